"""Certificates for TLS tests, made in Python with ``trustme`` (no openssl command needed).

``TLSFiles.make(folder)`` writes a CA, a server certificate for ``localhost`` and ``127.0.0.1``
signed by it, and a client certificate signed by it (for servers that ask clients for one:
``tls-auth-clients yes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

__all__ = ["TLSFiles"]


@dataclass(frozen=True)
class TLSFiles:
    """A CA, a server certificate and a client certificate, as PEM files."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, folder: Path) -> TLSFiles:
        ca = trustme.CA()
        server = ca.issue_cert("localhost", "127.0.0.1")
        client = ca.issue_cert("rediskit-test-client")
        files = cls(folder / "ca.pem", folder / "cert.pem", folder / "key.pem",
                    folder / "client-cert.pem", folder / "client-key.pem")
        ca.cert_pem.write_to_path(str(files.ca))
        server.cert_chain_pems[0].write_to_path(str(files.cert))
        server.private_key_pem.write_to_path(str(files.key))
        client.cert_chain_pems[0].write_to_path(str(files.client_cert))
        client.private_key_pem.write_to_path(str(files.client_key))
        return files

    def server_args(self, *, auth_clients: bool = False) -> tuple[str, ...]:
        """``redis-server`` arguments serving these certificates (``auth_clients``: ask
        every client for a certificate signed by the CA)."""
        return ("--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
                "--tls-ca-cert-file", str(self.ca),
                "--tls-auth-clients", "yes" if auth_clients else "no")

    def client_options(self, *, with_cert: bool = False) -> dict[str, Any]:
        """redis-py options of a client that checks the server's certificate against the CA
        (``with_cert``: and shows its own)."""
        options: dict[str, Any] = {"ssl_ca_certs": str(self.ca), "ssl_cert_reqs": "required"}
        if with_cert:
            options.update(ssl_certfile=str(self.client_cert), ssl_keyfile=str(self.client_key))
        return options
