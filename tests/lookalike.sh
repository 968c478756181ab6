#!/bin/sh
# tests/lookalike.sh - does whatsapp_proxy look like a web server to a
# scanner? nginx serves a small web site over TLS with nginx's own
# defaults and the versions of Debian's packaged configuration (TLS 1.0
# to 1.3); whatsapp_proxy, with the same certificate, has the same site
# as its --decoy. The same client asks both the same questions (TLS
# details, bytes that are not TLS, silence, 17 probes) and the answers are
# compared; lookalike.py asks and compares, and lists the differences that
# stay, with their reasons. tests/README.md says what each part proves.
#
#   sh tests/lookalike.sh          (or: make test-peers)
#
# What runs (all on 127.0.0.1, all started and stopped here by PID):
#
#   client --TLS--> nginx "site"   the web site reached directly
#   client --TLS--> whatsapp_proxy --decoy--> nginx "decoy" (plain HTTP,
#                                  the same site)
#                                  --WhatsApp--> fake chat server (in
#                                  lookalike.py: a probe there is a leak)
#   client --TLS--> whatsapp_proxy --decoy-send-proxy v1--> nginx "decoy"'s
#                                  proxy_protocol listener, which takes the
#                                  visitor's address from the header
#
# Output: one line per check, "ok - ..." or "not ok - ...", then
# "N passed, N failed". Exit status 0 only if nothing failed.

set -u

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PROXY=${LOOKALIKE_PROXY:-${PEERS_PROXY:-$ROOT/whatsapp_proxy}}
TOOL="$HERE/peer_tool.py"
STARTUP_S=10          # the longest wait for any server to listen
RUN_LIMIT_S=150       # the longest wait for lookalike.py to finish
PASSED=0
FAILED=0

# ok, not_ok, show_log, need, install_missing, new_run, start, cleanup,
# wait_listen, add_counts, still_running: see lib.sh.
. "$HERE/lib.sh"

# ---- 1. Tools ------------------------------------------------------------

# nginx lives in /usr/sbin, which an ordinary user's PATH may lack.
PATH="$PATH:/usr/sbin:/sbin"

need nginx nginx-light
need openssl openssl
need python3 python3
install_missing
# Installing nginx starts Debian's own nginx service on port 80; this
# test runs its own, so it stops that one (only if it installed it: a
# MISSING that is not empty after install_missing was just installed).
case ${MISSING:-} in
*nginx*)
    if [ -s /run/nginx.pid ]; then
        echo "# stopping the nginx service the package started"
        nginx -s stop >/dev/null 2>&1
    fi ;;
esac
[ -x "$PROXY" ] || { echo "no $PROXY: run make whatsapp_proxy" >&2; exit 1; }
for module in http_ssl_module http_realip_module; do
    nginx -V 2>&1 | grep -q "with-$module" || {
        echo "this nginx lacks $module (Debian's nginx-light has it)" >&2
        exit 1
    }
done

# ---- 2. Processes: started here, stopped here by PID ---------------------

new_run wp-lookalike "${LOOKALIKE_KEEP:-${PEERS_KEEP:-}}"
# nginx started by root runs its workers as another user, who must be
# able to read the site in here.
chmod 755 "$TMP"

# ---- 3. Ports, certificate, site and configurations ----------------------

# Ports below the ephemeral range, checked free (peer_tool.py ports).
set -- $(python3 "$TOOL" ports 7)
SITE=$1 DECOY=$2 DECOY_PP=$3 DECOY_TLS=$4 WP=$5 WP_TOLD=$6 CHAT=$7

# One certificate for nginx and whatsapp_proxy: ECDSA P-256, self-signed,
# for proxy.example.org (a scanner compares certificates too; here they
# are the same on purpose).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" -days 2 \
    -subj /CN=proxy.example.org -addext subjectAltName=DNS:proxy.example.org \
    >"$TMP/openssl.log" 2>&1 || { echo "openssl req failed" >&2; exit 1; }

# The web site: a page with a known body, and a page for local visitors
# only (as /server-status often is).
mkdir "$TMP/www"
echo "lookalike test site" >"$TMP/www/index.html"
echo "for local visitors only" >"$TMP/www/local-only"
chmod -R a+rX "$TMP/www"

