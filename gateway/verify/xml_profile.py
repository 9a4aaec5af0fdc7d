"""Where an e-prescription or dispensing signature may sit and what it must cover.

Without this, a signed document element moved elsewhere (where the references still find it by
Id) next to a forged unsigned one at the fixed path would verify (signature wrapping). Names are
compared by local name wherever elements are counted, and the national format has no namespace
outside its signatures: a reader that ignores namespaces must not find a look-alike (say
``<PrescriptionDocument xmlns="urn:evil">``) that the checks passed over.

Which profile applies is decided by the signature as well as by the root: a signature that sits
in a ``PrescriptionSign`` / ``DispensingSign`` element, or covers a ``PrescriptionDocument`` /
``Dispensing`` element, is an e-prescription signature whatever the root is, and it must be in
its profile's document (the trees of ../shared/fixtures/e-prescription/README.md); any other
signature in a document that is no e-prescription is plain XAdES.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from lxml import etree

from gateway.sign.eprescription import EPrescriptionProfile, SignatureSlot, profile_for_document
from gateway.sign.xades import DS

__all__ = ["claimed_profiles", "misplaced_problem", "placement_problem", "slot_for"]

_DS_SIG = "{%s}Signature" % DS  # noqa: UP031


def _local(el: etree._Element) -> str:
    return etree.QName(el).localname


def _tags_below_root(el: etree._Element) -> list[str]:
    tags = [el.tag for el in (el, *el.iterancestors())]
    return [t for t in reversed(tags[:-1]) if isinstance(t, str)]


def _last(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def claimed_profiles(
    sig: etree._Element,
    profiles: Sequence[EPrescriptionProfile],
    index: Mapping[str, etree._Element] | None = None,
) -> list[EPrescriptionProfile]:
    """The profiles the signature itself claims, whatever the root: one of whose slots it sits
    in (by the local name of its parent: PrescriptionSign, DispensingSign), or whose signed
    element one of its references covers (by local name: PrescriptionDocument, Dispensing)."""
    parent = sig.getparent()
    parent_name = _local(parent) if parent is not None else None
    covered: set[str] = set()
    if index is not None:
        for ref in sig.iterfind(f"{{{DS}}}SignedInfo/{{{DS}}}Reference"):
            uri = ref.get("URI") or ""
            target = index.get(uri[1:]) if uri.startswith("#") else None
            if target is not None:
                covered.add(_local(target))
    return [
        p
        for p in profiles
        if any(
            parent_name == _last(s.sign_path) or _last(s.signed_path) in covered for s in p.slots
        )
    ]


def slot_for(
    sig: etree._Element,
    profiles: Sequence[EPrescriptionProfile],
    index: Mapping[str, etree._Element] | None = None,
) -> tuple[EPrescriptionProfile | None, SignatureSlot | None]:
    """(profile, slot): the document's profile — or, in a document that is none, the profile
    the signature claims (:func:`claimed_profiles`) — and the slot the signature sits in, the
    only signature there (None: misplaced, or not in its profile's document)."""
    root = sig.getroottree().getroot()
    profile = profile_for_document(root, profiles)
    if profile is None:
        claimed = claimed_profiles(sig, profiles, index)
        return (claimed[0], None) if claimed else (None, None)
    parent = sig.getparent()
    if parent is None:
        return profile, None
    where = "/".join(_tags_below_root(parent))
    for slot in profile.slots:
        if where == slot.sign_path and len(parent.findall(_DS_SIG)) == 1:
            return profile, slot
    return profile, None


def misplaced_problem(profile: EPrescriptionProfile, sig: etree._Element) -> str:
    """Why a signature of ``profile`` has no slot (:func:`slot_for` gave none)."""
    root = sig.getroottree().getroot()
    if profile_for_document(root, (profile,)) is None:
        parent = sig.getparent()
        sits = _local(parent) if parent is not None else None
        if sits in {_last(s.sign_path) for s in profile.slots}:
            why = f"it sits in <{sits}>"
        else:
            why = "it covers " + " or ".join(f"<{_last(s.signed_path)}>" for s in profile.slots)
        return (
            f"a {profile.name} signature ({why}) in a document whose root is "
            f"<{etree.QName(root).text}>, not <{profile.root}> holding <{profile.container}>: "
            "it is verified as such or not at all"
        )
    where = " or ".join(f"{profile.root}/{s.sign_path}" for s in profile.slots)
    return f"the signature is not at {where} (or not the only one there)"


def _foreign_element(root: etree._Element) -> etree._Element | None:
    """The first element outside the signatures that has a namespace (document order)."""
    stack = [root]
    while stack:
        el = stack.pop()
        if el.tag == _DS_SIG:
            continue
        if etree.QName(el).namespace is not None:
            return el
        stack.extend(reversed(list(el.iterchildren("*"))))
    return None


def placement_problem(
    profile: EPrescriptionProfile,
    slot: SignatureSlot,
    root: etree._Element,
    covered: Sequence[etree._Element] = (),
) -> str | None:
    """None when the document has no element in a namespace outside its signatures, the
    slot's signed element is the one element of its (local) name, at its fixed path, and
    covered by the references, and its Base64 document element holds text alone (no child
    node: a comment inside would be invisible to the digest)."""
    foreign = _foreign_element(root)
    if foreign is not None:
        from gateway.verify.xml_refs import element_path

        q = etree.QName(foreign)
        return (
            f"element <{q.localname}> at {element_path(foreign)} is in namespace "
            f"{q.namespace}: the {profile.name} document has no namespace outside its "
            "signatures (a look-alike of its elements?)"
        )
    fixed = f"{profile.root}/{slot.signed_path}"
    target = root.find(slot.signed_path)
    if target is None:
        return f"no {fixed} element"
    ids = {id(el) for el in covered}
    if not any(id(a) in ids for a in (target, *target.iterancestors())):
        name = _last(slot.signed_path)
        moved = [el for el in covered if _local(el) == name]
        return f"the signature does not cover {fixed}" + (
            " (it covers another element of that name instead: signature wrapping)" if moved else ""
        )
    text_el = root.find(slot.text_path)
    if text_el is None:
        return f"no {profile.root}/{slot.text_path} element"
    if len(text_el):  # child nodes of any kind: elements, comments, processing instructions
        child = text_el[0]
        kind = (
            "a comment"
            if isinstance(child, etree._Comment)
            else "a processing instruction"
            if isinstance(child, etree._ProcessingInstruction)
            else f"an element <{etree.QName(child).text}>"
        )
        return (
            f"<{_last(slot.text_path)}> must hold its Base64 text alone: it holds {kind} "
            "(canonicalization leaves comments out of the digest, and a reader of the "
            "element's text stops at the first child)"
        )
    counts = Counter(_local(el) for el in root.iter("*"))
    for tag in sorted({*slot.signed_path.split("/"), *slot.sign_path.split("/")}):
        if counts[tag] != 1:
            return (
                f"the document has {counts[tag]} <{tag}> elements (in any namespace); the "
                f"{profile.name} profile allows one"
            )
    return None
