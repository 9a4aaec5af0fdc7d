"""The gateway's error hierarchy.

Every error a client can see is a :class:`GatewayError` with a stable machine ``code`` (the CSC
error code where CSC defines one), an HTTP ``status`` and a ``description`` that is safe to show.
Library exceptions are translated where they enter (``raise HsmUnavailable(...) from e``); the
cause stays in the server log, never in a response. One place renders them (``gateway.api.errors``).
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class: a failure with a safe description and a stable code."""

    status: int = 500
    code: str = "server_error"

    # What a client is told; None means the description itself is safe to show. Set where the
    # description names internals (key ids, token labels) that belong in the server log only.
    public_description: str | None = None

    def __init__(self, description: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def client_description(self) -> str:
        return self.public_description or self.description

    @property
    def logged(self) -> str:
        """The description with the type of its cause, for the server log (never the cause's
        text, which may carry request data): ``database unavailable (cause: OperationalError)``."""
        cause = self.__cause__
        return self.description + (f" (cause: {type(cause).__name__})" if cause else "")


class InvalidRequest(GatewayError):
    """Malformed or semantically invalid input (CSC ``invalid_request``)."""

    status = 400
    code = "invalid_request"


class AccessDenied(GatewayError):
    """Authenticated, but not allowed: revoked, suspended, unknown certificate, locked signer."""

    status = 403
    code = "access_denied"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class Conflict(GatewayError):
    """The request conflicts with the current state (e.g. a duplicate registration)."""

    status = 409
    code = "conflict"


class Gone(GatewayError):
    """The thing existed but is no longer available (an expired or used download link)."""

    status = 410
    code = "gone"


class Locked(GatewayError):
    """Locked after too many wrong passwords; only an officer's action unlocks it."""

    status = 423
    code = "locked"


class WrongPassword(GatewayError):
    """A wrong download password; the description says how many attempts are left."""

    status = 403
    code = "wrong_password"


class UnsupportedMediaType(GatewayError):
    """A request body in another media type than the route accepts (JSON on the API)."""

    status = 415
    code = "unsupported_media_type"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class TemporarilyUnavailable(GatewayError):
    """A dependency (HSM token, database) is down; the client should retry after a delay."""

    status = 503
    code = "temporarily_unavailable"

    def __init__(self, description: str, *, retry_after: int = 5) -> None:
        super().__init__(description, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class HsmUnavailable(TemporarilyUnavailable):
    """The HSM token is absent or failing; the key store reconnects by itself."""


class ConfigError(Exception):
    """The settings cannot be loaded; the message names the file, line or key at fault."""


class PkiError(GatewayError):
    """A certificate or CSR does not meet the profile or does not match its key."""

    status = 400
    code = "invalid_request"


class KeyNotFound(TemporarilyUnavailable):
    """The credential's key is not on the token (deleted, or the wrong token is configured)."""

    public_description = "the signing key of this credential is not available"

    def __init__(self, description: str, *, retry_after: int = 60) -> None:
        super().__init__(description, retry_after=retry_after)


# -- signatures, timestamps ------------------------------------------------------------------


class RoleNotPermitted(GatewayError):
    """The signer's hcRole may not sign this document type (configurable mapping)."""

    status = 403
    code = "role_not_permitted"


class TsaUnavailable(TemporarilyUnavailable):
    """The timestamp authority could not be reached or answered badly; nothing was returned.

    503 with Retry-After: the request can be repeated as it was (through signDoc the SAD is
    given back). The code names the cause for clients.
    """

    code = "tsa_unavailable"

    def __init__(self, description: str, *, retry_after: int = 30) -> None:
        super().__init__(description, retry_after=retry_after)


class TsaTimeout(TemporarilyUnavailable):
    """The timestamp authority did not answer in time; nothing was returned (503, Retry-After)."""

    code = "tsa_timeout"

    def __init__(self, description: str, *, retry_after: int = 30) -> None:
        super().__init__(description, retry_after=retry_after)


class RevocationUnavailable(TemporarilyUnavailable):
    """The revocation data a long-term signature (B-LT / B-LTA) must carry could not be had:
    the CRL server is down or slow and no current CRL is cached or configured. Nothing is
    signed; the client retries later."""

    def __init__(self, description: str, *, retry_after: int = 60) -> None:
        super().__init__(description, retry_after=retry_after)
