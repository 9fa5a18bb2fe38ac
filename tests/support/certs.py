"""A throw-away PKI for the TLS tests, made with the openssl CLI (cryptography is not a dependency).

    pki = make_pki(tmp_path / "pki")
    pki.server.cert, pki.server.key   # CN=ainode-test-server, SAN IP:127.0.0.1 and DNS:localhost
    pki.client                        # signed by pki.ca: trusted
    pki.untrusted                     # signed by another CA: refused

Keys are ECDSA P-256 (in DCMTK's BCP 195 profiles, and much faster to make than RSA), unencrypted.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")  # fast to make, unlike RSA


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path
    subject: str  # "CN=…" as the node reports it


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate every trusted side loads
    server: Pair
    client: Pair
    untrusted: Pair
    other_ca: Path  # signed `untrusted`


def _openssl(*args: str) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {r.stderr.strip()}")


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", *_KEY, "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", f"/O=ainode tests/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(folder: Path, name: str, cn: str, ca: tuple[Path, Path]) -> Pair:
    cert, key, csr, ext = (folder / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
    _openssl("req", "-new", *_KEY, "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/O=ainode tests/CN={cn}")
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert))
    csr.unlink()
    ext.unlink()
    return Pair(cert, key, f"O=ainode tests,CN={cn}")


def make_pki(folder: Path) -> Pki:
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl not found: apt-get install openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    other = _ca(folder, "other-ca")
    return Pki(ca=ca[0], server=_leaf(folder, "server", "ainode-test-server", ca),
               client=_leaf(folder, "client", "test-modality", ca),
               untrusted=_leaf(folder, "untrusted", "intruder", other), other_ca=other[0])
