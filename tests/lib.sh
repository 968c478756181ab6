# tests/lib.sh: shell functions that peers.sh and soak.sh share.
# Sourced, not run: `. "$HERE/lib.sh"`.

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
