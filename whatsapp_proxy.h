/*
 * whatsapp_proxy.h - what the tests call, in the order of the sections of
 * whatsapp_proxy.c.
 *
 * The proxy is one file, whatsapp_proxy.c, meant to be read from top to
 * bottom. This header exists only so that test_proxy.c can call the same
 * functions the proxy uses. Each declaration carries its contract; the
 * explanation of the idea behind it is in the section of the .c file named
 * in the banner above it.
 */
#ifndef WHATSAPP_PROXY_H
#define WHATSAPP_PROXY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* ==== 1. Settings and limits ==== */

/* All settings of one run. Defined in whatsapp_proxy.c section 1; tests only
 * hold a pointer and fill it through settings_parse(), exactly as an operator
 * fills it with command-line flags. */
struct settings;

/* Returns a new settings object holding the official proxy's defaults (the
 * reference's ports, upstreams, limits and timeouts). Free with
 * settings_free(). Never returns NULL (aborts when memory runs out). */
struct settings *settings_new(void);
void settings_free(struct settings *settings);

/* Counters every part of the proxy adds to. Read with proxy_counter(). */
enum counter {
    COUNTER_CONNECTIONS_ACCEPTED,  /* every accepted client, over limit too */
    COUNTER_CONNECTIONS_RELAYED,   /* clients that reached an upstream */
    COUNTER_CONNECTIONS_CLOSED,    /* clients whose connection has ended */
    COUNTER_REJECTED_MAXCONN,      /* closed at once: over --maxconn */
    COUNTER_BAD_PROXY_HEADER,      /* malformed or missing PROXY header */
    COUNTER_TLS_HANDSHAKE_FAILED,  /* plain bytes on a TLS port, bad hello */
    COUNTER_HANDSHAKE_TIMEOUT,     /* header or TLS not done in time */
    COUNTER_UPSTREAM_UNREACHABLE,  /* every upstream try failed */
    COUNTER_UPSTREAM_CONNECT_FAILED, /* one failed try (refused, timeout) */
    COUNTER_IDLE_TIMEOUT,          /* closed after --timeout-idle */
    COUNTER_FIN_TIMEOUT,           /* closed after --timeout-fin */
    COUNTER_RELAY_ERROR,           /* a reset or other error while relaying */
    COUNTER_BYTES_FROM_CLIENTS,    /* payload bytes client -> upstream */
    COUNTER_BYTES_TO_CLIENTS,      /* payload bytes upstream -> client */
    COUNTER_DECOYED,               /* probes handed to the --decoy site */
    COUNTER_SNI_MATCHED,           /* TLS server name in the --sni list */
    COUNTER_SNI_MISSED,            /* TLS server name missing or not listed */
    COUNTER_REJECTED_PER_IP,       /* closed at once: over --max-per-ip */
    COUNTER_REJECTED_UNTRUSTED,    /* PROXY port, source not trusted */
    COUNTER_COUNT
};

/* The value of one counter, and the number of client connections open
 * right now (in a conversation or in a relay thread). */
unsigned long long proxy_counter(enum counter which);
unsigned proxy_connections_now(void);

/* ==== 3. Command line ==== */

/* One --listen value, "[ADDR:]PORT[/tls][/accept-proxy][/media]". */
struct listener_spec {
    char address[64];   /* "" means every IPv4 and IPv6 address */
    uint16_t port;      /* 0 asks the kernel for a free port (tests use it) */
    bool tls;           /* terminate TLS here */
    bool accept_proxy;  /* expect a PROXY header (v1 or v2) first */
    bool media;         /* relay to the media upstream, untouched */
};

/* Parses one listener spec. Returns 0 and fills *out, or -1 and writes one
 * line naming the problem into error (error_size bytes, always terminated). */
int listener_spec_parse(const char *text, struct listener_spec *out,
                        char *error, size_t error_size);

/* Parses "HOST:PORT" or "[IPV6]:PORT" into host (host_size bytes) and *port.
 * Returns 0, or -1 with one line in error. */
int host_port_parse(const char *text, char *host, size_t host_size,
                    uint16_t *port, char *error, size_t error_size);

/* Parses a duration in seconds, decimals allowed ("200", "0.25"), into
 * milliseconds. Returns 0, or -1 with one line in error naming flag_name. */
int seconds_parse(const char *text, const char *flag_name, int *out_ms,
                  char *error, size_t error_size);

/* The name of command-line flag number index ("--listen", ...), in the
 * order --help lists them, or NULL past the last one. */
const char *settings_flag_name(size_t index);

/* What settings_parse() tells its caller to do next. */
enum parse_result {
    PARSE_RUN = 0,      /* settings are complete: run (or check) the proxy */
    PARSE_EXIT_OK = 1,  /* --help or --version was printed to stdout */
    PARSE_ERROR = 2     /* error holds one line naming the flag; exit 2 */
};

/* Reads argv (argv[0] is the program name) into settings, which must come
 * from settings_new(). Options given replace the defaults; a repeatable option
 * (--listen, --upstream) given once replaces the whole default list. */
enum parse_result settings_parse(struct settings *settings, int argc,
                                 char **argv, char *error, size_t error_size);

/* ==== 4. PROXY protocol ==== */

/* What a PROXY header says about a connection. */
struct proxy_addresses {
    bool known;                     /* false: UNKNOWN (v1) or LOCAL/UNSPEC (v2):
                                       the receiver uses the real addresses */
    struct sockaddr_storage source; /* the client, as the sender saw it */
    struct sockaddr_storage destination; /* the address the client dialled */
};

