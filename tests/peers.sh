#!/bin/sh
# tests/peers.sh - whatsapp_proxy against real peers: HAProxy as the load
# balancer in front of it, HAProxy as the server behind it, curl and
# openssl s_client as its clients, and two proxies behind one balancer
# (the way to scale out). tests/README.md says what each check proves.
#
#   sh tests/peers.sh          (or: make test-peers)
#
# What runs (all on 127.0.0.1, all started and stopped here by PID):
#
#   (a) client -> haproxy "front" --send-proxy-v2 (or v1)--> wp_a /accept-proxy
#                                  --> fake upstream A: did the header carry
#                                      the client's own address?
#   (b) curl -> wp_v1 / wp_v2 --send-proxy v1 / v2--> haproxy "back"
#                                  (accept-proxy, http mode): it answers
#                                  with the address it decoded
#   (c) openssl s_client, curl -k -> wp_a's TLS port --> fake upstream A
#       curl -k -> wp_v2's TLS port --> haproxy "back"
#   (d) client -> haproxy "front" --> wp_d1 --> fake upstream A
#                                 \-> wp_d2 --> fake upstream B
#       then SIGTERM to the instance a held connection landed on.
#
# Output: one line per check, "ok - ..." or "not ok - ...", then
# "N passed, N failed". Exit status 0 only if nothing failed.

set -u

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PROXY=${PEERS_PROXY:-$ROOT/whatsapp_proxy}
TOOL="$HERE/peer_tool.py"
STARTUP_S=10          # the longest wait for any server to listen
PASSED=0
FAILED=0

# ok, not_ok, show_log, field, need, install_missing, new_run, start,
# running, cleanup, wait_listen, still_running: see lib.sh.
. "$HERE/lib.sh"

# ---- 1. Reporting --------------------------------------------------------

# check DESCRIPTION EXPECTED ACTUAL: ok if the two strings are equal.
check_equal() {
    if [ "$2" = "$3" ]; then
        ok "$1"
    else
        not_ok "$1 (expected '$2', got '$3')"
    fi
}

# ---- 2. Tools ------------------------------------------------------------

need haproxy haproxy
need curl curl
need openssl openssl
need python3 python3
install_missing
[ -x "$PROXY" ] || { echo "no $PROXY: run make whatsapp_proxy" >&2; exit 1; }

# ---- 3. Processes: started here, stopped here by PID ---------------------

new_run wp-peers "${PEERS_KEEP:-}"

# Starts one whatsapp_proxy: wp NAME ARGS... (short grace, no stats page,
# its made certificate in the temporary folder).
wp() {
    name=$1
    shift
    start "$name" "$PROXY" --stats off --grace 5 --cert-dir "$TMP/certs_$name" "$@"
}

# ---- 4. Ports and configurations ----------------------------------------

# Ports below the ephemeral range, checked free (peer_tool.py ports).
set -- $(python3 "$TOOL" ports 17)
UP_A=$1 UP_B=$2
WPA_PLAIN_AP=$3 WPA_TLS_AP=$4 WPA_TLS=$5
FRONT_V2=$6 FRONT_V2_TLS=$7 FRONT_V1=$8 FRONT_SCALE=$9
shift 9
BACK=$1
WPV1=$2 WPV1_TLS=$3 WPV2=$4 WPV2_TLS=$5
WPD1=$6 WPD2=$7 FRONT_V1_TLS=$8

# HAProxy in front, as a cloud load balancer would be: plain TCP, a PROXY
# header to each proxy. The plain v2 one adds a CRC32C TLV (a checksum of
# the header, which whatsapp_proxy checks). The "scale" backend checks both
# proxies every 200 ms (a TCP connect) and takes one out after 2 failures.
cat >"$TMP/front.cfg" <<EOF
global
  maxconn 2000
defaults
  mode tcp
  log stderr format short local0 notice
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend v2_plain
  bind 127.0.0.1:$FRONT_V2
  default_backend v2_plain
backend v2_plain
  server wp_a 127.0.0.1:$WPA_PLAIN_AP send-proxy-v2 proxy-v2-options crc32c
frontend v2_tls
  bind 127.0.0.1:$FRONT_V2_TLS
  default_backend v2_tls
backend v2_tls
  server wp_a 127.0.0.1:$WPA_TLS_AP send-proxy-v2
frontend v1_plain
  bind 127.0.0.1:$FRONT_V1
  default_backend v1_plain
backend v1_plain
  server wp_a 127.0.0.1:$WPA_PLAIN_AP send-proxy
frontend v1_tls
  bind 127.0.0.1:$FRONT_V1_TLS
  default_backend v1_tls
