"""The portal: server-side pages of the verification environment (``/portal``)."""

from gateway.api.portal.pages import routes

__all__ = ["routes"]
