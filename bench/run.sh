#!/usr/bin/env bash
# bench/run.sh - measures whatsapp_proxy beside HAProxy (configured like the
# reference) and beside "direct" (the client straight to the upstream), on
# loopback, and prints one table. bench/README.md explains every row.
#
#   bash run.sh full     every figure the median of 3 runs (about 5 minutes)
#   bash run.sh quick    every figure from 1 shorter run (about a minute)
#
# What runs (all on 127.0.0.1, all started and stopped here by PID):
#
#   loadgen client --+--------------------------------> loadgen upstream
#                    +--> whatsapp_proxy (plain, TLS) --> loadgen upstream
#                    +--> haproxy        (plain, TLS) --> loadgen upstream
#                    |                                   (three of them, one
#                    |                                    each; they skip the
#                    |                                    PROXY header, then
#                    |                                    echo, sink or
#                    |                                    generate)
#                    +--(TLS)-------------------------> loadgen upstream --tls
#                                                       (the same, behind TLS:
#                                                        "direct" of the TLS
#                                                        bulk rows)
#
# The order of work: check tools, raise the open-file limit, make a
# certificate, start the three servers; then the memory tests (all runs),
# the most-connections test, the traffic tests (all runs), and the table of
# medians. Within a run every test visits direct, whatsapp_proxy and
# haproxy in turn, so a noisy moment of the machine hits all three alike.

set -u

MODE=${1:-full}
case "$MODE" in
# Where the time goes (quick, 2 cores): idle memory about 19 s (the 2 x
# 5,000 TLS handshakes alone about 6 s), most connections held about 7 s
# (2 x 10,000 connections, one by one), bulk about 9 s (24 tests), rate and
# round trip about 6 s, round trip in a TLS flood about 6 s (full: 13-14 s
# per run; a full run took 293 s in all). The memory and maxconn phases do a fixed amount of
# work, so they are the ones a loaded machine stretches; quick mode
# shortens the timed tests and the settling pauses of the memory test.
# MEM_SETTLE: each of the two pauses (after a fresh proxy's start, and
# after the idle client's) before the baseline; STEP_SETTLE: the pause
# after each step (the last handshakes and upstream connects finish).
# FLOOD_SECONDS: the round trips measured during a TLS handshake flood;
# the flood starts first and goes on FLOOD_SLACK longer, so that it covers
# the round-trip client's connect and warm-up and outlasts its last round
# trip.
full)  RUNS=3; BULK_SECONDS=1;   RATE_SECONDS=1;   RTT_SECONDS=1;   WARMUP=0.25
       MEM_READINGS=5; MEM_READING_GAP=0.1; MAXCONN_TIMEOUT=1
       MEM_SETTLE=0.25; STEP_SETTLE=0.3; FLOOD_SECONDS=2; FLOOD_SLACK=0.5 ;;
quick) RUNS=1; BULK_SECONDS=0.2; RATE_SECONDS=0.3; RTT_SECONDS=0.25; WARMUP=0.1
       MEM_READINGS=3; MEM_READING_GAP=0.05; MAXCONN_TIMEOUT=0.5
       MEM_SETTLE=0.1; STEP_SETTLE=0.2; FLOOD_SECONDS=0.5; FLOOD_SLACK=0.3 ;;
*) echo "usage: $0 full|quick" >&2; exit 2 ;;
esac

HERE=$(cd "$(dirname "$0")" && pwd)
LOADGEN=$HERE/loadgen
# bench/Makefile builds this -O2 copy of ../whatsapp_proxy.c; BENCH_PROXY
# names another binary to measure.
PROXY=${BENCH_PROXY:-$HERE/whatsapp_proxy_bench}
ADDRESS=127.0.0.1
# Ports below the kernel's ephemeral range (32768-60999 on Linux), so that
# no outgoing connection of the test can hold one of them.
PORT_BASE=${BENCH_PORT_BASE:-24100}
UPSTREAM_PORT=$PORT_BASE
WP_PLAIN=$((PORT_BASE + 1)); WP_TLS=$((PORT_BASE + 2))
HA_PLAIN=$((PORT_BASE + 3)); HA_TLS=$((PORT_BASE + 4))
UPSTREAM_TLS_PORT=$((PORT_BASE + 5))
# Each proxy dials an upstream of its own (the same program on another
# port). Sharing one would let a test's TIME_WAIT sockets slow the next
# target's connects: each connection to one address and port leaves its
# local port in TIME_WAIT, and Linux may reuse such a port (tcp_tw_reuse)
# only a second later. Measured with one shared upstream: "direct" made
# about 28,000 connections in 1 s to it, and the proxy measured right
# after it lost 0.15 to 0.9 of its connection rate, with 200 ms stalls.
UPSTREAM_WP_PORT=$((PORT_BASE + 6)); UPSTREAM_HA_PORT=$((PORT_BASE + 7))
CPUS=$(nproc)
IDLE_STEPS="1000 5000"   # connections held in the memory test
FLOOD_CLIENTS=64         # looping handshake clients of the TLS flood
FLOOD_POLICY="chrt --idle 0"  # their CPU policy (see measure_flood_rtt)
MAXCONN_CAP=27500        # the reference's maxconn

