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

# ---- 1. Reporting --------------------------------------------------------

ok()     { PASSED=$((PASSED + 1)); echo "ok - $*"; }
not_ok() { FAILED=$((FAILED + 1)); echo "not ok - $*"; }

# ---- 2. Tools ------------------------------------------------------------

# Installs (as root) or names the Debian packages that are missing. An
# apt-get that runs already holds dpkg's lock: wait for it, up to 5 min.
tools_check() {
    missing=""
    command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
    command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
    command -v python3 >/dev/null 2>&1 || missing="$missing python3"
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "# installing:$missing"
        apt-get -o DPkg::Lock::Timeout=300 update >/dev/null &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
                install -y $missing >/dev/null ||
            { echo "apt-get install$missing failed" >&2; exit 1; }
    else
        echo "missing:$missing. Install with: sudo apt-get install -y$missing" >&2
        exit 1
    fi
}
tools_check
[ -x "$PROXY" ] || { echo "no $PROXY: run make whatsapp_proxy" >&2; exit 1; }

# ---- 3. Processes: started here, stopped here by PID ---------------------

TMP=$(mktemp -d /tmp/wp-differential.XXXXXX)
PIDS=""

# start NAME COMMAND...: runs COMMAND in the background, its output in
# $TMP/NAME.log, and remembers its PID in the variable pid_NAME.
start() {
    name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    eval "pid_$name=$!"
    PIDS="$PIDS $!"
}

# running() and stop_pid(): see lib.sh.
. "$HERE/lib.sh"

cleanup() {
    for pid in $PIDS; do
        stop_pid "$pid"
    done
    if [ "$FAILED" -gt 0 ] || [ -n "${PEERS_KEEP:-}" ]; then
        echo "# logs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

# wait_listen PORT WHAT LOG: waits (bounded) until PORT listens; stops the
# run if it never does, since every later check would fail for that reason.
wait_listen() {
    python3 "$TOOL" wait-listen "$1" "$STARTUP_S" && return 0
    not_ok "$2 listens on port $1 within ${STARTUP_S} s (log: $TMP/$3.log)"
    sed 's/^/#   /' "$TMP/$3.log"
    echo "$PASSED passed, $FAILED failed"
    exit 1
}

# ---- 4. Ports, certificate and configuration ----------------------------

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
    sed 's/^/#   /' "$TMP/haproxy.check"
fi

# ---- 5. Start everything -------------------------------------------------

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

# ---- 6. The scenarios (differential.py prints its own lines) -------------

i=0
while running "$pid_diff" && [ $i -lt $((RUN_LIMIT_S * 10)) ]; do
    sleep 0.1
    i=$((i + 1))
done
cat "$TMP/diff.log"
if [ -r "$TMP/counts" ]; then
    counts=$(cat "$TMP/counts")
    PASSED=$((PASSED + $(echo "$counts" | sed 's/.*passed=\([0-9]*\).*/\1/')))
    FAILED=$((FAILED + $(echo "$counts" | sed 's/.*failed=\([0-9]*\).*/\1/')))
else
    not_ok "differential.py finished its run within $RUN_LIMIT_S s"
fi

# ---- 7. Every proxy is still alive (no crash along the way) ---------------

for name in wp_main wp_dead wp_late haproxy; do
    eval "pid=\$pid_$name"
    if running "$pid"; then
        ok "$name is still running at the end"
    else
        not_ok "$name is still running at the end (log: $TMP/$name.log)"
    fi
done

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
