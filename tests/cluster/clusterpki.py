"""Throwaway certificates and keys for the loopback test control plane.

A real kube-apiserver only serves TLS and authenticates clients by certificate or
token, so the test cluster needs its own CA, a serving certificate, an admin client
certificate (group ``system:masters``) and a service-account signing key pair. They
are made with the ``openssl`` command line, per cluster, and die with its state dir.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

# P-256 keys: generated in milliseconds, which keeps a warm cluster start short.
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
SERVING_NAMES = (
    "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local", "IP:127.0.0.1", "IP:10.0.0.1",
)


@dataclass(frozen=True)
class Pki:
    """Paths of the files one cluster's components and clients need."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def admin_cert(self) -> Path:
        return self.dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.dir / "admin.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def _signed_cert(pki: Pki, name: str, subject: str, extensions: list[str]) -> None:
    """A key and a certificate for ``name`` signed by the cluster CA."""
    ext_file = pki.dir / f"{name}.ext"
    ext_file.write_text("\n".join(extensions) + "\n")
    _openssl("req", "-new", *EC_KEY, "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=pki.dir)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", str(secrets.randbelow(10**12) + 2), "-days", "30",
             "-out", f"{name}.crt", "-extfile", ext_file.name, cwd=pki.dir)


def write_pki(directory: Path) -> Pki:
    """Create CA, serving, admin-client and service-account keys under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    _openssl("req", "-x509", *EC_KEY, "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "30", "-subj", "/CN=kubetune-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=directory)
    _signed_cert(pki, "apiserver", "/CN=kube-apiserver", [
        "basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature",
        "extendedKeyUsage=serverAuth", f"subjectAltName={','.join(SERVING_NAMES)}",
    ])
    _signed_cert(pki, "admin", "/O=system:masters/CN=kubetune-admin", [
        "basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature",
        "extendedKeyUsage=clientAuth",
    ])
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key",
             cwd=directory)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)
    return pki
