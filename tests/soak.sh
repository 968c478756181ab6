#!/bin/sh
# tests/soak.sh - thousands of busy connections through whatsapp_proxy for
# a bounded time: no byte may be lost or corrupted, and afterwards the
# proxy must hold no more descriptors, threads or memory than after a
# warm-up round. tests/README.md gives the figures measured.
#
# The traffic is what phones do, the awkward parts included (soak_load.c
# says how often each happens): readers that stop reading for 0.2 to
# 2.5 s in the middle of an answer; connections that half-close right
# after sending their last message, while its answer is still coming,
# and pause then (past the proxy's 1 s --timeout-fin; a few of them with
# 16 MiB of answer still to come, more than the sockets around the proxy
# can hold); and connections that vanish with a reset mid-exchange. Every
# byte of every answer must still arrive, then the FIN; a client's reset
# must reach the server as a reset, and only a client's reset may.
#
#   sh tests/soak.sh [SECONDS]      (or: make soak SOAK_SECONDS=600)
#
# Environment: SOAK_CONNECTIONS (2000) connections kept open at once.
#
# What runs (all on 127.0.0.1, all started and stopped here by PID):
#
#   soak_load load --(2,000 connections)--> whatsapp_proxy --PROXY v2-->
#                                           soak_load echo (skips the
#                                           header, echoes the rest)
#
# Order: build the helper, raise the open-file limit, start echo and
# proxy; read the proxy's figures at rest; a warm-up round; rest and read
# again (the baseline); the soak round, sampling the peak; rest and read
# a third time; compare with the baseline.
#
# Output: the figures, one "ok - ..." or "not ok - ..." line per check,
# then "N passed, N failed". Exit status 0 only if nothing failed.

set -u

