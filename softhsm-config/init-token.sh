#!/usr/bin/env bash
# Usage: init-token.sh DIR LABEL PIN_FILE SO_PIN_FILE
#
# Idempotent set-up of a SoftHSM2 token for the gateway:
#   - renders DIR/softhsm2.conf from softhsm2.conf.template (token directory DIR/tokens),
#   - creates PIN_FILE and SO_PIN_FILE (random digits, mode 0600) when they do not exist,
#   - initialises a token labelled LABEL unless that conf already has one.
# Prints the absolute path of the conf file on stdout (and nothing else there), so callers can
# do: export SOFTHSM2_CONF="$(softhsm-config/init-token.sh ...)".
# Running it again never re-initialises an existing token: keys on it survive.
set -euo pipefail

die() {
    echo "init-token.sh: $*" >&2
    exit 1
}

[[ $# -eq 4 ]] || die "usage: init-token.sh DIR LABEL PIN_FILE SO_PIN_FILE"
dir=$1
label=$2
pin_file=$3
so_pin_file=$4

[[ -n "$label" ]] || die "LABEL must not be empty"
(( ${#label} <= 32 )) || die "LABEL must be at most 32 characters (PKCS#11 token label)"

command -v softhsm2-util >/dev/null 2>&1 \
    || die "softhsm2-util not found: install SoftHSM2 (Debian/Ubuntu: apt-get install softhsm2)"

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
template="$script_dir/softhsm2.conf.template"
[[ -r "$template" ]] || die "template not found: $template"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
token_dir="$dir/tokens"
conf="$dir/softhsm2.conf"
# SoftHSM refuses to work with a token directory other users can read; keep it private.
mkdir -p "$token_dir"
chmod 0700 "$token_dir"

# Render the conf atomically; rewriting identical content keeps re-runs harmless.
tmp_conf=$(mktemp "$dir/.softhsm2.conf.XXXXXX")
sed "s|@TOKENDIR@|$token_dir|g" "$template" >"$tmp_conf"
chmod 0600 "$tmp_conf"
mv -f "$tmp_conf" "$conf"

random_digits() {
    # 16 digits from the kernel CSPRNG; od never ends early, so no SIGPIPE under pipefail.
    local digits=""
    while (( ${#digits} < 16 )); do
        digits+=$(od -An -tu8 -N8 /dev/urandom | tr -dc '0-9')
    done
    printf '%s' "${digits:0:16}"
}

make_pin_file() {
    local path=$1
    if [[ -e "$path" ]]; then
        [[ -s "$path" ]] || die "PIN file exists but is empty: $path"
        return
    fi
    mkdir -p "$(dirname "$path")"
    (umask 077 && random_digits >"$path")
    chmod 0600 "$path"
}

make_pin_file "$pin_file"
make_pin_file "$so_pin_file"

export SOFTHSM2_CONF="$conf"

token_exists() {
    # Labels are space-padded to 32 characters in --show-slots output.
    softhsm2-util --show-slots 2>/dev/null \
        | sed -n 's/^[[:space:]]*Label:[[:space:]]*//p' \
        | sed 's/[[:space:]]*$//' \
        | grep -Fxq -- "$label"
}

if token_exists; then
    echo "init-token.sh: token '$label' already initialised in $conf; left as is" >&2
else
    # softhsm2-util reads PINs only from argv or a terminal. The PINs are visible in the
    # process table for the fraction of a second the command runs; this is a one-off,
    # local set-up step.
    pin=$(<"$pin_file")
    so_pin=$(<"$so_pin_file")
    softhsm2-util --init-token --free --label "$label" --so-pin "$so_pin" --pin "$pin" \
        >/dev/null || die "softhsm2-util --init-token failed for token '$label'"
    token_exists || die "token '$label' not visible after initialisation"
    echo "init-token.sh: initialised token '$label' in $token_dir" >&2
fi

printf '%s\n' "$conf"
