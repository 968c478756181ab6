# tests/lib.sh: the shell functions that peers.sh, differential.sh,
# lookalike.sh, soak.sh and slow_readers.sh share, each written once here.
# Sourced, not run: `. "$HERE/lib.sh"`. Sourcing only defines functions:
# nothing runs, nothing is started.
#
# The script's variables they use:
#   PASSED, FAILED  the counts of checks, 0 at the start
#   TMP             the run's temporary folder: logs, configurations
#   PIDS            the PIDs start() remembers, "" at first
#   KEEP            non-empty: keep $TMP even when every check passed
#                   (new_run sets TMP, PIDS and KEEP)
#   TOOL, STARTUP_S peer_tool.py, the longest wait for a listener
#   RUN_LIMIT_S     the longest wait for a Python run (add_counts)
# and the ones they set: MISSING (need), pid_NAME (start).

# ---- Reporting -------------------------------------------------------------

# One line per check, "ok - ..." or "not ok - ...", counted in PASSED and
# FAILED; each script ends with "$PASSED passed, $FAILED failed" and an
# exit status that is 0 only if nothing failed.
ok()     { PASSED=$((PASSED + 1)); echo "ok - $*"; }
not_ok() { FAILED=$((FAILED + 1)); echo "not ok - $*"; }

# show_log FILE [LINES]: prints FILE (or only its last LINES lines) as
# comment lines, "#   ...", so that the reason for a failure stands in the
# output beside the failed check, and the output stays "ok"/"not ok" lines.
show_log() {
    if [ -n "${2:-}" ]; then
        tail -n "$2" "$1" | sed 's/^/#   /'
    else
        sed 's/^/#   /' "$1"
    fi
}

# give_up TEXT [LOG [LINES]]: a failed check after which every later check
# would fail for the same reason (a server that never started): says so
# once, shows the log (see show_log), prints the counts and ends the run
# (exit 1; the EXIT trap then stops what was started).
give_up() {
    not_ok "$1"
    [ -n "${2:-}" ] && show_log "$2" "${3:-}"
    echo "$PASSED passed, $FAILED failed"
    exit 1
}

# field KEY LINE: prints the value of KEY in a "key=value key=value" line
# (the form in which peer_tool.py and the C helpers report), or nothing.
field() {
    printf '%s\n' "$2" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -n 1
}

# ---- Tools -------------------------------------------------------------------

# need COMMAND PACKAGE: if COMMAND is not found, adds the Debian PACKAGE
# that brings it to MISSING. Call it once per tool, then install_missing.
# (A need that is not a command, a C header say, appends to MISSING itself.)
need() {
    command -v "$1" >/dev/null 2>&1 || MISSING="${MISSING:-} $2"
}

