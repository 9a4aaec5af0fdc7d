"""``GET /openapi.json``: a valid OpenAPI 3.1 document covering every route the app serves and
every route docs/api.md lists, with the request schemas the handlers validate with."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from gateway.api import openapi
from gateway.api.sign_doc_schema import SignDocRequest
from gateway.app import ROUTES
from tests.support.gateway import Server, request

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@pytest.fixture(scope="module")
def spec(gateway: Server, hospital_ctx: Any) -> dict[str, Any]:
    r = request(gateway.port, "GET", "/openapi.json", ctx=hospital_ctx)
    assert r.status == 200, r.body[:300]
    doc: dict[str, Any] = r.json()
    return doc


def test_the_document_validates_as_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    validate(spec)  # raises on any violation of the OpenAPI 3.1 schema


def test_every_route_of_the_app_is_described(spec: dict[str, Any]) -> None:
    served = {(m, p) for m, p, _ in openapi.table_routes(ROUTES)}
    described = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert served - described == set()
    assert ("GET", "/openapi.json") in described
    assert ("POST", "/download/{token}") in described  # the delivery listener too


def test_every_route_the_api_docs_list_is_described(spec: dict[str, Any]) -> None:
    rows = re.findall(r"^\| (GET|POST)[^|]*\| `([^`?]+)[^`]*` \|", API_MD.read_text(), re.M)
    assert len(rows) > 30, "the walk over docs/api.md found too few routes"

    # Parameter names may differ ({YYYY-MM} in the docs, {month} in the route): compare shapes.
    def shape(path: str) -> str:
        return re.sub(r"{[^}]*}", "{}", path)

    described = {(m.upper(), shape(p)) for p, ops in spec["paths"].items() for m in ops}
    # The metrics listener's GET /metrics (plain HTTP, Prometheus text on its own port) is
    # outside the document, which describes the main and delivery listeners (its info says so).
    listed = {(m, shape(p)) for m, p in rows} - {("GET", "/metrics")}
    assert ("GET", "/metrics") in {(m, p) for m, p in rows}
    assert listed - described == set()
    assert "delivery listener" in spec["info"]["description"]


def test_request_schemas_are_the_handlers_models(spec: dict[str, Any]) -> None:
    op = spec["paths"]["/csc/v2/signatures/signDoc"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/SignDocRequest"
    schema = spec["components"]["schemas"]["SignDocRequest"]
    generated = SignDocRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    generated.pop("$defs", None)
    assert schema == generated
    assert "DocumentEntry" in spec["components"]["schemas"]
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/SignDocResponse"}


def test_every_handler_that_parses_a_body_has_its_schema(spec: dict[str, Any]) -> None:
    import inspect

    parsing = [
        (m, p)
        for m, p, h in openapi.table_routes(ROUTES)
        if "await parse(request," in inspect.getsource(h)
    ]
    assert len(parsing) >= 15
    for m, p in parsing:
        assert "requestBody" in spec["paths"][p][m.lower()], (m, p)


def test_errors_are_listed_with_their_codes(spec: dict[str, Any]) -> None:
    responses = spec["paths"]["/csc/v2/signatures/signDoc"]["post"]["responses"]
    assert "invalid_request" in responses["400"]["description"]
    assert "role_not_permitted" in str(responses)
    assert "tsa_unavailable" in responses["503"]["description"]
    codes = spec["components"]["schemas"]["ErrorCode"]["enum"]
    # Every code the document names is one docs/api.md's error table explains.
    documented = set(re.findall(r"^\| \d{3} \| `([a-z_]+)`", API_MD.read_text(), re.M))
    assert len(documented) > 10, "the walk over the error table of docs/api.md found too few"
    assert set(codes) - documented == set()
