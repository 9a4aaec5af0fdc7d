"""hpki-gateway: a remote signing gateway for Japan's healthcare PKI (HPKI)."""

__version__ = "0.1.0"