# ---- 1. Tools ----------------------------------------------------------

# Installs (as root) or names the Debian packages that are missing.
tools_check() {
    local missing=""
    command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
    command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
    # ip brings up the loopback of run.sh's own network (see section 3);
    # without it run.sh still runs, on the machine's loopback.
    if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        missing="$missing iproute2"
    fi
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing:$missing"
        apt-get install -y $missing >/dev/null || {
            echo "apt-get install failed; try: apt-get update" >&2; exit 1; }
    else
        echo "missing:$missing. Install with: sudo apt-get install -y$missing" >&2
        exit 1
    fi
}

# ---- 2. Processes: started here, stopped here by PID -------------------

UPSTREAM_PID=""; UPSTREAM_WP_PID=""; UPSTREAM_HA_PID=""; UPSTREAM_TLS_PID=""
WP_PID=""; HA_PID=""; CLIENT_PID=""; FLOOD_PID=""
TMP=""

# Stops one process by PID: SIGTERM, up to 5 s, then SIGKILL.
stop_pid() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

cleanup() {
    stop_pid "$FLOOD_PID"; stop_pid "$CLIENT_PID"
    stop_pid "$HA_PID"; stop_pid "$WP_PID"
    stop_pid "$UPSTREAM_PID"; stop_pid "$UPSTREAM_WP_PID"
    stop_pid "$UPSTREAM_HA_PID"; stop_pid "$UPSTREAM_TLS_PID"
    [ -n "$TMP" ] && rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits (at most 5 s) until a TCP port accepts connections.
port_wait() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/$ADDRESS/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "port $1 did not open. Last log lines:" >&2
    tail -n 5 "$TMP"/*.log >&2
    exit 1
}

# Waits (at most $3 seconds) until file $1 has a line starting with $2.
line_wait() {
    local tries=$(($3 * 20))
    for _ in $(seq "$tries"); do
        grep -q "^$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "no '$2' in $1 after $3 s" >&2
    return 1
}

# Starts one plain upstream on port $1, logging to $TMP/$2.log; its PID
# goes in STARTED_PID.
plain_upstream_start() {
    "$LOADGEN" upstream --listen "$ADDRESS:$1" --threads "$CPUS" \
        >"$TMP/$2.log" 2>&1 &
    STARTED_PID=$!
    line_wait "$TMP/$2.log" LISTENING 5 || exit 1
}

upstream_start() {
    plain_upstream_start "$UPSTREAM_PORT" upstream
    UPSTREAM_PID=$STARTED_PID
    plain_upstream_start "$UPSTREAM_WP_PORT" upstream_wp
    UPSTREAM_WP_PID=$STARTED_PID
    plain_upstream_start "$UPSTREAM_HA_PORT" upstream_ha
    UPSTREAM_HA_PID=$STARTED_PID
    # The TLS reference: the same upstream behind TLS, with the proxies'
    # certificate, for the "direct" column of the TLS bulk rows.
    "$LOADGEN" upstream --listen "$ADDRESS:$UPSTREAM_TLS_PORT" --tls \
        --cert "$TMP/cert.pem" --key "$TMP/key.pem" \
        >"$TMP/upstream_tls.log" 2>&1 &
    UPSTREAM_TLS_PID=$!
    line_wait "$TMP/upstream_tls.log" LISTENING 5 || exit 1
}

# whatsapp_proxy with its defaults (relay threads: one per CPU), serving the
# same certificate as HAProxy. Where the build has them: no statistics
# port (8199 may be taken by another copy) and a 1 s grace at stop, so a
# restart does not wait 30 s for connections the test just closed.
wp_start() {
    local extra=""
    "$PROXY" --help 2>&1 | grep -q -- '--stats' && extra="$extra --stats off"
    "$PROXY" --help 2>&1 | grep -q -- '--grace' && extra="$extra --grace 1"
    "$PROXY" --listen "$ADDRESS:$WP_PLAIN" --listen "$ADDRESS:$WP_TLS/tls" \
        --upstream "$ADDRESS:$UPSTREAM_WP_PORT" \
        --media-upstream "$ADDRESS:$UPSTREAM_WP_PORT" \
        --cert "$TMP/cert.pem" --key "$TMP/key.pem" --cert-dir "$TMP" \
        --log-level warn $extra >>"$TMP/whatsapp_proxy.log" 2>&1 &
    WP_PID=$!
    port_wait "$WP_PLAIN"; port_wait "$WP_TLS"
}

ha_start() {
    haproxy -db -f "$TMP/haproxy.cfg" >>"$TMP/haproxy.log" 2>&1 &
    HA_PID=$!
    port_wait "$HA_PLAIN"; port_wait "$HA_TLS"
}

# A fresh process, so that its memory baseline holds nothing from earlier
# tests (freed memory stays in a process's heap and would be reused).
wp_restart() { stop_pid "$WP_PID"; WP_PID=""; wp_start; }
ha_restart() { stop_pid "$HA_PID"; HA_PID=""; ha_start; }

# ---- 3. Setup: limits, certificate, HAProxy configuration --------------

# TCP's congestion control decides when a sender may send, and on loopback
# the machine's choice can move the bulk rows more than any proxy does.
# BBR paces each connection with a timer; on loopback that costs CPU for
# every paced burst, and a proxied byte crosses two connections where a
# direct one crosses one. On the machine of bench/README.md (finding 12),
# plain bulk with 8 connections down measured 0.35x-0.45x of direct under
# BBR and 0.70x-0.76x under cubic, same binaries. So that a row means the same
# on every machine, run.sh runs itself in a network namespace of its own
# (a loopback of its own, nothing else on it) and sets cubic there, the
# default that Linux and Debian ship. The machine's own setting is left
# alone. Where no namespace can be made (no unshare or ip, or a kernel
# that refuses), it runs on the machine's loopback; either way the table
# names the congestion control it ran with.
MACHINE_CONGESTION=${BENCH_MACHINE_CONGESTION:-$(cat /proc/sys/net/ipv4/tcp_congestion_control 2>/dev/null)}

# Starts run.sh again inside a new network namespace, once (as root
# directly, else as root of a new user namespace: --map-root-user).
network_own() {
    if [ -n "${BENCH_NETNS:-}" ]; then
        ip link set lo up
        echo cubic >/proc/sys/net/ipv4/tcp_congestion_control 2>/dev/null
        return 0
    fi
    command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 || return 0
    local as_root=""
    [ "$(id -u)" = 0 ] || as_root=--map-root-user
    unshare --net $as_root true 2>/dev/null || return 0
    BENCH_NETNS=1 BENCH_MACHINE_CONGESTION=$MACHINE_CONGESTION \
        exec unshare --net $as_root bash "$0" "$MODE"
}

# One line for the table's header: where the traffic ran, with which
# congestion control.
network_describe() {
    local used
    used=$(cat /proc/sys/net/ipv4/tcp_congestion_control 2>/dev/null)
    if [ -n "${BENCH_NETNS:-}" ]; then
        echo "TCP congestion control: $used, in run.sh's own network namespace" \
            "(this machine's: $MACHINE_CONGESTION)"
    else
        echo "TCP congestion control: $used, on this machine's loopback" \
            "(no network namespace of its own could be made)"
    fi
}

setup() {
    TMP=$(mktemp -d /tmp/whatsapp_proxy_bench.XXXXXX)
    # Each process gets the hard limit; children inherit it.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null
    FD_LIMIT=$(ulimit -n)

    # ECDSA P-256: whatsapp_proxy's default key type; both proxies serve
    # this one certificate (HAProxy wants chain and key in one file).
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$TMP/key.pem" -out "$TMP/cert.pem" -days 2 \
        -subj "/CN=bench.invalid" >/dev/null 2>&1 || {
        echo "openssl could not make a certificate" >&2; exit 1; }
    cat "$TMP/cert.pem" "$TMP/key.pem" >"$TMP/haproxy.pem"

    sed -e "s/@NBTHREAD@/$CPUS/" -e "s/@ADDRESS@/$ADDRESS/g" \
        -e "s/@PLAIN_PORT@/$HA_PLAIN/" -e "s/@TLS_PORT@/$HA_TLS/" \
        -e "s/@UPSTREAM_PORT@/$UPSTREAM_HA_PORT/" \
        -e "s#@CERT_PEM@#$TMP/haproxy.pem#" \
        "$HERE/haproxy.cfg" >"$TMP/haproxy.cfg"
    haproxy -c -q -f "$TMP/haproxy.cfg" || {
        echo "haproxy rejected $TMP/haproxy.cfg" >&2; exit 1; }

    for port in $UPSTREAM_PORT $WP_PLAIN $WP_TLS $HA_PLAIN $HA_TLS \
        $UPSTREAM_TLS_PORT $UPSTREAM_WP_PORT $UPSTREAM_HA_PORT; do
        if (exec 3<>"/dev/tcp/$ADDRESS/$port") 2>/dev/null; then
            echo "port $port is in use; set BENCH_PORT_BASE" >&2; exit 1
        fi
    done
}

# ---- 4. Measurements ---------------------------------------------------

# Each measurement appends "ROW TARGET VALUE" lines to $RESULTS.
RESULTS=""

# The address of a target: direct, wp (whatsapp_proxy) or ha (haproxy);
# $2 is plain or tls.
target_address() {
    case "$1-$2" in
    direct-plain) echo "$ADDRESS:$UPSTREAM_PORT" ;;
    direct-tls) echo "$ADDRESS:$UPSTREAM_TLS_PORT" ;;
    wp-plain) echo "$ADDRESS:$WP_PLAIN" ;;
    wp-tls) echo "$ADDRESS:$WP_TLS" ;;
    ha-plain) echo "$ADDRESS:$HA_PLAIN" ;;
    ha-tls) echo "$ADDRESS:$HA_TLS" ;;
    esac
}

tls_flag() { [ "$1" = tls ] && echo --tls; }

# The value of KEY in a "RESULT k=v k=v" line.
result_value() { sed -n "s/.*[ ]$1=\([^ ]*\).*/\1/p" <<<"$2"; }

record() { echo "$1 $2 $3" >>"$RESULTS"; }

# Bulk throughput: connections, direction, plain|tls, target.
measure_bulk() {
    local out
    out=$("$LOADGEN" bulk --connect "$(target_address "$4" "$3")" \
        $(tls_flag "$3") --conns "$1" --direction "$2" \
        --seconds "$BULK_SECONDS" --warmup "$WARMUP" 2>>"$TMP/loadgen.log")
    record "bulk_$1_$2_$3" "$4" "$(result_value mbytes_per_s "$out")"
    [ "$3" = tls ] && record "tls_negotiated" "$4" "$(result_value tls "$out")"
}

# Connection rate: clients, plain|tls, target.
measure_rate() {
    local out
    out=$("$LOADGEN" rate --connect "$(target_address "$3" "$2")" \
        $(tls_flag "$2") --clients "$1" --seconds "$RATE_SECONDS" \
        --warmup "$WARMUP" 2>>"$TMP/loadgen.log")
    record "rate_$1_$2" "$3" "$(result_value conn_per_s "$out")"
    record "rate_$1_$2_p50" "$3" "$(result_value p50_us "$out")"
    record "rate_$1_$2_p99" "$3" "$(result_value p99_us "$out")"
    record "rate_errors" "$3" "$(result_value errors "$out")"
}

# Round trip: plain|tls, target.
measure_rtt() {
    local out
    out=$("$LOADGEN" rtt --connect "$(target_address "$2" "$1")" \
        $(tls_flag "$1") --seconds "$RTT_SECONDS" --warmup "$WARMUP" \
        2>>"$TMP/loadgen.log")
    record "rtt_$1_p50" "$2" "$(result_value p50_us "$out")"
    record "rtt_$1_p99" "$2" "$(result_value p99_us "$out")"
}

# Round trip during a TLS handshake flood: plain|tls (the round-trip
# connection's port), target (wp or ha). $FLOOD_CLIENTS clients loop on the
# proxy's TLS port: connect, full TLS handshake (no resumption), close, as
# fast as they can. A moment later, one connection to the same proxy (its
# plain or TLS port) measures 64-byte round trips for FLOOD_SECONDS after
# WARMUP. The flood measures the handshakes it completes per second from
# WARMUP after its start for FLOOD_SECONDS + FLOOD_SLACK, a window that
# holds the round trips' one; if it has ended before the round-trip client
# did, the notes say so.
# The flood runs under the scheduler's SCHED_IDLE policy, as if it came
# from other machines: it gets only the CPU time that nothing else wants,
# and whatever else wakes takes the CPU from it at once. On 2 cores its 64
# threads (doing the client's half of every handshake) otherwise decide
# the row: at the proxies' priority the round trip waited for a CPU
# (p50 2-27 ms, p99 16-200 ms through either proxy); at nice 19 it still
# waited out a flood thread's time slice now and then (p99 0.4-5.5 ms for
# one binary from round to round). Under SCHED_IDLE what is left is the
# wait inside the proxy, behind the handshake steps of its event loop.
measure_flood_rtt() {
    local kind=$1 target=$2 out flood
    $FLOOD_POLICY "$LOADGEN" rate --connect "$(target_address "$target" tls)" --tls \
        --handshake-only --clients "$FLOOD_CLIENTS" --warmup "$WARMUP" \
        --seconds "$(awk -v a="$FLOOD_SECONDS" -v b="$FLOOD_SLACK" 'BEGIN {print a + b}')" \
        >"$TMP/flood.out" 2>>"$TMP/loadgen.log" &
    FLOOD_PID=$!
    out=$("$LOADGEN" rtt --connect "$(target_address "$target" "$kind")" \
        $(tls_flag "$kind") --seconds "$FLOOD_SECONDS" --warmup "$WARMUP" \
        2>>"$TMP/loadgen.log")
    kill -0 "$FLOOD_PID" 2>/dev/null || record "flood_short" "$target" "$kind"
    # The flood ends by itself FLOOD_SLACK later (each client finishes its
    # loop, every socket call bounded by loadgen's 5 s timeout); wait at
    # most 15 s, then stop it.
    for _ in $(seq 150); do
        kill -0 "$FLOOD_PID" 2>/dev/null || break
        sleep 0.1
    done
    stop_pid "$FLOOD_PID"; FLOOD_PID=""
    flood=$(grep '^RESULT' "$TMP/flood.out")
    record "flood_rtt_${kind}_p50" "$target" "$(result_value p50_us "$out")"
    record "flood_rtt_${kind}_p99" "$target" "$(result_value p99_us "$out")"
    record "flood_${kind}" "$target" "$(result_value conn_per_s "$flood")"
    record "flood_errors" "$target" "$(result_value errors "$flood")"
    sleep 0.2 # the proxy drops what the flood left half-done
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# Free memory that MemAvailable leaves out: pages freed a moment ago wait
# in per-CPU lists (the "count:" lines of /proc/zoneinfo) before they go
# back to the free pool that MemAvailable counts, and the next allocations
# are served from those lists first. On this machine's kernel the lists
# grow to tens of MiB per CPU (seen: 190 MiB just after an idle client with
# 5,000 connections ended), so a test that follows a large free would seem
# to cost less than it does. With these pages added, the total of free,
# anonymous, slab and cache memory stayed the same to the MiB while those
# lists drained.
per_cpu_free_kib() {
    awk -v page_kib="$(($(getconf PAGESIZE) / 1024))" \
        '$1 == "count:" {pages += $2} END {print pages * page_kib}' /proc/zoneinfo
}
# MemAvailable plus the per-CPU free pages, the median of MEM_READINGS
# readings: other processes on a shared machine move it by megabytes from
# one second to the next.
available_kib() {
    for _ in $(seq "$MEM_READINGS"); do
        echo $(($(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) + $(per_cpu_free_kib)))
        sleep "$MEM_READING_GAP"
    done | sort -n | sed -n "$(((MEM_READINGS + 1) / 2))p"
}

# One memory snapshot: proxy RSS, MemAvailable, client RSS, and the RSS of
# the three plain upstreams together.
snapshot() {
    local proxy_rss=0
    [ -n "$1" ] && proxy_rss=$(rss_kib "$1")
    echo "$proxy_rss $(available_kib) $(rss_kib "$CLIENT_PID")" \
        "$(($(rss_kib "$UPSTREAM_PID") + $(rss_kib "$UPSTREAM_WP_PID") + $(rss_kib "$UPSTREAM_HA_PID")))"
}

# Idle memory: plain|tls, target. Opens 1,000 then 5,000 idle connections
# and records, per connection:
#   rss_N    growth of the proxy's RSS
#   avail_N  drop of the machine's MemAvailable, minus the RSS growth of
#            the loadgen client and upstream: what the proxy costs in its
#            process and in the kernel (sockets, thread stacks, ...), plus
#            the kernel's cost of the client's and upstream's own sockets,
#            which "direct" shows alone.
measure_idle() {
    local kind=$1 target=$2 pid=""
    case $target in
    wp) wp_restart; pid=$WP_PID ;;
    ha) ha_restart; pid=$HA_PID ;;
    esac
    sleep "$MEM_SETTLE"
    "$LOADGEN" idle --connect "$(target_address "$target" "$kind")" \
        $(tls_flag "$kind") --steps "${IDLE_STEPS// /,}" \
        >"$TMP/idle.out" 2>>"$TMP/loadgen.log" &
    CLIENT_PID=$!
    line_wait "$TMP/idle.out" "READY 0 " 5 || return
    sleep "$MEM_SETTLE"
    local before step now ok
    before=$(snapshot "$pid")
    for step in $IDLE_STEPS; do
        kill -USR1 "$CLIENT_PID"
        line_wait "$TMP/idle.out" "READY $step " 60 || break
        sleep "$STEP_SETTLE" # the last handshakes and connects finish
        now=$(snapshot "$pid")
        ok=$(sed -n "s/^READY $step ok=//p" "$TMP/idle.out")
        [ "${ok:-0}" -gt 0 ] || continue
        read -r p0 a0 c0 u0 <<<"$before"
        read -r p1 a1 c1 u1 <<<"$now"
        [ -n "$pid" ] &&
            record "mem_${kind}_${step}_rss" "$target" \
                "$(awk -v a="$p0" -v b="$p1" -v n="$ok" 'BEGIN {printf "%.2f", (b - a) / n}')"
        record "mem_${kind}_${step}_avail" "$target" \
            "$(awk -v a0="$a0" -v a1="$a1" -v c="$((c1 - c0 + u1 - u0))" -v n="$ok" \
                'BEGIN {printf "%.2f", (a0 - a1 - c) / n}')"
        [ "$ok" -lt "$step" ] && record "idle_short" "$target" "$ok/$step"
    done
    stop_pid "$CLIENT_PID"; CLIENT_PID=""
}

