"""What a key store checks and encodes before the token is involved (no PKCS#11 here).

Shared by the in-process store and the signing-process proxy, which validates on the worker
side so a bad digest never costs a round trip.
"""

from __future__ import annotations

from gateway.hsm.api import DigestAlgorithm

#: RFC 8017 §9.2 note 1: DER of DigestInfo up to (and including) the OCTET STRING header, with
#: NULL parameters. Fixed prefixes avoid an ASN.1 round trip per signature on the hot path; the
#: integration tests verify the result with ``cryptography``, which checks the encoding exactly.
DIGEST_INFO_PREFIX: dict[DigestAlgorithm, bytes] = {
    DigestAlgorithm.SHA256: bytes.fromhex("3031300d060960864801650304020105000420"),
    DigestAlgorithm.SHA384: bytes.fromhex("3041300d060960864801650304020205000430"),
    DigestAlgorithm.SHA512: bytes.fromhex("3051300d060960864801650304020305000440"),
}

RSA_KEY_SIZES = frozenset({2048, 3072, 4096})


def digest_info(digest: bytes, algorithm: DigestAlgorithm) -> bytes:
    """DigestInfo DER for ``CKM_RSA_PKCS``; ValueError for a digest of the wrong length."""
    if not isinstance(digest, bytes | bytearray):
        raise ValueError("digest must be bytes")
    if len(digest) != algorithm.digest_size:
        raise ValueError(
            f"digest length {len(digest)} bytes does not match {algorithm.name} "
            f"({algorithm.digest_size} bytes)"
        )
    return DIGEST_INFO_PREFIX[algorithm] + bytes(digest)


def check_key_request(label: str, bits: int) -> None:
    """ValueError unless ``label`` and ``bits`` describe a key the gateway generates."""
    if not label:
        raise ValueError("key label must not be empty")
    if bits not in RSA_KEY_SIZES:
        raise ValueError(f"unsupported RSA key size {bits}; valid: {sorted(RSA_KEY_SIZES)}")
