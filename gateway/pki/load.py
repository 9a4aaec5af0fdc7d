"""Reading certificates: from settings files (PEM bundles or DER) and from operator input."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from gateway.errors import ConfigError, PkiError

__all__ = ["load_certificate_files", "parse_certificate", "parse_pem_chain"]


def parse_certificate(data: bytes) -> x509.Certificate:
    """One certificate in PEM or DER; :class:`PkiError` when it is neither."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise PkiError(f"not an X.509 certificate: {e}") from e


def parse_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; :class:`PkiError` when there is none."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise PkiError(f"not a PEM certificate bundle: {e}") from e


def load_certificate_files(paths: Sequence[Path]) -> list[x509.Certificate]:
    """The certificates of configured files (PEM bundles or one DER each), in order.

    A file that cannot be read or parsed is a :class:`ConfigError` naming it: these paths come
    from the settings or the command line, never from a client.
    """
    out: list[x509.Certificate] = []
    for path in paths:
        try:
            data = path.read_bytes()
            if data.lstrip().startswith(b"-----BEGIN"):
                out.extend(x509.load_pem_x509_certificates(data))
            else:
                out.append(x509.load_der_x509_certificate(data))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load certificates from {path}: {e}") from e
    return out