# Most connections held at once (plain, one run: the open-file limit
# decides it, not chance).
measure_maxconn() {
    local target=$1 out began=$SECONDS
    case $target in
    wp) wp_restart ;;
    ha) ha_restart ;;
    esac
    out=$("$LOADGEN" maxconn --connect "$(target_address "$target" plain)" \
        --cap "$MAXCONN_CAP" --timeout "$MAXCONN_TIMEOUT" 2>>"$TMP/loadgen.log")
    record "maxconn" "$target" "$(result_value held "$out")"
    echo "$target ($((SECONDS - began)) s): $out" >>"$TMP/maxconn.log"
}

# One run of the memory tests, each on the three targets in turn. They run
# before any traffic test: the tens of thousands of TIME_WAIT sockets that
# the connection-rate test leaves behind are freed over the next 60 s, and
# would make MemAvailable rise while a memory test reads it.
run_memory() {
    local kind target phase_start=$SECONDS
    for kind in plain tls; do
        for target in direct wp ha; do
            [ "$kind-$target" = tls-direct ] && continue
            measure_idle "$kind" "$target"
        done
    done
    echo "  idle memory: $((SECONDS - phase_start)) s"
}

# One run of every traffic test, each on the three targets in turn (so a
# noisy moment of the machine hits all three alike).
run_traffic() {
    local n dir kind target clients phase_start=$SECONDS
    for kind in plain tls; do
        for n in 1 8; do
            for dir in up down; do
                for target in direct wp ha; do
                    measure_bulk "$n" "$dir" "$kind" "$target"
                done
            done
        done
    done
    echo "  bulk: $((SECONDS - phase_start)) s"; phase_start=$SECONDS
    for kind in plain tls; do
        for clients in 8 64; do
            for target in direct wp ha; do
                [ "$kind-$target" = tls-direct ] && continue
                measure_rate "$clients" "$kind" "$target"
            done
        done
        for target in direct wp ha; do
            [ "$kind-$target" = tls-direct ] && continue
            measure_rtt "$kind" "$target"
        done
    done
    echo "  connection rate and round trip: $((SECONDS - phase_start)) s"
    phase_start=$SECONDS
    for kind in plain tls; do
        for target in wp ha; do
            measure_flood_rtt "$kind" "$target"
        done
    done
    echo "  round trip in a TLS flood: $((SECONDS - phase_start)) s"
}

