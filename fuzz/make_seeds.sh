#!/usr/bin/env bash
# Writes the seed corpus: a few small, typical inputs per target, from which
# libFuzzer starts. Run it from anywhere: bash fuzz/make_seeds.sh
# It rewrites only the files named here; inputs added by hand (found crashes,
# see README.md) stay. bash, not sh: its printf understands \x00 escapes.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/proxyhdr corpus/command_line corpus/stats_request
cd corpus

# seed FOLDER NAME FORMAT: writes printf FORMAT into FOLDER/NAME. FORMAT
# may hold \r, \n and \xHH escapes (write %% for a percent sign).
seed() {
    printf -- "$3" > "$1/$2"
}

# ---- PROXY headers (fuzz_proxyhdr) ----
# The v2 signature, then version/command, family, and body length.
SIG='\r\n\r\n\x00\r\nQUIT\n'
# 192.0.2.1 -> 198.51.100.2, ports 40000 (0x9c40) -> 443 (0x01bb).
V4='\xc0\x00\x02\x01\xc6\x33\x64\x02\x9c\x40\x01\xbb'
# 2001:db8::1 -> 2001:db8::2, same ports.
V6='\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01'
V6+='\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02'
V6+='\x9c\x40\x01\xbb'
P=proxyhdr
seed $P v1_tcp4 'PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r\n'
seed $P v1_tcp6 'PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\n'
seed $P v1_unknown 'PROXY UNKNOWN\r\n'
seed $P v1_tcp4_then_payload 'PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r\nWA\x05\x02'
seed $P v2_ipv4 "$SIG"'\x21\x11\x00\x0c'"$V4"
seed $P v2_ipv6 "$SIG"'\x21\x21\x00\x24'"$V6"
seed $P v2_local "$SIG"'\x20\x00\x00\x00'
# A TLV after the addresses: type 0x04 (NOOP), length 3; body 12 + 6 bytes.
seed $P v2_ipv4_with_tlv "$SIG"'\x21\x11\x00\x12'"$V4"'\x04\x00\x03abc'
# The same TLV, then a CRC32C TLV (type 0x03, length 4) with the right
# checksum of the whole header (computed once, with the value as zeros).
seed $P v2_ipv4_with_checksum "$SIG"'\x21\x11\x00\x19'"$V4"'\x04\x00\x03abc\x03\x00\x04\x6c\x20\xb5\xc8'
# A TLV whose length runs one byte past the header's end.
seed $P broken_v2_tlv_overrun "$SIG"'\x21\x11\x00\x12'"$V4"'\x04\x00\x04abc'
# A header of 3,000 bytes: a custom TLV (type 0xE0) of 2,969 bytes of x.
FILLER=$(head -c 2969 /dev/zero | tr '\0' x)
seed $P v2_ipv4_long "$SIG"'\x21\x11\x0b\xa8'"$V4"'\xe0\x0b\x99'"$FILLER"
seed $P v2_ipv4_then_payload "$SIG"'\x21\x11\x00\x0c'"$V4"'WA\x05\x02'
seed $P broken_v1_lf_only 'PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\n'
seed $P broken_v1_bad_port 'PROXY TCP4 192.0.2.1 198.51.100.2 40000 65536\r\n'
seed $P broken_v2_version_1 "$SIG"'\x11\x11\x00\x0c'"$V4"
seed $P broken_v2_body_too_short "$SIG"'\x21\x21\x00\x0c'"$V4"
seed $P partial_v2_signature '\r\n\r\n\x00\r'
seed $P not_proxy_tls_hello '\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03'

# ---- command lines (fuzz_command_line): arguments end at NUL bytes ----
C=command_line
seed $C no_flags ''
seed $C listen_reference_like '--listen\x00443/tls\x00--listen\x008443/tls/accept-proxy\x00--listen\x00587/media\x00--listen\x007777/media/accept-proxy\x00'
seed $C listen_addresses '--listen=[::1]:8080/accept-proxy\x00--listen=127.0.0.1:5222\x00--stats\x000.0.0.0:8199\x00'
seed $C upstreams '--upstream\x00g.whatsapp.net:5222\x00--upstream=[2001:db8::1]:443\x00--media-upstream\x00whatsapp.net:443\x00--send-proxy\x00v1\x00'
seed $C limits_and_timeouts '--maxconn\x001000\x00--threads=4\x00--timeout-connect\x005\x00--timeout-idle\x000.5\x00--timeout-fin=1\x00--timeout-handshake\x005\x00--grace\x0030\x00--check-interval\x0060\x00'
seed $C certificate '--cert\x00/etc/letsencrypt/live/proxy.example.org/fullchain.pem\x00--key\x00/etc/letsencrypt/live/proxy.example.org/privkey.pem\x00'
seed $C made_certificate '--cert-key\x00rsa2048\x00--cert-dir\x00/var/lib/whatsapp_proxy\x00--ssl-dns\x00proxy.example.org,chat.example.org\x00--ssl-ip\x00192.0.2.1,2001:db8::1\x00'
seed $C operate '--user\x00nobody\x00--log-level\x00debug\x00--log-clients\x00--stats\x00off\x00--public-host\x00proxy.example.org\x00--check\x00'
seed $C help '--help\x00'
seed $C version '--version\x00'
seed $C broken_tls_media '--listen\x00587/tls/media\x00'
seed $C broken_cert_without_key '--cert\x00fullchain.pem\x00'
seed $C broken_missing_value '--listen\x00'
seed $C broken_zero_seconds '--timeout-idle\x000\x00'
# Single values (no NUL): settings_parse() refuses them, but the small
# parsers (listener_spec_parse() and the others) read them whole.
seed $C value_listen_ipv6 '[2001:db8::1]:8443/tls/accept-proxy'
seed $C value_host_port 'g-fallback.whatsapp.net:443'
seed $C value_seconds '0.25'

# ---- requests to the statistics port (fuzz_stats_request) ----
S=stats_request
seed $S get_page 'GET / HTTP/1.1\r\nHost: localhost:8199\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n'
seed $S get_metrics 'GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n'
seed $S get_healthz_query 'GET /healthz?probe=1 HTTP/1.0\r\n\r\n'
seed $S head_page 'HEAD / HTTP/1.1\r\n\r\n'
seed $S post_page 'POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n'
seed $S partial_line 'GET /metr'
seed $S partial_headers 'GET / HTTP/1.1\r\nHost: local'
seed $S broken_no_slash 'GET metrics HTTP/1.1\r\n\r\n'
seed $S broken_no_version 'GET /\r\n\r\n'