/* Longest v1 header, CRLF included (doc/proxy-protocol.txt). */
#define PROXYHDR_V1_MAX_BYTES 107
/* The longest v2 header this proxy accepts, TLVs included: 4,096 bytes,
 * the size of the reference's buffers, which a header must fit in there
 * too. Balancers add TLVs (a connection ID, TLS details, a cloud's
 * endpoint ID), so headers of several hundred bytes are normal. Longer ones
 * are treated as malformed. */
#define PROXYHDR_V2_MAX_BYTES 4096
/* Room for any header this proxy writes (v2 for IPv6 is 16 + 36 bytes). */
#define PROXYHDR_ENCODED_MAX_BYTES 108

/* Decodes a PROXY header (v1 or v2) at the start of data[0..length).
 * Returns the header's length in bytes (> 0) and fills *out; 0 when every
 * byte so far is a valid beginning of a header but it is not complete yet
 * (read more, then call again with all bytes); -1 when it is malformed (a
 * v2 TLV that runs past the header's end, a wrong CRC32C checksum) or too
 * long. Never looks past the header's end: bytes after it are the client's. */
int proxyhdr_decode(const uint8_t *data, size_t length,
                    struct proxy_addresses *out);

/* The CRC32C checksum (Castagnoli, as in iSCSI and SCTP) of
 * data[0..length): what a v2 header's CRC32C TLV carries. */
uint32_t crc32c(const uint8_t *data, size_t length);

/* Writes a v1 header for addresses into out (out_size >= 108). Returns its
 * length. Mixed or unknown families are written as "PROXY UNKNOWN\r\n". */
size_t proxyhdr_encode_v1(const struct proxy_addresses *addresses,
                          uint8_t *out, size_t out_size);

/* Writes a v2 header (PROXY command, TCP over IPv4 or IPv6; LOCAL when
 * !addresses->known) into out (out_size >= 108). Returns its length. */
size_t proxyhdr_encode_v2(const struct proxy_addresses *addresses,
                          uint8_t *out, size_t out_size);

/* ==== 5. TLS termination ==== */

/* What the first bytes of a client of a TLS port say. */
enum hello_verdict {
    HELLO_WHOLE,     /* its first TLS record (the ClientHello) is all here */
    HELLO_NEED_MORE, /* a TLS record, not whole yet: *needed bytes make it */
    HELLO_NOT_TLS    /* not TLS at all */
};

/* Looks at bytes[0..seen) (seen >= 1), what a client of a TLS port has
 * sent so far. */
enum hello_verdict tls_hello_look(const uint8_t *bytes, size_t seen,
                                  int *needed);

/* ==== 9. Conversation ==== */

/* What the first bytes a client sends say about it (--decoy). */
enum decoy_verdict {
    DECOY_NEED_MORE, /* too few bytes to tell yet */
    DECOY_WHATSAPP,  /* relay to WhatsApp */
    DECOY_PROBE      /* not WhatsApp: hand it to the decoy web site */
};

/* Classifies the first bytes of a client's stream, data[0..length), by the
 * --decoy-rule: with strict false ("http") only an HTTP request line or a
 * TLS record is a probe; with strict true anything that does not start
 * with WhatsApp's connection header ('W' 'A' and two version bytes,
 * optionally after an 'E' 'D' 0 1 routing prefix) is. */
enum decoy_verdict decoy_classify(const uint8_t *data, size_t length,
                                  bool strict);

/* ==== 11. Check summary ==== */

/* Writes the share link for WhatsApp users into out, for example
 * "https://wa.me/proxy?host=proxy.example.org&chatPort=443&mediaPort=587&chatTLS=true".
 * Returns the length written (snprintf semantics). */
int share_link_format(const char *host, uint16_t chat_port,
                      uint16_t media_port, bool chat_tls, char *out,
                      size_t out_size);

/* ==== 12. Statistics ==== */

/* What stats_request_parse() found. */
enum stats_request {
    STATS_REQUEST_METHOD_NOT_ALLOWED = -2, /* not GET or HEAD: answer 405 */
    STATS_REQUEST_BAD = -1,                /* malformed or too long: 400 */
    STATS_REQUEST_INCOMPLETE = 0,          /* read more, call again */
    STATS_REQUEST_GET = 1,
    STATS_REQUEST_HEAD = 2
};

/* Parses the HTTP request at data[0..length) sent to the statistics port.
 * A request is complete at the blank line after its headers. On GET or HEAD
 * the path, without any "?query", is written into path (path_size bytes). */
int stats_request_parse(const uint8_t *data, size_t length, char *path,
                        size_t path_size);

/* ==== 13. Starting and stopping ==== */

/* Makes everything ready to serve: makes or loads the certificate, resolves
 * the upstreams, binds every listener and the statistics port, drops to
 * --user, raises the descriptor limit, starts the relay, health and
 * statistics threads. Returns 0, or -1 with one line in error (the message a
 * volunteer sees, naming the port or file and the fix). The proxy keeps the
 * settings pointer until proxy_run() returns; the caller frees them after. */
int proxy_open(struct settings *settings, char *error, size_t error_size);

/* Accepts clients until proxy_request_stop(), then closes the listeners,
 * lets connections end by themselves for up to --grace seconds, closes the
 * rest, ends every thread, and frees what proxy_open() made. */
void proxy_run(void);

/* Asks proxy_run() to return. Safe from a signal handler and any thread. */
void proxy_request_stop(void);

/* The port listener number index (in --listen order) is bound to, or 0 when
 * there is no such listener. Useful with port 0. */
uint16_t proxy_listener_port(size_t index);

/* The port of the statistics server, or 0 with --stats off. */
uint16_t proxy_stats_port(void);

/* Asks for a certificate reload, as SIGHUP does. Safe from a signal handler
 * and any thread; the acceptor does the work. */
void proxy_request_reload(void);


#endif
