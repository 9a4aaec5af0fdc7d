"""Both languages of the portal have every word, and every key a template uses exists."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.api.portal import i18n

TEMPLATES = Path(i18n.__file__).parent / "templates"


def test_both_languages_have_the_same_keys() -> None:
    assert set(i18n.JA) == set(i18n.EN)
    assert all(v.strip() for v in [*i18n.JA.values(), *i18n.EN.values()])


def test_every_key_the_templates_use_exists() -> None:
    used = set()
    for path in TEMPLATES.glob("*.html"):
        used |= set(re.findall(r"\bt\.([a-z_0-9]+)", path.read_text(encoding="utf-8")))
        used |= set(re.findall(r'"(nav_[a-z]+)"', path.read_text(encoding="utf-8")))
    assert used, "the walk found no key"
    assert used - set(i18n.JA) == set()


def test_the_language_choice() -> None:
    assert i18n.pick(None, None) == "ja"
    assert i18n.pick("en", "ja") == "en"
    assert i18n.pick(None, "en") == "en"
    assert i18n.pick("fr", None) == "ja"


def test_indications_in_words() -> None:
    assert i18n.explain_indication("ja", "TOTAL-FAILED").startswith("署名は無効")
    assert i18n.explain_sub("en", "HASH_FAILURE").startswith("The signed content was changed")
    assert i18n.explain_sub("en", "SOMETHING_NEW") == i18n.EN["sub_unknown"]
    assert i18n.explain_sub("ja", None) == ""


def test_every_modification_level_has_words_in_both_languages() -> None:
    """The verify page looks the level's words up by name (``t["modification_" ~ level]``)."""
    from pyhanko.sign.diff_analysis import ModificationLevel

    for level in ModificationLevel:
        assert f"modification_{level.name}" in i18n.JA, level
        assert f"modification_{level.name}" in i18n.EN, level