# ---- 5. The table ------------------------------------------------------

# The median of the values recorded for row and target, or "-".
median() {
    awk -v row="$1" -v target="$2" '$1 == row && $2 == target && $3 != "" {print $3}' \
        "$RESULTS" | sort -g |
        awk '{v[NR] = $1} END {
            if (NR == 0) print "-";
            else if (NR % 2) print v[(NR + 1) / 2];
            else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Prints one row. $1 row key, $2 label, $3 "high" (more is better),
# "low", or "info" (a figure for context, with no target); for the bulk
# rows also $4, the row whose direct figure is the reference ("" for this
# row's own) and $5, the least fraction of it that whatsapp_proxy must
# reach. The "met" column says yes, or NO and why.
row() {
    local key=$1 label=$2 better=$3 direct_key=${4:-} direct_factor=${5:-}
    local direct wp ha ratio target verdict
    direct=$(median "${direct_key:-$key}" direct)
    wp=$(median "$key" wp)
    ha=$(median "$key" ha)
    ratio=$(awk -v a="$wp" -v b="$ha" 'BEGIN {
        if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }')
    case $better in
    high) target=">=1.0x HA" ;;
    low) target="<=1.0x HA" ;;
    *) target="(none: context)" ;;
    esac
    verdict=$(awk -v r="$ratio" -v better="$better" 'BEGIN {
        if (better == "info") print "-";
        else if (r == "-") print "?";
        else if ((better == "high" && r >= 1.0) || (better == "low" && r <= 1.0)) print "yes";
        else print "NO (" r "x HA)" }')
    if [ -n "$direct_factor" ]; then
        local of_direct
        target="$target, >=${direct_factor}x direct"
        of_direct=$(awk -v a="$wp" -v d="$direct" 'BEGIN {
            if (a == "-" || d == "-" || d == 0) print "-"; else printf "%.2f", a / d }')
        if ! awk -v r="$of_direct" -v f="$direct_factor" \
            'BEGIN {exit !(r != "-" && r >= f)}'; then
            if [ "$verdict" = yes ]; then verdict="NO"; fi
            verdict="$verdict (${of_direct}x direct)"
        fi
    fi
    [ "$ratio" = - ] || ratio="${ratio}x"
    [ -z "$direct_key" ] || direct="($direct)"
    printf '%-40s %9s %9s %9s %6s  %-25s %s\n' \
        "$label" "$direct" "$wp" "$ha" "$ratio" "$target" "$verdict"
}

