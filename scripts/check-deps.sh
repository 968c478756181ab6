#!/bin/sh
# Checks that this machine has what whatsapp_proxy needs. `make`, `make run`,
# `make test`, `make install` and `make demo` run it first.
#
#   sh scripts/check-deps.sh      the check; it prints nothing when all is there
#   sh scripts/check-deps.sh qr   only says how to get qrencode (for `make qr`)
#
# Needed to build and to test: a C compiler and make (build-essential),
# pkg-config, the OpenSSL and Check headers, and the openssl program (the
# tests make certificates with it). Needed for the demo and the tutorial's
# checkpoints: nc and curl. Optional: qrencode, which draws the share link
# as a QR code.
#
# As root, what is missing is installed with apt-get. Otherwise the one
# command that installs it is printed, and the check fails only when the
# build or the tests cannot work.

# Prints the command that installs the packages $1 (" a b c"), for the
# person at this machine: as root, with sudo, or with su - when there is no
# sudo (a fresh Debian has none). $2 is the command to run again after it.
how_to_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "    with your system's installer (these are Debian's names):$1"
    elif [ "$(id -u)" = 0 ]; then
        echo "    apt-get update && apt-get install -y$1"
    elif command -v sudo >/dev/null 2>&1; then
        echo "    sudo apt-get update && sudo apt-get install -y$1"
        echo "(if you may not use sudo: become root with \`su -\`, then run: apt-get update && apt-get install -y$1)"
    else
        echo "    There is no sudo here: become root with \`su -\`, then run: apt-get update && apt-get install -y$1"
        echo "    Then type \`exit\` to be yourself again, and run \`${2:-make}\` again."
    fi
}

if [ "${1:-}" = qr ]; then
    command -v qrencode >/dev/null 2>&1 && exit 0
    echo "No QR code: qrencode is not installed (the share link above works without it). Get it with:"
    how_to_install " qrencode" "make qr"
    exit 0
fi

needed=""
{ command -v cc && command -v make && [ -f /usr/include/stdio.h ]; } >/dev/null 2>&1 ||
    needed="$needed build-essential"
command -v pkg-config >/dev/null 2>&1 || needed="$needed pkg-config"
[ -f /usr/include/openssl/ssl.h ] || needed="$needed libssl-dev"
[ -f /usr/include/check.h ] || needed="$needed check"
command -v openssl >/dev/null 2>&1 || needed="$needed openssl"
demo=""
command -v nc >/dev/null 2>&1 || demo="$demo netcat-openbsd"
command -v curl >/dev/null 2>&1 || demo="$demo curl"
[ -z "$needed$demo" ] && exit 0
missing="$needed$demo"
optional=""
command -v qrencode >/dev/null 2>&1 || optional=" qrencode"

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing:$missing"
    log=$(mktemp) || exit 1
    trap 'rm -f "$log" "$log.status"' EXIT
    # Runs apt-get, shows its output as it comes, and keeps it in $log.
    apt_get() {
        { DEBIAN_FRONTEND=noninteractive apt-get "$@" 2>&1; echo $? > "$log.status"; } | tee "$log"
        return "$(cat "$log.status")"
    }
    # $missing is split into its words on purpose.
    # shellcheck disable=SC2086
    if apt_get update -q && apt_get install -y -q $missing; then
        [ -z "$optional" ] ||
            echo "Optional: \`apt-get install -y qrencode\` lets \`make qr\` show the share link as a QR code."
        exit 0
    fi
    if grep -q -e 'Could not get lock' -e 'Unable to acquire the dpkg' -e 'Unable to lock' "$log"; then
        echo "apt-get is busy: another program is installing updates (a new server does this for a while after its first start)." >&2
        echo "Wait a few minutes and run this again." >&2
    else
        echo "apt-get could not install:$missing (its message is above)." >&2
    fi
    exit 1
fi

if [ -n "$needed" ]; then
    echo "Missing to build and test whatsapp_proxy:$needed${demo:+ (and for the demo:$demo)}." >&2
    [ -z "$optional" ] ||
        echo "(Optional: add qrencode to the command below, and \`make qr\` also shows the share link as a QR code.)" >&2
    echo "Install them with:" >&2
    how_to_install "$missing" >&2
    exit 1
fi
echo "Note: the demo and the tutorial's checkpoints need$demo (building does not). Install with:" >&2
how_to_install "$demo" >&2
exit 0