SECONDS_WANTED=${1:-60}
case "$SECONDS_WANTED" in
''|*[!0-9]*) echo "usage: $0 [SECONDS]  (a whole number, 5 or more)" >&2; exit 2 ;;
esac
[ "$SECONDS_WANTED" -ge 5 ] || { echo "$0: SECONDS must be 5 or more" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PROXY=${SOAK_PROXY:-$ROOT/whatsapp_proxy}
TOOL="$HERE/peer_tool.py"
CONNECTIONS=${SOAK_CONNECTIONS:-2000}
LOAD_THREADS=2
ECHO_THREADS=2
SEED=$(date +%s)
# Warm-up: a third of the run, at least 3 s and at most 10 s; long enough
# for the proxy's memory to reach its working size at this concurrency.
WARMUP=$((SECONDS_WANTED / 3))
[ $WARMUP -lt 3 ] && WARMUP=3
[ $WARMUP -gt 10 ] && WARMUP=10
SETTLE_S=30           # bound on the return to rest (idle conversation workers end after 10 s)
DRAIN_S=30            # soak_load's own bound on finishing after SECONDS
# Growth allowed after the soak, compared with the baseline: descriptors
# and threads none (the proxy is at rest both times), memory 10 % + 4 MiB
# (malloc keeps some freed memory; a real leak grows with every connection).
FD_MARGIN=0
THREAD_MARGIN=0
RSS_MARGIN_PERCENT=10
RSS_MARGIN_KB=4096

PASSED=0
FAILED=0

# ok, not_ok, give_up, field, need, install_missing, running, stop_pid,
# cleanup: see lib.sh.
. "$HERE/lib.sh"

# ---- 1. Tools, helper, limits --------------------------------------------

need cc gcc
need python3 python3
install_missing
[ -x "$PROXY" ] || { echo "no $PROXY: run make whatsapp_proxy" >&2; exit 1; }

TMP=$(mktemp -d /tmp/wp-soak.XXXXXX)
LOAD=$TMP/soak_load
cc -O2 -std=c11 -Wall -Wextra -pthread -o "$LOAD" "$HERE/soak_load.c" || {
    echo "cannot build tests/soak_load.c" >&2; rm -rf "$TMP"; exit 1; }

# Each connection costs the proxy two descriptors, and the load generator
# and the echo server one each: raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null
LIMIT=$(ulimit -n)
if [ "$LIMIT" != unlimited ] && [ "$LIMIT" -lt $((CONNECTIONS * 2 + 100)) ]; then
    echo "the open-file limit ($LIMIT) is too low for $CONNECTIONS connections:" \
         "lower SOAK_CONNECTIONS or raise the hard limit" >&2
    rm -rf "$TMP"
    exit 1
fi

# ---- 2. Processes: started here, stopped here by PID ---------------------

# Each PID is kept in a variable of its own, emptied once the script has
# stopped (and waited for) that process itself.
ECHO_PID="" PROXY_PID="" LOAD_PID=""
KEEP=${SOAK_KEEP:-}
trap 'cleanup $LOAD_PID $PROXY_PID $ECHO_PID' EXIT
trap 'exit 1' INT TERM HUP

set -- $(python3 "$TOOL" ports 2)
ECHO_PORT=$1
PROXY_PORT=$2

"$LOAD" echo "$ECHO_PORT" "$ECHO_THREADS" >"$TMP/echo.log" 2>&1 &
ECHO_PID=$!
python3 "$TOOL" wait-listen "$ECHO_PORT" 10 ||
    give_up "the echo server listens" "$TMP/echo.log"
# The media server is the echo server too: it is never used here, but the
# proxy health-checks it, and the default (whatsapp.net) may not resolve.
"$PROXY" --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$ECHO_PORT" \
    --media-upstream "127.0.0.1:$ECHO_PORT" \
    --stats off --grace 5 --cert-dir "$TMP/certs" >"$TMP/proxy.log" 2>&1 &
PROXY_PID=$!
python3 "$TOOL" wait-listen "$PROXY_PORT" 10 ||
    give_up "whatsapp_proxy listens" "$TMP/proxy.log"

# ---- 3. Reading the proxy's figures --------------------------------------

# Sets FDS, THREADS and RSS_KB from /proc for the proxy.
reading() {
    FDS=$(ls "/proc/$PROXY_PID/fd" 2>/dev/null | wc -l)
    THREADS=$(sed -n 's/^Threads:[[:space:]]*//p' "/proc/$PROXY_PID/status" 2>/dev/null)
    RSS_KB=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$PROXY_PID/status" 2>/dev/null)
    : "${THREADS:=0}" "${RSS_KB:=0}"
}

# Waits (bounded) until the proxy is back at rest: no more descriptors and
# threads than at the start, and two equal readings in a row.
settle() {
    i=0
    last=""
    while [ $i -lt $((SETTLE_S * 5)) ]; do
        reading
        now="$FDS $THREADS"
        if [ "$FDS" -le "$REST_FDS" ] && [ "$THREADS" -le "$REST_THREADS" ] &&
           [ "$now" = "$last" ]; then
            return 0
        fi
        last=$now
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}

# run_load SECONDS NAME: one round; samples the proxy's peak every second.
run_load() {
    "$LOAD" load "$PROXY_PORT" "$CONNECTIONS" "$1" "$LOAD_THREADS" "$SEED" \
        >"$TMP/$2.log" 2>&1 &
    LOAD_PID=$!
    PEAK_FDS=0 PEAK_THREADS=0 PEAK_RSS_KB=0
    limit=$(($1 + DRAIN_S + 15))
    waited=0
    while running "$LOAD_PID"; do
        reading
        [ "$FDS" -gt "$PEAK_FDS" ] && PEAK_FDS=$FDS
        [ "$THREADS" -gt "$PEAK_THREADS" ] && PEAK_THREADS=$THREADS
        [ "$RSS_KB" -gt "$PEAK_RSS_KB" ] && PEAK_RSS_KB=$RSS_KB
        if [ $waited -ge $limit ]; then
            stop_pid "$LOAD_PID"
            echo "load timed out" >>"$TMP/$2.log"
            break
        fi
        sleep 1
        waited=$((waited + 1))
    done
    wait "$LOAD_PID" 2>/dev/null
    LOAD_STATUS=$?
    LOAD_PID=""
    LOAD_LINE=$(grep '^load ' "$TMP/$2.log")
}

reading
REST_FDS=$FDS REST_THREADS=$THREADS REST_RSS_KB=$RSS_KB
echo "# whatsapp_proxy PID $PROXY_PID at rest: $FDS descriptors, $THREADS threads, $RSS_KB KiB resident"
echo "# $CONNECTIONS connections, $LOAD_THREADS load threads, seed $SEED, open-file limit $LIMIT, $(nproc) CPUs"

# ---- 4. Warm-up round, baseline -------------------------------------------

run_load "$WARMUP" warmup
echo "# warm-up ${WARMUP} s: $LOAD_LINE"
# The echo server counts the resets of both rounds: so must we.
WARMUP_ABORTS=$(field aborts "$LOAD_LINE")
if [ "$LOAD_STATUS" = 0 ]; then
    ok "warm-up: $(field exchanges "$LOAD_LINE") exchanges, no byte lost or corrupted"
else
    not_ok "warm-up: no byte lost or corrupted, no connection failed (status $LOAD_STATUS)"
fi
settle || not_ok "the proxy comes back to rest within ${SETTLE_S} s after the warm-up"
reading
BASE_FDS=$FDS BASE_THREADS=$THREADS BASE_RSS_KB=$RSS_KB
echo "# baseline after warm-up: $FDS descriptors, $THREADS threads, $RSS_KB KiB resident (peak during warm-up: $PEAK_FDS descriptors, $PEAK_THREADS threads, $PEAK_RSS_KB KiB)"

# ---- 5. The soak round -----------------------------------------------------

run_load "$SECONDS_WANTED" soak
echo "# soak ${SECONDS_WANTED} s: $LOAD_LINE"
echo "# peak during the soak: $PEAK_FDS descriptors, $PEAK_THREADS threads, $PEAK_RSS_KB KiB resident"
for key in bytes_lost bytes_corrupted connect_failures resets early_closes stalls; do
    value=$(field "$key" "$LOAD_LINE")
    if [ "$value" = 0 ]; then
        ok "soak: $key = 0"
    else
        not_ok "soak: $key = 0 (got '${value:-no figure}', log: $TMP/soak.log)"
    fi
done
sent=$(field bytes_sent "$LOAD_LINE")
received=$(field bytes_received "$LOAD_LINE")
# The exchanges that ended in an abort are counted apart (aborted_bytes_*):
# what remains is exact.
if [ -n "$sent" ] && [ "$sent" -gt 0 ] && [ "$sent" = "$received" ]; then
    ok "soak: every byte sent came back ($sent bytes each way, $(field exchanges "$LOAD_LINE") exchanges on $(field connections "$LOAD_LINE") connections)"
else
    not_ok "soak: every byte sent came back (sent '$sent', received '$received')"
fi
# The awkward traffic really happened (a figure of 0 would mean the checks
# above proved nothing about it).
for key in pauses pauses_after_half_close half_closes_mid_echo big_echo_pauses aborts; do
    value=$(field "$key" "$LOAD_LINE")
    if [ -n "$value" ] && [ "$value" -gt 0 ]; then
        ok "soak: the traffic had $key ($value)"
    else
        not_ok "soak: the traffic had $key (got '${value:-no figure}')"
    fi
done
if [ "$PEAK_FDS" -ge "$CONNECTIONS" ]; then
    ok "soak: the proxy really held the connections at once (peak $PEAK_FDS descriptors)"
else
    not_ok "soak: the proxy really held the connections at once (peak $PEAK_FDS descriptors, $CONNECTIONS connections)"
fi

# ---- 6. Back at rest: nothing grew -----------------------------------------

if running "$PROXY_PID"; then
    ok "whatsapp_proxy is still running"
else
    give_up "whatsapp_proxy is still running" "$TMP/proxy.log"
fi
settle || not_ok "the proxy comes back to rest within ${SETTLE_S} s after the soak"
reading
echo "# after the soak: $FDS descriptors, $THREADS threads, $RSS_KB KiB resident"
if [ "$FDS" -le $((BASE_FDS + FD_MARGIN)) ]; then
    ok "descriptors did not grow ($BASE_FDS -> $FDS)"
else
    not_ok "descriptors did not grow ($BASE_FDS -> $FDS)"
    ls -l "/proc/$PROXY_PID/fd" | sed 's/^/#   /'
fi
if [ "$THREADS" -le $((BASE_THREADS + THREAD_MARGIN)) ]; then
    ok "threads did not grow ($BASE_THREADS -> $THREADS)"
else
    not_ok "threads did not grow ($BASE_THREADS -> $THREADS)"
fi
RSS_LIMIT_KB=$((BASE_RSS_KB + BASE_RSS_KB * RSS_MARGIN_PERCENT / 100 + RSS_MARGIN_KB))
if [ "$RSS_KB" -le "$RSS_LIMIT_KB" ]; then
    ok "memory did not grow beyond the margin ($BASE_RSS_KB -> $RSS_KB KiB, limit $RSS_LIMIT_KB)"
else
    not_ok "memory did not grow beyond the margin ($BASE_RSS_KB -> $RSS_KB KiB, limit $RSS_LIMIT_KB)"
fi
conns=$(field connections "$LOAD_LINE")
if [ -n "$conns" ] && [ "$conns" -gt 0 ]; then
    echo "# a leak of more than $(( (RSS_LIMIT_KB - BASE_RSS_KB) * 1024 / conns )) bytes per connection would have failed the memory check"
fi

# ---- 7. Stop: the proxy exits 0, the echo server saw only good headers ------

kill -TERM "$PROXY_PID"
status=timeout
i=0
while [ $i -lt 100 ]; do
    if ! running "$PROXY_PID"; then
        wait "$PROXY_PID"
        status=$?
        PROXY_PID=""
        break
    fi
    sleep 0.1
    i=$((i + 1))
done
if [ "$status" = 0 ]; then
    ok "whatsapp_proxy stops on SIGTERM with status 0"
else
    not_ok "whatsapp_proxy stops on SIGTERM with status 0 (got $status)"
fi
kill -TERM "$ECHO_PID"
i=0
while [ $i -lt 50 ] && ! grep -q '^echo ' "$TMP/echo.log"; do
    sleep 0.1
    i=$((i + 1))
done
ECHO_LINE=$(grep '^echo ' "$TMP/echo.log")
stop_pid "$ECHO_PID"
ECHO_PID=""
echo "# $ECHO_LINE"
bad=$(field header_bad "$ECHO_LINE")
missing=$(field header_missing "$ECHO_LINE")
if [ "$bad" = 0 ] && [ "$missing" = 0 ]; then
    ok "upstream: every connection began with a well-formed PROXY v2 header ($(field header_v2 "$ECHO_LINE") headers)"
else
    not_ok "upstream: every connection began with a well-formed PROXY v2 header (bad '$bad', missing '$missing')"
fi
# How the echo server's connections ended. A client that aborted (RST)
# should reach it as a reset, as HAProxy passes one on; every other
# connection, and the proxy's health checks, must end with a FIN. The
# counts cannot tell which connection was which: a reset in place of a
# FIN and a FIN in place of a reset, the same number of each, would go
# unseen; both kinds of mistake alone are caught.
SOAK_ABORTS=$(field aborts "$LOAD_LINE")
aborts=$(( ${WARMUP_ABORTS:-0} + ${SOAK_ABORTS:-0} ))
connections=$(field connections "$ECHO_LINE")
ended_fin=$(field ended_fin "$ECHO_LINE")
ended_reset=$(field ended_reset "$ECHO_LINE")
ended_error=$(field ended_error "$ECHO_LINE")
ended_here=$(field ended_here "$ECHO_LINE")
: "${connections:=0}" "${ended_fin:=0}" "${ended_reset:=0}" "${ended_error:=-1}" "${ended_here:=0}"
if [ "$ended_error" = 0 ] &&
   [ $((ended_fin + ended_reset + ended_here)) -eq "$connections" ]; then
    ok "upstream: every connection ended, with a FIN or a reset ($ended_fin FIN, $ended_reset reset, $connections connections)"
else
    not_ok "upstream: every connection ended, with a FIN or a reset ($ended_fin FIN, $ended_reset reset, $ended_error other errors, $ended_here closed for a bad header, $connections connections)"
fi
if [ "$aborts" -gt 0 ] && [ $((ended_reset * 10)) -ge $((aborts * 9)) ]; then
    ok "upstream: the clients' resets arrived as resets ($ended_reset of $aborts aborts, at least 90 % needed)"
else
    not_ok "upstream: the clients' resets arrived as resets ($ended_reset of $aborts aborts, at least 90 % needed)"
fi
if [ "$ended_reset" -le "$aborts" ]; then
    ok "upstream: no reset without a client's abort ($ended_reset resets, $aborts aborts)"
else
    not_ok "upstream: no reset without a client's abort ($ended_reset resets, $aborts aborts)"
fi
problems=$(grep -cE ' (warn|error):' "$TMP/proxy.log")
# Two warnings at start are about the machine, not about connections.
problems=$((problems - $(grep -cE 'running as root|open-file limit' "$TMP/proxy.log")))
if [ "$problems" -eq 0 ]; then
    ok "the proxy's log has no warning about a connection"
else
    not_ok "the proxy's log has no warning about a connection ($problems lines)"
    grep -E ' (warn|error):' "$TMP/proxy.log" | head -n 20 | sed 's/^/#   /'
fi

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