table_print() {
    printf '\n%-40s %9s %9s %9s %6s  %-25s %s\n' \
        "row" "direct" "wa_proxy" "haproxy" "wa/ha" "target" "met"
    printf '%0.s-' $(seq 114); echo
    local kind n dir kind_label
    for kind in plain tls; do
        for n in 1 8; do
            for dir in up down; do
                if [ "$kind" = plain ]; then
                    row "bulk_${n}_${dir}_plain" "bulk $n conn $dir, plain (MB/s)" high \
                        "" 0.5
                else
                    row "bulk_${n}_${dir}_tls" "bulk $n conn $dir, TLS (MB/s)" high \
                        "" 0.8
                fi
            done
        done
    done
    for kind in plain tls; do
        kind_label=$kind; [ "$kind" = tls ] && kind_label=TLS
        for n in 8 64; do
            row "rate_${n}_${kind}" "conn rate $n clients, $kind_label (/s)" high
            row "rate_${n}_${kind}_p50" "  p50 latency (us)" low
            row "rate_${n}_${kind}_p99" "  p99 latency (us)" low
        done
    done
    row rtt_plain_p50 "round trip 64 B, plain p50 (us)" low
    row rtt_plain_p99 "round trip 64 B, plain p99 (us)" low
    row rtt_tls_p50 "round trip 64 B, TLS p50 (us)" low
    row rtt_tls_p99 "round trip 64 B, TLS p99 (us)" low
    for kind in plain tls; do
        kind_label=$kind; [ "$kind" = tls ] && kind_label=TLS
        row "flood_rtt_${kind}_p50" "round trip in TLS flood, $kind_label p50 (us)" low
        row "flood_rtt_${kind}_p99" "round trip in TLS flood, $kind_label p99 (us)" low
        row "flood_${kind}" "  the flood's TLS handshakes (/s)" info
    done
    for kind in plain tls; do
        kind_label=$kind; [ "$kind" = tls ] && kind_label=TLS
        for n in $IDLE_STEPS; do
            row "mem_${kind}_${n}_rss" "idle $n $kind_label: RSS/conn (KiB)" low
            row "mem_${kind}_${n}_avail" "  MemAvailable drop/conn (KiB)" low
        done
    done
    row maxconn "most connections held (cap $MAXCONN_CAP)" high
    printf '%0.s-' $(seq 114); echo
}

