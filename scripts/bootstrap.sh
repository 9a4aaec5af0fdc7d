#!/usr/bin/env bash
# Idempotent set-up: installs what is missing and nothing else.
#   1. Debian packages the gateway and its tests need (as root, via apt-get).
#   2. The virtualenv at .venv with the project installed editable, with test extras.
# Re-running it is cheap: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every Debian package the gateway, `make test` and `make bench` use, with what for. The install
# runs with --no-install-recommends, so nothing here may rely on a package's recommendations.
APT_PACKAGES=(
    python3-venv          # the .venv
    build-essential       # C extensions built from source (pyscard, python-pkcs11 without a wheel)
    softhsm2              # the HSM of tests, bench and sandbox (libsofthsm2.so, softhsm2-util)
    opensc                # pkcs11-tool, to inspect a token by hand (operations.md)
    openssl               # independent verifier of CMS, TSA replies, OCSP, PKCS#12 in the tests
    xmlsec1               # independent verifier of XAdES / e-prescription signatures
    poppler-utils         # pdfsig (PAdES), pdftotext/pdffonts/pdftoppm (password notice)
    poppler-data          # CJK CMaps: pdftotext reads Japanese text only with them
    libnss3-tools         # certutil: the NSS trust store that pdfsig verifies against
    fonts-ipaexfont       # IPAex Mincho/Gothic, embedded (subset) in the password notice
    fonts-dejavu-core     # DejaVu Sans Mono Bold: the password on the notice
    fonts-noto-cjk        # Japanese glyphs in Chromium pages and PDFs that embed no font
    curl                  # a real foreign TLS client with the facility .p12 in the tests
    ca-certificates
    sqlite3               # the default store; backups by hand (operations.md)
    chromium              # the real-browser WebAuthn tests (driven by Playwright)
    postgresql            # the store tests on a throwaway cluster (initdb, pg_ctl)
    pcscd                 # PC/SC daemon: card readers, real or virtual
    vsmartcard-vpcd       # virtual PC/SC reader driver that the virtual test cards speak to
    pcsc-tools            # pcsc_scan, to see a reader and a card by hand
    libpcsclite-dev swig  # build pyscard (the PC/SC client) from source
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv"
    "$PY" -m venv .venv
fi

# Reinstall only when the dependency list changed since the last install.
stamp=.venv/.hpki-gateway-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: installing the project into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
