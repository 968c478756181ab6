#!/bin/sh
# make demo: the whole proxy on one machine, with no internet.
#
#   demo upstream  127.0.0.1:9000   prints PROXY headers, echoes the rest
#   whatsapp_proxy 127.0.0.1:5222   plain chat port
#                  127.0.0.1:8443   TLS chat port
#                  127.0.0.1:8080   chat port that expects a PROXY header
#                  127.0.0.1:7587   media port (passthrough, no header)
#                  127.0.0.1:8199   statistics (http://127.0.0.1:8199/)
#
# Both stop with Ctrl-C. Another terminal then follows tutorial.md, Part 1.
set -eu
cd "$(dirname "$0")/.."
./demo/demo_upstream 9000 &
upstream=$!
trap 'kill $upstream 2>/dev/null' EXIT INT TERM
./whatsapp_proxy --listen 127.0.0.1:5222 --listen 127.0.0.1:8443/tls \
    --listen 127.0.0.1:8080/accept-proxy --listen 127.0.0.1:7587/media \
    --upstream 127.0.0.1:9000 --media-upstream 127.0.0.1:9000 \
    --public-host 127.0.0.1 --check-interval 5 --timeout-handshake 5 "$@"