notes_print() {
    cat <<EOF
Each figure: the median of $RUNS run(s) ($MODE mode). wa/ha: whatsapp_proxy
divided by HAProxy. "direct": the client straight to the upstream, the
physical limit of this machine; in the TLS bulk rows the client's TLS
straight to the upstream behind TLS (same certificate, same negotiation,
no proxy), so a TLS row's target is that whatsapp_proxy keeps 0.8x of what
the same TLS does without a proxy. The other TLS rows have no direct figure.
HAProxy: $(haproxy -v | head -1 | cut -d' ' -f1-3), nbthread $CPUS (= its default on
$CPUS CPUs), tune.bufsize 4096, maxconn 27500, send-proxy-v2, the same
ECDSA P-256 certificate as whatsapp_proxy. whatsapp_proxy: default relay
threads (one per CPU). Idle memory: after each step, RSS growth of the proxy
process, and the machine's MemAvailable drop (with the free pages in the
kernel's per-CPU lists added back) minus the RSS growth of the loadgen
client and upstream (so it holds the proxy plus every kernel-side cost;
"direct" is the kernel cost of the client and upstream sockets alone).
Open-file limit: $FD_LIMIT per process (hard limit; run.sh raises the soft
one to it). A proxied connection needs 2 descriptors in the proxy (client
and upstream), so a proxy holds at most about $(((FD_LIMIT - 20) / 2)); the
loadgen client and upstream are separate processes with 1 per connection,
so direct stops near $((FD_LIMIT - 10)). Reaching the reference's 27,500
through a proxy needs an open-file limit of at least 55,100 (LimitNOFILE=).
EOF
    grep -h . "$TMP/maxconn.log" 2>/dev/null | sed 's/^/maxconn /'
    awk '$1 == "tls_negotiated" {t[$2] = t[$2] ? t[$2] : $3} END {
        printf "TLS negotiated in the bulk tests:";
        for (k in t) printf " %s %s;", k, t[k]; print "" }' "$RESULTS"
    awk '$1 == "rate_errors" && $3 > 0 {e[$2] += $3} END {
        for (t in e) printf "connection-rate errors (%s): %d\n", t, e[t] }' "$RESULTS"
    cat <<EOF
