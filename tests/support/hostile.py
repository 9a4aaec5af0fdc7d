"""Hostile inputs an attacker sends: malformed PDFs that make PDF libraries recurse or loop,
and JSON bodies nested or sized past what a parser handles."""

from __future__ import annotations


def _pdf(objects: list[bytes]) -> bytes:
    """A syntactically complete PDF (header, objects, xref, trailer) around ``objects``."""
    out = b"%PDF-1.7\n"
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for o in offsets:
        out += b"%010d 00000 n \n" % o
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return out


def pdf_self_referencing_pages() -> bytes:
    """The catalog's /Pages is the catalog itself."""
    return _pdf([b"<< /Type /Catalog /Pages 1 0 R >>"])


def pdf_nested_arrays(depth: int = 100_000) -> bytes:
    """``depth`` nested arrays in the catalog."""
    return _pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R /X " + b"[" * depth + b"]" * depth + b" >>",
            b"<< /Type /Pages /Kids [] /Count 0 >>",
        ]
    )


def pdf_indirect_chain(length: int = 50_000) -> bytes:
    """/Pages reached through ``length`` objects that each refer to the next."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    objects += [b"%d 0 R" % (i + 1) for i in range(2, length + 1)]
    objects.append(b"<< /Type /Pages /Kids [] /Count 0 >>")
    return _pdf(objects)


HOSTILE_PDFS = {
    "self-referencing-pages": pdf_self_referencing_pages,
    "nested-arrays": pdf_nested_arrays,
    "indirect-chain": pdf_indirect_chain,
}


def deep_json(depth: int = 100_000) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


def huge_integer_json(digits: int = 5_000) -> bytes:
    return b'{"credentialID":' + b"7" * digits + b"}"


def xml_many_attributes(n: int = 200_000) -> bytes:
    """One element with ``n`` attributes (2.3 MB at 200,000)."""
    return b"<r " + b" ".join(b'a%d="1"' % i for i in range(n)) + b"/>"


def xml_many_namespaces(n: int = 20_000) -> bytes:
    return b"<r " + b" ".join(b'xmlns:n%d="urn:x:%d"' % (i, i) for i in range(n)) + b"/>"


HOSTILE_XML = {"attributes": xml_many_attributes, "namespaces": xml_many_namespaces}
