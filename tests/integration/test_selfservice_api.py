"""Self-service routes on the running gateway over real mTLS: officers (admin API and CLI
``--json``), a vendor with its own client certificate, and a facility asking about itself."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import Server, client_context, request, run_cli

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

CODE = "2718000001"
OTHER = "2718000002"
VENDOR = "test-vendor-kk"


@pytest.fixture(scope="module")
def admin_ctx(sandbox: dict[str, Any]) -> ssl.SSLContext:
    a = sandbox["admin"]
    return client_context(sandbox["server_ca"], a["client_cert"], a["client_key"])


def new_body(code: str) -> dict[str, Any]:
    return {
        "institution_code": code,
        "kind": "new",
        "facility_name": f"TEST 北クリニック {code}",
        "facility_kind": "clinic",
        "recipient_name": "資格 太郎",
        "contact_email": "office@north.test.invalid",
    }


def test_officer_vendor_and_facility_over_mtls(
    gateway: Server,
    admin_ctx: ssl.SSLContext,
    sandbox: dict[str, Any],
    hospital: dict[str, Any],
    tmp_path: Path,
) -> None:
    port = gateway.port
    key = {"Idempotency-Key": "webform-20261127-0001"}
    r = request(
        port, "POST", "/admin/applications", ctx=admin_ctx, json_body=new_body(CODE), headers=key
    )
    assert r.status == 201, r.body
    rid = r.json()["request_id"]
    r2 = request(
        port, "POST", "/admin/applications", ctx=admin_ctx, json_body=new_body(CODE), headers=key
    )
    assert r2.status == 200 and r2.json()["request_id"] == rid
    r3 = request(
        port,
        "POST",
        "/admin/applications",
        ctx=admin_ctx,
        json_body={**new_body(CODE), "facility_name": "別"},
        headers=key,
    )
    assert r3.status == 409 and "other content" in r3.json()["detail"]
    r = request(
        port,
        "POST",
        "/admin/applications",
        ctx=admin_ctx,
        json_body={**new_body(CODE), "unknown": 1},
    )
    assert r.status == 400
    assert rid in [
        a["request_id"]
        for a in request(port, "GET", "/admin/applications", ctx=admin_ctx).json()["applications"]
    ]

    r = request(port, "POST", f"/admin/applications/{rid}/reject", ctx=admin_ctx, json_body={})
    assert r.status == 400 and "reason" in r.json()["detail"]
    r = request(
        port,
        "POST",
        f"/admin/applications/{rid}/approve",
        ctx=admin_ctx,
        json_body={"reason": "書類確認済"},
    )
    assert r.status == 200, r.body
    approved = r.json()
    assert approved["status"] == "issued" and len(approved["certificates"]) == 1
    assert "hand_over" not in approved["issued_certificates"][0]

    r = request(port, "GET", f"/admin/facilities/{CODE}/applications", ctx=admin_ctx)
    assert r.status == 200
    [row] = r.json()["applications"]
    assert {k: row[k] for k in ("request_id", "status", "downloaded")} == {
        "request_id": rid,
        "status": "issued",
        "downloaded": False,
    }
    assert row["issued"] and row["last_update"]
    cli = run_cli("application", "status", CODE, "-c", sandbox["config"], "--json")
    assert json.loads(cli.stdout)["applications"][0]["request_id"] == rid

    # A vendor: registered and linked by an officer, with its own client certificate.
    run_cli("vendor", "add", VENDOR, "-c", sandbox["config"])
    run_cli("vendor", "issue-cert", VENDOR, "--out", str(tmp_path / "v"), "-c", sandbox["config"])
    r = request(
        port,
        "POST",
        f"/admin/vendors/{VENDOR}/facilities",
        ctx=admin_ctx,
        json_body={"institution_code": CODE},
    )
    assert r.status == 200 and r.json()["facilities"] == [CODE]
    vctx = client_context(
        sandbox["server_ca"], str(tmp_path / "v" / "client.pem"), str(tmp_path / "v" / "client.key")
    )
    assert request(port, "GET", "/vendor/facilities", ctx=vctx).json()["facilities"] == [CODE]
    # nothing else is reachable with a vendor's certificate
    for path in (
        "/admin/facilities",
        "/facility/applications",
        "/csc/v2/info",
        "/.well-known/est/cacerts",
    ):
        method = "POST" if path.startswith("/csc/") else "GET"
        assert request(port, method, path, ctx=vctx, json_body={}).status == 403, path
    # EST and the vendor API are not the officer's either
    assert request(port, "GET", "/.well-known/est/cacerts", ctx=admin_ctx).status == 403
    assert request(port, "GET", "/vendor/facilities", ctx=admin_ctx).status == 403
    r = request(
        port,
        "POST",
        f"/vendor/facilities/{OTHER}/applications",
        ctx=vctx,
        json_body={"kind": "reapply", "remarks": "x"},
    )
    assert r.status in (403, 404)
    r = request(
        port,
        "POST",
        f"/vendor/facilities/{CODE}/applications",
        ctx=vctx,
        json_body={"kind": "reapply"},
    )
    assert r.status == 400 and "備考" in r.json()["detail"]
    r = request(
        port,
        "POST",
        f"/vendor/facilities/{CODE}/applications",
        ctx=vctx,
        json_body={
            "kind": "reapply",
            "remarks": "通知書紛失",
            "cause": "notice_lost",
            "contact_email": "vendor@vendor.test.invalid",
        },
    )
    assert r.status == 400 and "registered address" in r.json()["detail"]
    r = request(
        port,
        "POST",
        f"/vendor/facilities/{CODE}/applications",
        ctx=vctx,
        json_body={"kind": "reapply", "remarks": "通知書紛失", "cause": "notice_lost"},
    )
    assert r.status == 201 and r.json()["via"] == "vendor"
    vrid = r.json()["request_id"]
    st = request(port, "GET", f"/vendor/facilities/{CODE}/applications", ctx=vctx).json()
    assert [a["request_id"] for a in st["applications"]][:2] == [vrid, rid]

    # The facility itself, over its own certificate: its own applications only.
    hctx = client_context(sandbox["server_ca"], hospital["client_cert"], hospital["client_key"])
    r = request(
        port,
        "POST",
        "/facility/applications",
        ctx=hctx,
        json_body={"kind": "reapply", "remarks": "端末名称の変更"},
    )
    assert r.status == 201, r.body
    frid = r.json()["request_id"]
    mine = request(port, "GET", "/facility/applications", ctx=hctx).json()
    assert mine["institution_code"] == hospital["institution_code"]
    assert frid in [a["request_id"] for a in mine["applications"]]
    assert vrid not in [a["request_id"] for a in mine["applications"]]
    r = request(
        port,
        "POST",
        f"/admin/applications/{frid}/reject",
        ctx=admin_ctx,
        json_body={"reason": "窓口で確認のうえ取り下げ"},
    )
    assert r.status == 200 and r.json()["status"] == "rejected"
    # admin applications routes are refused to a facility
    assert request(port, "GET", "/admin/applications", ctx=hctx).status == 403


def test_statement_routes_and_command(
    gateway: Server, admin_ctx: ssl.SSLContext, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    from datetime import datetime

    from gateway.clock import JST

    code = "2718000003"
    r = request(
        gateway.port, "POST", "/admin/applications", ctx=admin_ctx, json_body=new_body(code)
    )
    assert r.status == 201
    now = datetime.now(JST)
    this_month = f"{now.year}-{now.month:02d}"
    last = f"{now.year - (now.month == 1)}-{(now.month - 2) % 12 + 1:02d}"
    # The facility is registered on approval; its statements exist from then on.
    r = request(
        gateway.port,
        "POST",
        f"/admin/applications/{r.json()['request_id']}/approve",
        ctx=admin_ctx,
        json_body={},
    )
    assert r.status == 200
    r = request(
        gateway.port,
        "POST",
        f"/admin/facilities/{code}/payment-method",
        ctx=admin_ctx,
        json_body={"payment_method": "deduction"},
    )
    assert r.status == 200 and r.json()["payment_method"] == "deduction"
    r = request(
        gateway.port, "GET", f"/admin/facilities/{code}/statements/{this_month}", ctx=admin_ctx
    )
    assert r.status == 400 and "not over yet" in r.json()["detail"]
    r = request(
        gateway.port,
        "GET",
        f"/admin/facilities/{code}/statements/{last}?format=json",
        ctx=admin_ctx,
    )
    assert r.status == 200 and r.json()["total_yen"] == 0
    assert r.json()["payment_method"] == "deduction"
    csv_r = request(
        gateway.port, "GET", f"/admin/facilities/{code}/statements/{last}?format=csv", ctx=admin_ctx
    )
    assert csv_r.status == 200 and csv_r.headers["content-type"].startswith("text/csv")
    assert csv_r.body.decode("utf-8-sig").splitlines()[-1].split(",")[4] == "合計"
    pdf_r = request(
        gateway.port, "GET", f"/admin/facilities/{code}/statements/{last}?format=pdf", ctx=admin_ctx
    )
    assert pdf_r.status == 200 and pdf_r.body.startswith(b"%PDF")
    out = tmp_path / "st.pdf"
    run_cli(
        "statement",
        "make",
        code,
        last,
        "--format",
        "pdf",
        "--out",
        str(out),
        "-c",
        sandbox["config"],
    )
    assert out.read_bytes() == pdf_r.body  # the command and the route make the same document
    r = request(gateway.port, "GET", f"/admin/facilities/{code}/statements/2026-13", ctx=admin_ctx)
    assert r.status == 400


def test_an_unlinked_vendor_gets_nothing_by_replay_and_its_application_is_not_approved(
    gateway: Server, admin_ctx: ssl.SSLContext, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    """The security review's case: a vendor re-posting its submission with the same
    Idempotency-Key after the officer unlinked it got 200 and the application as it is now."""
    port, code, name = gateway.port, "2718000004", "test-vendor-unlinked"
    r = request(port, "POST", "/admin/applications", ctx=admin_ctx, json_body=new_body(code))
    r = request(
        port, "POST", f"/admin/applications/{r.json()['request_id']}/approve", ctx=admin_ctx,
        json_body={},
    )  # fmt: skip
    assert r.status == 200, r.body
    run_cli("vendor", "add", name, "-c", sandbox["config"])
    run_cli("vendor", "issue-cert", name, "--out", str(tmp_path / "v"), "-c", sandbox["config"])
    vctx = client_context(
        sandbox["server_ca"], str(tmp_path / "v" / "client.pem"), str(tmp_path / "v" / "client.key")
    )
    link = {"institution_code": code}
    r = request(port, "POST", f"/admin/vendors/{name}/facilities", ctx=admin_ctx, json_body=link)
    assert r.status == 200
    body = {"kind": "reapply", "remarks": "lost notice", "cause": "notice_lost"}
    key = {"Idempotency-Key": "k1"}
    path = f"/vendor/facilities/{code}/applications"
    r = request(port, "POST", path, ctx=vctx, json_body=body, headers=key)
    assert r.status == 201, r.body
    rid = r.json()["request_id"]
    r = request(
        port, "POST", f"/admin/vendors/{name}/facilities/{code}/unlink", ctx=admin_ctx,
        json_body={},
    )  # fmt: skip
    assert r.status == 200 and r.json()["facilities"] == []
    assert request(port, "GET", path, ctx=vctx).status == 403
    r = request(port, "POST", path, ctx=vctx, json_body=body, headers=key)
    assert r.status == 403, r.body
    assert "not linked" in r.json()["detail"] and rid not in r.body.decode()
    r = request(port, "POST", f"/admin/applications/{rid}/approve", ctx=admin_ctx, json_body={})
    assert r.status == 409, r.body
    assert "no longer linked" in r.json()["detail"]
    r = request(
        port, "POST", f"/admin/applications/{rid}/reject", ctx=admin_ctx,
        json_body={"reason": "代理人の委任終了"},
    )  # fmt: skip
    assert r.status == 200 and r.json()["status"] == "rejected"
