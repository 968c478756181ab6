#!/bin/sh
# Keeps tutorial.md true: checks that everything it names still exists in
# the code, and runs its checkpoints against the real proxy and the demo
# upstream, comparing what they print with what the tutorial says.
#
#   sh scripts/check-tutorial.sh           names, then checkpoints
#   sh scripts/check-tutorial.sh --names   names only (make test runs this)
#
# Conventions in tutorial.md:
#   `name()`             a function of whatsapp_proxy.c, test_proxy.c or
#                        demo/demo_upstream.c
#   ```c                 a quote: each of its lines stands in the code
#   `test_...`           a test of test_proxy.c
#   §N Name              section N of whatsapp_proxy.c, called Name
#   CK_RUN_CASE="Name"   a test case (TCase) of test_proxy.c
#   ```sh checkpoint     a command to run while `make demo` runs; the
#   ```text              block right after it is what it must print. In it,
#                        [...] stands for any text within a line, and a line
#                        of just ... for any number of lines.
set -u
cd "$(dirname "$0")/.."
passed=0
failed=0
ok() { passed=$((passed + 1)); printf 'ok - %s\n' "$1"; }
not_ok() { failed=$((failed + 1)); printf 'not ok - %s\n' "$1"; }
sources="whatsapp_proxy.c test_proxy.c demo/demo_upstream.c"

# --- 1. Names -----------------------------------------------------------
for name in $(grep -oE '`[a-z_][a-z0-9_]*\(\)`' tutorial.md | tr -d '`()' | sort -u); do
    if grep -qE "\\b$name\\(" $sources; then ok "function $name()"
    else not_ok "tutorial.md names $name(), which the code no longer has"; fi
done
for name in $(grep -oE '`test_[a-z0-9_]+`' tutorial.md | tr -d '`' | sort -u); do
    if grep -qE "^START_TEST\\($name\\)" test_proxy.c; then ok "test $name"
    else not_ok "tutorial.md names $name, which test_proxy.c does not have"; fi
done
grep -oE 'CK_RUN_CASE="[^"]+"' tutorial.md | sed 's/CK_RUN_CASE="//; s/"$//' | sort -u |
while read -r case_name; do
    if grep -qF "section(\"$case_name\"," test_proxy.c; then echo "ok - test case $case_name"
    else echo "not ok - tutorial.md runs test case \"$case_name\", which test_proxy.c does not have"; fi
done > /tmp/check-tutorial.$$
passed=$((passed + $(grep -c '^ok' /tmp/check-tutorial.$$)))
failed=$((failed + $(grep -c '^not ok' /tmp/check-tutorial.$$)))
cat /tmp/check-tutorial.$$
rm -f /tmp/check-tutorial.$$
grep -oE '§[0-9]+ [A-Z][A-Za-z]*( [a-zA-Z]+)*' tutorial.md | sort -u |
while read -r mark rest; do
    number=${mark#§}
    found=0
    # The banner's name must start the words after §N.
    banner=$(grep -oE "^/\\* ==== $number\\. [^=]+ ====" whatsapp_proxy.c | sed "s/^\\/\\* ==== $number\\. //; s/ ====\$//")
    case "$rest" in "$banner"*) found=1 ;; esac
    if [ "$found" = 1 ]; then echo "ok - section §$number $banner"
    else echo "not ok - tutorial.md says §$number $rest, but section $number is '$banner'"; fi
done > /tmp/check-tutorial.$$
passed=$((passed + $(grep -c '^ok' /tmp/check-tutorial.$$)))
failed=$((failed + $(grep -c '^not ok' /tmp/check-tutorial.$$)))
cat /tmp/check-tutorial.$$
rm -f /tmp/check-tutorial.$$

# Code is quoted, never paraphrased: every line of a ```c block must stand,
# word for word, in the code (a line of just ... marks a cut).
awk '
    /^```c$/ { n++; inside = 1; next }
    /^```/ { inside = 0; next }
    inside { print n "|" $0 }
' tutorial.md | while IFS='|' read -r block line; do
    trimmed=$(printf '%s' "$line" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
    case "$trimmed" in ""|"..."|"/* ... */") continue ;; esac
    if grep -qF -- "$trimmed" $sources whatsapp_proxy.h; then :
    else echo "not ok - quote $block of tutorial.md is not in the code: $trimmed"; fi