backend v1_tls
  server wp_a 127.0.0.1:$WPA_TLS_AP send-proxy
frontend scale
  bind 127.0.0.1:$FRONT_SCALE
  default_backend scale
backend scale
  balance roundrobin
  server wp_d1 127.0.0.1:$WPD1 send-proxy-v2 check inter 200ms fall 2 rise 2
  server wp_d2 127.0.0.1:$WPD2 send-proxy-v2 check inter 200ms fall 2 rise 2
EOF

# HAProxy behind, as the upstream: it takes the PROXY header (v1 or v2,
# accept-proxy takes both) and answers every HTTP request with the two
# addresses it decoded: "client-address:port proxy-address:port".
cat >"$TMP/back.cfg" <<EOF
global
  maxconn 2000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend decoded
  bind 127.0.0.1:$BACK accept-proxy
  http-request return status 200 content-type text/plain lf-string "%[src]:%[src_port] %[dst]:%[dst_port]"
EOF

for cfg in front back; do
    if haproxy -c -q -f "$TMP/$cfg.cfg" >"$TMP/$cfg.check" 2>&1; then
        ok "haproxy accepts the $cfg configuration"
    else
        not_ok "haproxy accepts the $cfg configuration"
        show_log "$TMP/$cfg.check"
    fi
done

# ---- 5. Start everything -------------------------------------------------

echo "# $(haproxy -v | head -n 1); $(curl --version | head -n 1 | cut -d' ' -f1-2); $(openssl version)"
start up_a python3 -u "$TOOL" upstream "$UP_A" A
start up_b python3 -u "$TOOL" upstream "$UP_B" B
start back haproxy -db -f "$TMP/back.cfg"
wait_listen "$UP_A" "fake upstream A" up_a
wait_listen "$UP_B" "fake upstream B" up_b
wait_listen "$BACK" "haproxy back" back
wp wp_a --listen "127.0.0.1:$WPA_PLAIN_AP/accept-proxy" \
        --listen "127.0.0.1:$WPA_TLS_AP/tls/accept-proxy" \
        --listen "127.0.0.1:$WPA_TLS/tls" --upstream "127.0.0.1:$UP_A"
wp wp_v1 --listen "127.0.0.1:$WPV1" --listen "127.0.0.1:$WPV1_TLS/tls" \
         --upstream "127.0.0.1:$BACK" --send-proxy v1
wp wp_v2 --listen "127.0.0.1:$WPV2" --listen "127.0.0.1:$WPV2_TLS/tls" \
         --upstream "127.0.0.1:$BACK" --send-proxy v2
wp wp_d1 --listen "127.0.0.1:$WPD1/accept-proxy" --upstream "127.0.0.1:$UP_A"
wp wp_d2 --listen "127.0.0.1:$WPD2/accept-proxy" --upstream "127.0.0.1:$UP_B"
wait_listen "$WPA_TLS" "wp_a" wp_a
wait_listen "$WPV1_TLS" "wp_v1" wp_v1
wait_listen "$WPV2_TLS" "wp_v2" wp_v2
wait_listen "$WPD1" "wp_d1" wp_d1
wait_listen "$WPD2" "wp_d2" wp_d2
start front haproxy -db -f "$TMP/front.cfg"
wait_listen "$FRONT_SCALE" "haproxy front" front

# ---- 6. (a) HAProxy in front, PROXY header in ----------------------------

# through_front WHAT PORT [--tls]: one conversation through haproxy front to
# wp_a's accept-proxy port; the fake upstream must see the client itself.
through_front() {
    what=$1
    port=$2
    shift 2
    line=$(python3 "$TOOL" client 127.0.0.1 "$port" "$@")
    echo "#   $line"
    check_equal "$what: the bytes come back intact" ok "$(field echo "$line")"
    check_equal "$what: upstream gets whatsapp_proxy's v2 header" v2 "$(field ver "$line")"
    check_equal "$what: upstream sees the client's own address and port" \
        "$(field self "$line")" "$(field src "$line")"
    check_equal "$what: upstream sees the address the client dialled (haproxy's)" \
        "127.0.0.1:$port" "$(field dst "$line")"
}
through_front "(a) haproxy send-proxy-v2 with a CRC32C TLV -> plain accept-proxy" "$FRONT_V2"
through_front "(a) haproxy send-proxy-v2 -> TLS accept-proxy" "$FRONT_V2_TLS" --tls
through_front "(a) haproxy send-proxy (v1) -> plain accept-proxy" "$FRONT_V1"
through_front "(a) haproxy send-proxy (v1) -> TLS accept-proxy" "$FRONT_V1_TLS" --tls

