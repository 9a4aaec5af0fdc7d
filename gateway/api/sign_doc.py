"""CSC v2 ``signatures/signDoc``: the gateway builds CAdES / XAdES (incl. the e-prescription
profile) / PAdES signatures over documents the signer approved.

The SAD authorizes the SHA-256 digests of the decoded documents as sent (and, for detached
CAdES, the ``documentDigests`` given): the same hash-bound challenge as signHash, so the doctor's
authenticator signed a commitment to exactly these documents. This handler decodes and
validates every entry before the SAD is spent, then hands one ``DocumentJob`` per digest to
``signing.core.SigningService.sign_documents`` (which spends, audits, signs, and refunds if a
signature cannot be built) and renders the result.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.decode import caller_of
from gateway.api.keys import SIGNING
from gateway.api.schema import parse
from gateway.api.sign_doc_io import check_entries, jobs_of, response_body
from gateway.api.sign_doc_schema import SignDocRequest
from gateway.errors import AccessDenied, GatewayError

routes = web.RouteTableDef()


@routes.post("/csc/v2/signatures/signDoc")
async def sign_doc(request: web.Request) -> web.Response:
    caller = caller_of(request)
    if caller.facility_id is None:
        raise AccessDenied("CSC methods are for facility client certificates")
    signing = request.app[SIGNING]
    credential_id: str | None = None
    try:
        req = await parse(request, SignDocRequest)
        credential_id = req.credentialID
        check_entries(req, policy=signing.policy, tsa=signing.tsa)
        jobs = jobs_of(req)
    except GatewayError as e:
        if e.status < 500:
            await signing.refused(
                caller,
                action="signature.refused",
                reason=e.description,
                detail={"credential": credential_id, "method": "signDoc"},
            )
        raise
    results = await signing.sign_documents(
        caller,
        sad=req.SAD,
        credential_id=req.credentialID,
        jobs=jobs,
        refused_detail={"credential": credential_id, "method": "signDoc"},
    )
    return web.json_response(response_body(results))
