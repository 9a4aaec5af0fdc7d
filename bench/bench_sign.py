"""Signature throughput, side by side on ONE SoftHSM key in one process.

Measures (signatures per second, sequential, each signature one HSM round trip):
  raw_pkcs11_per_s           KeyHandle.sign_digest alone (the ceiling)
  cades_signdoc_per_s        CAdES-B-B with the gateway's template builder
  pyhanko_cms_per_s          pyHanko's generic CMS (async_sign_general_data), same key
  xades_eprescription_per_s  the e-prescription XAdES-B-B (CSV -> signed XML), gateway builder
  signxml_xades_per_s        signxml's XAdESSigner in-process on the same key (HSM-backed
                             object with cryptography's private-key sign()/public_key())
and the ratios the issue sets targets for. ``run(ctx)`` is what ``bench/run.py`` calls;
``python bench/bench_sign.py`` prints the JSON. Numbers depend on the machine's load: other
engineers' test runs share these 2 cores.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402

from gateway.hsm.api import DigestAlgorithm, StoreKeyHandle  # noqa: E402
from gateway.hsm.pkcs11 import Pkcs11KeyStore, _pkcs11_executor  # noqa: E402

CSV = "1,医療機関コード,1310000011\r\n2,処方,ロキソニン錠60mg,3錠,分3毎食後\r\n".encode()
DURATION = float(os.environ.get("BENCH_SECONDS", "2.0"))


async def _rate(fn: Callable[[], Awaitable[Any]], seconds: float = DURATION) -> float:
    for _ in range(20):  # warm-up: caches, templates, first PKCS#11 lookups
        await fn()
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        await fn()
        n += 1
    return n / (time.perf_counter() - start)


def _sync_rate(fn: Callable[[], Any], seconds: float = DURATION) -> float:
    for _ in range(10):
        fn()
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


class HsmPrivateKey:
    """cryptography-style RSA private key whose sign() goes to the HSM (for signxml)."""

    def __init__(self, store: Pkcs11KeyStore, key: StoreKeyHandle, public: rsa.RSAPublicKey):
        self._store, self._key, self._public = store, key, public
        self.key_size = public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(self, data: bytes, padding: padding.AsymmetricPadding, algorithm: Any) -> bytes:
        import hashlib

        from gateway.hsm.pkcs11 import _digest_info

        digest = hashlib.new(algorithm.name, data).digest()
        info = _digest_info(digest, DigestAlgorithm.SHA256)
        op = functools.partial(self._store._sign_sync, self._key.key_id, [info])
        # The same single PKCS#11 thread the async path uses (one hop per signature).
        fut = _pkcs11_executor().submit(self._store._call_sync, op, True)
        result: list[bytes] = fut.result()
        return result[0]


async def _measure(store: Pkcs11KeyStore) -> dict[str, float]:
    from lxml import etree
    from pyhanko.sign.signers.pdf_cms import Signer  # noqa: F401 - pyHanko imported for timing

    from gateway.sandbox import testworld
    from gateway.sign.cades import template_for
    from gateway.sign.eprescription import RolePolicy, build_prescription, sign_eprescription
    from gateway.sign.pades import KeyHandlePdfSigner
    from gateway.sign.xades import EXC_C14N, XadesBuilder

    gen = await store.generate_rsa_key(label="bench-sign")
    key = await store.get_key(gen.key_id)
    assert isinstance(key, StoreKeyHandle)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    root = testworld.make_hpki_root(now=now)
    ca = testworld.make_hpki_signing_ca(root, now=now)
    cert = testworld.issue_hpki_signer_cert(
        ca,
        public_key_der=gen.public_key_der,
        name_romaji="Bench Doctor",
        name_kanji="試験",
        role="Medical Doctor",
        organization="BENCH",
        serial_number_attr="BENCH1",
        now=now,
    )
    chain = [ca.cert, root.cert]
    digest = b"\x5a" * 32
    content = b"x" * 2048

    out: dict[str, float] = {}
    out["raw_pkcs11_per_s"] = await _rate(lambda: key.sign_digest(digest, DigestAlgorithm.SHA256))

    tpl = template_for(cert, chain)

    async def cades() -> bytes:
        return await tpl.sign(
            key, content=content, attached=True, signing_time=dt.datetime.now(dt.UTC)
        )

    out["cades_signdoc_per_s"] = await _rate(cades)

    ph = KeyHandlePdfSigner(key=key, certificate=cert, chain=chain)

    async def pyhanko_cms() -> Any:
        return await ph.async_sign_general_data(content, "sha256", detached=False)

    out["pyhanko_cms_per_s"] = await _rate(pyhanko_cms)

    roles = RolePolicy({"prescription": ["Medical Doctor"]})
    xb = XadesBuilder(certificate=cert, chain=chain)

    async def xades() -> bytes:
        return await sign_eprescription(
            key=key,
            certificate=cert,
            chain=chain,
            document=CSV,
            roles=roles,
            signing_time=dt.datetime.now(dt.UTC),
            builder=xb,
        )

    out["xades_eprescription_per_s"] = await _rate(xades)

    from signxml import methods
    from signxml.xades import XAdESSigner

    public = serialization.load_der_public_key(gen.public_key_der)
    assert isinstance(public, rsa.RSAPublicKey)
    hsm_key = HsmPrivateKey(store, key, public)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    def signxml_xades() -> Any:
        doc = build_prescription(CSV).getroot()
        signer = XAdESSigner(
            method=methods.enveloped,
            signature_algorithm="rsa-sha256",
            digest_algorithm="sha256",
            c14n_algorithm=EXC_C14N,
        )
        return signer.sign(doc, key=hsm_key, cert=[cert_pem])

    etree.tostring(signxml_xades())  # fails loudly here if signxml cannot use the key
    out["signxml_xades_per_s"] = await asyncio.get_running_loop().run_in_executor(
        None, _sync_rate, signxml_xades
    )

    out["cades_vs_pyhanko_ratio"] = out["cades_signdoc_per_s"] / out["pyhanko_cms_per_s"]
    out["cades_vs_raw_ratio"] = out["cades_signdoc_per_s"] / out["raw_pkcs11_per_s"]
    out["xades_vs_signxml_ratio"] = out["xades_eprescription_per_s"] / out["signxml_xades_per_s"]
    return {k: round(v, 3) for k, v in out.items()}


def run(ctx: Any = None) -> dict[str, float]:
    """Bench entry point. ``ctx`` may carry ``softhsm_conf``/``token_label``/``pin``/``module``
    of an existing token (the integrator's run.py); without it a temporary token is made."""
    from tests.support.softhsm import SOFTHSM_MODULE, make_token

    ctx = ctx if isinstance(ctx, dict) else {}
    tmp = None
    if "softhsm_conf" in ctx:
        conf, label, pin = Path(ctx["softhsm_conf"]), ctx["token_label"], ctx["pin"]
        module = ctx.get("module", SOFTHSM_MODULE)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-sign-")
        token = make_token(Path(tmp.name), "bench-sign")
        conf, label, pin, module = token.conf, token.label, token.pin, SOFTHSM_MODULE
    store = Pkcs11KeyStore(module_path=module, token_label=label, pin=pin, softhsm_conf=conf)

    async def main() -> dict[str, float]:
        await store.open()
        try:
            return await _measure(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
