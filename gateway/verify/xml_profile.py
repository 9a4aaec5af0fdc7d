"""Where an e-prescription or dispensing signature may sit and what it must cover.

Without this, a signed document element moved elsewhere (where the references still find it by
Id) next to a forged unsigned one at the fixed path would verify (signature wrapping).
"""

from __future__ import annotations

from collections.abc import Sequence

from lxml import etree

from gateway.sign.eprescription import EPrescriptionProfile, SignatureSlot, profile_for_document
from gateway.sign.xades import DS

__all__ = ["placement_problem", "slot_for"]

_DS_SIG = "{%s}Signature" % DS  # noqa: UP031


def _tags_below_root(el: etree._Element) -> list[str]:
    tags = [el.tag for el in (el, *el.iterancestors())]
    return [t for t in reversed(tags[:-1]) if isinstance(t, str)]


def slot_for(
    sig: etree._Element, profiles: Sequence[EPrescriptionProfile]
) -> tuple[EPrescriptionProfile | None, SignatureSlot | None]:
    """(profile, slot): the document's profile, and the slot the signature sits in — the only
    signature there (None: misplaced)."""
    root = sig.getroottree().getroot()
    profile = profile_for_document(root, profiles)
    if profile is None:
        return None, None
    parent = sig.getparent()
    if parent is None:
        return profile, None
    where = "/".join(_tags_below_root(parent))
    for slot in profile.slots:
        if where == slot.sign_path and len(parent.findall(_DS_SIG)) == 1:
            return profile, slot
    return profile, None


def placement_problem(
    profile: EPrescriptionProfile,
    slot: SignatureSlot | None = None,
    root: etree._Element | None = None,
    covered: Sequence[etree._Element] = (),
) -> str | None:
    """Without a slot: why the signature is misplaced. With one: None when the slot's signed
    element is the one element of its name, at its fixed path, and covered by the references."""
    if slot is None or root is None:
        where = " or ".join(f"{profile.root}/{s.sign_path}" for s in profile.slots)
        return f"the signature is not at {where} (or not the only one there)"
    fixed = f"{profile.root}/{slot.signed_path}"
    target = root.find(slot.signed_path)
    if target is None:
        return f"no {fixed} element"
    ids = {id(el) for el in covered}
    if not any(id(a) in ids for a in (target, *target.iterancestors())):
        name = slot.signed_path.rsplit("/", 1)[-1]
        moved = [el for el in covered if el.tag == name]
        return f"the signature does not cover {fixed}" + (
            " (it covers another element of that name instead: signature wrapping)" if moved else ""
        )
    for tag in {*slot.signed_path.split("/"), *slot.sign_path.split("/")}:
        n = sum(1 for _ in root.iter(tag))
        if n != 1:
            return f"the document has {n} <{tag}> elements; the {profile.name} profile allows one"
    return None
