"""The signing use case, whatever proved the signer's presence.

An authenticator (FIDO2 today; the My Number card and the card PIN next) proves who is present
and what they approved, and returns a ``Grant`` (``grant.py``). ``ledger.SadLedger`` stores it
as a SAD and spends it atomically; ``core.SigningService`` is the one place that consumes a SAD,
touches the credential's key (through ``hsm.api.KeyStore``), refunds what could not be produced
and audits. ``rules.py`` holds the one rule about who may sign. HTTP handlers only decode,
validate, call and render. This package imports ``hsm``, ``sign`` (formats) and ``store``,
never ``api``; ``auth`` imports ``grant``, ``rules`` and ``ledger`` from it.
"""
