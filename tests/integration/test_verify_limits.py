"""/verify under hostile input: refused before the work, never on the event loop, time-limited.

The documents are built here (no signature in them verifies), posted over real mTLS to a real
gateway process; nothing is timed: the tests wait (with a deadline) until the gateway's
verification process exists or works, and check what is answered and in which order.
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
from tests.support.faults import wait_until
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


#: Four attributes to render per element: 150,000 of them (4.8 MB, near the 5 MiB and 200,000
#: element limits) make the slowest document found within the limits (13.5 s here, in-process).
SLOW_ELEMENT = "<e a='1' b='2' c='3' d='4'>t</e>"


def slow_document(
    nodes: int = 150_000,
    signatures: int = 10,
    references: int = 10,
    element: str = "<e a='1'>t</e>",
) -> bytes:
    """Within the limits but slow: every reference digests (correctly) a large element, so each
    of the signatures canonicalises it ``references`` times before failing."""
    big = "<big Id='b'>" + element * nodes + "</big>"
    digest = base64.b64encode(hashlib.sha256(c14n(etree.fromstring(big))).digest()).decode()
    ref = _REF.format(uri="#b", transform="http://www.w3.org/2001/10/xml-exc-c14n#", digest=digest)
    return ("<r>" + big + _signature(ref * references) * signatures + "</r>").encode()


def _verify(port: int, ctx: Any, document: bytes, timeout: float = 120) -> Response:
    body = {"document": base64.b64encode(document).decode()}
    return request(port, "POST", "/verify", ctx=ctx, json_body=body, timeout=timeout)


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


def _verification_running(srv: Server, client: threading.Thread) -> None:
    """Wait (at most 60 s) until ``client``'s /verify has arrived and taken a slot: the gateway
    (a fresh one: no verification process before its first /verify) has a verification process,
    started for it after the upload was read."""
    assert srv.proc is not None
    pid = srv.proc.pid
    assert wait_until(lambda: bool(_workers_of(pid)) or not client.is_alive(), 60), srv.logs()
    assert _workers_of(pid), f"the /verify ended before a verification process was seen: {pid}"


#: A second gateway on the session's world must not start a second TEST TSA on its port.
NO_TSA = {"HPKI_GATEWAY_TEST_TSA__ENABLED": "false"}


def test_thousands_of_signatures_are_refused_before_the_work(
    gateway: Server, hospital_ctx: Any
) -> None:
    doc = many_signatures_document()
    assert len(doc) > 4_000_000
    r = _verify(gateway.port, hospital_ctx, doc)
    assert r.status == 200, r.body
    rep = r.json()
    assert (rep["indication"], rep["sub_indication"]) == ("TOTAL-FAILED", "FORMAT_FAILURE")
    assert "3500 signatures; at most 10" in rep["reason"]
    # eleven references in one signature: refused before any digest
    ref = _REF.format(uri="#x", transform="http://www.w3.org/2001/10/xml-exc-c14n#", digest="AA")
    r = _verify(gateway.port, hospital_ctx, f"<r><a Id='x'/>{_signature(ref * 11)}</r>".encode())
    assert r.json()["sub_indication"] == "FORMAT_FAILURE"
    assert "11 references; at most 10" in r.json()["reason"]


def _cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_slow_verification_does_not_block_other_requests(
    sandbox: dict[str, Any], hospital_ctx: Any
) -> None:
    # A gateway of its own: one verification slot, and a time limit far above the document's
    # (about 6 s here), so that the verification runs to its end.
    env = {
        "HPKI_GATEWAY_SIGNING__VERIFY_TIMEOUT_SECONDS": "600",
        "HPKI_GATEWAY_SIGNING__VERIFY_CONCURRENCY": "1",
        **NO_TSA,
    }
    with serving(Path(sandbox["config"]), env=env) as srv:
        assert srv.proc is not None
        # A first /verify starts the slot's process, which then waits for work using no CPU.
        r = _verify(srv.port, hospital_ctx, b"<a/>")
        assert r.status == 200, r.body
        (process,) = _workers_of(srv.proc.pid)
        idle = _cpu_seconds(process)
        doc = slow_document()
        result: dict[str, Response] = {}
        client = threading.Thread(
            target=lambda: result.setdefault("r", _verify(srv.port, hospital_ctx, doc, 600))
        )
        client.start()
        # The verification is under way once that process works (at most 60 s to get there).
        assert wait_until(
            lambda: _cpu_seconds(process) >= idle + 0.2 or not client.is_alive(), 60
        ), srv.logs()
        assert client.is_alive(), f"the verification ended before its process worked: {result}"
        # While it runs, /info is answered: five times, each before the verification's answer.
        for _ in range(5):
            r = request(srv.port, "POST", "/csc/v2/info", ctx=hospital_ctx, json_body={})
            assert r.status == 200, r.body
            assert client.is_alive(), "the verification answered before /info did"
            time.sleep(0.1)
        client.join(timeout=600)
        r = result["r"]
        assert r.status == 200, r.body
        assert r.json()["indication"] == "TOTAL-FAILED"


def test_time_limit_and_concurrency_cap(sandbox: dict[str, Any], hospital_ctx: Any) -> None:
    env = {
        "HPKI_GATEWAY_SIGNING__VERIFY_TIMEOUT_SECONDS": "5",
        "HPKI_GATEWAY_SIGNING__VERIFY_CONCURRENCY": "1",
        **NO_TSA,
    }
    with serving(Path(sandbox["config"]), env=env) as srv:
        assert srv.proc is not None
        # About 13.5 s here (100 canonicalisations of 4.8 MB): well over the 5 s limit.
        slow = slow_document(element=SLOW_ELEMENT)
        result: dict[str, Response] = {}
        client = threading.Thread(
            target=lambda: result.setdefault("r", _verify(srv.port, hospital_ctx, slow))
        )
        client.start()
        # The one slot is taken from before its process starts until the 5 s limit stops the
        # verification (the limit counts from the end of the process's start-up).
        _verification_running(srv, client)
        # The one slot is busy: refused at once, not queued.
        busy = _verify(srv.port, hospital_ctx, b"<a/>")
        assert busy.status == 503, busy.body
        assert busy.json()["code"] == "temporarily_unavailable"
        assert "verifications are already running" in busy.json()["detail"], busy.body
        assert int(busy.headers["retry-after"]) > 0
        client.join(timeout=120)
        r = result["r"]
        assert r.status == 503, r.body
        assert "longer than 5 s" in r.json()["detail"]
        # Again: each stuck verification is killed, none piles up; /verify keeps working.
        for _ in range(2):
            r = _verify(srv.port, hospital_ctx, slow)
            assert r.status == 503, r.body
            assert "longer than 5 s" in r.json()["detail"]
        # Killed when stopped (the answer is sent after the kill): gone within moments, where one
        # left running would canonicalise for about 8 s more.
        assert wait_until(lambda: not _workers_of(srv.proc.pid), 3), _workers_of(srv.proc.pid)
        r = _verify(srv.port, hospital_ctx, os.urandom(64))
        assert r.status == 200, r.body
        assert r.json()["sub_indication"] == "FORMAT_FAILURE"
