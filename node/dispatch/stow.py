"""DICOMweb STOW-RS: result files to a PACS by HTTP POST, the alternative to C-STORE (node/dispatch/cstore.py).

`send_stow(dest, files)` has the contract of `send_files`: {sop_instance_uid: None when stored, else the
error}, and `SendError` (here the subclass `StowError`) when a whole request failed and nothing was stored.
Each batch (at most `dest.max_batch_mb` of file data) is one `multipart/related; type="application/dicom"`
POST to {url}/studies, streamed from disk with a Content-Length. The answer (DICOM JSON, or XML where the
server insists) is read per instance: ReferencedSOPSequence (0008,1199) stored, FailedSOPSequence (0008,1198)
refused with its FailureReason (0008,1197).

Retrying is the dispatcher's job (it persists the attempt count). Both error kinds say whether a retry may
help: `StowError.retryable`, and each per-instance error is a `StowFailure`, a `str` with `.retryable`.
Credentials never appear in messages or logs; the URL in them is the configured one, which holds none.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from node.dispatch.cstore import Outgoing, SendError
from node.config.dicomweb import DicomWebDestination

log = logging.getLogger("ainode.dispatch.stow")

CHUNK = 256 * 1024
MAX_ANSWER = 16 * 1024 * 1024  # a STOW-RS answer is ~1 kB per instance
RETRYABLE_HTTP = {408, 425, 429}
REFERENCED_SOP_SEQ, FAILED_SOP_SEQ = "00081199", "00081198"
SOP_INSTANCE_UID, FAILURE_REASON, WARNING_REASON = "00081155", "00081197", "00081196"
JSON_TYPE, XML_TYPE = "application/dicom+json", "application/dicom+xml"


class StowError(SendError):
    """A whole STOW-RS request failed: nothing in it was stored.

    `retryable`: True where the same request may succeed later unchanged (PACS down, busy, slow, 5xx, 429)
    and False where it will not until someone changes the config or the PACS (404, 401/403, TLS verification,
    a missing secret, 413): the dispatcher can then dead-letter at once. `status` is the HTTP status, or None
    when no HTTP answer came.
    """

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class StowFailure(str):
    """One instance's error: a plain `str` for the store and the audit, plus whether a retry may help."""

    retryable: bool

    def __new__(cls, text: str, retryable: bool) -> "StowFailure":
        obj = super().__new__(cls, text)
        obj.retryable = retryable
        return obj


# FailureReason (0008,1197) values, PS3.18 table 10.5.3-2 / PS3.4 annex B; ranges by their first digits.
def describe_failure(code: int | None) -> tuple[str, bool]:
    """(meaning, retryable) of a FailureReason."""
    if code is None:
        return "no FailureReason given", True
    if 0xA700 <= code <= 0xA7FF:
        return "refused: out of resources", True
    if code == 0x0110:
        return "processing failure", True
    if 0xA900 <= code <= 0xA9FF:
        return "data set does not match its SOP class", False
    if 0xC000 <= code <= 0xCFFF:
        return ("transfer syntax not supported" if code == 0xC122 else "cannot understand"), False
    known = {0x0111: "duplicate SOP instance (the PACS keeps the one it has)", 0x0122: "SOP class not supported",
             0x0124: "not authorized", 0x0211: "unrecognized operation", 0x0212: "mistyped argument"}
    return known.get(code, "failed"), False


# ---- the answer ------------------------------------------------------------------------------------------

@dataclass
class StowAnswer:
    """What a STOW-RS answer says per instance."""

    stored: dict[str, int | None] = field(default_factory=dict)  # uid -> WarningReason, if any
    failed: dict[str, int | None] = field(default_factory=dict)  # uid -> FailureReason, if given


def _int(value: object) -> int | None:
    """A FailureReason / WarningReason: a number in DICOM JSON, decimal text in XML (hex text tolerated)."""
    if isinstance(value, int):
        return value
    text = str(value).strip() if value is not None else ""
    for base in (10, 16):
        try:
            return int(text, base)
        except ValueError:
            continue
    return None