# ---- 7. (b) HAProxy behind, PROXY header out -----------------------------

# to_back WHAT URL: curl through a proxy to haproxy back, which answers
# "src dst" as it decoded them; curl adds its own and the proxy's address.
to_back() {
    reply=$(curl -s -k --max-time 10 -w '|%{local_ip}:%{local_port} %{remote_ip}:%{remote_port}|%{http_code}' "$2" | tr -d '\n')
    echo "#   $2: haproxy decoded '${reply%%|*}'; curl: '$(echo "$reply" | cut -d'|' -f2)'"
    check_equal "$1: haproxy answers 200" 200 "${reply##*|}"
    decoded=${reply%%|*}
    curl_side=$(echo "$reply" | cut -d'|' -f2)
    check_equal "$1: haproxy decodes the client's own address and port" \
        "${curl_side% *}" "${decoded% *}"
    check_equal "$1: haproxy decodes the address the client dialled" \
        "${curl_side#* }" "${decoded#* }"
}
to_back "(b) --send-proxy v1, plain listener" "http://127.0.0.1:$WPV1/"
to_back "(b) --send-proxy v2, plain listener" "http://127.0.0.1:$WPV2/"
to_back "(b) --send-proxy v1, TLS listener (curl -k)" "https://127.0.0.1:$WPV1_TLS/"

# The same request from a Python client whose address we know before the
# request is sent, once per header version (one more witness than curl).
for version in v1 v2; do
    if [ $version = v1 ]; then port=$WPV1; else port=$WPV2; fi
    reply=$(python3 - "$port" <<'EOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
me = "%s:%d" % s.getsockname()[:2]
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
body = data.split(b"\r\n\r\n", 1)[-1].decode()
print(me, body.split(" ")[0])
EOF
)
    check_equal "(b) --send-proxy $version: haproxy decodes a Python client's address" \
        "${reply% *}" "${reply#* }"
done

# ---- 8. (c) curl and openssl s_client on a TLS listener -------------------

to_back "(c) curl -k https through --send-proxy v2" "https://127.0.0.1:$WPV2_TLS/"

reply=$(curl -s -k --max-time 10 -w '|%{local_ip}:%{local_port}' "https://127.0.0.1:$WPA_TLS/hello" | tr -d '\n')
echo "#   curl -k https://127.0.0.1:$WPA_TLS/: $reply"
line=${reply%%|*}
check_equal "(c) curl -k https to the fake upstream: it sees curl's address" \
    "$(echo "$reply" | cut -d'|' -f2)" "$(field src "$line")"

# s_client: hold stdin open one second so the reply can arrive, then close.
message="hello-openssl-$$"
for proto in "" -tls1_2 -tls1_3; do
    out=$({ echo "$message"; sleep 1; } |
          timeout 10 openssl s_client -connect "127.0.0.1:$WPA_TLS" $proto \
              -quiet -no_ign_eof 2>"$TMP/s_client.err")
    check_equal "(c) openssl s_client ${proto:-(default)}: the line comes back through TLS" \
        "$message" "$(echo "$out" | grep -x "$message")"
    check_equal "(c) openssl s_client ${proto:-(default)}: the upstream gets a v2 header" \
        v2 "$(field ver "$(echo "$out" | grep '^SEEN')")"
done
summary=$(echo | timeout 10 openssl s_client -connect "127.0.0.1:$WPA_TLS" -brief 2>&1)
echo "#   s_client -brief: $(echo "$summary" | grep -E 'Protocol version|Ciphersuite' | tr '\n' ' ')"
# TLS 1.1: refused (TLS 1.2 is the minimum), with the "internal error"
# alert that nginx on this OpenSSL sends, not OpenSSL's own "protocol
# version" (tests/lookalike.sh compares the two servers). SECLEVEL=0 lets
# this OpenSSL client offer TLS 1.1.
echo | timeout 10 openssl s_client -connect "127.0.0.1:$WPA_TLS" -tls1_1 \
    -cipher 'DEFAULT@SECLEVEL=0' >"$TMP/tls11.out" 2>&1
if grep -q "alert internal error" "$TMP/tls11.out"; then
    ok "(c) TLS 1.1 is refused with an internal_error alert (TLS 1.2 is the minimum)"
else
    not_ok "(c) TLS 1.1 is refused with an internal_error alert (TLS 1.2 is the minimum)"
    show_log "$TMP/tls11.out"
fi

# ---- 9. (d) Two proxies behind one balancer --------------------------------

