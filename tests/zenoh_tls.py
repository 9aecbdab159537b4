"""Certificates and zenoh configurations for the security tests and the TLS benchmarks: a CA, the
daemon's, the bridge's and a reader's certificates signed by it, an intruder's signed by it under
another name, and a stranger's from another CA, all made here with openssl. The zenoh files are
the repo's examples (config/zenoh/*.json5) with their certificate folder pointed here, so the
examples themselves are what the tests run."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import zenoh

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "config" / "zenoh"
EXAMPLE_DIR = "/etc/liveomics/tls/"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=d)


def _leaf(d: Path, name: str, cn: str, ca: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=d)


@dataclass
class Pki:
    dir: Path

    def example(self, name: str, out: Path) -> Path:
        """The repo's example zenoh file `name` with its certificates taken from here."""
        text = (EXAMPLES / name).read_text().replace(EXAMPLE_DIR, f"{self.dir}/")
        out.write_text(text)
        return out

    def client(self, who: str, connect: list[str], ca: str = "ca", listen: list[str] | None = None) -> zenoh.Config:
        """A plain zenoh session (no access control of its own) holding `who`'s certificate."""
        c = zenoh.Config()
        c.insert_json5("mode", '"peer"')
        c.insert_json5("connect/endpoints", json.dumps(connect))
        c.insert_json5("listen/endpoints", json.dumps(listen or []))
        c.insert_json5("scouting/multicast/enabled", "false")
        tls = {"root_ca_certificate": str(self.dir / f"{ca}.pem"),
               "connect_certificate": str(self.dir / f"{who}.pem"),
               "connect_private_key": str(self.dir / f"{who}.key"),
               "listen_certificate": str(self.dir / f"{who}.pem"),
               "listen_private_key": str(self.dir / f"{who}.key"),
               "enable_mtls": True}
        c.insert_json5("transport/link/tls", json.dumps(tls))
        return c


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "otherca")
    _leaf(d, "daemon", "liveomics-daemon", "ca")
    _leaf(d, "bridge", "liveomics-bridge", "ca")
    _leaf(d, "reader", "liveomics-reader", "ca")
    _leaf(d, "intruder", "intruder", "ca")
    _leaf(d, "stranger", "liveomics-bridge", "otherca")
    return Pki(d)
