"""Virtual smart cards written in the project, behind real pcscd through vsmartcard's vpcd.

``vpcd`` (Debian ``vsmartcard-vpcd``) is a pcscd reader driver that forwards each APDU to a TCP
socket; a card here is a :class:`CardApplet` (pure: bytes in, bytes out) that a
:class:`VirtualReader` connects to one vpcd slot. :mod:`gateway.vcard.pcscd` runs a private
pcscd (own mount and network namespaces) whose clients are any PC/SC program: pyscard,
``pcsc_scan``, ``opensc-tool``, the project's card client. The applets: :mod:`.jpki` (My Number
card, user authentication).
"""

from gateway.vcard.applet import BinaryFile, CardApplet, make_atr
from gateway.vcard.vpcd import VirtualReader

__all__ = ["BinaryFile", "CardApplet", "VirtualReader", "make_atr"]
