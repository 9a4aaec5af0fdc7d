"""XML-DSig reference processing shared by the verifier and the archive-timestamp builder:
Id lookup (both ``id`` and ``Id``), the transforms HPKI uses, Base64 text, and the input of a
XAdES 1.4.1 ArchiveTimeStamp."""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Iterator

from lxml import etree

from gateway.sign.xades import C14N10, DETACHED_URI, DS, ENVELOPED, EXC_C14N, XADES, c14n

__all__ = [
    "XADES141",
    "ArchiveInputs",
    "apply_transforms",
    "archive_timestamp_input",
    "b64_text",
    "detached",
    "element_path",
    "id_index",
    "reference_octets",
]

XADES141 = "http://uri.etsi.org/01903/v1.4.1#"
_DS = "{%s}" % DS  # noqa: UP031
_XA = "{%s}" % XADES  # noqa: UP031


def id_index(root: etree._Element) -> tuple[dict[str, etree._Element], set[str]]:
    """Elements by Id (attributes ``Id``, ``ID`` and ``id``), and the Ids seen more than once."""
    index: dict[str, etree._Element] = {}
    dupes: set[str] = set()
    for el in root.iter("*"):  # elements only (no comments or PIs)
        for attr in ("Id", "ID", "id"):
            v = el.get(attr)
            if v is not None:
                if v in index and index[v] is not el:
                    dupes.add(v)
                index[v] = el
    return index, dupes


def b64_text(el: etree._Element | None, what: str) -> bytes:
    """The Base64 content of ``el`` (whitespace ignored); ValueError naming ``what``."""
    text = "".join((el.text or "").split()) if el is not None else ""
    if not text:
        raise ValueError(f"{what} is empty")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} is not valid Base64") from e


@contextlib.contextmanager
def detached(el: etree._Element) -> Iterator[None]:
    """Take ``el`` out of its tree for a moment (the enveloped-signature transform), without
    copying the tree: the text after it stays where it was, and everything is put back."""
    parent = el.getparent()
    if parent is None:
        yield
        return
    index = parent.index(el)
    tail = el.tail
    prev = el.getprevious()
    prev_tail = prev.tail if prev is not None else None
    parent_text = parent.text
    if tail:
        if prev is not None:
            prev.tail = (prev_tail or "") + tail
        else:
            parent.text = (parent_text or "") + tail
    parent.remove(el)  # lxml takes the tail along; it was kept just above
    try:
        yield
    finally:
        if prev is not None:
            prev.tail = prev_tail
        else:
            parent.text = parent_text
        el.tail = tail
        parent.insert(index, el)


def apply_transforms(
    node: etree._Element | etree._ElementTree, transforms: list[str], sig: etree._Element
) -> bytes:
    """Transforms the gateway writes and HPKI uses: enveloped-signature, (exc-)C14N 1.0."""
    c14n_alg = C14N10  # XMLDSig: a node-set becomes octets by inclusive C14N by default
    enveloped = False
    for t in transforms:
        if t == ENVELOPED:
            enveloped = True
        elif t in (EXC_C14N, C14N10):
            c14n_alg = t
        else:
            raise ValueError(f"unsupported transform {t}")
    if enveloped:
        start = node.getroot() if isinstance(node, etree._ElementTree) else node
        if start is sig:
            return b""  # the transform removes the whole node-set
        if any(a is start for a in sig.iterancestors()):
            with detached(sig):
                return c14n(node, exclusive=c14n_alg == EXC_C14N)
    return c14n(node, exclusive=c14n_alg == EXC_C14N)


def reference_octets(
    ref: etree._Element,
    sig: etree._Element,
    tree: etree._ElementTree,
    index: dict[str, etree._Element],
    content: bytes | None,
) -> tuple[bytes | None, etree._Element | None]:
    """The octets a ds:Reference digests and the element it points to (None, None: detached
    content not given; KeyError: the Id is not found)."""
    uri = ref.get("URI")
    transforms = [t.get("Algorithm", "") for t in ref.iterfind(f"{_DS}Transforms/{_DS}Transform")]
    if uri is None or uri == DETACHED_URI or not (uri == "" or uri.startswith("#")):
        return content, None
    if uri == "":
        return apply_transforms(tree, transforms, sig), tree.getroot()
    target = index[uri[1:]]
    return apply_transforms(target, transforms, sig), target


