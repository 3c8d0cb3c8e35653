"""TLS from PEM text: the material of a session, and the SSLContext made from it."""

from __future__ import annotations

import os
import re
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def normalize_pem(text: str) -> str:
    """PEM blocks as OpenSSL reads them, whatever a JSON or TOML round trip did to them.

    Certificates pasted into a JSON field often lose their line breaks (one long line, or
    spaces instead of newlines); OpenSSL needs base64 lines. Text that has no PEM block is
    returned as it is, for OpenSSL to refuse with its own message.
    """
    blocks = []
    for label, body in _PEM_BLOCK.findall(text.replace("\\n", "\n")):
        if ":" in body:  # encrypted-key headers (Proc-Type, DEK-Info): keep the layout
            blocks.append(f"-----BEGIN {label}-----{body}-----END {label}-----\n")
            continue
        data = "".join(body.split())
        lines = "\n".join(data[i : i + 64] for i in range(0, len(data), 64))
        blocks.append(f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n")
    return "".join(blocks) if blocks else text


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """What a TLS session is made from. Secret: never logged (`repr=False` throughout)."""

    trusted_ca: str | None = field(default=None, repr=False)  # PEM; None: `default_roots`
    certificate: str | None = field(default=None, repr=False)  # PEM, with its chain
    private_key: str | None = field(default=None, repr=False)  # PEM
    default_roots: str | None = field(default=None, repr=False)  # None: the system store
    alpn: tuple[str, ...] = ()


def tls_context(material: TlsMaterial) -> ssl.SSLContext:
    """An SSLContext that verifies the broker and presents our certificate, if any.

    `load_cert_chain` reads files only, so the certificate and key are written to a private
    directory (0700, files 0600), loaded, and removed at once. Raises ssl.SSLError or
    ValueError on material OpenSSL cannot use.
    """
    roots = material.trusted_ca or material.default_roots
    context = ssl.create_default_context(cadata=normalize_pem(roots) if roots else None)
    context.sslsocket_class = _HandshakeClosingSocket
    if material.alpn:
        context.set_alpn_protocols(list(material.alpn))
    if (material.certificate is None) != (material.private_key is None):
        missing = "privateKey" if material.private_key is None else "certificate"
        raise ValueError(
            f"a client certificate needs both certificate and privateKey: no {missing}"
        )
    if material.certificate is not None and material.private_key is not None:
        with tempfile.TemporaryDirectory(prefix="iotflow-tls-") as directory:
            certfile = _write_private(Path(directory) / "certificate.pem", material.certificate)
            keyfile = _write_private(Path(directory) / "key.pem", material.private_key)
            context.load_cert_chain(certfile, keyfile)
    return context


class _HandshakeClosingSocket(ssl.SSLSocket):
    """An SSLSocket that closes itself when its handshake fails.

    paho wraps the TCP socket and runs the handshake, and when the handshake raises (a
    broker whose certificate we refuse) it lets go of the socket without closing it:
    one leaked descriptor per attempt, for as long as the connection keeps retrying.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # not a failure: a non-blocking handshake in progress
        except OSError:
            self.close()
            raise


def _write_private(path: Path, pem: str) -> Path:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii", errors="replace") as file:
        file.write(normalize_pem(pem))
    return path


def describe_tls_error(error: BaseException) -> str:
    # ssl's messages name the OpenSSL reason (`[SSL: KEY_VALUES_MISMATCH]`), never the
    # content of what it could not read.
    return f"{type(error).__name__}: {error}"
