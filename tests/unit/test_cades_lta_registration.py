"""The archive-timestamp attribute names work in a process that encoded CMS attributes before
the B-LTA code was loaded (a worker that signed B-T first): asn1crypto builds its name -> OID
map once, so the registration must reach a map that already exists."""

from __future__ import annotations

import subprocess
import sys


def test_names_encode_after_the_reverse_map_was_built() -> None:
    code = """
from asn1crypto import cms
when = cms.Time({"utc_time": "261127000000Z"})
cms.CMSAttribute({"type": "signing_time", "values": [when]}).dump()
assert cms.CMSAttributeType._reverse_map is not None
import gateway.sign.cades_lta as lta
print(cms.CMSAttributeType("ats_hash_index_v3").dotted)
print(cms.CMSAttributeType("archive_time_stamp_v3").dotted)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.4.0.19122.1.5", "0.4.0.1733.2.4"]