# Twenty connections, one after the other: all must succeed, and round
# robin must use both proxies.
seen_a=0 seen_b=0 good=0
for i in $(seq 20); do
    line=$(python3 "$TOOL" client 127.0.0.1 "$FRONT_SCALE")
    if [ "$(field echo "$line")" = ok ] &&
       [ "$(field self "$line")" = "$(field src "$line")" ]; then
        good=$((good + 1))
    else
        echo "#   $line"
    fi
    case $(field name "$line") in
    A) seen_a=$((seen_a + 1)) ;;
    B) seen_b=$((seen_b + 1)) ;;
    esac
done
echo "#   20 connections: $seen_a through wp_d1, $seen_b through wp_d2"
check_equal "(d) 20 connections through the balancer succeed with the client's address" 20 "$good"
if [ "$seen_a" -gt 0 ] && [ "$seen_b" -gt 0 ]; then
    ok "(d) the balancer spreads them over both proxies"
else
    not_ok "(d) the balancer spreads them over both proxies"
fi

# A connection held open: it lands on one proxy, which we then stop.
start held python3 -u "$TOOL" client 127.0.0.1 "$FRONT_SCALE" --hold 3
landed=""
for i in $(seq 100); do
    landed=$(field name "$(grep '^first' "$TMP/held.log" 2>/dev/null)")
    [ -n "$landed" ] && break
    sleep 0.05
done
if [ "$landed" = A ]; then
    victim=$pid_wp_d1 victim_name=wp_d1 survivor=B
else
    victim=$pid_wp_d2 victim_name=wp_d2 survivor=A
fi
echo "#   the held connection is on $victim_name; SIGTERM to PID $victim"
kill -TERM "$victim"

# New connections right away: each may be retried (bounded) while haproxy
# has not yet seen the stopped proxy fail its checks.
good=0 retried=0 wrong=0
for i in $(seq 10); do
    line=$(python3 "$TOOL" client 127.0.0.1 "$FRONT_SCALE" --tries 10)
    [ "$(field echo "$line")" = ok ] && good=$((good + 1))
    [ "$(field tries "$line")" != 1 ] && retried=$((retried + 1))
    [ "$(field name "$line")" != "$survivor" ] && wrong=$((wrong + 1))
done
echo "#   10 connections during the stop: $good succeeded, $retried needed a retry"
check_equal "(d) new connections succeed while one proxy stops" 10 "$good"
check_equal "(d) they all go to the proxy still running" 0 "$wrong"

# haproxy notices (its log says DOWN) within a bounded time.
for i in $(seq 50); do
    grep -q "$victim_name is DOWN" "$TMP/front.log" && break
    sleep 0.1
done
if grep -q "$victim_name is DOWN" "$TMP/front.log"; then
    ok "(d) haproxy's health check marks the stopped proxy DOWN"
else
    not_ok "(d) haproxy's health check marks the stopped proxy DOWN"
    show_log "$TMP/front.log"
fi
good=0
for i in $(seq 10); do
    line=$(python3 "$TOOL" client 127.0.0.1 "$FRONT_SCALE")
    [ "$(field echo "$line")" = ok ] && [ "$(field name "$line")" = "$survivor" ] &&
        good=$((good + 1))
done
check_equal "(d) after that, new connections succeed at the first try" 10 "$good"

# The held connection was in flight on the stopped proxy: the grace period
# lets it finish its second exchange.
for i in $(seq 100); do
    running "$pid_held" || break
    sleep 0.1
done
check_equal "(d) a connection in flight on the stopped proxy finishes its exchange" \
    ok "$(field echo "$(grep '^self=' "$TMP/held.log")")"
# And the stopped proxy exits, 0, within its grace (5 s) and a margin.
status=timeout
for i in $(seq 100); do
    if ! running "$victim"; then
        wait "$victim"
        status=$?
        break
    fi
    sleep 0.1
done
check_equal "(d) the stopped proxy exits with status 0 within its grace period" 0 "$status"

# haproxy's health checks carry a PROXY v2 LOCAL header (HAProxy sends one
# on checks when the server has send-proxy-v2). The PROXY protocol says LOCAL means "use the
# connection's own addresses", so the proxy relays the check and the
# upstream sees the proxy's own listener as the destination.
checks=$(grep -c "dst=127.0.0.1:$WPD2\$" "$TMP/up_b.log")
echo "#   haproxy health checks relayed by wp_d2 to its upstream: $checks"
if [ "$checks" -gt 0 ]; then
    ok "(d) a balancer check (PROXY v2 LOCAL) is relayed with the connection's own addresses"
else
    not_ok "(d) a balancer check (PROXY v2 LOCAL) is relayed with the connection's own addresses"
fi

# ---- 10. Every process is still alive (no crash along the way) ------------

still_running up_a up_b wp_a wp_v1 wp_v2 back front

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
