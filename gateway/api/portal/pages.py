"""The portal (``/portal``): the verification environment in a browser, Japanese first.

Server-side pages (Jinja2) behind the same mTLS as every route: the browser presents a client
certificate from the sandbox manifest (a facility's or the administrator's). Every page works
without JavaScript except the two WebAuthn steps (enrol, approve a signature), whose scripts are
files under ``/portal/static/`` (the Content-Security-Policy allows no inline script).

Forms post ``multipart/form-data`` (file uploads): ``api/middleware.py:browser_guard`` lets
those through under ``/portal/`` only when the browser names this listener as the ``Origin``,
so a cross-site form still cannot post here.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import BodyPartReader, web

from gateway import scenario_file
from gateway.api import scenarios
from gateway.api.keys import CLOCK, FIDO2, JPKI, KEYSTORE, SETTINGS, SIGNERS, VERIFY_POOL
from gateway.api.middleware import identity
from gateway.api.portal import i18n, report_pdf
from gateway.auth.mtls import ClientIdentity
from gateway.clock import days_left, jst_date
from gateway.errors import (
    AccessDenied,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)
from gateway.sign.samples import DISPENSING_CSV, PRESCRIPTION_CSV

routes = web.RouteTableDef()

LEVELS = ("AdES-B-B", "AdES-B-T", "AdES-B-LT", "AdES-B-LTA")
SHA256_OID = "2.16.840.1.101.3.4.2.1"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway.api.portal", "templates"),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _lang(request: web.Request) -> str:
    return i18n.pick(request.query.get("lang"), request.cookies.get(i18n.COOKIE))


def render(request: web.Request, template: str, *, status: int = 200, **ctx: Any) -> web.Response:
    lang = _lang(request)
    settings = request.app[SETTINGS]
    html = _env.get_template(template).render(
        t=i18n.MESSAGES[lang],
        lang=lang,
        other_lang="en" if lang == "ja" else "ja",
        path=request.path,
        sandbox=settings.service.sandbox,
        **ctx,
    )
    response = web.Response(text=html, content_type="text/html", status=status)
    _secure(response)
    if request.query.get("lang") in i18n.LANGS:
        response.set_cookie(
            i18n.COOKIE,
            lang,
            max_age=365 * 24 * 3600,
            path="/portal",
            secure=True,
            httponly=True,
            samesite="Strict",
        )
    return response


def _secure(response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # Not no-referrer: under it Chromium sends "Origin: null" with a form post, which the
    # form guard (an Origin naming this listener) must refuse.
    response.headers["Referrer-Policy"] = "same-origin"


# -- Status -----------------------------------------------------------------------------------


@routes.get("/portal")
async def portal_root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/portal/status" + (f"?{request.query_string}" if request.query else ""))


async def _signers_of(request: web.Request, ident: ClientIdentity) -> list[dict[str, Any]]:
    code = ident.institution_code if ident.kind == "facility" else None
    signers = await request.app[SIGNERS].list_signers(institution_code=code)
    out = []
    for s in signers:
        authenticators = await request.app[FIDO2].list_authenticators(s.id)
        cards = await request.app[JPKI].list_links(s.id)
        out.append(
            {
                "signer": s.to_json_dict(),
                "presence": [
                    *(["fido2"] if authenticators else []),
                    *(["jpki"] if cards else []),
                ],
                "cards": [c.to_json_dict() for c in cards],
            }
        )
    return out


async def _hsm_ok(request: web.Request) -> bool:
    try:
        await request.app[KEYSTORE].check()
    except GatewayError:
        return False
    return True


def _endpoints(request: web.Request) -> list[tuple[str, str | None]]:
    settings = request.app[SETTINGS]
    manifest = sandbox_manifest(request)
    rows: list[tuple[str, str | None]] = [("tsa", settings.timestamp.url)]
    for name, url in (manifest or {}).get("ocsp_urls", {}).items():
        rows.append(("ocsp", f"{name}: {url}"))
    for name, url in (manifest or {}).get("crl_urls", {}).items():
        rows.append(("crl", f"{name}: {url}"))
    if len(rows) == 1:
        rows += [("ocsp", None), ("crl", None)]
    return rows


@routes.get("/portal/status")
async def status_page(request: web.Request) -> web.Response:
    ident = identity(request)
    now: datetime = request.app[CLOCK]()
    return render(
        request,
        "status.html",
        ident=ident,
        expires=jst_date(ident.not_after).isoformat(),
        days_left=days_left(ident.not_after, now),
        signers=await _signers_of(request, ident),
        endpoints=_endpoints(request),
        hsm_ok=await _hsm_ok(request),
        scenarios_on=_scenarios_on(request, ident),
    )


def _scenarios_on(request: web.Request, ident: ClientIdentity) -> list[str]:
    settings = request.app[SETTINGS]
    if not settings.service.sandbox:
        return []
    out = []
    for key, names in scenario_file.active(settings).items():
        if key == f"facility:{ident.institution_code}" or key.startswith("credential:"):
            out += [f"{n} ({key})" for n in names]
    return out


# -- Enrol ------------------------------------------------------------------------------------


@routes.get("/portal/enrol")
async def enrol_page(request: web.Request) -> web.Response:
    identity(request)
    return render(request, "enrol.html")


@routes.get("/portal/enrol/mynumber")
async def enrol_mynumber_page(request: web.Request) -> web.Response:
    """How a My Number card is linked (the card itself needs the local card client: a browser
    cannot reach a PC/SC reader), and which cards each signer has linked."""
    ident = identity(request)
    settings = request.app[SETTINGS]
    manifest = sandbox_manifest(request) or {}
    code = ident.institution_code
    facilities = manifest.get("facilities", [])
    holder = next((f for f in facilities if f.get("institution_code") == code), None)
    signers = await _signers_of(request, ident)
    mine = {row["signer"]["id"] for row in signers}
    # The sandbox's virtual cards (after `sandbox cards up`): reader and socket, never the PIN.
    cards = [
        {k: c.get(k, "") for k in ("signer", "reader", "pcsc_socket")}
        for c in manifest.get("cards", [])
        if c.get("kind") == "jpki" and c.get("signer") in mine
    ]
    return render(
        request,
        "enrol_mynumber.html",
        enabled=settings.jpki.enabled,
        url=str(request.url.origin()),  # the address this browser reached
        client_cert=(holder or {}).get("client_cert", "facility.pem"),
        client_key=(holder or {}).get("client_key", "facility.key"),
        server_ca=manifest.get("server_ca", "server-ca.pem"),
        config=manifest.get("config", "gateway.toml"),
        sandbox_dir=str(Path(manifest["config"]).parent) if "config" in manifest else "DIR",
        signers=signers,
        virtual_cards=cards,
    )


# -- Sign -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToSign:
    name: str
    profile: str  # jp-eprescription | jp-dispensing
    document: bytes
    csv_encoding: str = "utf-8"
    prescription: bytes | None = None  # dispensing: the signed prescription it embeds

    def preview(self) -> str:
        try:
            return self.document.decode(self.csv_encoding)
        except UnicodeDecodeError:
            return self.document.decode("utf-8", errors="replace")


def _sample(request: web.Request, which: str) -> ToSign:
    if which == "prescription":
        return ToSign("prescription.csv", "jp-eprescription", PRESCRIPTION_CSV)
    if which == "dispensing":
        manifest = sandbox_manifest(request)
        path = ((manifest or {}).get("samples") or {}).get("prescription", {}).get("AdES-B-B")
        if not path:
            raise NotFound("the sample dispensing result needs the sandbox's signed prescription")
        return ToSign(
            "dispensing.csv",
            "jp-dispensing",
            DISPENSING_CSV,
            prescription=Path(path).read_bytes(),
        )
    raise InvalidRequest(f"Invalid parameter sample: {which[:40]!r}")


def _binding(credential_id: str, digest: bytes) -> tuple[str, str]:
    """The canonical JSON a hash-bound challenge commits to (docs/api.md), and its SHA-256."""
    canonical = json.dumps(
        {
            "credentialID": credential_id,
            "hashAlgorithmOID": SHA256_OID,
            "hashes": [base64.b64encode(digest).decode()],
            "numSignatures": 1,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return canonical, base64.b64encode(hashlib.sha256(canonical.encode()).digest()).decode()


async def _credentials(request: web.Request, ident: ClientIdentity) -> list[dict[str, str]]:
    out = []
    for row in await _signers_of(request, ident):
        s = row["signer"]
        for c in s["credentials"]:
            if c["status"] == "active":
                label = f"{s['name_kanji'] or s['name']} ({s['role']}) {c['id']}"
                out.append({"id": c["id"], "label": label, "role": s["role"]})
    return out


async def _sign_page(
    request: web.Request, doc: ToSign | None, *, credential: str | None, level: str
) -> web.Response:
    ident = identity(request)
    creds = await _credentials(request, ident)
    ctx: dict[str, Any] = {"credentials": creds, "levels": LEVELS, "level": level, "doc": None}
    if doc is not None:
        if credential is None and creds:
            wanted = "Pharmacist" if doc.profile == "jp-dispensing" else "Medical Doctor"
            credential = next((c["id"] for c in creds if c["role"] == wanted), creds[0]["id"])
        digest = hashlib.sha256(doc.document).digest()
        canonical, binding = _binding(credential or "", digest)
        ctx.update(
            doc=doc,
            credential=credential,
            document_b64=base64.b64encode(doc.document).decode(),
            prescription_b64=(
                base64.b64encode(doc.prescription).decode() if doc.prescription else ""
            ),
            hash_b64=base64.b64encode(digest).decode(),
            hash_hex=digest.hex(),
            canonical=canonical,
            binding=binding,
            download_name=Path(doc.name).stem + "-signed.xml",
        )
    return render(request, "sign.html", **ctx)


def _level(value: str | None) -> str:
    if value is None or value == "":
        return "AdES-B-B"
    if value not in LEVELS:
        raise InvalidRequest(f"Invalid parameter level: {value[:40]!r}")
    return value


@routes.get("/portal/sign")
async def sign_page(request: web.Request) -> web.Response:
    q = request.query
    doc = _sample(request, q["sample"]) if q.get("sample") else None
    return await _sign_page(
        request, doc, credential=q.get("credential") or None, level=_level(q.get("level"))
    )


async def _form(request: web.Request) -> dict[str, bytes | str]:
    """The posted form: file fields as bytes, other fields as text; each within the limit."""
    limit = request.app[SETTINGS].signing.max_document_bytes
    out: dict[str, bytes | str] = {}
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader) or not part.name:
                continue
            data = bytes(await part.read(decode=False))
            if len(data) > limit:
                raise PayloadTooLarge(
                    f"{part.name} of {len(data)} bytes is over the limit of {limit}"
                )
            out[part.name] = data if part.filename is not None else data.decode("utf-8", "replace")
    except (ValueError, LookupError) as e:
        # aiohttp's multipart reader on a type without its boundary or a body cut short.
        raise InvalidRequest(
            "the form cannot be read: post it as multipart/form-data, as the portal's pages do"
        ) from e
    return out


def _b64(form: dict[str, bytes | str], name: str) -> bytes | None:
    """The form field ``name`` as base64-decoded bytes; None when it is absent or empty."""
    text = _text(form, name)
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:  # binascii.Error is a ValueError
        raise InvalidRequest(f"{name} is not valid base64") from e


def _text(form: dict[str, bytes | str], name: str) -> str | None:
    v = form.get(name)
    return v if isinstance(v, str) and v else None


def _file(form: dict[str, bytes | str], name: str) -> bytes | None:
    v = form.get(name)
    return v if isinstance(v, bytes) and v else None


@routes.post("/portal/sign")
async def sign_upload(request: web.Request) -> web.Response:
    form = await _form(request)
    document = _file(form, "document")
    if document is None:
        raise InvalidRequest("Missing (or invalid type) parameter document")
    kind = _text(form, "kind") or "prescription"
    encoding = _text(form, "csv_encoding") or "utf-8"
    if encoding not in ("utf-8", "shift_jis"):
        raise InvalidRequest(f"Invalid parameter csv_encoding: {encoding[:40]!r}")
    if kind == "prescription":
        doc = ToSign("prescription.csv", "jp-eprescription", document, encoding)
    elif kind == "dispensing":
        prescription = _file(form, "prescription")
        if prescription is None:
            raise InvalidRequest("Missing (or invalid type) parameter prescription")
        doc = ToSign("dispensing.csv", "jp-dispensing", document, encoding, prescription)
    else:
        raise InvalidRequest(f"Invalid parameter kind: {kind[:40]!r}")
    return await _sign_page(
        request, doc, credential=_text(form, "credential"), level=_level(_text(form, "level"))
    )


# -- Verify -----------------------------------------------------------------------------------


@routes.get("/portal/verify")
async def verify_page(request: web.Request) -> web.Response:
    identity(request)
    return render(request, "verify.html", report=None)


def explained(lang: str, report: dict[str, Any]) -> dict[str, Any]:
    """The report with the indication and sub-indication said in words."""
    out = dict(report)
    out["indication_text"] = i18n.explain_indication(lang, report["indication"])
    out["sub_indication_text"] = i18n.explain_sub(lang, report.get("sub_indication"))
    out["signatures"] = [
        {
            **s,
            "indication_text": i18n.explain_indication(lang, s["indication"]),
            "sub_indication_text": i18n.explain_sub(lang, s.get("sub_indication")),
        }
        for s in report.get("signatures", [])
    ]
    return out


@routes.post("/portal/verify")
async def verify_upload(request: web.Request) -> web.Response:
    identity(request)
    form = await _form(request)
    document = _file(form, "document")
    if document is None:
        # The report page re-posts what it verified as base64 to download JSON or PDF.
        document = _b64(form, "document_b64")
    if document is None:
        raise InvalidRequest("Missing (or invalid type) parameter document")
    content = _file(form, "content")
    if content is None:
        content = _b64(form, "content_b64")
    report = (await request.app[VERIFY_POOL].verify(document, content)).to_json_dict()
    output = _text(form, "output") or "html"
    lang = _lang(request)
    if output == "json":
        response = web.Response(
            text=json.dumps(report, ensure_ascii=False, indent=2),
            content_type="application/json",
            headers={"Content-Disposition": 'attachment; filename="verification-report.json"'},
        )
        _secure(response)
        return response
    if output == "pdf":
        pdf = report_pdf.render(explained(lang, report), i18n.MESSAGES[lang], request.app[SETTINGS])
        response = web.Response(
            body=pdf,
            content_type="application/pdf",
            headers={"Content-Disposition": 'attachment; filename="verification-report.pdf"'},
        )
        _secure(response)
        return response
    return render(
        request,
        "verify.html",
        report=explained(lang, report),
        document_b64=base64.b64encode(document).decode(),
        content_b64=base64.b64encode(content).decode() if content else "",
    )


# -- Downloads --------------------------------------------------------------------------------


def sandbox_manifest(request: web.Request) -> dict[str, Any] | None:
    """The sandbox's manifest.json (beside its gateway.toml); None outside a sandbox."""
    settings = request.app[SETTINGS]
    if not settings.service.sandbox:
        return None
    path = settings.base_dir / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Download:
    name: str  # the URL segment and the file name the browser saves
    group: str  # dl_* key of i18n
    path: Path | None = None
    data: bytes | None = None
    note: str = ""
    media_type: str = "application/octet-stream"

    def body(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


def broken(signed_xml: bytes) -> bytes:
    """A deliberately broken copy of a signed XML: the first character of the signed CSV
    (base64 in ``PrescriptionDocument`` / ``DispensingDocument``) changed after signing, so a
    verifier must answer TOTAL-FAILED / HASH_FAILURE."""
    for marker in (b'id="DispensingDocument">', b'id="PrescriptionDocument">'):
        at = signed_xml.find(marker)
        if at >= 0:
            i = at + len(marker)
            swapped = b"N" if signed_xml[i : i + 1] != b"N" else b"M"
            return signed_xml[:i] + swapped + signed_xml[i + 1 :]
    raise ValueError("not a signed e-prescription or dispensing result")


#: A client's credentials in the manifest (``facilities[]``, ``admin``): a facility caller gets
#: its own only (security review: any facility downloaded the administrator's p12 and password).
_HOLDER_SECRETS = ("client_key", "client_p12", "p12_password")
_SIGNER_SECRETS = ("enrollment_code", "enrollment_password")


def _without(entry: Any, keys: tuple[str, ...]) -> Any:
    return {k: v for k, v in entry.items() if k not in keys} if isinstance(entry, dict) else entry


def manifest_for(manifest: dict[str, Any], ident: ClientIdentity) -> dict[str, Any]:
    """The manifest as ``ident`` may download it: whole for an administrator; for anyone else
    without the other holders' keys, PKCS#12 and passwords (every other facility's, the
    administrator's), the enrolment codes of signers not linked to the caller's facility and the
    PINs of their cards. Every field is kept (paths, URLs, the caller's own secrets)."""
    if ident.kind == "admin":
        return manifest
    code = ident.institution_code
    out = dict(manifest)
    if isinstance(manifest.get("admin"), dict):
        out["admin"] = _without(manifest["admin"], _HOLDER_SECRETS)
    out["facilities"] = [
        f if isinstance(f, dict) and f.get("institution_code") == code
        else _without(f, _HOLDER_SECRETS)
        for f in manifest.get("facilities", [])
    ]  # fmt: skip
    signers = manifest.get("signers", [])
    mine = {s.get("id") for s in signers if isinstance(s, dict) and code in s.get("facilities", [])}
    out["signers"] = [
        s if isinstance(s, dict) and s.get("id") in mine else _without(s, _SIGNER_SECRETS)
        for s in signers
    ]
    if "cards" in manifest:
        out["cards"] = [
            c if isinstance(c, dict) and c.get("signer") in mine else _without(c, ("pin",))
            for c in manifest.get("cards") or []
        ]
    return out


def downloads(request: web.Request) -> list[Download]:
    """What the caller may download: the public material (CA certificates, CRLs, samples) for
    every caller; client PKCS#12 files with their passwords for an administrator all, for a
    facility its own; the manifest as ``manifest_for`` cuts it."""
    manifest = sandbox_manifest(request)
    if manifest is None:
        return []
    ident = identity(request)
    out = [
        Download(
            "manifest.json", "dl_manifest", data=_manifest_bytes(manifest_for(manifest, ident))
        )
    ]
    pem = "application/x-pem-file"
    for key in ("server_ca", "hpki_trust_anchors", "hpki_intermediates", "tsa_trust_anchors"):
        value = manifest.get(key)
        for p in [value] if isinstance(value, str) else list(value or []):
            out.append(Download(Path(p).name, "dl_ca", Path(p), media_type=pem))
    client_ca = Path(manifest["server_ca"]).with_name("facility-client-ca.pem")
    if client_ca.is_file():
        out.append(Download(client_ca.name, "dl_ca", client_ca, media_type=pem))
    jpki = manifest.get("jpki") or {}
    if jpki.get("trust_anchor"):  # the TEST JPKI CA of the My Number cards
        out.append(Download(Path(jpki["trust_anchor"]).name, "dl_ca", Path(jpki["trust_anchor"]),
                            media_type=pem))  # fmt: skip
    for name, p in sorted(manifest.get("crls", {}).items()):
        out.append(Download(f"{name}.crl", "dl_crl", Path(p), media_type="application/pkix-crl"))
    if jpki.get("crl_file"):
        out.append(Download(Path(jpki["crl_file"]).name, "dl_crl", Path(jpki["crl_file"]),
                            media_type="application/pkix-crl"))  # fmt: skip
    holders = [*manifest.get("facilities", []), {"institution_code": "admin", **manifest["admin"]}]
    if ident.kind != "admin":
        holders = [f for f in holders if f["institution_code"] == ident.institution_code]
    for f in holders:
        out.append(
            Download(
                f"client-{f['institution_code']}.p12",
                "dl_p12",
                Path(f["client_p12"]),
                note=f"{f.get('name', f['institution_code'])} / {f['p12_password']}",
                media_type="application/x-pkcs12",
            )
        )
    out.append(Download("prescription.csv", "dl_samples_csv", data=PRESCRIPTION_CSV))
    out.append(Download("dispensing.csv", "dl_samples_csv", data=DISPENSING_CSV))
    xml = "application/xml"
    for kind, levels in sorted(manifest.get("samples", {}).items()):
        for level, p in levels.items():
            out.append(Download(Path(p).name, "dl_valid", Path(p), note=level, media_type=xml))
        bb = levels.get("AdES-B-B")
        if bb:
            out.append(
                Download(
                    f"{kind}-AdES-B-B-broken.xml",
                    "dl_broken",
                    data=broken(Path(bb).read_bytes()),
                    note="HASH_FAILURE",
                    media_type=xml,
                )
            )
    return out


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode()


@routes.get("/portal/downloads")
async def downloads_page(request: web.Request) -> web.Response:
    identity(request)
    return render(request, "downloads.html", files=downloads(request))


@routes.get("/portal/downloads/{name}")
async def download_file(request: web.Request) -> web.Response:
    identity(request)
    name = request.match_info["name"]
    found = next((d for d in downloads(request) if d.name == name), None)
    if found is None:
        raise NotFound(f"no download named {name[:80]!r}")
    response = web.Response(
        body=found.body(),
        content_type=found.media_type,
        headers={"Content-Disposition": f'attachment; filename="{found.name}"'},
    )
    _secure(response)
    return response


# -- Static files of the portal (its CSS and the WebAuthn scripts) ------------------------------

_STATIC = {
    "portal.css": "text/css",
    "csc.js": "text/javascript",
    "enrol.js": "text/javascript",
    "approve.js": "text/javascript",
    "sign.js": "text/javascript",
    "api.js": "text/javascript",
}
#: The Swagger UI build of the swagger-ui-py package (no CDN): the two files the API page loads.
_SWAGGER = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript"}


@routes.get("/portal/static/{name}")
async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise NotFound(f"no portal file named {name[:80]!r}")
    text = resources.files("gateway.api.portal").joinpath(f"static/{name}").read_text("utf-8")
    response = web.Response(text=text, content_type=_STATIC[name])
    _secure(response)
    response.headers["Cache-Control"] = "max-age=300"
    return response


@routes.get("/portal/swagger-ui/{name}")
async def swagger_file(request: web.Request) -> web.Response:
    import swagger_ui  # type: ignore[import-untyped]

    name = request.match_info["name"]
    if name not in _SWAGGER:
        raise NotFound(f"no Swagger UI file named {name[:80]!r}")
    path = Path(swagger_ui.__file__).parent / "static" / name
    response = web.Response(body=path.read_bytes(), content_type=_SWAGGER[name])
    _secure(response)
    response.headers["Cache-Control"] = "max-age=3600"
    return response


@routes.get("/portal/api")
async def api_page(request: web.Request) -> web.Response:
    identity(request)
    response = render(request, "api.html")
    # Swagger UI sets inline styles and data: images.
    response.headers["Content-Security-Policy"] = CSP.replace(
        "style-src 'self'", "style-src 'self' 'unsafe-inline'"
    ).replace("img-src 'self'", "img-src 'self' data:")
    return response


# -- Scenarios --------------------------------------------------------------------------------


async def _scenario_page(request: web.Request, ident: ClientIdentity) -> web.Response:
    settings = request.app[SETTINGS]
    if not settings.service.sandbox:
        return render(request, "scenarios.html", catalog=[], on={}, credentials=[])
    data = scenario_file.active(settings)
    creds = await _credentials(request, ident) if ident.kind == "facility" else []
    on: dict[str, list[str]] = {}
    for key in (f"facility:{ident.institution_code}", *(f"credential:{c['id']}" for c in creds)):
        for name in data.get(key, []):
            on.setdefault(name, []).append(key.split(":", 1)[1])
    return render(
        request,
        "scenarios.html",
        catalog=scenarios.catalog_json(),
        on=on,
        credentials=creds,
    )


@routes.get("/portal/scenarios")
async def scenarios_page(request: web.Request) -> web.Response:
    return await _scenario_page(request, identity(request))


@routes.post("/portal/scenarios")
async def scenarios_switch(request: web.Request) -> web.Response:
    ident = identity(request)
    if ident.kind != "facility":
        raise AccessDenied("the portal switches the scenarios of the caller's facility")
    form = await _form(request)
    action = _text(form, "action") or ""
    if action == "reset":
        creds = await _credentials(request, ident)
        await scenarios.reset(
            request,
            actor=ident.actor,
            only=[
                f"facility:{ident.institution_code}",
                *(f"credential:{c['id']}" for c in creds),
            ],
        )
    else:
        name = _text(form, "scenario") or ""
        scenario = scenarios.CATALOG.get(name)
        if scenario is None:
            raise InvalidRequest(f"Invalid parameter scenario: {name[:60]!r}")
        if scenario.scope == "credential":
            credential = _text(form, "credential") or ""
            if credential not in {c["id"] for c in await _credentials(request, ident)}:
                raise InvalidRequest("Invalid parameter credential: not one of this facility's")
            target = f"credential:{credential}"
        else:
            target = f"facility:{ident.institution_code}"
        await scenarios.switch(
            request, name=name, target=target, on=action == "on", actor=ident.actor
        )
    return await _scenario_page(request, ident)
