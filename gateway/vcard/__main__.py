"""``python -m gateway.vcard DIR``: the background process of ``sandbox cards up DIR``."""

import sys
from pathlib import Path

from gateway.vcard.sandbox import serve_cards

if __name__ == "__main__":
    serve_cards(Path(sys.argv[1]))