# install_missing: installs the packages in MISSING as root, with apt-get;
# for anyone else it prints the "sudo apt-get install" line and ends the
# run (exit 1), since the checks cannot run without them. Nothing missing:
# it returns at once. An apt-get that runs already (another test, an
# unattended upgrade) holds dpkg's lock: wait for it, up to 5 min, rather
# than fail. After it returns, a non-empty MISSING means "just installed".
install_missing() {
    [ -z "${MISSING:-}" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "# installing:$MISSING"
        apt-get -o DPkg::Lock::Timeout=300 update >/dev/null &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
                install -y $MISSING >/dev/null ||
            { echo "apt-get install$MISSING failed" >&2; exit 1; }
    else
        echo "missing:$MISSING. Install with: sudo apt-get install -y$MISSING" >&2
        exit 1
    fi
}

# ---- Processes: started here, stopped here by PID ------------------------
#
# Every process a script starts, it stops itself, by the PID it got from
# $! when it started it: never by name (pkill, killall), which would also
# hit a developer's own haproxy or nginx, or another test's, on the same
# machine.

# start NAME COMMAND...: runs COMMAND in the background, its output in
# $TMP/NAME.log, and remembers its PID in the variable pid_NAME and in the
# list PIDS (which cleanup stops at the end).
start() {
    name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    eval "pid_$name=$!"
    PIDS="$PIDS $!"
}

# True while process $1 runs (a child that exited but was not yet waited
# for, a zombie, does not count).
running() {
    [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# Stops one process by PID: SIGTERM, up to 5 s, then SIGKILL.
stop_pid() {
    kill -TERM "$1" 2>/dev/null || return 0
    i=0
    while [ $i -lt 50 ] && running "$1"; do
        sleep 0.1
        i=$((i + 1))
    done
    kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null
}

# cleanup PID...: the end of every run, from the EXIT trap, so that it runs
# on success, on failure and on Ctrl-C alike:
#     trap 'cleanup $PIDS' EXIT          (single quotes: the PIDs as they
#     trap 'exit 1' INT TERM HUP          are at the end, not at the start;
#                                         a signal goes through exit, so
#                                         through the EXIT trap too)
# Stops each PID, in the order given, then removes $TMP, or keeps it and
# says where it is if a check failed or KEEP is set (the logs are the
# first thing to read after a failure).
cleanup() {
    for pid in "$@"; do
        stop_pid "$pid"
    done
    if [ "$FAILED" -gt 0 ] || [ -n "$KEEP" ]; then
        echo "# logs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
}

# new_run NAME KEEP: for a script that starts its processes with start():
# makes the run's temporary folder, TMP (/tmp/NAME.XXXXXX), empties PIDS,
# sets KEEP, and sets the two traps above, so that whatever start() starts
# from here on is stopped at the end. (soak.sh and slow_readers.sh keep
# each PID in a variable of their own and set the traps themselves.)
new_run() {
    TMP=$(mktemp -d "/tmp/$1.XXXXXX")
    PIDS=""
    KEEP=$2
    trap 'cleanup $PIDS' EXIT
    trap 'exit 1' INT TERM HUP
}

# wait_listen PORT WHAT NAME [optional]: waits (bounded by STARTUP_S) until
# PORT listens on 127.0.0.1. If it never does, the failed check names the
# log of the process started as NAME and shows it; without "optional" that
# also ends the run (give_up), since every later check would fail for that
# reason; with it, wait_listen returns 1 and the run goes on.
wait_listen() {
    python3 "$TOOL" wait-listen "$1" "$STARTUP_S" && return 0
    if [ "${4:-}" = optional ]; then
        not_ok "$2 listens on port $1 within ${STARTUP_S} s (log: $TMP/$3.log)"
        show_log "$TMP/$3.log"
        return 1
    fi
    give_up "$2 listens on port $1 within ${STARTUP_S} s (log: $TMP/$3.log)" \
        "$TMP/$3.log"
}

# still_running NAME...: one check per process started as NAME: it must
# still run at the end (a proxy that crashed along the way fails here even
# if every conversation before the crash went well).
still_running() {
    for name in "$@"; do
        eval "pid=\$pid_$name"
        if running "$pid"; then
            ok "$name is still running at the end"
        else
            not_ok "$name is still running at the end (log: $TMP/$name.log)"
        fi
    done
}

# add_counts NAME PROGRAM: for a Python run started as NAME (differential.py,
# lookalike.py), which prints its own "ok"/"not ok" lines and writes
# "passed=N failed=N" to $TMP/counts: waits (bounded by RUN_LIMIT_S) until
# it ends, prints its log, and adds its counts to PASSED and FAILED. No
# counts file (it hung, or crashed): one failed check.
add_counts() {
    eval "pid=\$pid_$1"
    i=0
    while running "$pid" && [ $i -lt $((RUN_LIMIT_S * 10)) ]; do
        sleep 0.1
        i=$((i + 1))
    done
    cat "$TMP/$1.log"
    if [ -r "$TMP/counts" ]; then
        counts=$(cat "$TMP/counts")
        PASSED=$((PASSED + $(echo "$counts" | sed 's/.*passed=\([0-9]*\).*/\1/')))
        FAILED=$((FAILED + $(echo "$counts" | sed 's/.*failed=\([0-9]*\).*/\1/')))
    else
        not_ok "$2 finished its run within $RUN_LIMIT_S s"
    fi
}
