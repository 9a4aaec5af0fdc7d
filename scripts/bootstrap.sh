#!/usr/bin/env bash
# Idempotent set-up: installs what is missing and nothing else.
#   1. Debian packages the gateway and its tests need (as root, via apt-get).
#   2. The virtualenv at .venv with the project installed editable, with test extras.
# Re-running it is cheap: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

# softhsm2/opensc: the HSM for tests and the sandbox; xmlsec1, poppler-utils (pdfsig, pdftoppm),
# openssl: independent verifiers in the tests; chromium: the real-browser WebAuthn tests (driven
# by the Playwright package, never by a browser it downloads); postgresql: the store tests on a
# throwaway PostgreSQL cluster; fonts-noto-cjk: Japanese text in generated PDFs renders;
# libnss3-tools: certutil builds the NSS trust store that pdfsig verifies PAdES against;
# pcscd, vsmartcard-vpcd, pcsc-tools: real PC/SC with virtual card readers in tests and
# `sandbox cards up`; swig, libpcsclite-dev: pyscard builds from source.
APT_PACKAGES=(softhsm2 opensc xmlsec1 poppler-utils openssl sqlite3 python3-venv curl
              ca-certificates chromium postgresql fonts-noto-cjk libnss3-tools
              pcscd vsmartcard-vpcd pcsc-tools swig libpcsclite-dev)

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