Round trip in TLS flood: $FLOOD_CLIENTS clients (SCHED_IDLE, by $FLOOD_POLICY) loop on the proxy's
TLS port: connect, full TLS handshake, close, no data. Meanwhile one
connection to the same proxy, on its plain or TLS port, measures 64-byte
round trips for $FLOOD_SECONDS s after a $WARMUP s warm-up. The flood's TLS
handshakes: completed per second over the flood's own window, which
holds the round trips' and is $FLOOD_SLACK s longer (context: no target).
EOF
    awk '$1 == "flood_errors" && $3 > 0 {e[$2] += $3} END {
        for (t in e) printf "TLS flood: failed handshakes (%s): %d\n", t, e[t] }' "$RESULTS"
    awk '$1 == "flood_short" {
        printf "TLS flood (%s): ended before the %s round trips did\n", $2, $3}' "$RESULTS"
    awk '$1 == "idle_short" {printf "idle connections not all opened (%s): %s\n", $2, $3}' \
        "$RESULTS"
}

# ---- 6. Main -----------------------------------------------------------

main() {
    local started=$SECONDS run target
    tools_check
    network_own
    [ -x "$LOADGEN" ] || { echo "build loadgen first: make -C bench" >&2; exit 1; }
    [ -x "$PROXY" ] || { echo "build it first: make -C bench whatsapp_proxy_bench" >&2; exit 1; }
    if nm "$PROXY" 2>/dev/null | grep -qE '__asan|__ubsan|__tsan|__gcov'; then
        echo "$PROXY is a sanitizer or coverage build: its numbers would mislead" >&2
        exit 1
    fi
    setup
    RESULTS=$TMP/results
    : >"$RESULTS"
    echo "whatsapp_proxy benchmark ($MODE), $(date -u +%Y-%m-%dT%H:%MZ)," \
        "$CPUS CPUs, open-file limit $FD_LIMIT"
    network_describe
    upstream_start
    wp_start
    ha_start
    for run in $(seq "$RUNS"); do
        echo "idle memory, run $run of $RUNS ($((SECONDS - started)) s so far)"
        run_memory
    done
    local phase_start=$SECONDS
    # Before the traffic tests: their TIME_WAIT sockets would make each of
    # the 10,000-20,000 connects search longer for a free local port.
    # Quick mode skips direct, whose result is the descriptor limit (the
    # notes state it) and which takes longest.
    echo "most connections held ($((SECONDS - started)) s so far)"
    for target in direct wp ha; do
        [ "$MODE-$target" = quick-direct ] && continue
        measure_maxconn "$target"
    done
    echo "  most connections held: $((SECONDS - phase_start)) s"
    for run in $(seq "$RUNS"); do
        echo "traffic, run $run of $RUNS ($((SECONDS - started)) s so far)"
        run_traffic
    done
    table_print
    notes_print
    echo "finished in $((SECONDS - started)) s"
}

# On one line with main, so that bash reads nothing more of this file
# after main has returned, even if the file was edited meanwhile.
main; exit
