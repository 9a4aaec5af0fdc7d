"""The Prometheus scrape: a real gateway process, a real signature, a scrape that parses with
prometheus_client's own parser and shows what happened."""

from __future__ import annotations

import http.client
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import Server, free_port, request, serving
from tests.support.signing import Csc, random_hashes

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 200
        assert r.getheader("Content-Type", "").startswith("text/plain")
        text = r.read().decode()
    finally:
        conn.close()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scheduler_runs(m: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {
        dict(labels)["outcome"]: v
        for (name, labels), v in m.items()
        if name == "hpki_gateway_scheduler_runs_total"
    }


def test_a_scrape_parses_and_counts_what_happened(
    gateway: Server,
    sandbox: dict[str, Any],
    hospital_ctx: ssl.SSLContext,
    doctor: Any,
) -> None:
    mport = free_port()
    env = {
        "HPKI_GATEWAY_METRICS__PORT": str(mport),
        "HPKI_GATEWAY_TEST_TSA__ENABLED": "false",
        "HPKI_GATEWAY_SCHEDULER__INTERVAL_SECONDS": "3600",
    }
    doc, auth = doctor
    with serving(Path(sandbox["config"]), env=env) as srv:
        csc = Csc(srv.port, hospital_ctx)
        hashes = random_hashes(2)
        # Authorized at the session gateway, spent at this one: the SAD lives in the store.
        sad = Csc(gateway.port, hospital_ctx).authorize(doc["credential_id"], hashes, auth)
        r = csc.sign_hash(doc["credential_id"], sad, hashes)
        assert r.status == 200, r.body
        refused = csc.sign_hash(doc["credential_id"], "not-a-sad-" + "x" * 40, hashes[:1])
        assert refused.status == 400
        # The HTTP parser's other methods (WebDAV's, PURGE, ...) count as one label value.
        for method in ("PROPFIND", "MKCOL"):
            odd = request(srv.port, method, "/csc/v2/info", ctx=hospital_ctx)
            assert odd.status == 405, (method, odd.status)
        # The scheduler's first run starts with the server and may still be going (the
        # scrapes themselves are not counted as requests).
        deadline = time.monotonic() + 30
        while not _scheduler_runs(m := _scrape(mport)) and time.monotonic() < deadline:
            time.sleep(0.2)
    sign = (("method", "POST"), ("route", "/csc/v2/signatures/signHash"))
    assert m[("hpki_gateway_requests_total", (*sign[:1], sign[1], ("status", "200")))] == 1
    assert m[("hpki_gateway_requests_total", (*sign[:1], sign[1], ("status", "400")))] == 1
    other = (("method", "OTHER"), ("route", "unmatched"), ("status", "405"))
    assert m[("hpki_gateway_requests_total", other)] == 2
    assert not [k for k in m if ("method", "PROPFIND") in k[1] or ("method", "MKCOL") in k[1]]
    bucket = ("hpki_gateway_request_duration_seconds_count", (sign[1],))
    assert m[bucket] == 2
    presence = (("format", "hash"), ("level", "raw"), ("presence", "fido2"))
    assert m[("hpki_gateway_signatures_total", presence)] == 2
    assert m[("hpki_gateway_sad_events_total", (("event", "consumed"),))] == 2
    assert m[("hpki_gateway_sad_events_total", (("event", "refused"),))] == 1
    assert m[("hpki_gateway_hsm_up", ())] == 1
    assert m[("hpki_gateway_signing_process_queue", ())] == 0
    # Its run: "ok", or "skipped" when the session's gateway on the same store held the
    # scheduler's lock at that moment; never "failed".
    runs = _scheduler_runs(m)
    assert runs.get("ok", 0) + runs.get("skipped", 0) >= 1, runs
    assert runs.get("failed", 0) == 0, runs
    # The worker froze what start-up built (lifetime.freeze_start_up_objects); the cyclic
    # collector's and the process's own figures are there for the operator.
    assert m[("hpki_gateway_gc_frozen_objects", ())] > 50_000
    assert m[("python_gc_collections_total", (("generation", "2"),))] >= 1
    assert m[("process_resident_memory_bytes", ())] > 10_000_000
    assert m[("process_open_fds", ())] > 3
    for kind in ("facility_client", "signer"):
        for days in ("30", "90"):
            key = ("hpki_gateway_certificates_expiring", (("kind", kind), ("within_days", days)))
            assert key in m
