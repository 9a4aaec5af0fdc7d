"""XAdES schema validation (ETSI TS 101 903 1.3.2 and 1.4.1, W3C XML-DSig), as the reference
e-prescription verifier checks the signature parts. The schemas ship with the package and are
resolved locally: nothing is fetched."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

from lxml import etree

__all__ = ["schema_problem"]

_DIR = Path(__file__).parent / "xsd"
_LOCATIONS = {
    "http://www.w3.org/TR/2008/REC-xmldsig-core-20080610/xmldsig-core-schema.xsd": (
        "xmldsig-core-schema.xsd"
    ),
    "http://uri.etsi.org/01903/v1.3.2/XAdES01903v132-201601.xsd": "XAdES01903v132-201601.xsd",
}
_WRAPPER = b"""<xsd:schema xmlns:xsd="http://www.w3.org/2001/XMLSchema"
  targetNamespace="urn:hpki-gateway:xades-schemas" elementFormDefault="qualified">
 <xsd:import namespace="http://www.w3.org/2000/09/xmldsig#"
   schemaLocation="http://www.w3.org/TR/2008/REC-xmldsig-core-20080610/xmldsig-core-schema.xsd"/>
 <xsd:import namespace="http://uri.etsi.org/01903/v1.3.2#"
   schemaLocation="http://uri.etsi.org/01903/v1.3.2/XAdES01903v132-201601.xsd"/>
 <xsd:import namespace="http://uri.etsi.org/01903/v1.4.1#"
   schemaLocation="XAdES01903v141-201601.xsd"/>
</xsd:schema>"""


class _Local(etree.Resolver):
    def resolve(self, system_url: str, public_id: str, context: object) -> object:  # type: ignore[override]
        name = _LOCATIONS.get(system_url) or Path(system_url).name
        path = _DIR / name
        if path.is_file():
            return self.resolve_filename(str(path), context)  # type: ignore[attr-defined]
        return None


@functools.cache
def _schema() -> etree.XMLSchema:
    # The bundled W3C schema carries a DTD with entity declarations: it is our own file, so
    # its DTD is loaded; network access stays off.
    parser = etree.XMLParser(load_dtd=True, resolve_entities=True, no_network=True)
    parser.resolvers.add(_Local())
    doc = etree.fromstring(_WRAPPER, parser, base_url=str(_DIR / "wrapper.xsd"))
    return etree.XMLSchema(doc)


def schema_problem(sig: etree._Element) -> str | None:
    """None when the ds:Signature (with its XAdES parts) is schema-valid; else the first error."""
    schema = _schema()
    doc = etree.ElementTree(copy.deepcopy(sig))
    if schema.validate(doc):
        return None
    err = schema.error_log.last_error  # type: ignore[attr-defined]
    return f"line {err.line}: {err.message}" if err is not None else "invalid"