def _json_answer(data: object) -> StowAnswer | None:
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        return None
    data = {str(k).upper(): v for k, v in data.items()}
    if REFERENCED_SOP_SEQ not in data and FAILED_SOP_SEQ not in data:
        return None

    def items(tag: str) -> list[dict]:
        element = data.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        return [{str(k).upper(): v for k, v in i.items()} for i in values or [] if isinstance(i, dict)]

    def first(item: dict, tag: str) -> object:
        element = item.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        return values[0] if isinstance(values, list) and values else None

    answer = StowAnswer()
    for item in items(REFERENCED_SOP_SEQ):
        if uid := first(item, SOP_INSTANCE_UID):
            answer.stored[str(uid)] = _int(first(item, WARNING_REASON))
    for item in items(FAILED_SOP_SEQ):
        if uid := first(item, SOP_INSTANCE_UID):
            answer.failed[str(uid)] = _int(first(item, FAILURE_REASON))
    return answer


def _xml_answer(body: bytes) -> StowAnswer | None:
    """PS3.19 Native DICOM Model: <NativeDicomModel><DicomAttribute tag=".." vr="SQ"><Item><DicomAttribute..."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    local = lambda el: el.tag.rsplit("}", 1)[-1]  # noqa: E731 - ignore the namespace
    if local(root) != "NativeDicomModel":
        return None
    top = {(a.get("tag") or "").upper(): a for a in root if local(a) == "DicomAttribute"}
    if REFERENCED_SOP_SEQ not in top and FAILED_SOP_SEQ not in top:
        return None

    def first(item: ET.Element, tag: str) -> str | None:
        for a in item:
            if local(a) == "DicomAttribute" and (a.get("tag") or "").upper() == tag:
                for v in a:
                    if local(v) == "Value" and v.text:
                        return v.text.strip()
        return None

    answer = StowAnswer()
    for tag, target, reason_tag in ((REFERENCED_SOP_SEQ, answer.stored, WARNING_REASON),
                                    (FAILED_SOP_SEQ, answer.failed, FAILURE_REASON)):
        seq = top.get(tag)
        for item in (i for i in (seq if seq is not None else []) if local(i) == "Item"):
            if uid := first(item, SOP_INSTANCE_UID):
                target[uid] = _int(first(item, reason_tag))
    return answer


def parse_answer(body: bytes) -> StowAnswer | None:
    """The per-instance content of a STOW-RS answer (DICOM JSON or XML), or None if it is not one."""
    text = body.lstrip()
    if text[:1] in (b"{", b"["):
        try:
            return _json_answer(json.loads(text))
        except ValueError:
            return None
    if text[:1] == b"<":
        return _xml_answer(text)
    return None


def _snippet(body: bytes) -> str:
    """What the server said, in one short line (an Orthanc error's Message, or the start of the text)."""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            for key in ("Message", "message", "error_description", "error", "OrthancError", "detail"):
                if isinstance(data.get(key), str) and data[key]:
                    return data[key][:200]
    except ValueError:
        pass
    return " ".join(body[:300].decode("utf-8", errors="replace").split())[:200]


# ---- the request -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Part:
    uid: str
    path: Path
    size: int


class _FileChanged(Exception):
    pass


def _secret(dest: DicomWebDestination, what: str, env: str | None, path: Path | None) -> str | None:
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise StowError(f"DICOMweb {dest.url}: {what}_env {env} is not set in the node's environment",
                            retryable=False)
        return value
    if path is not None:
        try:
            value = path.read_text(encoding="utf-8").strip("\r\n")
        except OSError as exc:
            raise StowError(f"DICOMweb {dest.url}: {what}_file {path} cannot be read ({exc.strerror})",
                            retryable=False) from None
        if not value:
            raise StowError(f"DICOMweb {dest.url}: {what}_file {path} is empty", retryable=False)
        return value
    return None


def _authorization(dest: DicomWebDestination) -> str | None:
    if dest.username is not None:
        password = _secret(dest, "password", dest.password_env, dest.password_file) or ""
        return "Basic " + base64.b64encode(f"{dest.username}:{password}".encode("utf-8")).decode("ascii")
    token = _secret(dest, "token", dest.token_env, dest.token_file)
    return f"Bearer {token.strip()}" if token else None


def _ssl_context(dest: DicomWebDestination) -> ssl.SSLContext | None:
    if not dest.url.startswith("https://"):
        return None
    try:
        return ssl.create_default_context(cafile=str(dest.ca_file) if dest.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise StowError(f"DICOMweb {dest.url}: CA file {dest.ca_file} cannot be loaded ({exc}): check ca_file",
                        retryable=False) from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib turns a redirected POST into a GET without the files; report the 3xx instead."""

    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def _prepare(f: Outgoing) -> _Part:
    """The file's size, having checked it is a DICOM Part 10 file (what application/dicom carries)."""
    with open(f.path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    return _Part(f.sop_instance_uid, Path(f.path), size)


def _batches(parts: list[_Part], max_bytes: int) -> list[list[_Part]]:
    out: list[list[_Part]] = []
    size = 0
    for p in parts:
        if out and size + p.size <= max_bytes:
            out[-1].append(p)
            size += p.size
        else:
            out.append([p])
            size = p.size
    return out


def _part_head(boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")


def _body(parts: list[_Part], boundary: str) -> Iterator[bytes]:
    head = _part_head(boundary)
    for p in parts:
        yield head
        with open(p.path, "rb") as fh:
            left = p.size
            while left > 0:
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    raise _FileChanged(f"{p.path} shrank while being sent")
                left -= len(chunk)
                yield chunk
            if fh.read(1):
                raise _FileChanged(f"{p.path} grew while being sent")
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def _content_length(parts: list[_Part], boundary: str) -> int:
    return sum(len(_part_head(boundary)) + p.size + 2 for p in parts) + len(f"--{boundary}--\r\n")


def _network_error(dest: DicomWebDestination, exc: BaseException) -> StowError:
    url = dest.stow_url
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc  # a read timeout comes unwrapped
    if isinstance(reason, ssl.SSLCertVerificationError):
        return StowError(f"STOW-RS {url}: the server's TLS certificate does not verify ({reason.verify_message}): "
                         f"check ca_file and the host name in url", retryable=False)
    if isinstance(reason, ssl.SSLError):
        return StowError(f"STOW-RS {url}: TLS failed ({getattr(reason, 'reason', None) or reason}): check that "
                         f"the server speaks https on that port", retryable=False)
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return StowError(f"STOW-RS {url}: no answer within {dest.timeout_s:g} s (timeout_s); the PACS may be busy",
                         retryable=True)
    if isinstance(reason, socket.gaierror):
        return StowError(f"STOW-RS {url}: host name not resolved ({reason.strerror}): check url", retryable=True)
    if isinstance(reason, ConnectionRefusedError):
        return StowError(f"STOW-RS {url}: connection refused: check the host and port in url and that the "
                         f"PACS's DICOMweb service runs", retryable=True)
    if isinstance(reason, (ConnectionResetError, BrokenPipeError, http.client.HTTPException)):
        return StowError(f"STOW-RS {url}: the connection was closed before an answer "
                         f"({type(reason).__name__}); a proxy or the PACS may limit the request size "
                         f"(max_batch_mb) or time", retryable=True)
    text = getattr(reason, "strerror", None) or str(reason)
    return StowError(f"STOW-RS {url}: cannot connect ({text}): check url, network and that the PACS runs",
                     retryable=True)


def _http_error(dest: DicomWebDestination, status: int, body: bytes, location: str | None,
                n_files: int) -> StowError:
    url = dest.stow_url
    said = _snippet(body)
    said = f" ({said})" if said else ""
    if 300 <= status < 400:
        return StowError(f"STOW-RS {url} answered HTTP {status}, a redirect to {location or '?'}: set url to the "
                         f"DICOMweb base there", retryable=False, status=status)
    hints = {
        400: "the PACS could not read the request and stored none of it",
        401: ("the PACS wants credentials: check username and password_env/password_file, or token_env/token_file"
              if dest.username or dest.token_env or dest.token_file else
              "the PACS wants credentials: set username with password_env/password_file, or token_env/token_file"),
        403: "the credentials may not store here: check the PACS account's rights",
        404: "no STOW-RS service at this URL: check url (the DICOMweb base, e.g. http://pacs:8042/dicom-web; "
             "the node adds /studies)",
        405: "this URL does not take POST: check url (the DICOMweb base; the node adds /studies)",
        406: "the PACS answers neither application/dicom+json nor application/dicom+xml",
        409: "the PACS refused to store any of it (conflict)",
        411: "the PACS wants a Content-Length (a proxy may have removed it)",
        413: f"request too large for the PACS: lower max_batch_mb (now {dest.max_batch_mb:g})",
        415: "the PACS does not take multipart/related; type=\"application/dicom\"",
    }
    retryable = status >= 500 or status in RETRYABLE_HTTP
    hint = hints.get(status) or ("the PACS is failing or busy; will retry" if retryable else "refused")
    return StowError(f"STOW-RS {url} answered HTTP {status} for {n_files} file(s): {hint}{said}",
                     retryable=retryable, status=status)


def _post(dest: DicomWebDestination, parts: list[_Part], authorization: str | None,
          context: ssl.SSLContext | None, accept: str) -> tuple[int, bytes, str | None]:
    """One POST; (status, answer body, Location). Network failures as StowError."""
    boundary = f"ainode-{uuid.uuid4().hex}"
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(_content_length(parts, boundary)),
        "Accept": accept,
        "User-Agent": "ainode-stow",
    }
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(dest.stow_url, data=_body(parts, boundary), headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=dest.timeout_s) as response:
            return response.status, response.read(MAX_ANSWER), response.headers.get("Location")
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(MAX_ANSWER)
        except (OSError, http.client.HTTPException):
            body = b""
        return exc.code, body, exc.headers.get("Location") if exc.headers else None
    except _FileChanged as exc:
        raise StowError(f"STOW-RS {dest.stow_url}: {exc}; nothing counted as sent", retryable=True) from None
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
        raise _network_error(dest, exc) from None


def _send_batch(dest: DicomWebDestination, parts: list[_Part], authorization: str | None,
                context: ssl.SSLContext | None) -> dict[str, str | None]:
    t = time.perf_counter()
    status, body, location = _post(dest, parts, authorization, context, JSON_TYPE)
    if status == 406:  # a server that only writes XML
        status, body, location = _post(dest, parts, authorization, context, XML_TYPE)
    answer = parse_answer(body)
    mentioned = answer is not None and any(p.uid in answer.stored or p.uid in answer.failed for p in parts)
    if status not in (200, 202) and not mentioned:
        raise _http_error(dest, status, body, location, len(parts))
    results: dict[str, str | None] = {}
    for p in parts:
        if answer is not None and p.uid in answer.failed:
            code = answer.failed[p.uid]
            meaning, retryable = describe_failure(code)
            reason = f"FailureReason 0x{code:04X}, {meaning}" if code is not None else meaning
            results[p.uid] = StowFailure(f"STOW-RS {dest.stow_url} refused it (HTTP {status}): {reason}", retryable)
        elif answer is not None and p.uid in answer.stored:
            results[p.uid] = None
            if answer.stored[p.uid] is not None:
                log.info("STOW-RS %s stored %s with WarningReason 0x%04X", dest.stow_url, p.uid, answer.stored[p.uid])
        elif status == 200:
            results[p.uid] = None  # 200: all stored (PS3.18 10.5.3), listed or not
        else:
            retryable = status == 202 or status >= 500 or status in RETRYABLE_HTTP
            why = "is it valid DICOM?" if status == 400 else "a later attempt will re-send it"
            results[p.uid] = StowFailure(f"STOW-RS {dest.stow_url} answered HTTP {status} and did not list this "
                                         f"instance as stored ({why})", retryable)
    failed = sum(1 for v in results.values() if v is not None)
    log.info("STOW-RS %s: HTTP %d, %d stored, %d failed, %.1f MB in %.2f s", dest.stow_url, status,
             len(parts) - failed, failed, sum(p.size for p in parts) / 1e6, time.perf_counter() - t)
    return results


def send_stow(dest: DicomWebDestination, files: Sequence[Outgoing]) -> dict[str, str | None]:
    """POST `files` to `dest` (one request per batch); {sop_instance_uid: None if stored, else the error}.

    Raises StowError (a SendError) when nothing could be stored because of the request as a whole: the PACS
    unreachable, 401/403/404, a missing secret, TLS. Per-instance errors are StowFailure strings.
    """
    results: dict[str, str | None] = {}
    parts: list[_Part] = []
    for f in files:
        try:
            parts.append(_prepare(f))
        except OSError as exc:
            results[f.sop_instance_uid] = StowFailure(f"cannot read {f.path}: {exc.strerror}", False)
        except ValueError as exc:
            results[f.sop_instance_uid] = StowFailure(f"{f.path}: {exc}", False)
    if not parts:
        return results
    authorization = _authorization(dest)  # raises before anything is sent
    context = _ssl_context(dest)
    batches = _batches(parts, int(dest.max_batch_mb * 1024 * 1024))
    answered = bool(results)
    for i, batch in enumerate(batches):
        try:
            results.update(_send_batch(dest, batch, authorization, context))
            answered = True
        except StowError as exc:
            if exc.status == 413 and i < len(batches) - 1:  # this batch only: the smaller ones after it may go
                results.update({p.uid: StowFailure(str(exc), exc.retryable) for p in batch})
                continue
            if not answered:
                raise  # nothing stored, nothing to say per instance: the whole request failed
            # The PACS, the URL or the credentials: the batches left would fail the same way.
            for rest in batches[i:]:
                results.update({p.uid: StowFailure(str(exc), exc.retryable) for p in rest})
            break
    return results
