"""/verify under hostile input: refused before the work, never on the event loop, time-limited.

The documents are built here (no signature in them verifies), posted over real mTLS to a real
gateway process; the timings are generous correctness bounds, not benchmarks.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.sign.xades import DS, XADES, c14n
from tests.support.gateway import Response, Server, request, serving

pytestmark = [pytest.mark.tls]

_REF = (
    '<ds:Reference URI="{uri}"><ds:Transforms><ds:Transform Algorithm="{transform}"/>'
    '</ds:Transforms><ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>'
    "<ds:DigestValue>{digest}</ds:DigestValue></ds:Reference>"
)
_SIG = (
    '<ds:Signature Id="s" xmlns:ds="{ds}"><ds:SignedInfo>'
    '<ds:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>'
    '<ds:SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/>'
    "{refs}</ds:SignedInfo><ds:SignatureValue>AAAA</ds:SignatureValue><ds:Object>"
    '<xa:QualifyingProperties xmlns:xa="{xa}"><xa:SignedProperties><xa:SignedSignatureProperties>'
    "<xa:SigningCertificateV2><xa:Cert><xa:CertDigest>"
    '<ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>'
    "<ds:DigestValue>AAAA</ds:DigestValue></xa:CertDigest></xa:Cert></xa:SigningCertificateV2>"
    "</xa:SignedSignatureProperties></xa:SignedProperties></xa:QualifyingProperties></ds:Object>"
    "</ds:Signature>"
)


def _signature(refs: str) -> str:
    return _SIG.format(ds=DS, xa=XADES, refs=refs)


def many_signatures_document(n: int = 3500, pad: int = 1_100_000) -> bytes:
    """The review's case: thousands of dummy signatures, each over the whole document."""
    ref = _REF.format(
        uri="", transform="http://www.w3.org/2000/09/xmldsig#enveloped-signature", digest="AAAA"
    )
    return ("<r><pad>" + "x" * pad + "</pad>" + _signature(ref) * n + "</r>").encode()


def slow_document(nodes: int = 150_000, signatures: int = 10, references: int = 10) -> bytes:
    """Within the limits but slow: every reference digests (correctly) a large element, so each
    of the signatures canonicalises it ``references`` times before failing."""
    big = "<big Id='b'>" + "<e a='1'>t</e>" * nodes + "</big>"
    digest = base64.b64encode(hashlib.sha256(c14n(etree.fromstring(big))).digest()).decode()
    ref = _REF.format(uri="#b", transform="http://www.w3.org/2001/10/xml-exc-c14n#", digest=digest)
    return ("<r>" + big + _signature(ref * references) * signatures + "</r>").encode()


def _verify(port: int, ctx: Any, document: bytes, timeout: float = 120) -> Response:
    body = {"document": base64.b64encode(document).decode()}
    return request(port, "POST", "/verify", ctx=ctx, json_body=body, timeout=timeout)


def _info_latencies(port: int, ctx: Any, n: int = 5) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        r = request(port, "POST", "/csc/v2/info", ctx=ctx, json_body={})
        out.append(time.monotonic() - t0)
        assert r.status == 200, r.body
        time.sleep(0.1)
    return out


def test_thousands_of_signatures_are_refused_before_the_work(
    gateway: Server, hospital_ctx: Any
) -> None:
    doc = many_signatures_document()
    assert len(doc) > 4_000_000
    t0 = time.monotonic()
    r = _verify(gateway.port, hospital_ctx, doc)
    took = time.monotonic() - t0
    assert r.status == 200, r.body
    rep = r.json()
    assert (rep["indication"], rep["sub_indication"]) == ("TOTAL-FAILED", "FORMAT_FAILURE")
    assert "3500 signatures; at most 10" in rep["reason"]
    assert took < 5, took
    # eleven references in one signature: refused before any digest
    ref = _REF.format(uri="#x", transform="http://www.w3.org/2001/10/xml-exc-c14n#", digest="AA")
    r = _verify(gateway.port, hospital_ctx, f"<r><a Id='x'/>{_signature(ref * 11)}</r>".encode())
    assert r.json()["sub_indication"] == "FORMAT_FAILURE"
    assert "11 references; at most 10" in r.json()["reason"]


def test_a_slow_verification_does_not_block_other_requests(
    gateway: Server, hospital_ctx: Any
) -> None:
    doc = slow_document()
    result: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        result["response"] = _verify(gateway.port, hospital_ctx, doc)
        result["took"] = time.monotonic() - t0

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.5)
    latencies = _info_latencies(gateway.port, hospital_ctx)
    still_running = worker.is_alive()
    worker.join(timeout=120)
    r = result["response"]
    assert r.status == 200, r.body
    assert r.json()["indication"] == "TOTAL-FAILED"
    assert still_running, f"the verification ended too early to show anything: {result['took']}"
    assert max(latencies) < 2, (latencies, result["took"])


def _workers_of(pid: int) -> list[int]:
    """Live verification worker processes (multiprocessing spawn children) of ``pid``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmd:
            found.append(int(d.name))
    return found


def test_time_limit_and_concurrency_cap(sandbox: dict[str, Any], hospital_ctx: Any) -> None:
    env = {
        "HPKI_GATEWAY_SIGNING__VERIFY_TIMEOUT_SECONDS": "1",
        "HPKI_GATEWAY_SIGNING__VERIFY_CONCURRENCY": "1",
    }
    with serving(Path(sandbox["config"]), env=env) as srv:
        assert srv.proc is not None
        slow = slow_document()
        result: dict[str, Response] = {}
        worker = threading.Thread(
            target=lambda: result.setdefault("r", _verify(srv.port, hospital_ctx, slow))
        )
        worker.start()
        time.sleep(0.5)
        # The one slot is busy: refused at once, not queued.
        t0 = time.monotonic()
        busy = _verify(srv.port, hospital_ctx, b"<a/>")
        assert time.monotonic() - t0 < 2
        assert busy.status == 503, busy.body
        assert busy.json()["code"] == "temporarily_unavailable"
        assert int(busy.headers["retry-after"]) > 0
        worker.join(timeout=60)
        r = result["r"]
        assert r.status == 503, r.body
        assert "longer than 1 s" in r.json()["detail"]
        # Again: each stuck verification is killed, none piles up; /verify keeps working.
        for _ in range(2):
            r = _verify(srv.port, hospital_ctx, slow)
            assert r.status == 503, r.body
        time.sleep(0.5)
        assert len(_workers_of(srv.proc.pid)) <= 1, _workers_of(srv.proc.pid)
        r = _verify(srv.port, hospital_ctx, os.urandom(64))
        assert r.status == 200, r.body
        assert r.json()["sub_indication"] == "FORMAT_FAILURE"
