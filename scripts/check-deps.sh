#!/bin/sh
# Checks that this machine can build and test whatsapp_proxy.
# Missing pieces are installed with apt-get when we are root; otherwise the
# one command that installs them is printed and the script fails.
missing=""
command -v cc >/dev/null 2>&1 || missing="$missing gcc"
command -v pkg-config >/dev/null 2>&1 || missing="$missing pkg-config"
[ -f /usr/include/openssl/ssl.h ] || missing="$missing libssl-dev"
[ -f /usr/include/check.h ] || missing="$missing check"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing:$missing"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing && exit 0
    echo "apt-get could not install:$missing" >&2
    exit 1
fi
echo "Missing:$missing. Install them with:" >&2
echo "    sudo apt-get install -y$missing" >&2
exit 1
