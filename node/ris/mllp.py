"""MLLP client: one HL7 message per connection, framed 0x0B ... 0x1C 0x0D, and its ACK checked.

MSA-1 AA/CA is success. AE/CE mean the RIS found the message itself at fault: resending the same bytes
cannot help, so those are not retryable. AR/CR mean it refused for its own reasons (busy, down, queue
full): retryable. A connection that fails, or an ACK that does not come in time, is retryable.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from dataclasses import dataclass

from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_segment

from .errors import RisSendError

START, END = b"\x0b", b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20
_ESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\", ".br": " "}


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2: the MSH-10 of the message it acknowledges
    text: str  # MSA-3 (or ERR-8 when MSA-3 is empty)

    def summary(self) -> str:
        return f"{self.code} {self.control_id}" + (f": {self.text}" if self.text else "")


def frame(message: str) -> bytes:
    return START + message.encode("utf-8") + END


def _unescape(text: str) -> str:
    """HL7 escape sequences back to text, for showing MSA-3 to an operator."""
    return re.sub(r"\\(F|S|T|R|E|\.br)\\", lambda m: _ESCAPES[m.group(1)], text)


def _field_text(segment: object, *names: str) -> str:
    for name in names:
        try:
            element = segment
            for part in name.split("."):
                element = getattr(element, part)
            value = element.to_er7()  # type: ignore[attr-defined]
        except (HL7apyException, AttributeError, IndexError):
            continue
        if value:
            return value
    return ""


def parse_ack(raw: bytes, where: str) -> Ack:
    """MSA (and ERR) of an ACK. Only these segments are parsed, with the v2.5 definitions, so an ACK in any
    HL7 v2 version, or one whose MSH-12 is empty, is understood."""
    text = raw.decode("utf-8", errors="replace").strip("\x0b\x1c\r\n")
    segments = [seg for seg in re.split(r"\r\n|\r|\n", text) if seg]
    head = segments[0] if segments else ""
    msa = None
    if head.startswith("MSH") and len(head) >= 8:
        sep, enc = head[3], head[4:8]
        chars = {"FIELD": sep, "COMPONENT": enc[0], "REPETITION": enc[1], "ESCAPE": enc[2], "SUBCOMPONENT": enc[3],
                 "GROUP": "\r", "SEGMENT": "\r"}
        msa = next((seg for seg in segments if seg.startswith("MSA" + sep)), None)
    if msa is None:
        raise RisSendError(f"{where} answered something that is not an HL7 ACK (no MSH and MSA segment); "
                           f"first bytes: {text[:80]!r}", retryable=True)
    try:
        msa_seg = parse_segment(msa, version="2.5", encoding_chars=chars)
        err = next((seg for seg in segments if seg.startswith("ERR" + sep)), None)
        err_seg = parse_segment(err, version="2.5", encoding_chars=chars) if err else None
    except HL7apyException as exc:
        raise RisSendError(f"{where} answered an ACK whose MSA or ERR segment cannot be parsed ({exc}): "
                           f"{msa[:80]!r}", retryable=True) from exc
    code = _field_text(msa_seg, "msa_1").strip().upper()
    control = _field_text(msa_seg, "msa_2").strip()
    detail = _field_text(msa_seg, "msa_3")
    if not detail and err_seg is not None:
        detail = _field_text(err_seg, "err_8", "err_7", "err_3.cwe_2", "err_3.cwe_1", "err_1")
    return Ack(code, control, _unescape(detail).strip())


def _exchange(host: str, port: int, payload: bytes, timeout_s: float, ssl_context: ssl.SSLContext | None) -> bytes:
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError as exc:
        raise RisSendError(f"RIS {where} refused the connection: check that its HL7 listener runs and that "
                           f"host and port are right", retryable=True) from exc
    except (socket.timeout, TimeoutError) as exc:
        raise RisSendError(f"RIS {where}: no TCP connection within {timeout_s:g} s: check host, port and "
                           f"firewalls between the node and the RIS", retryable=True) from exc
    except OSError as exc:
        raise RisSendError(f"RIS {where}: cannot connect ({exc}): check host name, network and port",
                           retryable=True) from exc
    try:
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                raise RisSendError(f"RIS {where}: its TLS certificate does not verify ({exc.verify_message}): "
                                   f"check tls.ca_file and that the certificate names {host}",
                                   retryable=False) from exc
            except (ssl.SSLError, OSError) as exc:
                raise RisSendError(f"RIS {where}: TLS handshake failed ({exc}): check that the port speaks "
                                   f"TLS and, if it checks clients, tls.cert_file/key_file", retryable=True) from exc
        deadline = time.monotonic() + timeout_s
        try:
            sock.settimeout(timeout_s)
            sock.sendall(payload)
            buf = b""
            while END not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout()
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise RisSendError(f"RIS {where} closed the connection before sending an ACK: the message "
                                       f"may or may not have been taken; check the RIS interface log",
                                       retryable=True)
                buf += chunk
                if len(buf) > MAX_ACK_BYTES:
                    raise RisSendError(f"RIS {where} sent over {MAX_ACK_BYTES} bytes without an MLLP end block "
                                       f"(0x1C 0x0D): is this port an MLLP listener?", retryable=True)
        except (socket.timeout, TimeoutError) as exc:
            raise RisSendError(f"RIS {where}: no ACK within {timeout_s:g} s after sending: check that the RIS "
                               f"interface engine is running and processing its queue", retryable=True) from exc
        except ssl.SSLError as exc:
            raise RisSendError(f"RIS {where}: TLS error while exchanging the message ({exc}): if the RIS "
                               f"checks client certificates, check tls.cert_file/key_file", retryable=True) from exc
        except OSError as exc:
            raise RisSendError(f"RIS {where}: connection lost while waiting for the ACK ({exc})",
                               retryable=True) from exc
    finally:
        sock.close()
    start = buf.find(START)
    return buf[start + 1 if start >= 0 else 0:buf.index(END)]


def send_message(host: str, port: int, message: str, *, control_id: str, timeout_s: float,
                 ssl_context: ssl.SSLContext | None = None) -> Ack:
    """Send one HL7 message (ER7 text, segments ending in \\r) and return its ACK if it says accepted."""
    where = f"{host}:{port}"
    ack = parse_ack(_exchange(host, port, frame(message), timeout_s, ssl_context), where)
    said = f" ({ack.text})" if ack.text else ""
    if ack.control_id != control_id:
        raise RisSendError(f"RIS {where} acknowledged control id {ack.control_id!r}, not the {control_id!r} just "
                           f"sent: an ACK of another message; resending", retryable=True)
    if ack.code in {"AA", "CA"}:
        return ack
    if ack.code in {"AE", "CE"}:
        raise RisSendError(f"RIS {where} rejected message {control_id} as erroneous (MSA-1 {ack.code}){said}: "
                           f"resending will not help; check the message against the RIS's interface "
                           f"specification", retryable=False)
    if ack.code in {"AR", "CR"}:
        raise RisSendError(f"RIS {where} refused message {control_id} (MSA-1 {ack.code}){said}: the RIS is "
                           f"busy or unable to process now; will retry", retryable=True)
    raise RisSendError(f"RIS {where} answered MSA-1 {ack.code!r} to message {control_id}{said}, which is no "
                       f"acknowledgement code (AA/AE/AR/CA/CE/CR)", retryable=True)