# nginx_config NAME SERVERS: an nginx configuration in $TMP/NAME.conf with
# nginx's own defaults, in the foreground (stopped by PID), one worker,
# its logs and temporary files in $TMP. The access log names the visitor
# as nginx sees it ($remote_addr) and as a PROXY header said
# ($proxy_protocol_addr). SERVERS: the server blocks.
nginx_config() {
    mkdir "$TMP/$1"
    cat >"$TMP/$1.conf" <<EOF
daemon off;
worker_processes 1;
pid $TMP/$1/nginx.pid;
error_log $TMP/$1.error.log info;
events { worker_connections 256; }
http {
  log_format visitors '\$remote_addr \$proxy_protocol_addr "\$request" \$status';
  access_log $TMP/$1.access.log visitors;
  client_body_temp_path $TMP/$1/body;
  proxy_temp_path $TMP/$1/proxy;
  fastcgi_temp_path $TMP/$1/fastcgi;
  uwsgi_temp_path $TMP/$1/uwsgi;
  scgi_temp_path $TMP/$1/scgi;
$2
}
EOF
}

# The site's pages, the same in every server block.
PAGES="    root $TMP/www;
    location = /local-only { allow 127.0.0.1; deny all; }"

# nginx "site": the web site reached directly over TLS. No ssl_* option
# but the certificate and the versions: nginx's defaults are the point.
# The versions are the line in Debian's packaged nginx.conf (and the
# default of nginx 1.23.4 to 1.27.2); nginx 1.22's own default lacks TLS
# 1.3 (see TLS_1_3_NOTE in lookalike.py).
nginx_config site "  server {
    listen 127.0.0.1:$SITE ssl;
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
    ssl_certificate $TMP/cert.pem;
    ssl_certificate_key $TMP/key.pem;
$PAGES
  }"

# nginx "decoy": the same site in plain HTTP, as whatsapp_proxy's decoy
# (the proxy ends TLS and hands it the decrypted bytes). Its second
# listener takes a PROXY header first, and real_ip makes the visitor's
# address in it the one the access rules and the log see. Its third is
# the site's own TLS port (--decoy-tls-port), for what a client of the
# proxy's TLS port sends before any TLS.
nginx_config decoy "  server {
    listen 127.0.0.1:$DECOY;
    listen 127.0.0.1:$DECOY_PP proxy_protocol;
    listen 127.0.0.1:$DECOY_TLS ssl;
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
    ssl_certificate $TMP/cert.pem;
    ssl_certificate_key $TMP/key.pem;
    set_real_ip_from 127.0.0.1;
    real_ip_header proxy_protocol;
$PAGES
  }"

# nginx_run NAME [nginx options]: becomes nginx (exec, so that the PID
# start() keeps is nginx's own) with configuration NAME, its prefix and
# its first log (before the configuration is read) in $TMP. Run it in a
# subshell or through start(), never in the script's own shell.
nginx_run() {
    name=$1
    shift
    exec nginx -c "$TMP/$name.conf" -p "$TMP/$name" \
        -e "$TMP/$name.error.log" "$@"
}

for name in site decoy; do
    if (nginx_run "$name" -t -q) >"$TMP/$name.check" 2>&1; then
        ok "nginx accepts the $name configuration"
    else
        not_ok "nginx accepts the $name configuration"
        show_log "$TMP/$name.check"
    fi
done

# ---- 4. Start everything -------------------------------------------------

echo "# $(nginx -v 2>&1); $(openssl version); $(python3 --version)"
start nginx_site nginx_run site
start nginx_decoy nginx_run decoy
wait_listen "$SITE" "nginx site" nginx_site
for port in $DECOY $DECOY_PP $DECOY_TLS; do
    wait_listen "$port" "nginx decoy" nginx_decoy
done

# whatsapp_proxy: the same certificate, the site's plain twin as its decoy,
# the fake chat server as its upstream (PROXY v2 header, its default).
wp() {
    name=$1
    shift
    start "$name" "$PROXY" --stats off --grace 1 --cert "$TMP/cert.pem" \
        --key "$TMP/key.pem" --upstream "127.0.0.1:$CHAT" "$@"
}
wp wp_main --listen "127.0.0.1:$WP/tls" --decoy "127.0.0.1:$DECOY" \
    --decoy-tls-port "$DECOY_TLS"
wp wp_told --listen "127.0.0.1:$WP_TOLD/tls" --decoy "127.0.0.1:$DECOY_PP" \
    --decoy-send-proxy v1
wait_listen "$WP" "whatsapp_proxy --decoy" wp_main
# Without --decoy-send-proxy (an older binary) only part (5) fails.
wait_listen "$WP_TOLD" "whatsapp_proxy --decoy-send-proxy v1" wp_told \
    optional

# ---- 5. The questions (lookalike.py prints its own lines) ----------------

start ask python3 -u "$HERE/lookalike.py" run "$TMP/counts" \
    "nginx=$SITE" "proxy=$WP" "told=$WP_TOLD" \
    "chat=$CHAT" "decoy_log=$TMP/decoy.access.log"
add_counts ask lookalike.py

# ---- 6. Everything is still alive (no crash along the way) ----------------

still_running nginx_site nginx_decoy wp_main wp_told

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
