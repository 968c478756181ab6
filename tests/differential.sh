#!/bin/sh
# tests/differential.sh - whatsapp_proxy and HAProxy side by side. HAProxy
# runs with the official proxy's settings (bench/haproxy.cfg's values),
# whatsapp_proxy with the same timeouts; the same scripted clients go
# through both, and what every client and every upstream saw (bytes, their
# hash, how the connection ended, how long it took) is compared.
# Differences on purpose are listed, with their reason, in differential.py
# (DELIBERATE). tests/README.md says what each scenario proves.
#
#   sh tests/differential.sh          (or: make test-peers)
#
# What runs (all on 127.0.0.1, all started and stopped here by PID):
#
#   clients --plain, TLS--> whatsapp_proxy --PROXY v2--> recording upstream W
#   clients --plain, TLS--> haproxy        --PROXY v2--> recording upstream H
#   clients --> a second whatsapp_proxy / haproxy front --> nothing listens
#   clients --> a third whatsapp_proxy / haproxy front --> an upstream that
#               starts listening 2.5 s after the client's connect
#
# The recording upstreams and the clients are differential.py.
#
# Output: one line per check, "ok - ..." or "not ok - ...", then
# "N passed, N failed". Exit status 0 only if nothing failed.

set -u

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PROXY=${PEERS_PROXY:-$ROOT/whatsapp_proxy}
TOOL="$HERE/peer_tool.py"
STARTUP_S=10          # the longest wait for any server to listen
RUN_LIMIT_S=180       # the longest wait for differential.py to finish
PASSED=0
FAILED=0

# ok, not_ok, show_log, need, install_missing, new_run, start, cleanup,
# wait_listen, add_counts, still_running: see lib.sh.
. "$HERE/lib.sh"

# ---- 1. Tools ------------------------------------------------------------

need haproxy haproxy
need openssl openssl
need python3 python3
install_missing
[ -x "$PROXY" ] || { echo "no $PROXY: run make whatsapp_proxy" >&2; exit 1; }

# ---- 2. Processes: started here, stopped here by PID ---------------------

new_run wp-differential "${PEERS_KEEP:-}"

# ---- 3. Ports, certificate and configuration ----------------------------

# Ports below the ephemeral range, checked free (peer_tool.py ports). For
# each proxy: plain front, TLS front, dead front, late front, recording
# upstream, late upstream. DEAD_UP: nothing ever listens there.
set -- $(python3 "$TOOL" ports 13)
W_PORTS="$1,$2,$3,$4,$5,$6"
H_PORTS="$7,$8,$9,${10},${11},${12}"
W_PLAIN=$1 W_TLS=$2 W_DEAD=$3 W_LATE=$4 W_UP=$5 W_LATE_UP=$6
H_PLAIN=$7 H_TLS=$8 H_DEAD=$9 H_LATE=${10} H_UP=${11} H_LATE_UP=${12}
DEAD_UP=${13}

# One certificate for both TLS fronts: ECDSA P-256, self-signed, as
# whatsapp_proxy makes by default. HAProxy wants key and chain in one file.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" -days 2 -subj /CN=localhost \
    >"$TMP/openssl.log" 2>&1 || { echo "openssl req failed" >&2; exit 1; }
cat "$TMP/cert.pem" "$TMP/key.pem" >"$TMP/haproxy.pem"

# HAProxy as the official proxy: global and defaults are bench/haproxy.cfg's
# (the reference's values), and so is the main backend's default-server
# line. Two additions that change no behaviour: a log on stderr (notices
# only, into the run's log folder), and nbthread left out, which in
# HAProxy 2.6 means one thread per CPU, what bench/ writes out.
# The backends of the dead and late upstreams have no health check: the
# first check comes at HAProxy's start, and one failure then is enough to
# take a server out (it starts at the edge of its "rise" count); HAProxy
# would then close clients at once, and the test would measure the
# checks, not the retries. whatsapp_proxy checks first one
# --check-interval (60 s) after its start, after this test.
cat >"$TMP/haproxy.cfg" <<EOF
global
  tune.bufsize 4096
  maxconn 27500
  ssl-server-verify none
  no strict-limits
  log stderr format short local0 notice

defaults
  mode tcp
  log global
  timeout client-fin 1s
  timeout server-fin 1s
  timeout connect 5s
  timeout client 200s
  timeout server 200s
  default-server inter 10s fastinter 1s downinter 3s error-limit 50

frontend plain
  maxconn 27495
  bind 127.0.0.1:$H_PLAIN
  default_backend upstream

frontend tls
  maxconn 27495
  bind 127.0.0.1:$H_TLS ssl crt $TMP/haproxy.pem
  default_backend upstream

frontend dead
  bind 127.0.0.1:$H_DEAD
  default_backend dead

frontend late
  bind 127.0.0.1:$H_LATE
  default_backend late

backend upstream
  default-server check inter 60000 observe layer4 send-proxy-v2
  server s 127.0.0.1:$H_UP

backend dead
  server s 127.0.0.1:$DEAD_UP send-proxy-v2

backend late
  server s 127.0.0.1:$H_LATE_UP send-proxy-v2
EOF

if haproxy -c -q -f "$TMP/haproxy.cfg" >"$TMP/haproxy.check" 2>&1; then
    ok "haproxy accepts the configuration"
else
    not_ok "haproxy accepts the configuration"
    show_log "$TMP/haproxy.check"
fi

# ---- 4. Start everything -------------------------------------------------

# The recording upstreams listen first (HAProxy checks its server at once).
echo "# $(haproxy -v | head -n 1); $(openssl version); $(python3 --version)"
start diff python3 -u "$HERE/differential.py" run "$TMP/counts" \
    "whatsapp_proxy=$W_PORTS" "haproxy=$H_PORTS"
wait_listen "$W_UP" "recording upstream W" diff
wait_listen "$H_UP" "recording upstream H" diff

# whatsapp_proxy with the same timeouts as HAProxy above.
wp() {
    name=$1
    shift
    start "$name" "$PROXY" --stats off --grace 5 --send-proxy v2 \
        --timeout-fin 1 --timeout-idle 200 --timeout-connect 5 "$@"
}
wp wp_main --listen "127.0.0.1:$W_PLAIN" --listen "127.0.0.1:$W_TLS/tls" \
    --cert "$TMP/cert.pem" --key "$TMP/key.pem" --upstream "127.0.0.1:$W_UP"
wp wp_dead --listen "127.0.0.1:$W_DEAD" --upstream "127.0.0.1:$DEAD_UP"
wp wp_late --listen "127.0.0.1:$W_LATE" --upstream "127.0.0.1:$W_LATE_UP"
start haproxy haproxy -db -f "$TMP/haproxy.cfg"
wait_listen "$W_TLS" "whatsapp_proxy (main)" wp_main
wait_listen "$W_DEAD" "whatsapp_proxy (dead upstream)" wp_dead
wait_listen "$W_LATE" "whatsapp_proxy (late upstream)" wp_late
wait_listen "$H_LATE" "haproxy" haproxy

# ---- 5. The scenarios (differential.py prints its own lines) -------------

add_counts diff differential.py

# ---- 6. Every proxy is still alive (no crash along the way) ---------------

still_running wp_main wp_dead wp_late haproxy

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