def element_path(el: etree._Element) -> str:
    """A readable absolute path of an element (prefix:name, [n] among same-named siblings)."""
    parts = []
    node: etree._Element | None = el
    while node is not None:
        q = etree.QName(node)
        name = f"{node.prefix}:{q.localname}" if node.prefix else q.localname
        parent = node.getparent()
        if parent is not None:
            same = [c for c in parent if c.tag == node.tag]
            if len(same) > 1:
                name += f"[{same.index(node) + 1}]"
        parts.append(name)
        node = parent
    return "/" + "/".join(reversed(parts))


def archive_timestamp_input(
    sig: etree._Element,
    before: etree._Element | None,
    tree: etree._ElementTree,
    index: dict[str, etree._Element],
    *,
    exclusive: bool,
    content: bytes | None = None,
) -> bytes:
    """What a XAdES 1.4.1 ArchiveTimeStamp stamps (ETSI TS 101 903 §8.2.1 / G.2.2.16.1.3).

    The concatenation of: every ds:Reference's octets after its transforms, in order; the
    canonical SignedInfo, SignatureValue and KeyInfo; every unsigned signature property that
    precedes the ArchiveTimeStamp (``before``; None: all of them, for a new one), canonical and
    in document order; and every ds:Object other than the one holding QualifyingProperties.
    """
    return ArchiveInputs(sig, tree, index, content=content).input(before, exclusive=exclusive)


class ArchiveInputs:
    """:func:`archive_timestamp_input` for each ArchiveTimeStamp of one signature in turn.

    The parts every timestamp shares (references, SignedInfo, SignatureValue, KeyInfo, the other
    ds:Objects) are made once, and each unsigned property is canonicalized once per
    canonicalization method, not again for every later timestamp (which made the work grow
    with the square of the number of timestamps).
    """

    def __init__(
        self,
        sig: etree._Element,
        tree: etree._ElementTree,
        index: dict[str, etree._Element],
        *,
        content: bytes | None = None,
    ) -> None:
        self._sig, self._tree, self._index, self._content = sig, tree, index, content
        usp = sig.find(
            f"{_DS}Object/{_XA}QualifyingProperties/{_XA}UnsignedProperties/"
            f"{_XA}UnsignedSignatureProperties"
        )
        children = list(usp) if usp is not None else []
        #: The unsigned properties (elements), and for each child of UnsignedSignatureProperties
        #: how many of them precede it (the list keeps the proxies, hence their ids, alive).
        self._children = children
        self._props: list[etree._Element] = []
        self._before: dict[int, int] = {}
        for child in children:
            self._before[id(child)] = len(self._props)
            if isinstance(child.tag, str):
                self._props.append(child)
        self._refs: bytes | None = None
        self._fixed: dict[bool, tuple[bytes, bytes]] = {}
        self._canonical: dict[bool, list[bytes]] = {}

    def input(self, before: etree._Element | None, *, exclusive: bool) -> bytes:
        """The input of the ArchiveTimeStamp ``before`` (None: of a new, last one)."""
        n = len(self._props) if before is None else self._before.get(id(before), len(self._props))
        head, tail = self._fixed_parts(exclusive)
        done = self._canonical.setdefault(exclusive, [])
        while len(done) < n:
            done.append(c14n(self._props[len(done)], exclusive=exclusive))
        return b"".join([head, *done[:n], tail])

    def _fixed_parts(self, exclusive: bool) -> tuple[bytes, bytes]:
        if exclusive in self._fixed:
            return self._fixed[exclusive]
        sig = self._sig
        si = sig.find(_DS + "SignedInfo")
        if si is None:
            raise ValueError("no ds:SignedInfo")
        if self._refs is None:
            parts: list[bytes] = []
            for ref in si.iterfind(_DS + "Reference"):
                octets, _ = reference_octets(ref, sig, self._tree, self._index, self._content)
                if octets is None:
                    raise ValueError(
                        "a detached reference's content is needed for the archive timestamp"
                    )
                parts.append(octets)
            self._refs = b"".join(parts)
        head = [self._refs]
        for tag in ("SignedInfo", "SignatureValue", "KeyInfo"):
            el = sig.find(_DS + tag)
            if el is not None:
                head.append(c14n(el, exclusive=exclusive))
        tail = [
            c14n(obj, exclusive=exclusive)
            for obj in sig.iterfind(_DS + "Object")
            if obj.find(_XA + "QualifyingProperties") is None
        ]
        self._fixed[exclusive] = (b"".join(head), b"".join(tail))
        return self._fixed[exclusive]