done > /tmp/check-tutorial.$$
quotes=$(grep -c '^```c$' tutorial.md)
if [ -s /tmp/check-tutorial.$$ ]; then
    failed=$((failed + $(grep -c '^not ok' /tmp/check-tutorial.$$)))
    cat /tmp/check-tutorial.$$
else
    passed=$((passed + 1)); echo "ok - all $quotes code quotes stand in the code"
fi
rm -f /tmp/check-tutorial.$$

if [ "${1:-}" = "--names" ]; then
    echo "$passed passed, $failed failed"
    [ "$failed" = 0 ]
    exit
fi

# --- 2. Checkpoints -----------------------------------------------------
for tool in nc openssl curl; do
    command -v $tool >/dev/null 2>&1 || { echo "check-tutorial: needs $tool (apt-get install netcat-openbsd openssl curl)"; exit 1; }
done
make -s whatsapp_proxy demo/demo_upstream || exit 1
work=$(mktemp -d)
./demo/demo_upstream 9000 > "$work/upstream.log" 2>&1 &
upstream_pid=$!
./whatsapp_proxy --listen 127.0.0.1:5222 --listen 127.0.0.1:8443/tls \
    --listen 127.0.0.1:8080/accept-proxy --listen 127.0.0.1:7587/media \
    --upstream 127.0.0.1:9000 --media-upstream 127.0.0.1:9000 \
    --public-host 127.0.0.1 --check-interval 5 --timeout-handshake 5 --cert-dir "$work/certs" \
    > "$work/proxy.log" 2>&1 &
proxy_pid=$!
trap 'kill $proxy_pid $upstream_pid 2>/dev/null; rm -rf "$work"' EXIT
tries=0
until grep -q ' ready;' "$work/proxy.log" || [ $tries -ge 100 ]; do
    tries=$((tries + 1)); sleep 0.1
done
grep -q ' ready;' "$work/proxy.log" || { cat "$work/proxy.log"; echo "check-tutorial: the demo did not start (is make demo running?)"; exit 1; }

# Split tutorial.md into numbered command and expected-output files.
awk -v dir="$work" '
    /^```sh checkpoint/ { n++; file = dir "/command." n; mode = "c"; next }
    /^```text/ && mode == "after" { file = dir "/expected." n; mode = "e"; next }
    /^```/ { if (mode == "c") mode = "after"; else mode = ""; next }
    mode == "c" || mode == "e" { print > file }
' tutorial.md

# Does the output file $2 match the expected file $1 ([...] and ... rules)?
matches() {
    awk '
        function to_regex(line,    out) {
            gsub(/[\\.^$*+?(){}|\/]/, "\\\\&", line)
            gsub(/\[/, "\\[", line); gsub(/\]/, "\\]", line)
            gsub(/\\\[\\\.\\\.\\\.\\\]/, ".*", line)
            return "^" line "$"
        }
        function fits(i, j,    k) {
            if (i > n_expected) return j > n_actual
            if (expected[i] == "...") {
                for (k = j; k <= n_actual + 1; k++) if (fits(i + 1, k)) return 1
                return 0
            }
            if (j > n_actual) return 0
            return actual[j] ~ to_regex(expected[i]) && fits(i + 1, j + 1)
        }
        FNR == NR { expected[++n_expected] = $0; next }
        { actual[++n_actual] = $0 }
        END { exit fits(1, 1) ? 0 : 1 }
    ' "$1" "$2"
}

n=1
while [ -f "$work/command.$n" ]; do
    timeout 20 sh "$work/command.$n" > "$work/actual.$n" 2>&1
    summary=$(head -n 1 "$work/command.$n")
    if [ ! -f "$work/expected.$n" ]; then
        not_ok "checkpoint $n ($summary) has no \`\`\`text block after it"
    elif matches "$work/expected.$n" "$work/actual.$n"; then
        ok "checkpoint $n: $summary"
    else
        not_ok "checkpoint $n: $summary"
        echo "  expected:"; sed 's/^/    /' "$work/expected.$n"
        echo "  got:"; sed 's/^/    /' "$work/actual.$n"
    fi
    n=$((n + 1))
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
