/*
 * whatsapp_proxy.c - a WhatsApp chat proxy in one C file.
 *
 * It lets people behind a government block reach WhatsApp: the app connects
 * to this proxy, and the proxy relays the bytes to WhatsApp's servers. It is a
 * drop-in replacement for the official HAProxy-based proxy, written to be
 * read from top to bottom. Read it with tutorial.md open beside it.
 *
 *     make run      build and run with the reference's ports (needs root or
 *                   CAP_NET_BIND_SERVICE for ports below 1024)
 *     make test     build and run the test suite (test_proxy.c)
 *
 * Depends on: the C library, POSIX threads, OpenSSL. Linux only (epoll,
 * eventfd, accept4).
 *
 * The path of the bytes
 * ---------------------
 *
 *   WhatsApp app                this proxy                     WhatsApp
 *   ------------   TCP    +------------------------+   TCP    ----------
 *   client  ------------> | listener               |
 *                         |  [PROXY header in] (4) |
 *                         |  [TLS handshake]   (5) |
 *                         |  [decoy or not]    (9) |
 *                         |  pick upstream     (6) | -------> chat server,
 *                         |  [PROXY header out](4) |          media server,
 *                         |  relay bytes      (10) | <------> or decoy site
 *                         +------------------------+
 *
 * The chat stream is end-to-end encrypted by WhatsApp itself. The proxy never
 * sees a message and never tries to: it only moves bytes.
 *
 * The listeners
 * -------------
 *
 * By default, the ports a phone connects to directly, as the official
 * proxy's operators run them:
 *
 *   port  client side       goes to    header sent up
 *   80    plain             chat pool  PROXY v2
 *   443   TLS (ended here)  chat pool  PROXY v2
 *   5222  plain             chat pool  PROXY v2
 *   587   passthrough       media      none
 *   7777  passthrough       media      none
 *
 * Behind a load balancer, the official proxy also has twins that read the
 * balancer's PROXY header first: 8080 (plain), 8443 (TLS, header before
 * TLS), 8222 (plain), asked for with --listen PORT/accept-proxy. They are
 * not opened by default, and they take a header only from --trusted-proxy
 * addresses: a header says who the client is, and on an open port anyone
 * could write any address into one.
 *
 * The sections of this file
 * -------------------------
 *
 *    1. Settings and limits     every knob, its default and its reason
 *    2. Logging and errors      log lines, allocation, waiting with deadlines
 *    3. Command line            flags into settings
 *    4. PROXY protocol          the header that carries a client's address
 *    5. TLS termination         certificates and the TLS handshake
 *    6. Upstreams               WhatsApp's servers: dialling, health checks
 *    7. Listeners               the ports clients connect to
 *    8. Admission               --maxconn and --max-per-ip
 *    9. Conversation            what a client says first; the decoy
 *   10. Relay                   a few threads that serve every connection
 *   11. Check summary           --check and what to tell WhatsApp users
 *   12. Statistics              the HTML page, /metrics and /healthz
 *   13. Starting and stopping   proxy_open(), proxy_run(), signals, main()
 *
 * Each section uses only what is above it. The types and functions that the
 * tests call are declared in whatsapp_proxy.h, in the same order.
 *
 * One connection's life
 * ---------------------
 *
 * One relay thread (section 10) does all of it, one step at a time, in an
 * event loop that serves thousands of other connections in between:
 *
 *   1. it accepts the client, and the admission rules (section 8) decide:
 *      over --maxconn it is closed at once;
 *   2. it reads what the client must say first, where the port needs it
 *      (section 9): a PROXY header, then --max-per-ip on the address it
 *      carries; the TLS handshake (section 5); the first bytes, when a
 *      decoy is to be chosen;
 *   3. it connects to the upstream (section 6), sends our PROXY header
 *      there, and moves bytes both ways until both sides close, or the
 *      connection is idle for too long.
 *
 * Why an event loop, and not a thread per connection? A WhatsApp chat
 * connection is idle nearly all the time: a phone keeps it open for hours
 * and sends a few bytes now and then. A thread parked in read() for each of
 * them would cost about 30 KiB of memory (kernel stack plus the touched
 * part of its user stack), and the reference holds 27,500 connections on
 * one host: 800 MiB for nothing. A connection in an epoll loop costs only
 * its sockets and a small struct, and a client that connects and says
 * nothing holds no thread that others need.
 *
 * The threads, all told: one relay thread per CPU (section 10); one
 * health-check thread (6); one statistics thread (12); and the main
 * thread, which starts everything, waits for signals and stops (13).
 *
 * Error policy: problems at startup stop the program with one line that
 * names the flag, port or file and the fix (exit 2). Problems with one
 * client are counted, logged without the client's address, and that client is
 * closed; every other connection carries on.
 */

#include "whatsapp_proxy.h"

#include <arpa/inet.h>
#include <assert.h>
#include <ctype.h>
#include <grp.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pwd.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* ==== 1. Settings and limits ==== */

/*
 * Everything a volunteer can change is in struct settings, filled by the
 * command line (section 3) before any thread starts and only read after.
 * Fixed limits are the constants below, each with its reason.
 */

#define PROGRAM_NAME "whatsapp_proxy"
#define PROGRAM_VERSION "1.0.0"

/* Enough for the eight reference ports and any sensible extra. */
#define MAX_LISTENERS 32
/* The reference pool has six servers; room for an operator's own. */
#define MAX_UPSTREAMS 16
/* Longest DNS name is 253 characters. */
#define HOST_NAME_BYTES 256
/* --sni names: a few secret names are plenty. */
#define MAX_SNI_NAMES 8
/* --trusted-proxy ranges: the defaults are 8; room for an operator's own. */
#define MAX_TRUSTED_PROXIES 16

/* A client's upstream connect is tried at most this many times: the first
 * try and HAProxy's "retries 3". */
#define UPSTREAM_TRIES_MAX 4

/* After a try that failed at once (refused, unreachable), the next one
 * waits this long, as HAProxy's turn-around timer does: a chat server that
 * restarts for a second or two then still serves the clients that arrive
 * meanwhile. A try that timed out has waited long enough already. */
#define UPSTREAM_RETRY_DELAY_MS 1000

/* Lists in the table of connections per client address (--max-per-ip,
 * section 8): 4,096 pointers, 32 KiB, keep the lists short for the
 * reference's 27,500 connections. */
#define PER_IP_BUCKETS 4096

/* The kernel's queue of not yet accepted connections per listener. Linux
 * silently caps it at net.core.somaxconn (4096 since Linux 5.4). */
#define LISTEN_BACKLOG 4096

/* Each relay thread carries bytes from one socket to another through one
 * scratch buffer of this size (section 10). Bigger means fewer system calls
 * on bulk transfers; it exists once per relay thread, not per connection,
 * so it costs nothing per client. (HAProxy's reference keeps two 4 KiB
 * buffers for every connection; bench/README.md has the measurements.) */
#define RELAY_SCRATCH_BYTES (1024 * 1024)

/* The most bytes one TLS record carries (the protocol's limit). */
#define TLS_RECORD_BYTES (16 * 1024)

/* Bytes one direction may move in one turn before the relay thread serves
 * other connections, so that one bulk transfer cannot starve the rest. */
#define RELAY_TURN_BYTES (1024 * 1024)

/* Which PROXY header goes to an upstream: the chat servers (--send-proxy)
 * or the decoy web site (--decoy-send-proxy). */
enum send_proxy {
    SEND_PROXY_NONE,
    SEND_PROXY_V1,
    SEND_PROXY_V2
};

/* The key type of the certificate made at startup. */
enum key_type {
    KEY_EC256,   /* ECDSA P-256: fast handshakes, what certbot makes today */
    KEY_RSA2048, /* the reference's choice, for very old clients */
    KEY_RSA4096
};

/* How much the proxy writes to stderr. */
enum log_level {
    LOG_ERROR,
    LOG_WARN,
    LOG_INFO,
    LOG_DEBUG
};

/* A range of addresses, as "192.168.0.0/16" (--trusted-proxy). */
struct address_range {
    uint8_t bytes[16];   /* the network: 4 bytes for IPv4, 16 for IPv6 */
    uint8_t length;      /* 4 or 16 */
    uint8_t prefix_bits; /* how many leading bits must match */
    char text[48];       /* as written, for --check */
};

/* One upstream server as the operator wrote it: a name and a port. */
struct upstream_spec {
    char host[HOST_NAME_BYTES];
    uint16_t port;
};

struct settings {
    struct listener_spec listeners[MAX_LISTENERS];
    size_t listener_count;
    struct upstream_spec chat_upstreams[MAX_UPSTREAMS]; /* round-robin pool */
    size_t chat_upstream_count;
    struct upstream_spec media_upstream;
    enum send_proxy send_proxy;     /* header for chat upstreams */

    char cert_file[PATH_MAX];       /* "" means: make a certificate */
    char key_file[PATH_MAX];
    char cert_dir[PATH_MAX];        /* where a made certificate is written */
    enum key_type cert_key;
    char ssl_dns[1024];             /* extra DNS names, comma separated */
    char ssl_ip[1024];              /* extra IP addresses, comma separated */

    unsigned maxconn;               /* client connections at once */
    int timeout_connect_ms;         /* to reach an upstream */
    int timeout_idle_ms;            /* no byte either way */
    int timeout_fin_ms;             /* after one direction has closed */
    int timeout_handshake_ms;       /* PROXY header plus TLS handshake */
    unsigned relay_threads;         /* 0 means one per CPU */

    struct upstream_spec decoy;     /* a web site that probes are given */
    bool decoy_enabled;             /* --decoy was given */
    bool decoy_strict;              /* --decoy-rule strict (the default) */
    enum send_proxy decoy_send_proxy; /* header for the decoy */
    uint16_t decoy_tls_port;        /* the decoy's own TLS port, or 0 */
    bool decoy_tuned;               /* another --decoy-... option given */
    char sni_names[MAX_SNI_NAMES][HOST_NAME_BYTES]; /* --sni, if any */
    size_t sni_count;
    unsigned max_per_ip;            /* connections from one address; 0: any */
    struct address_range trusted_proxies[MAX_TRUSTED_PROXIES];
    size_t trusted_proxy_count;     /* who may send a PROXY header */

    struct listener_spec stats;     /* where the statistics page is */
    bool stats_enabled;             /* false after --stats off */
    int check_interval_ms;          /* between health checks of a server */
    int grace_ms;                   /* for connections to end at a stop */
    char user[64];                  /* drop to this user after binding */

    char public_host[HOST_NAME_BYTES]; /* the name users type, for --check */
    enum log_level log_level;
    bool log_clients;               /* write client addresses in logs */
    bool check_only;                /* --check: validate, summarise, exit */
};

/* The chat pool of the newest official proxy configuration. */
static const struct upstream_spec DEFAULT_CHAT_UPSTREAMS[] = {
    {"g.whatsapp.net", 5222},          {"g.whatsapp.net", 80},
    {"g.whatsapp.net", 443},           {"g-fallback.whatsapp.net", 5222},
    {"g-fallback.whatsapp.net", 80},   {"g-fallback.whatsapp.net", 443},
};

/* Where a PROXY header is taken from when no --trusted-proxy is given:
 * loopback, and the private and link-local ranges (RFC 1918, RFC 4193,
 * RFC 3927 and RFC 4291), which is where a cloud's load balancer comes
 * from. Anyone else could write any address into a header, and so walk
 * past --max-per-ip and tell WhatsApp a false address. */
static const char *const DEFAULT_TRUSTED_PROXIES[] = {
    "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12",
    "192.168.0.0/16", "169.254.0.0/16", "fc00::/7", "fe80::/10"};

/* The ports a phone connects to directly (see the file's opening); the
 * PROXY-header twins are for load balancers, asked for with --listen.
 * Port 8199 (statistics) is not a relay port. */
static const struct listener_spec DEFAULT_LISTENERS[] = {
    {.port = 80},
    {.port = 443, .tls = true},
    {.port = 5222},
    {.port = 587, .media = true},
    {.port = 7777, .media = true},
};

#define ARRAY_LENGTH(array) (sizeof(array) / sizeof((array)[0]))

/*
 * The shared state: everything more than one thread touches, in one struct,
 * grouped by how it is protected. The only other mutable global is the
 * stop_requested flag below it, which a signal handler writes.
 *
 * Which thread owns what:
 *   - the main thread opens and closes the listening sockets, and waits
 *     for signals (section 13);
 *   - a relay thread owns every connection in its epoll loop, from
 *     accept() to close() (section 10);
 *   - nothing else is shared except what is below.
 */
struct listener;     /* section 7 */
struct per_ip;       /* section 8 */
struct upstream;     /* section 6 */
struct relay_thread; /* section 10 */

static struct proxy_state {
    /* Written by proxy_open() before any thread starts; read-only after. */
    const struct settings *settings;
    struct listener *listeners;      /* settings->listener_count of them */
    size_t listener_count;
    struct listener *stats_listener; /* NULL with --stats off */
    struct relay_thread *relay_threads;
    unsigned relay_thread_count;
    pthread_t health_thread;         /* section 6 */
    pthread_t stats_thread;          /* section 12 */
    time_t started_at;               /* wall-clock time of proxy_open() */
    int abort_fd;         /* eventfd, readable once every wait must end */
    int main_wake_fd;     /* eventfd: a stop or a reload for main */

    /* Guarded by tls_lock: replaced by a certificate reload (SIGHUP). The
     * main thread, the only one that replaces it, reads it without. */
    pthread_mutex_t tls_lock;
    SSL_CTX *tls_context;            /* NULL when no listener is TLS */

    /* Atomics: any thread may change them without a lock. */
    atomic_int log_level;            /* an enum log_level */
    atomic_int reload_requested;     /* set by SIGHUP, cleared by main */
    atomic_ullong counters[COUNTER_COUNT];
    atomic_uint connections_now;     /* compared with settings->maxconn */
    atomic_llong accept_rest_until_ms; /* see accept_rest_begin() */
    atomic_llong accept_warned_ms;   /* its last warning in the log */
    atomic_uint next_chat_upstream;  /* round-robin over the chat pool */
    atomic_llong certificate_expires_at; /* Unix time; 0 without TLS */
    atomic_llong certificate_warned_at;  /* its last warning in the log */

    /* Guarded by upstream_lock: the resolved addresses of the servers. */
    pthread_mutex_t upstream_lock;
    struct upstream *chat_upstreams; /* settings->chat_upstream_count */
    struct upstream *media_upstream;
    struct upstream *decoy_upstreams; /* decoy_count(): the site, then
                                         its TLS port; NULL without one */

    /* Guarded by per_ip_lock: connections per client address (section 8). */
    pthread_mutex_t per_ip_lock;
    struct per_ip *per_ip_buckets[PER_IP_BUCKETS];

    /* With stop_lock: while stopping, the last connection to end signals
     * `ended` (section 13). */
    pthread_mutex_t stop_lock;
    pthread_cond_t ended;
} state = {
    .abort_fd = -1,
    .main_wake_fd = -1,
    .log_level = LOG_INFO,
    .tls_lock = PTHREAD_MUTEX_INITIALIZER,
    .per_ip_lock = PTHREAD_MUTEX_INITIALIZER,
    .upstream_lock = PTHREAD_MUTEX_INITIALIZER,
    .stop_lock = PTHREAD_MUTEX_INITIALIZER,
};

/* Set by proxy_request_stop(), which a signal handler may call, and read by
 * every thread. A lock-free C11 atomic is safe in a signal handler and,
 * unlike volatile sig_atomic_t, also safe between threads. */
static atomic_int stop_requested;

/* Adds amount to one of the counters listed in whatsapp_proxy.h. Relaxed
 * order: a counter orders nothing else, it is only read for statistics. */
static void counter_add(enum counter which, unsigned long long amount)
{
    atomic_fetch_add_explicit(&state.counters[which], amount,
                              memory_order_relaxed);
}

/* The value of one counter; see whatsapp_proxy.h. */
unsigned long long proxy_counter(enum counter which)
{
    return atomic_load(&state.counters[which]);
}

/* Client connections open now; see whatsapp_proxy.h. */
unsigned proxy_connections_now(void)
{
    return atomic_load(&state.connections_now);
}

static void *xcalloc(size_t count, size_t size);

/* Returns settings with the reference's defaults; see whatsapp_proxy.h. */
struct settings *settings_new(void)
{
    struct settings *settings = xcalloc(1, sizeof *settings);

    memcpy(settings->listeners, DEFAULT_LISTENERS, sizeof DEFAULT_LISTENERS);
    settings->listener_count = ARRAY_LENGTH(DEFAULT_LISTENERS);
    memcpy(settings->chat_upstreams, DEFAULT_CHAT_UPSTREAMS,
           sizeof DEFAULT_CHAT_UPSTREAMS);
    settings->chat_upstream_count = ARRAY_LENGTH(DEFAULT_CHAT_UPSTREAMS);
    settings->media_upstream = (struct upstream_spec){"whatsapp.net", 443};
    settings->send_proxy = SEND_PROXY_V2; /* the reference's newest choice */
    settings->decoy_strict = true;        /* every probe to the site */
    settings->decoy_send_proxy = SEND_PROXY_NONE;

    settings->cert_dir[0] = '\0'; /* a made certificate stays in memory */
    settings->cert_key = KEY_EC256;
    /* SSL_DNS and SSL_IP: the reference's environment variables. */
    const char *dns = getenv("SSL_DNS");
    const char *ip = getenv("SSL_IP");
    snprintf(settings->ssl_dns, sizeof settings->ssl_dns, "%s", dns ? dns : "");
    snprintf(settings->ssl_ip, sizeof settings->ssl_ip, "%s", ip ? ip : "");

    settings->maxconn = 27500;              /* the reference's maxconn */
    settings->timeout_connect_ms = 5000;    /* timeout connect 5s */
    settings->timeout_idle_ms = 200000;     /* timeout client/server 200s */
    settings->timeout_fin_ms = 1000;        /* timeout client-fin 1s */
    /* A client's first words (a PROXY header, a TLS handshake, its first
     * bytes) get 60 s. On a lossy mobile link one lost segment is sent
     * again after 1, 2, 4, 8 and 16 s (TCP's doubling retransmission
     * timer), so a handshake that loses a packet twice needs tens of
     * seconds; 60 s is also how long nginx waits, so a scanner that times
     * a silent connection sees a web server's patience. Silent clients
     * stay bounded by --maxconn (and --max-per-ip), as every client is. */
    settings->timeout_handshake_ms = 60000;
    settings->relay_threads = 0;
    /* Statistics on loopback only: the reference serves them on every
     * address, which lets a scanner recognise a proxy by its port 8199. */
    settings->stats = (struct listener_spec){.address = "127.0.0.1",
                                             .port = 8199};
    settings->stats_enabled = true;
    settings->check_interval_ms = 60000;    /* check inter 60000 */
    settings->grace_ms = 30000;
    settings->log_level = LOG_INFO;
    return settings;
}

/* Frees settings from settings_new(). NULL is allowed. */
void settings_free(struct settings *settings)
{
    free(settings);
}

/* ==== 2. Logging and errors ==== */

/*
 * One line per notable event on stderr, with the time and the level, so that
 * systemd's journal or a terminal shows it as it happens. Client addresses are
 * not written unless the operator asks with --log-clients: the reference
 * turns logging off so that nobody can learn from a seized server who used
 * it, and we keep that promise by default.
 *
 * Memory allocation failure is not handled per call: on Linux it practically
 * means the machine is out of memory, and carrying on with half-built state
 * is worse than stopping, so xmalloc() and friends abort with a message.
 */

static const char *const LOG_LEVEL_NAMES[] = {"error", "warn", "info",
                                              "debug"};

/* Writes one log line "2026-01-31T12:00:00Z warn: ..." to stderr if level is
 * enabled. Thread-safe: one fprintf() call per line, and stdio locks the
 * stream for each call. */
__attribute__((format(printf, 2, 3)))
static void log_line(enum log_level level, const char *format, ...)
{
    if ((int)level > atomic_load(&state.log_level))
        return;

    char message[512];
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(message, sizeof message, format, arguments);
    va_end(arguments);

    char when[32];
    time_t now = time(NULL);
    struct tm utc;
    gmtime_r(&now, &utc);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &utc);
    fprintf(stderr, "%s %s: %s\n", when, LOG_LEVEL_NAMES[level], message);
}

/* Prints "whatsapp_proxy: out of memory allocating N bytes" and aborts.
 * For allocation failure only (see the section comment). */
static void out_of_memory(size_t bytes)
{
    fprintf(stderr, PROGRAM_NAME ": out of memory allocating %zu bytes\n",
            bytes);
    abort();
}

/* malloc() that never returns NULL. The caller frees the result. */
static void *xmalloc(size_t size)
{
    void *memory = malloc(size);
    if (memory == NULL)
        out_of_memory(size);
    return memory;
}

/* calloc() that never returns NULL. The caller frees the result. */
static void *xcalloc(size_t count, size_t size)
{
    void *memory = calloc(count, size);
    if (memory == NULL)
        out_of_memory(count * size);
    return memory;
}

/* Writes the newest OpenSSL error reason (or "unknown reason") into buffer
 * and clears OpenSSL's error queue of this thread. */
static void tls_error_text(char *buffer, size_t buffer_size)
{
    unsigned long code = ERR_peek_last_error();
    if (code == 0)
        snprintf(buffer, buffer_size, "unknown reason");
    else
        ERR_error_string_n(code, buffer, buffer_size);
    ERR_clear_error();
}

/* Returns whether error_number (an errno value) says that the process has
 * run out of file descriptors or kernel memory: our own shortage, which
 * passes when connections end, not a fault of a client or a server. */
static bool out_of_descriptors(int error_number)
{
    return error_number == EMFILE || error_number == ENFILE ||
           error_number == ENOBUFS || error_number == ENOMEM;
}

/* Monotonic milliseconds since some fixed moment: for deadlines, never for
 * the wall-clock time (which can jump when the clock is corrected). */
static long long now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

/*
 * Waiting with a deadline. The one thread that waits for a socket as
 * blocking code does, the health thread (section 6), waits in
 * socket_wait(), with a deadline, and gives up at once when the proxy
 * stops (abort_fd, section 13). Clients are never waited for this way: a
 * relay thread's event loop waits for thousands at once (section 10).
 */

/* What socket_wait() saw. */
enum wait_result {
    WAIT_READY,     /* the socket is ready (or has an error to report) */
    WAIT_TIMED_OUT, /* the deadline passed first */
    WAIT_STOPPING   /* the proxy's grace period is over: give up now */
};

/* Waits until fd is ready for events (POLLIN or POLLOUT), the deadline (a
 * now_ms() value) passes, or the proxy's grace period ends (abort_fd). */
static enum wait_result socket_wait(int fd, short events, long long deadline_ms)
{
    for (;;) {
        long long left_ms = deadline_ms - now_ms();
        if (left_ms <= 0)
            return WAIT_TIMED_OUT;
        struct pollfd watched[2] = {
            {.fd = fd, .events = events},
            {.fd = state.abort_fd, .events = POLLIN},
        };
        int ready = poll(watched, 2, (int)left_ms);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready < 0 || watched[1].revents != 0)
            return WAIT_STOPPING;
        if (watched[0].revents != 0)
            return WAIT_READY;
    }
}

/* ==== 3. Command line ==== */

/*
 * Every flag is in the OPTIONS table below: its name, the name of its value
 * (NULL for a switch) and one line of help. The parser uses the table to know
 * whether a flag takes a value, and --help prints the same table, so the two
 * can never disagree. Both "--flag value" and "--flag=value" work.
 *
 * Parsing never exits: it returns PARSE_ERROR with one line naming the flag,
 * so that tests can check the message and main() decides to exit 2.
 */

struct option {
    const char *name;
    const char *value_name; /* NULL: the flag takes no value */
    const char *help;
};

static const struct option OPTIONS[] = {
    {"--listen", "[ADDR:]PORT[/tls][/accept-proxy][/media]",
     "a port to serve, repeatable (default: 80 443/tls 5222 587/media "
     "7777/media)"},
    {"--upstream", "HOST:PORT",
     "a chat server, repeatable (default: g.whatsapp.net and g-fallback)"},
    {"--media-upstream", "HOST:PORT", "the media server (whatsapp.net:443)"},
    {"--send-proxy", "none|v1|v2", "PROXY header sent to chat servers (v2)"},
    {"--cert", "FILE", "certificate chain in PEM, e.g. from Let's Encrypt"},
    {"--key", "FILE", "private key in PEM for --cert"},
    {"--cert-dir", "DIR", "write a made certificate here (not written)"},
    {"--cert-key", "ec256|rsa2048|rsa4096", "key of a made certificate (ec256)"},
    {"--ssl-dns", "NAME,...", "extra DNS names in a made certificate"},
    {"--ssl-ip", "IP,...", "extra IP addresses in a made certificate"},
    {"--maxconn", "N", "client connections at once (27500)"},
    {"--timeout-connect", "S", "seconds to reach a server (5)"},
    {"--timeout-idle", "S", "seconds without a byte before closing (200)"},
    {"--timeout-fin", "S", "seconds of silence after a half-close (1)"},
    {"--timeout-handshake", "S", "seconds for PROXY header and TLS (60)"},
    {"--threads", "N", "relay threads (one per CPU)"},
    {"--decoy", "HOST:PORT", "give clients that are not WhatsApp to this "
     "web site"},
    {"--decoy-rule", "strict|http", "what is not WhatsApp (strict)"},
    {"--decoy-send-proxy", "none|v1|v2", "PROXY header sent to the decoy (none)"},
    {"--decoy-tls-port", "PORT", "the decoy's own HTTPS port, for what is "
     "not TLS on a TLS port (none)"},
    {"--sni", "NAME", "on TLS ports, serve only this server name "
     "(repeatable)"},
    {"--max-per-ip", "N", "connections at once from one address (no limit)"},
    {"--trusted-proxy", "ADDR[/BITS]", "take PROXY headers only from here, "
     "repeatable (loopback and private ranges)"},
    {"--stats", "[ADDR:]PORT|off", "statistics page (127.0.0.1:8199)"},
    {"--check-interval", "S", "seconds between health checks (60)"},
    {"--grace", "S", "seconds for connections to end at a stop (30)"},
    {"--user", "NAME", "run as this user after opening ports and keys"},
    {"--public-host", "NAME", "the name users type in the app, for --check"},
    {"--log-level", "error|warn|info|debug", "how much to log (info)"},
    {"--log-clients", NULL, "write client addresses in logs (never do by "
     "default)"},
    {"--check", NULL, "check the settings, print what to tell users, exit"},
    {"--help", NULL, "show this help and exit"},
    {"--version", NULL, "show the version and exit"},
};

/* The name of flag number index, in the order of --help; see
 * whatsapp_proxy.h. */
const char *settings_flag_name(size_t index)
{
    return index < ARRAY_LENGTH(OPTIONS) ? OPTIONS[index].name : NULL;
}

/* Writes printf-style text into error (always terminated) and returns -1, so
 * that parsers can say "return parse_failure(...)". */
__attribute__((format(printf, 3, 4)))
static int parse_failure(char *error, size_t error_size, const char *format,
                         ...)
{
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(error, error_size, format, arguments);
    va_end(arguments);
    return -1;
}

/* Reads a decimal port 0..65535 from text[0..length). Returns true on
 * success. Leading signs, spaces and empty text are refused. */
static bool port_parse(const char *text, size_t length, uint16_t *port)
{
    if (length == 0 || length > 5)
        return false;
    unsigned value = 0;
    for (size_t i = 0; i < length; i++) {
        if (!isdigit((unsigned char)text[i]))
            return false;
        value = value * 10 + (unsigned)(text[i] - '0');
    }
    if (value > 65535)
        return false;
    *port = (uint16_t)value;
    return true;
}

/* Splits "HOST:PORT" or "[IPV6]:PORT" into its parts; see whatsapp_proxy.h.
 * An empty host is allowed here; callers that need one check it. */
static int address_port_split(const char *text, char *host, size_t host_size,
                              uint16_t *port, char *error, size_t error_size)
{
    const char *host_start = text;
    const char *host_end;
    const char *port_text;

    if (text[0] == '[') {
        host_start = text + 1;
        host_end = strchr(host_start, ']');
        if (host_end == NULL || host_end[1] != ':')
            return parse_failure(error, error_size,
                                 "'%s': expected [IPV6]:PORT", text);
        port_text = host_end + 2;
    } else {
        host_end = strrchr(text, ':');
        if (host_end == NULL)
            return parse_failure(error, error_size,
                                 "'%s': expected HOST:PORT", text);
        if (memchr(text, ':', (size_t)(host_end - text)) != NULL)
            return parse_failure(error, error_size,
                                 "'%s': put IPv6 addresses in brackets, "
                                 "like [::1]:443", text);
        port_text = host_end + 1;
    }

    size_t host_length = (size_t)(host_end - host_start);
    if (host_length >= host_size)
        return parse_failure(error, error_size, "'%s': host name too long",
                             text);
    if (!port_parse(port_text, strlen(port_text), port))
        return parse_failure(error, error_size,
                             "'%s': the port must be a number from 0 to 65535",
                             text);
    memcpy(host, host_start, host_length);
    host[host_length] = '\0';
    return 0;
}

/* True if text is an IPv4 or IPv6 address. */
static bool host_is_address(const char *text)
{
    uint8_t bytes[16];
    return inet_pton(AF_INET, text, bytes) == 1 ||
           inet_pton(AF_INET6, text, bytes) == 1;
}

/* True if text is a DNS host name (RFC 1123): labels of letters, digits
 * and hyphens, 1 to 63 characters, not starting or ending with a hyphen,
 * joined by dots; at most 253 characters. "https://proxy.example.org/" is
 * not one: users type the name alone into the app. */
static bool host_is_name(const char *text)
{
    size_t length = strlen(text);
    if (length == 0 || length > 253)
        return false;
    size_t label = 0;
    for (size_t i = 0; i <= length; i++) {
        char c = text[i];
        if (c == '.' || c == '\0') {
            if (label == 0 || label > 63 || text[i - 1] == '-')
                return false;
            label = 0;
        } else if (isalnum((unsigned char)c) || (c == '-' && label > 0)) {
            label++;
        } else {
            return false;
        }
    }
    return true;
}

/* Parses "HOST:PORT"; see whatsapp_proxy.h. A host is a DNS name (letters,
 * digits, dots and hyphens), an IPv4 address, or an IPv6 one in brackets:
 * so no host name can carry quotes or markup into the statistics page. */
int host_port_parse(const char *text, char *host, size_t host_size,
                    uint16_t *port, char *error, size_t error_size)
{
    if (address_port_split(text, host, host_size, port, error, error_size) < 0)
        return -1;
    if (host[0] == '\0')
        return parse_failure(error, error_size, "'%s': the host is missing",
                             text);
    struct in6_addr ignored;
    bool ipv6 = text[0] == '[';
    if (ipv6 && inet_pton(AF_INET6, host, &ignored) != 1)
        return parse_failure(error, error_size,
                             "'%s': not an IPv6 address", text);
    for (const char *c = host; !ipv6 && *c != '\0'; c++)
        if (!isalnum((unsigned char)*c) && *c != '.' && *c != '-')
            return parse_failure(error, error_size,
                                 "'%s': a host name has only letters, "
                                 "digits, dots and hyphens", text);
    if (*port == 0)
        return parse_failure(error, error_size, "'%s': port 0 cannot be "
                             "dialled", text);
    return 0;
}

/* Parses one --listen value; see whatsapp_proxy.h. */
int listener_spec_parse(const char *text, struct listener_spec *out,
                        char *error, size_t error_size)
{
    struct listener_spec spec = {0};
    char head[128];
    const char *options = strchr(text, '/');
    size_t head_length = options ? (size_t)(options - text) : strlen(text);

    if (head_length == 0 || head_length >= sizeof head)
        return parse_failure(error, error_size,
                             "bad --listen '%s': expected "
                             "[ADDR:]PORT[/tls][/accept-proxy][/media]", text);
    memcpy(head, text, head_length);
    head[head_length] = '\0';

    /* The address part: none, an IPv4 address, or an IPv6 one in []. */
    if (strchr(head, ':') == NULL) {
        if (!port_parse(head, head_length, &spec.port))
            return parse_failure(error, error_size,
                                 "bad --listen '%s': the port must be a number "
                                 "from 0 to 65535", text);
    } else {
        char detail[160];
        if (address_port_split(head, spec.address, sizeof spec.address,
                               &spec.port, detail, sizeof detail) < 0)
            return parse_failure(error, error_size, "bad --listen %s", detail);
        struct in6_addr ignored;
        int family = head[0] == '[' ? AF_INET6 : AF_INET;
        if (inet_pton(family, spec.address, &ignored) != 1)
            return parse_failure(error, error_size,
                                 "bad --listen '%s': '%s' is not an IP "
                                 "address of this machine", text,
                                 spec.address);
    }

    /* The options: any of tls, accept-proxy, media, each after a '/'. */
    while (options != NULL) {
        const char *name = options + 1;
        const char *next = strchr(name, '/');
        size_t length = next ? (size_t)(next - name) : strlen(name);
        if (length == 3 && strncmp(name, "tls", 3) == 0)
            spec.tls = true;
        else if (length == 12 && strncmp(name, "accept-proxy", 12) == 0)
            spec.accept_proxy = true;
        else if (length == 5 && strncmp(name, "media", 5) == 0)
            spec.media = true;
        else
            return parse_failure(error, error_size,
                                 "bad --listen '%s': unknown option '%.*s' "
                                 "(known: tls, accept-proxy, media)", text,
                                 (int)length, name);
        options = next;
    }
    if (spec.tls && spec.media)
        return parse_failure(error, error_size,
                             "bad --listen '%s': a media port cannot be /tls: "
                             "media clients speak TLS with WhatsApp itself, "
                             "through the proxy", text);
    *out = spec;
    return 0;
}

/* Parses seconds with decimals into milliseconds; see whatsapp_proxy.h.
 * Accepts more than 0 and less than 24 days (the largest int of ms). */
int seconds_parse(const char *text, const char *flag_name, int *out_ms,
                  char *error, size_t error_size)
{
    char *end = NULL;
    errno = 0;
    double seconds = strtod(text, &end);
    if (text[0] == '\0' || *end != '\0' || errno != 0 || !(seconds > 0) ||
        seconds >= INT_MAX / 1000.0)
        return parse_failure(error, error_size,
                             "bad %s '%s': expected seconds above 0, like 5 or "
                             "0.5", flag_name, text);
    *out_ms = (int)(seconds * 1000 + 0.5);
    if (*out_ms == 0)
        *out_ms = 1;
    return 0;
}

/* Parses a whole number from 1 to max for flag_name into *out. */
static int count_parse(const char *text, const char *flag_name, unsigned max,
                       unsigned *out, char *error, size_t error_size)
{
    char *end = NULL;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (!isdigit((unsigned char)text[0]) || *end != '\0' || errno != 0 ||
        value < 1 || value > max)
        return parse_failure(error, error_size,
                             "bad %s '%s': expected a whole number from 1 to %u",
                             flag_name, text, max);
    *out = (unsigned)value;
    return 0;
}

/* Returns the index in names[] of text, or -1 with one line in error. */
static int choice_parse(const char *text, const char *flag_name,
                        const char *const names[], size_t name_count,
                        char *error, size_t error_size)
{
    for (size_t i = 0; i < name_count; i++)
        if (strcmp(text, names[i]) == 0)
            return (int)i;
    return parse_failure(error, error_size, "bad %s '%s': see --help",
                         flag_name, text);
}

/* Copies text into a fixed field, or fails naming the flag if it is too
 * long. */
static int text_copy(char *field, size_t field_size, const char *text,
                     const char *flag_name, char *error, size_t error_size)
{
    if (strlen(text) >= field_size)
        return parse_failure(error, error_size, "bad %s: too long", flag_name);
    memcpy(field, text, strlen(text) + 1);
    return 0;
}

/* Checks that every item of a comma list is an IPv4 or IPv6 address. */
static int ip_list_check(const char *list, char *error, size_t error_size)
{
    char copy[1024];
    snprintf(copy, sizeof copy, "%s", list);
    char *rest = copy;
    for (char *item = strsep(&rest, ","); item; item = strsep(&rest, ",")) {
        struct in6_addr ignored;
        if (item[0] != '\0' && inet_pton(AF_INET, item, &ignored) != 1 &&
            inet_pton(AF_INET6, item, &ignored) != 1)
            return parse_failure(error, error_size,
                                 "bad --ssl-ip '%s': not an IP address", item);
    }
    return 0;
}

/* Parses --stats "[ADDR:]PORT" or "off" into settings. The statistics port
 * takes no listener options. */
static int stats_spec_parse(struct settings *settings, const char *value,
                            char *error, size_t error_size)
{
    settings->stats_enabled = strcmp(value, "off") != 0;
    if (!settings->stats_enabled)
        return 0;
    char ignored[200];
    if (listener_spec_parse(value, &settings->stats, ignored,
                            sizeof ignored) < 0 || strchr(value, '/') != NULL)
        return parse_failure(error, error_size,
                             "bad --stats '%s': expected [ADDR:]PORT or off",
                             value);
    return 0;
}

static void help_print(void)
{
    printf("Usage: " PROGRAM_NAME " [options]\n"
           "A WhatsApp chat proxy. With no options it serves the ports a "
           "phone connects to\n(80 443 5222 587 7777) and relays to "
           "WhatsApp.\n\n");
    for (size_t i = 0; i < ARRAY_LENGTH(OPTIONS); i++) {
        char left[80];
        snprintf(left, sizeof left, "%s%s%s", OPTIONS[i].name,
                 OPTIONS[i].value_name ? " " : "",
                 OPTIONS[i].value_name ? OPTIONS[i].value_name : "");
        /* One line when it fits in 80 columns, else the help below. */
        if (strlen(left) <= 30 && strlen(OPTIONS[i].help) <= 46)
            printf("  %-30s %s\n", left, OPTIONS[i].help);
        else
            printf("  %s\n        %s\n", left, OPTIONS[i].help);
    }
    printf("\nSignals: SIGTERM or SIGINT stops (after --grace); SIGHUP "
           "reloads\nthe certificate. Read tutorial.md to learn more.\n");
}

/* Parses "ADDR/BITS" (or a bare ADDR: that one address) into *out. Returns
 * 0, or -1 with one line naming the flag in error. */
static int address_range_parse(const char *text, struct address_range *out,
                               char *error, size_t error_size)
{
    char address[INET6_ADDRSTRLEN];
    const char *slash = strchr(text, '/');
    size_t address_length = slash ? (size_t)(slash - text) : strlen(text);
    if (address_length >= sizeof address || strlen(text) >= sizeof out->text)
        return parse_failure(error, error_size, "bad --trusted-proxy '%s': "
                             "too long", text);
    memcpy(address, text, address_length);
    address[address_length] = '\0';
    *out = (struct address_range){.length = 4};
    if (inet_pton(AF_INET, address, out->bytes) != 1) {
        out->length = 16;
        if (inet_pton(AF_INET6, address, out->bytes) != 1)
            return parse_failure(error, error_size, "bad --trusted-proxy "
                                 "'%s': not an IPv4 or IPv6 address", text);
    }
    char *end = NULL;
    long bits = slash ? strtol(slash + 1, &end, 10) : out->length * 8;
    if (slash && (end == slash + 1 || *end != '\0' || bits < 0 ||
                  bits > out->length * 8))
        return parse_failure(error, error_size, "bad --trusted-proxy '%s': "
                             "the /BITS must be 0 to %d", text,
                             out->length * 8);
    out->prefix_bits = (uint8_t)bits;
    snprintf(out->text, sizeof out->text, "%s", text);
    return 0;
}

/* Applies one flag with its value (NULL for switches) to settings. The two
 * booleans say whether --listen and --upstream were already given once: the
 * first use of a repeatable flag replaces the default list. */
static int option_apply(struct settings *settings, const char *name,
                        const char *value, bool *listen_seen,
                        bool *upstream_seen, char *error, size_t error_size)
{
    static const char *const SEND_PROXY_NAMES[] = {"none", "v1", "v2"};
    static const char *const KEY_NAMES[] = {"ec256", "rsa2048", "rsa4096"};
    int choice;

    if (strcmp(name, "--listen") == 0) {
        if (!*listen_seen)
            settings->listener_count = 0;
        *listen_seen = true;
        if (settings->listener_count == MAX_LISTENERS)
            return parse_failure(error, error_size, "too many --listen (%d)",
                                 MAX_LISTENERS);
        return listener_spec_parse(
            value, &settings->listeners[settings->listener_count++], error,
            error_size);
    }
    if (strcmp(name, "--decoy") == 0) {
        char detail[200];
        settings->decoy_enabled = true;
        if (host_port_parse(value, settings->decoy.host,
                            sizeof settings->decoy.host, &settings->decoy.port,
                            detail, sizeof detail) < 0)
            return parse_failure(error, error_size, "bad --decoy %s", detail);
        return 0;
    }
    if (strcmp(name, "--decoy-rule") == 0) {
        static const char *const RULE_NAMES[] = {"http", "strict"};
        choice = choice_parse(value, name, RULE_NAMES, 2, error, error_size);
        settings->decoy_strict = choice == 1;
        settings->decoy_tuned = true;
        return choice < 0 ? -1 : 0;
    }
    if (strcmp(name, "--decoy-send-proxy") == 0) {
        choice = choice_parse(value, name, SEND_PROXY_NAMES, 3, error,
                              error_size);
        settings->decoy_send_proxy = (enum send_proxy)choice;
        settings->decoy_tuned = true;
        return choice < 0 ? -1 : 0;
    }
    if (strcmp(name, "--decoy-tls-port") == 0) {
        settings->decoy_tuned = true;
        if (!port_parse(value, strlen(value), &settings->decoy_tls_port) ||
            settings->decoy_tls_port == 0)
            return parse_failure(error, error_size, "bad --decoy-tls-port "
                                 "'%s': give a port, 1 to 65535", value);
        return 0;
    }
    if (strcmp(name, "--sni") == 0) {
        if (settings->sni_count == MAX_SNI_NAMES)
            return parse_failure(error, error_size, "too many --sni (%d)",
                                 MAX_SNI_NAMES);
        return text_copy(settings->sni_names[settings->sni_count++],
                         HOST_NAME_BYTES, value, name, error, error_size);
    }
    if (strcmp(name, "--max-per-ip") == 0)
        return count_parse(value, name, 1000000, &settings->max_per_ip, error,
                           error_size);
    if (strcmp(name, "--trusted-proxy") == 0) {
        if (settings->trusted_proxy_count == MAX_TRUSTED_PROXIES)
            return parse_failure(error, error_size, "too many "
                                 "--trusted-proxy (%d)", MAX_TRUSTED_PROXIES);
        return address_range_parse(
            value, &settings->trusted_proxies[settings->trusted_proxy_count++],
            error, error_size);
    }
    if (strcmp(name, "--upstream") == 0 ||
        strcmp(name, "--media-upstream") == 0) {
        struct upstream_spec spec;
        char detail[200];
        if (host_port_parse(value, spec.host, sizeof spec.host, &spec.port,
                            detail, sizeof detail) < 0)
            return parse_failure(error, error_size, "bad %s %s", name, detail);
        if (strcmp(name, "--media-upstream") == 0) {
            settings->media_upstream = spec;
            return 0;
        }
        if (!*upstream_seen)
            settings->chat_upstream_count = 0;
        *upstream_seen = true;
        if (settings->chat_upstream_count == MAX_UPSTREAMS)
            return parse_failure(error, error_size,
                                 "too many --upstream (%d)", MAX_UPSTREAMS);
        settings->chat_upstreams[settings->chat_upstream_count++] = spec;
        return 0;
    }
    if (strcmp(name, "--send-proxy") == 0) {
        choice = choice_parse(value, name, SEND_PROXY_NAMES, 3, error,
                              error_size);
        settings->send_proxy = (enum send_proxy)choice;
        return choice < 0 ? -1 : 0;
    }
    if (strcmp(name, "--cert-key") == 0) {
        choice = choice_parse(value, name, KEY_NAMES, 3, error, error_size);
        settings->cert_key = (enum key_type)choice;
        return choice < 0 ? -1 : 0;
    }
    if (strcmp(name, "--log-level") == 0) {
        choice = choice_parse(value, name, LOG_LEVEL_NAMES, 4, error,
                              error_size);
        settings->log_level = (enum log_level)choice;
        return choice < 0 ? -1 : 0;
    }
    if (strcmp(name, "--cert") == 0)
        return text_copy(settings->cert_file, sizeof settings->cert_file,
                         value, name, error, error_size);
    if (strcmp(name, "--key") == 0)
        return text_copy(settings->key_file, sizeof settings->key_file, value,
                         name, error, error_size);
    if (strcmp(name, "--cert-dir") == 0)
        return text_copy(settings->cert_dir, sizeof settings->cert_dir, value,
                         name, error, error_size);
    if (strcmp(name, "--ssl-dns") == 0)
        return text_copy(settings->ssl_dns, sizeof settings->ssl_dns, value,
                         name, error, error_size);
    if (strcmp(name, "--ssl-ip") == 0)
        return text_copy(settings->ssl_ip, sizeof settings->ssl_ip, value,
                         name, error, error_size);
    if (strcmp(name, "--public-host") == 0)
        return text_copy(settings->public_host, sizeof settings->public_host,
                         value, name, error, error_size);
    if (strcmp(name, "--maxconn") == 0)
        return count_parse(value, name, 1000000, &settings->maxconn, error,
                           error_size);
    if (strcmp(name, "--threads") == 0)
        return count_parse(value, name, 256, &settings->relay_threads, error,
                           error_size);
    if (strcmp(name, "--timeout-connect") == 0)
        return seconds_parse(value, name, &settings->timeout_connect_ms,
                             error, error_size);
    if (strcmp(name, "--timeout-idle") == 0)
        return seconds_parse(value, name, &settings->timeout_idle_ms, error,
                             error_size);
    if (strcmp(name, "--timeout-fin") == 0)
        return seconds_parse(value, name, &settings->timeout_fin_ms, error,
                             error_size);
    if (strcmp(name, "--timeout-handshake") == 0)
        return seconds_parse(value, name, &settings->timeout_handshake_ms,
                             error, error_size);
    if (strcmp(name, "--check-interval") == 0)
        return seconds_parse(value, name, &settings->check_interval_ms, error,
                             error_size);
    if (strcmp(name, "--grace") == 0)
        return seconds_parse(value, name, &settings->grace_ms, error,
                             error_size);
    if (strcmp(name, "--user") == 0)
        return text_copy(settings->user, sizeof settings->user, value, name,
                         error, error_size);
    if (strcmp(name, "--stats") == 0)
        return stats_spec_parse(settings, value, error, error_size);
    if (strcmp(name, "--log-clients") == 0) {
        settings->log_clients = true;
        return 0;
    }
    if (strcmp(name, "--check") == 0) {
        settings->check_only = true;
        return 0;
    }
    /* Every name in OPTIONS is handled above. */
    assert(!"option in OPTIONS without a handler");
    return -1;
}

/* Returns whether host:port would reach one of the proxy's own listeners:
 * a local host and a port it listens on. A decoy there would hand each
 * client back to the proxy, which would hand it on again, until --maxconn
 * is used up. */
static bool points_back_here(const struct settings *settings,
                             const char *host, uint16_t port)
{
    static const char *const LOCAL[] = {"localhost", "::1", "0.0.0.0", "::"};
    bool local = strncmp(host, "127.", 4) == 0;
    for (size_t i = 0; i < ARRAY_LENGTH(LOCAL); i++)
        local |= strcmp(host, LOCAL[i]) == 0;
    for (size_t i = 0; local && i < settings->listener_count; i++)
        if (settings->listeners[i].port == port)
            return true;
    return false;
}

/* Reads argv into settings; see whatsapp_proxy.h. */
enum parse_result settings_parse(struct settings *settings, int argc,
                                 char **argv, char *error, size_t error_size)
{
    bool listen_seen = false;
    bool upstream_seen = false;

    for (int i = 1; i < argc; i++) {
        /* Split "--flag=value" into name and inline value. */
        char name[64];
        const char *equals = strchr(argv[i], '=');
        size_t name_length = equals ? (size_t)(equals - argv[i])
                                    : strlen(argv[i]);
        snprintf(name, sizeof name, "%.*s", (int)name_length, argv[i]);

        const struct option *option = NULL;
        for (size_t k = 0; k < ARRAY_LENGTH(OPTIONS); k++)
            if (strcmp(name, OPTIONS[k].name) == 0)
                option = &OPTIONS[k];
        if (option == NULL) {
            parse_failure(error, error_size,
                          "unknown option '%s' (see --help)", argv[i]);
            return PARSE_ERROR;
        }

        const char *value = NULL;
        if (option->value_name != NULL) {
            if (equals != NULL)
                value = equals + 1;
            else if (i + 1 < argc)
                value = argv[++i];
            else {
                parse_failure(error, error_size, "%s needs a value: %s %s",
                              name, name, option->value_name);
                return PARSE_ERROR;
            }
        } else if (equals != NULL) {
            parse_failure(error, error_size, "%s takes no value", name);
            return PARSE_ERROR;
        }

        if (strcmp(name, "--help") == 0) {
            help_print();
            return PARSE_EXIT_OK;
        }
        if (strcmp(name, "--version") == 0) {
            printf(PROGRAM_NAME " " PROGRAM_VERSION " (%s)\n",
                   OpenSSL_version(OPENSSL_VERSION));
            return PARSE_EXIT_OK;
        }
        if (option_apply(settings, name, value, &listen_seen, &upstream_seen,
                         error, error_size) < 0)
            return PARSE_ERROR;
    }

    /* No --trusted-proxy: the defaults. */
    for (size_t i = 0; settings->trusted_proxy_count == 0 &&
                       i < ARRAY_LENGTH(DEFAULT_TRUSTED_PROXIES); i++)
        address_range_parse(DEFAULT_TRUSTED_PROXIES[i],
                            &settings->trusted_proxies[i], error, error_size);
    if (settings->trusted_proxy_count == 0)
        settings->trusted_proxy_count = ARRAY_LENGTH(DEFAULT_TRUSTED_PROXIES);

    /* Checks that need more than one flag. */
    if ((settings->cert_file[0] == '\0') != (settings->key_file[0] == '\0')) {
        parse_failure(error, error_size,
                      "--cert and --key go together: give both or neither");
        return PARSE_ERROR;
    }
    if (ip_list_check(settings->ssl_ip, error, error_size) < 0)
        return PARSE_ERROR;
    bool any_tls = false;
    for (size_t i = 0; i < settings->listener_count; i++)
        any_tls |= settings->listeners[i].tls;
    if (settings->sni_count > 0 && !any_tls) {
        parse_failure(error, error_size,
                      "--sni needs a TLS listener (--listen PORT/tls)");
        return PARSE_ERROR;
    }
    if (settings->decoy_tuned && !settings->decoy_enabled) {
        parse_failure(error, error_size, "--decoy-rule, --decoy-send-proxy "
                      "and --decoy-tls-port need --decoy HOST:PORT");
        return PARSE_ERROR;
    }
    if (settings->decoy_tls_port != 0 && !any_tls) {
        parse_failure(error, error_size, "--decoy-tls-port needs a TLS "
                      "listener (--listen PORT/tls)");
        return PARSE_ERROR;
    }
    uint16_t decoy_ports[] = {settings->decoy.port, settings->decoy_tls_port};
    for (size_t i = 0; settings->decoy_enabled && i < 2; i++)
        if (decoy_ports[i] != 0 &&
            points_back_here(settings, settings->decoy.host, decoy_ports[i])) {
            parse_failure(error, error_size, "%s: port %u of %s is this "
                          "proxy's own; the decoy must be another server "
                          "(a local nginx on port 8081, say)",
                          i == 0 ? "--decoy" : "--decoy-tls-port",
                          decoy_ports[i], settings->decoy.host);
            return PARSE_ERROR;
        }
    return PARSE_RUN;
}

/* ==== 4. PROXY protocol ==== */

/*
 * A relay hides the client: WhatsApp's server sees a connection from the
 * proxy, not from the phone. The PROXY protocol (HAProxy's
 * doc/proxy-protocol.txt) fixes that with a short header sent first on a new
 * connection, before any payload, that says "this connection really comes
 * from address S port s, and was made to address D port d".
 *
 * We meet it twice:
 *   - On "accept-proxy" listeners a load balancer in front of us sends one.
 *     We read it, and from then on the address it carries is the client's.
 *   - Towards the chat servers we send one, as the reference does, so that
 *     WhatsApp sees the client's address (media ports send none).
 *
 * Two versions exist:
 *
 *   v1, one text line of at most 107 bytes:
 *       "PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n"
 *       "PROXY UNKNOWN\r\n"      (use the connection's own addresses)
 *
 *   v2, binary:
 *       12 bytes  signature \r\n\r\n\0\r\nQUIT\n
 *        1 byte   version (high 4 bits, always 2) and command (low 4 bits:
 *                 0 LOCAL = use the connection's own addresses, 1 PROXY)
 *        1 byte   family and protocol: 0x11 TCP/IPv4, 0x21 TCP/IPv6, 0 UNSPEC
 *        2 bytes  length of what follows, big-endian
 *       12 bytes  IPv4: source, destination, source port, destination port
 *    or 36 bytes  IPv6: the same with 16-byte addresses
 *       then optional TLVs: 1 byte type, 2 bytes length (big-endian),
 *       that many bytes of value. A balancer adds what it knows: a
 *       connection ID, TLS details, its cloud's endpoint ID. A receiver
 *       may skip them all, but each must end inside the header, and one,
 *       type 0x03, carries a CRC32C checksum of the whole header that a
 *       receiver must check: a header that fails either is refused.
 *
 * The most important rule: a receiver reads exactly the header and not one
 * byte more. The client's first payload bytes follow immediately and must
 * reach the upstream intact. proxyhdr_decode() is a pure function (bytes in,
 * verdict out, no socket) so it can be tested with every kind of broken
 * input; section 9 shows how to read a socket without overshooting.
 */

static const uint8_t PROXYHDR_V2_SIGNATURE[12] = {
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

/* v2 command and family bytes (doc/proxy-protocol.txt section 2.2). */
#define PROXYHDR_V2_VERSION 0x20
#define PROXYHDR_V2_COMMAND_LOCAL 0x00
#define PROXYHDR_V2_COMMAND_PROXY 0x01
#define PROXYHDR_V2_UNSPEC 0x00
#define PROXYHDR_V2_TCP4 0x11
#define PROXYHDR_V2_UDP4 0x12
#define PROXYHDR_V2_TCP6 0x21
#define PROXYHDR_V2_UDP6 0x22
#define PROXYHDR_V2_UNIX_STREAM 0x31
#define PROXYHDR_V2_UNIX_DGRAM 0x32
#define PROXYHDR_V2_IPV4_BYTES 12
#define PROXYHDR_V2_IPV6_BYTES 36
#define PROXYHDR_V2_UNIX_BYTES 216
#define PROXYHDR_V2_TLV_CRC32C 0x03

/* Turns an IPv4 address written as IPv6 (::ffff:a.b.c.d, which a listener on
 * "::" reports for IPv4 clients) back into plain IPv4, in place, so that the
 * header we send says TCP4 as the client really used IPv4. */
static void address_unmap_ipv4(struct sockaddr_storage *address)
{
    struct sockaddr_in6 *ipv6 = (struct sockaddr_in6 *)address;
    if (address->ss_family != AF_INET6 || !IN6_IS_ADDR_V4MAPPED(&ipv6->sin6_addr))
        return;
    struct sockaddr_in ipv4 = {.sin_family = AF_INET, .sin_port = ipv6->sin6_port};
    memcpy(&ipv4.sin_addr, &ipv6->sin6_addr.s6_addr[12], 4);
    memset(address, 0, sizeof *address);
    memcpy(address, &ipv4, sizeof ipv4);
}

/* Returns the bytes of the IP address in *address (IPv4 or IPv6), and
 * sets *length to 4 or 16. */
static const uint8_t *address_bytes(const struct sockaddr_storage *address,
                                    uint8_t *length)
{
    if (address->ss_family == AF_INET) {
        *length = 4;
        return (const uint8_t *)&((const struct sockaddr_in *)address)
            ->sin_addr;
    }
    *length = 16;
    return ((const struct sockaddr_in6 *)address)->sin6_addr.s6_addr;
}

/* Writes the IP address of *address as text into out (INET6_ADDRSTRLEN
 * bytes) and returns its port, in host byte order. */
static uint16_t address_to_text(const struct sockaddr_storage *address,
                                char out[INET6_ADDRSTRLEN])
{
    if (address->ss_family == AF_INET) {
        const struct sockaddr_in *ipv4 = (const struct sockaddr_in *)address;
        inet_ntop(AF_INET, &ipv4->sin_addr, out, INET6_ADDRSTRLEN);
        return ntohs(ipv4->sin_port);
    }
    const struct sockaddr_in6 *ipv6 = (const struct sockaddr_in6 *)address;
    inet_ntop(AF_INET6, &ipv6->sin6_addr, out, INET6_ADDRSTRLEN);
    return ntohs(ipv6->sin6_port);
}

/* Fills *address from a raw IP address (4 or 16 bytes, network order) and a
 * port in network byte order, as they stand in a v2 header. */
static void address_from_bytes(struct sockaddr_storage *address, int family,
                               const uint8_t *ip, const uint8_t *port)
{
    memset(address, 0, sizeof *address);
    if (family == AF_INET) {
        struct sockaddr_in *ipv4 = (struct sockaddr_in *)address;
        ipv4->sin_family = AF_INET;
        memcpy(&ipv4->sin_addr, ip, 4);
        memcpy(&ipv4->sin_port, port, 2);
    } else {
        struct sockaddr_in6 *ipv6 = (struct sockaddr_in6 *)address;
        ipv6->sin6_family = AF_INET6;
        memcpy(&ipv6->sin6_addr, ip, 16);
        memcpy(&ipv6->sin6_port, port, 2);
    }
}

/* Parses one v1 address and port pair ("203.0.113.7", "40000") of the given
 * family into *address. Returns false if either is malformed. */
static bool proxyhdr_v1_address(int family, const char *ip_text,
                                const char *port_text,
                                struct sockaddr_storage *address)
{
    uint8_t ip[16];
    uint16_t port;
    if (inet_pton(family, ip_text, ip) != 1 ||
        !port_parse(port_text, strlen(port_text), &port))
        return false;
    uint16_t port_network = htons(port);
    address_from_bytes(address, family, ip, (const uint8_t *)&port_network);
    return true;
}

/* Decodes a complete v1 line (CRLF at line[length-2]). Returns length or -1.
 * The line is a header, not payload, so it is safe to copy it into a C
 * string for parsing. */
static int proxyhdr_v1_decode(const uint8_t *line, size_t length,
                              struct proxy_addresses *out)
{
    char text[PROXYHDR_V1_MAX_BYTES + 1];
    memcpy(text, line, length - 2);
    text[length - 2] = '\0';

    /* Split at single spaces into at most six words. */
    char *words[7];
    size_t word_count = 0;
    char *rest = text;
    while (rest != NULL && word_count < ARRAY_LENGTH(words))
        words[word_count++] = strsep(&rest, " ");

    if (word_count >= 2 && strcmp(words[1], "UNKNOWN") == 0) {
        /* Whatever follows UNKNOWN is ignored (the specification says so). */
        out->known = false;
        return (int)length;
    }
    if (word_count != 6)
        return -1;
    int family;
    if (strcmp(words[1], "TCP4") == 0)
        family = AF_INET;
    else if (strcmp(words[1], "TCP6") == 0)
        family = AF_INET6;
    else
        return -1;
    if (!proxyhdr_v1_address(family, words[2], words[4], &out->source) ||
        !proxyhdr_v1_address(family, words[3], words[5], &out->destination))
        return -1;
    out->known = true;
    return (int)length;
}

/* Decodes v1 from data[0..length), which starts like "PROXY ". Returns the
 * header length, 0 for "not complete yet" or -1 for malformed. */
static int proxyhdr_v1_scan(const uint8_t *data, size_t length,
                            struct proxy_addresses *out)
{
    size_t limit = length < PROXYHDR_V1_MAX_BYTES ? length
                                                  : PROXYHDR_V1_MAX_BYTES;
    for (size_t i = 0; i < limit; i++) {
        if (data[i] == '\n')
            return i > 0 && data[i - 1] == '\r'
                       ? proxyhdr_v1_decode(data, i + 1, out)
                       : -1;
        /* Only printable ASCII and the final CR may appear in a v1 line; so
         * garbage is refused at once instead of after 107 bytes. */
        if (data[i] != '\r' && (data[i] < 0x20 || data[i] > 0x7E))
            return -1;
        if (data[i] == '\r' && i + 1 < length && data[i + 1] != '\n')
            return -1;
    }
    return length >= PROXYHDR_V1_MAX_BYTES ? -1 : 0;
}

/* The CRC32C checksum; see whatsapp_proxy.h. Bit by bit, the way the
 * definition reads: for each bit, shift right, and where a 1 fell out, add
 * (XOR) the Castagnoli polynomial, written bit-reversed. A table of 256
 * values would be faster, but a header is checked once per connection and
 * is at most 4 KiB, so the short form wins. */
uint32_t crc32c(const uint8_t *data, size_t length)
{
    const uint32_t POLYNOMIAL_REVERSED = 0x82F63B78;
    uint32_t crc = 0xFFFFFFFF;
    for (size_t i = 0; i < length; i++) {
        crc ^= data[i];
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ ((crc & 1) ? POLYNOMIAL_REVERSED : 0);
    }
    return ~crc;
}

/* True if the CRC32C TLV whose 4-byte value starts at header[value_at]
 * matches the header[0..length): the checksum is taken over the whole
 * header with those 4 bytes as zeros. The header is not ours to change, so
 * it is copied first (it is at most PROXYHDR_V2_MAX_BYTES long). */
static bool proxyhdr_v2_checksum_matches(const uint8_t *header, size_t length,
                                         size_t value_at)
{
    uint8_t copy[PROXYHDR_V2_MAX_BYTES];
    memcpy(copy, header, length);
    uint32_t expected = (uint32_t)header[value_at] << 24 |
                        (uint32_t)header[value_at + 1] << 16 |
                        (uint32_t)header[value_at + 2] << 8 |
                        header[value_at + 3];
    memset(copy + value_at, 0, 4);
    return crc32c(copy, length) == expected;
}

/* Walks the TLVs in header[at..length), the end of a complete v2 header:
 * returns false if one runs past the end, or if a CRC32C TLV is not 4
 * bytes long or does not match. Other types are skipped unread. */
static bool proxyhdr_v2_tlvs_valid(const uint8_t *header, size_t at,
                                   size_t length)
{
    while (at < length) {
        if (length - at < 3)
            return false; /* not even room for a type and a length */
        uint8_t type = header[at];
        size_t value_length = (size_t)header[at + 1] << 8 | header[at + 2];
        size_t value_at = at + 3;
        if (value_length > length - value_at)
            return false;
        if (type == PROXYHDR_V2_TLV_CRC32C &&
            (value_length != 4 ||
             !proxyhdr_v2_checksum_matches(header, length, value_at)))
            return false;
        at = value_at + value_length;
    }
    return true;
}

/* Decodes v2 from data[0..length), which starts with (part of) the v2
 * signature. Returns the header length, 0 or -1 like proxyhdr_decode(). */
static int proxyhdr_v2_decode(const uint8_t *data, size_t length,
                              struct proxy_addresses *out)
{
    if (length < 16)
        return 0;
    uint8_t version = data[12] & 0xF0;
    uint8_t command = data[12] & 0x0F;
    uint8_t family = data[13];
    size_t body_length = (size_t)data[14] << 8 | data[15];
    size_t total_length = 16 + body_length;

    if (version != PROXYHDR_V2_VERSION ||
        (command != PROXYHDR_V2_COMMAND_LOCAL &&
         command != PROXYHDR_V2_COMMAND_PROXY) ||
        total_length > PROXYHDR_V2_MAX_BYTES)
        return -1;

    size_t needed;
    switch (family) {
    case PROXYHDR_V2_TCP4:
    case PROXYHDR_V2_UDP4:
        needed = PROXYHDR_V2_IPV4_BYTES;
        break;
    case PROXYHDR_V2_TCP6:
    case PROXYHDR_V2_UDP6:
        needed = PROXYHDR_V2_IPV6_BYTES;
        break;
    case PROXYHDR_V2_UNIX_STREAM:
    case PROXYHDR_V2_UNIX_DGRAM:
        needed = PROXYHDR_V2_UNIX_BYTES;
        break;
    case PROXYHDR_V2_UNSPEC:
        needed = 0;
        break;
    default:
        return -1; /* the specification says: reject other values */
    }
    if (command == PROXYHDR_V2_COMMAND_PROXY && body_length < needed)
        return -1;
    if (length < total_length)
        return 0;
    /* LOCAL's body is skipped whole, addresses and TLVs alike, as the
     * specification says (and as the reference does); after PROXY's
     * addresses come the TLVs, checked once the header is all here. */
    if (command == PROXYHDR_V2_COMMAND_PROXY &&
        !proxyhdr_v2_tlvs_valid(data, 16 + needed, total_length))
        return -1;

    /* Only TCP addresses describe our client; LOCAL (a balancer's health
     * check), UNSPEC, UDP and UNIX mean "use the connection's own". */
    out->known = command == PROXYHDR_V2_COMMAND_PROXY &&
                 (family == PROXYHDR_V2_TCP4 || family == PROXYHDR_V2_TCP6);
    if (out->known && family == PROXYHDR_V2_TCP4) {
        address_from_bytes(&out->source, AF_INET, data + 16, data + 24);
        address_from_bytes(&out->destination, AF_INET, data + 20, data + 26);
    } else if (out->known) {
        address_from_bytes(&out->source, AF_INET6, data + 16, data + 48);
        address_from_bytes(&out->destination, AF_INET6, data + 32, data + 50);
    }
    return (int)total_length;
}

/* Decodes a PROXY header (v1 or v2); see whatsapp_proxy.h. */
int proxyhdr_decode(const uint8_t *data, size_t length,
                    struct proxy_addresses *out)
{
    static const char V1_PREFIX[] = "PROXY ";
    size_t v1_prefix_length = sizeof V1_PREFIX - 1;

    if (length == 0)
        return 0;
    size_t compared = length < 12 ? length : 12;
    if (memcmp(data, PROXYHDR_V2_SIGNATURE, compared) == 0)
        return proxyhdr_v2_decode(data, length, out);
    compared = length < v1_prefix_length ? length : v1_prefix_length;
    if (memcmp(data, V1_PREFIX, compared) == 0)
        return length < v1_prefix_length ? 0
                                         : proxyhdr_v1_scan(data, length, out);
    return -1; /* neither: no PROXY header at all */
}

/* Writes a v1 header; see whatsapp_proxy.h. */
size_t proxyhdr_encode_v1(const struct proxy_addresses *addresses,
                          uint8_t *out, size_t out_size)
{
    int family = addresses->source.ss_family;
    int written;
    if (!addresses->known || family != addresses->destination.ss_family ||
        (family != AF_INET && family != AF_INET6)) {
        written = snprintf((char *)out, out_size, "PROXY UNKNOWN\r\n");
    } else {
        char source[INET6_ADDRSTRLEN];
        char destination[INET6_ADDRSTRLEN];
        uint16_t source_port = address_to_text(&addresses->source, source);
        uint16_t destination_port =
            address_to_text(&addresses->destination, destination);
        written = snprintf((char *)out, out_size, "PROXY %s %s %s %u %u\r\n",
                           family == AF_INET ? "TCP4" : "TCP6", source,
                           destination, source_port, destination_port);
    }
    assert(written > 0 && (size_t)written < out_size);
    return (size_t)written;
}

/* Writes a v2 header; see whatsapp_proxy.h. */
size_t proxyhdr_encode_v2(const struct proxy_addresses *addresses,
                          uint8_t *out, size_t out_size)
{
    assert(out_size >= 16 + PROXYHDR_V2_IPV6_BYTES);
    (void)out_size;
    int family = addresses->source.ss_family;
    bool usable = addresses->known &&
                  family == addresses->destination.ss_family &&
                  (family == AF_INET || family == AF_INET6);

    memcpy(out, PROXYHDR_V2_SIGNATURE, 12);
    size_t body_length = 0;
    if (!usable) {
        out[12] = PROXYHDR_V2_VERSION | PROXYHDR_V2_COMMAND_LOCAL;
        out[13] = PROXYHDR_V2_UNSPEC;
    } else if (family == AF_INET) {
        const struct sockaddr_in *source =
            (const struct sockaddr_in *)&addresses->source;
        const struct sockaddr_in *destination =
            (const struct sockaddr_in *)&addresses->destination;
        out[12] = PROXYHDR_V2_VERSION | PROXYHDR_V2_COMMAND_PROXY;
        out[13] = PROXYHDR_V2_TCP4;
        memcpy(out + 16, &source->sin_addr, 4);
        memcpy(out + 20, &destination->sin_addr, 4);
        memcpy(out + 24, &source->sin_port, 2);
        memcpy(out + 26, &destination->sin_port, 2);
        body_length = PROXYHDR_V2_IPV4_BYTES;
    } else {
        const struct sockaddr_in6 *source =
            (const struct sockaddr_in6 *)&addresses->source;
        const struct sockaddr_in6 *destination =
            (const struct sockaddr_in6 *)&addresses->destination;
        out[12] = PROXYHDR_V2_VERSION | PROXYHDR_V2_COMMAND_PROXY;
        out[13] = PROXYHDR_V2_TCP6;
        memcpy(out + 16, &source->sin6_addr, 16);
        memcpy(out + 32, &destination->sin6_addr, 16);
        memcpy(out + 48, &source->sin6_port, 2);
        memcpy(out + 50, &destination->sin6_port, 2);
        body_length = PROXYHDR_V2_IPV6_BYTES;
    }
    out[14] = (uint8_t)(body_length >> 8);
    out[15] = (uint8_t)(body_length & 0xFF);
    return 16 + body_length;
}

/* Writes the header of the given kind (none, v1 or v2) for addresses into
 * out, which has room for PROXYHDR_ENCODED_MAX_BYTES, and returns its
 * length: 0 for none. */
static size_t proxyhdr_encode(enum send_proxy kind,
                              const struct proxy_addresses *addresses,
                              uint8_t *out)
{
    if (kind == SEND_PROXY_V1)
        return proxyhdr_encode_v1(addresses, out, PROXYHDR_ENCODED_MAX_BYTES);
    if (kind == SEND_PROXY_V2)
        return proxyhdr_encode_v2(addresses, out, PROXYHDR_ENCODED_MAX_BYTES);
    return 0;
}

/* ==== 5. TLS termination ==== */

/*
 * On TLS listeners the client wraps its chat stream in TLS, and we unwrap it
 * here ("terminate" it) before relaying. Inside is WhatsApp's own end-to-end
 * encrypted stream, so TLS adds no secrecy for messages: it makes the
 * connection look like any HTTPS visit to a censor watching the wire.
 *
 * The certificate. The app does not verify it, so by default, like the
 * reference, we make a fresh one at every start, with the OpenSSL API. The
 * reference makes a certificate authority with a random name and a
 * certificate for <random>.net signed by it, and sends both: a pattern a
 * scanner can look for. We make what a web server makes for itself: one
 * self-signed certificate for the --public-host name (else the first
 * --ssl-dns name, else the machine's host name), plus any --ssl-dns and
 * --ssl-ip names, valid from a random moment in the last month. With
 * --cert-dir the files are written there for operators who want to look
 * at them.
 * An operator with a domain name should give a real certificate with --cert
 * and --key (Let's Encrypt): a real name with a real certificate is much
 * harder for a censor to tell from an ordinary web site.
 *
 * The SSL_CTX ("context") holds the certificate and the rules; it is fully
 * configured before any thread starts and then only read, which OpenSSL
 * allows from many threads. Each client gets its own SSL object, made and
 * used by its relay thread alone. Using one SSL from two threads at once
 * corrupts it (openssl-threads(7)).
 *
 * The handshake takes turns: the client speaks (ClientHello), we answer
 * (our half of the key exchange, the certificate, a signature), the client
 * finishes. On a non-blocking socket, SSL_accept() does what it can with
 * the bytes that have arrived and then says what it waits for;
 * tls_handshake_step() is one such call. A relay thread (section 10) calls
 * it again when its epoll loop says the socket is ready, serving thousands
 * of other clients in between.
 *
 * The server name. A TLS client says which name it wants in its first
 * message (the ClientHello's "SNI"). With --sni, only listed names are
 * served; see section 9 for why a secret name keeps scanners out.
 */

/* A made certificate is valid for 10 years, as the reference's is, from a
 * random moment in the last TLS_BACKDATE_DAYS: a start date of "now" would
 * tell a scanner when the proxy last restarted. */
#define TLS_DAYS 3650
#define TLS_BACKDATE_DAYS 30

/* Makes a new private key of the chosen type. Returns NULL on failure (the
 * OpenSSL error queue says why). The caller frees it with EVP_PKEY_free(). */
static EVP_PKEY *tls_make_key(enum key_type type)
{
    switch (type) {
    case KEY_RSA2048:
        return EVP_RSA_gen(2048);
    case KEY_RSA4096:
        return EVP_RSA_gen(4096);
    case KEY_EC256:
        break;
    }
    return EVP_EC_gen("P-256");
}

/* Adds one X.509 v3 extension, written as in openssl.cnf ("CA:FALSE"), to
 * certificate. Returns false on failure. */
static bool tls_add_extension(X509 *certificate, X509 *issuer, int nid,
                              const char *value)
{
    X509V3_CTX context;
    X509V3_set_ctx_nodb(&context);
    X509V3_set_ctx(&context, issuer, certificate, NULL, NULL, 0);
    X509_EXTENSION *extension = X509V3_EXT_conf_nid(NULL, &context, nid, value);
    if (extension == NULL)
        return false;
    bool added = X509_add_ext(certificate, extension, -1) == 1;
    X509_EXTENSION_free(extension);
    return added;
}

/* Makes a self-signed certificate for common_name and alt_names (as in
 * openssl.cnf: "DNS:a.example,IP:192.0.2.1") with key: the kind a web
 * server makes for itself, which `openssl verify -CAfile cert.pem
 * cert.pem` accepts. Returns NULL on failure. */
static X509 *tls_make_certificate(const char *common_name, EVP_PKEY *key,
                                  const char *alt_names)
{
    X509 *certificate = X509_new();
    uint8_t random_bytes[16 + 4];
    BIGNUM *serial_number = NULL;
    bool made = false;

    if (certificate == NULL ||
        RAND_bytes(random_bytes, sizeof random_bytes) != 1)
        goto out;
    random_bytes[0] &= 0x7F; /* a serial number must be positive */
    serial_number = BN_bin2bn(random_bytes, 16, NULL);
    uint32_t random_number;
    memcpy(&random_number, random_bytes + 16, 4);
    long backdate = (long)(random_number % (TLS_BACKDATE_DAYS * 86400L));
    if (serial_number == NULL ||
        BN_to_ASN1_INTEGER(serial_number, X509_get_serialNumber(certificate)) ==
            NULL)
        goto out;

    X509_NAME *name = X509_get_subject_name(certificate);
    if (X509_set_version(certificate, 2) != 1 || /* 2 means X.509 v3 */
        X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                   (const unsigned char *)common_name, -1, -1,
                                   0) != 1 ||
        X509_set_issuer_name(certificate, name) != 1 || /* self-signed */
        X509_gmtime_adj(X509_getm_notBefore(certificate), -backdate) == NULL ||
        X509_gmtime_adj(X509_getm_notAfter(certificate),
                        86400L * TLS_DAYS - backdate) == NULL ||
        X509_set_pubkey(certificate, key) != 1 ||
        !tls_add_extension(certificate, certificate, NID_basic_constraints,
                           "critical,CA:FALSE") ||
        !tls_add_extension(certificate, certificate, NID_key_usage,
                           "digitalSignature,keyEncipherment") ||
        !tls_add_extension(certificate, certificate, NID_ext_key_usage,
                           "serverAuth") ||
        !tls_add_extension(certificate, certificate, NID_subject_alt_name,
                           alt_names) ||
        !tls_add_extension(certificate, certificate,
                           NID_subject_key_identifier, "hash") ||
        X509_sign(certificate, key, EVP_sha256()) == 0)
        goto out;
    made = true;
out:
    BN_free(serial_number);
    if (!made) {
        X509_free(certificate);
        certificate = NULL;
    }
    return certificate;
}

/* Appends ",PREFIX:item" to out for each item of the comma list. */
static void tls_append_names(char *out, size_t out_size, const char *prefix,
                             const char *list)
{
    char copy[1024];
    snprintf(copy, sizeof copy, "%s", list);
    char *rest = copy;
    for (char *item = strsep(&rest, ","); item; item = strsep(&rest, ","))
        if (item[0] != '\0')
            snprintf(out + strlen(out), out_size - strlen(out), ",%s:%s",
                     prefix, item);
}

/* Writes the name of the user who owns path into out ("user 1234" if the
 * name is unknown, "?" if path cannot be looked at), for warnings that must
 * say whose folder it is. */
static void path_owner(const char *path, char *out, size_t out_size)
{
    struct stat info;
    if (stat(path, &info) != 0) {
        snprintf(out, out_size, "?");
        return;
    }
    struct passwd *owner = getpwuid(info.st_uid);
    if (owner != NULL)
        snprintf(out, out_size, "%s", owner->pw_name);
    else
        snprintf(out, out_size, "user %u", (unsigned)info.st_uid);
}

/* Writes certificates to path (and key, if not NULL, readable by the owner
 * only), through a new file PATH.new that replaces path only once it is
 * whole. PATH.new is made with O_EXCL | O_NOFOLLOW: a link standing there,
 * put by someone else who can write in the folder, is removed and never
 * followed, so a key never lands in a file somebody else chose. rename()
 * then replaces path itself, even where path is a link. Mode 0600 is set
 * when the file is made, so there is no moment in which others could read
 * it. Returns false on failure (errno says why). */
static bool tls_write_pem(const char *path, X509 *first, X509 *second,
                          EVP_PKEY *key)
{
    char fresh[PATH_MAX + 32];
    snprintf(fresh, sizeof fresh, "%s.new", path);
    const int flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
    int fd = open(fresh, flags, 0600);
    if (fd < 0 && errno == EEXIST && unlink(fresh) == 0)
        fd = open(fresh, flags, 0600); /* left by a crash, or planted */
    if (fd < 0)
        return false;
    FILE *file = fdopen(fd, "w");
    if (file == NULL) {
        close(fd);
        unlink(fresh);
        return false;
    }
    bool written = fchmod(fd, key ? 0600 : 0644) == 0;
    if (key != NULL)
        written = written &&
                  PEM_write_PrivateKey(file, key, NULL, NULL, 0, NULL, NULL);
    if (first != NULL)
        written = written && PEM_write_X509(file, first);
    if (second != NULL)
        written = written && PEM_write_X509(file, second);
    written = fclose(file) == 0 && written;
    if (written && rename(fresh, path) == 0)
        return true;
    int saved = errno;
    unlink(fresh);
    errno = saved;
    return false;
}

/* Writes the made certificate that context serves to --cert-dir, if one
 * was given: key.pem and cert.pem. Called only once
 * every port is bound, so that a second copy that cannot start never
 * replaces the files of the copy that runs. A failure earns a warning that
 * names the file and the folder's owner; the certificate is served from
 * memory anyway. */
static void tls_save_made_certificate(SSL_CTX *context,
                                const struct settings *settings)
{
    if (context == NULL || settings->cert_file[0] != '\0' ||
        settings->cert_dir[0] == '\0')
        return;
    X509 *certificate = SSL_CTX_get0_certificate(context);
    EVP_PKEY *key = SSL_CTX_get0_privatekey(context);

    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s", settings->cert_dir);
    /* The folder may exist already: that is fine. */
    bool written = mkdir(settings->cert_dir, 0700) == 0 || errno == EEXIST;
    if (written) {
        snprintf(path, sizeof path, "%s/key.pem", settings->cert_dir);
        written = tls_write_pem(path, NULL, NULL, key);
    }
    if (written) {
        snprintf(path, sizeof path, "%s/cert.pem", settings->cert_dir);
        written = tls_write_pem(path, certificate, NULL, NULL);
    }
    if (written) {
        log_line(LOG_INFO, "the made certificate is in %s/",
                 settings->cert_dir);
        return;
    }
    int failure = errno;
    char owner[64];
    path_owner(settings->cert_dir, owner, sizeof owner);
    log_line(LOG_WARN, "cannot write %s: %s (the folder %s belongs to %s; "
             "serving the made certificate from memory anyway)", path,
             strerror(failure), settings->cert_dir, owner);
}

/* Chooses the name a made certificate is for: the --public-host name,
 * else the first --ssl-dns name, else this machine's own host name, which
 * is what Debian's self-signed certificate for a new web server carries
 * (the "snakeoil" one). */
static void tls_made_name(const struct settings *settings, char *out,
                          size_t out_size)
{
    const char *host = settings->public_host;
    if (host_is_name(host) && !host_is_address(host)) {
        snprintf(out, out_size, "%s", host);
    } else if (settings->ssl_dns[0] != '\0') {
        snprintf(out, out_size, "%.*s",
                 (int)strcspn(settings->ssl_dns, ","), settings->ssl_dns);
    } else if (gethostname(out, out_size) != 0 || !host_is_name(out)) {
        snprintf(out, out_size, "localhost");
    }
}

/* SHORTCUT: like the reference, a new certificate at every start, so it
 * changes at each restart; reusing the files in --cert-dir when they exist
 * would keep it stable (tutorial.md, exercise "keep the made
 * certificate").
 *
 * Makes a self-signed certificate (see the section comment) and puts it
 * into context; tls_save_made_certificate() writes it to --cert-dir later.
 * Returns 0, or -1 with one line in error. */
static int tls_make_own_certificate(SSL_CTX *context, const struct settings *settings,
                          char *error, size_t error_size)
{
    char name[HOST_NAME_BYTES];
    tls_made_name(settings, name, sizeof name);
    /* Each item of the lists grows by at most 3 times ("a," becomes
     * ",DNS:a"), so this always fits them whole. */
    char alt_names[3 * (sizeof settings->ssl_dns + sizeof settings->ssl_ip +
                        sizeof settings->public_host + sizeof name)];
    alt_names[0] = '\0';
    tls_append_names(alt_names, sizeof alt_names, "DNS", name);
    tls_append_names(alt_names, sizeof alt_names, "DNS", settings->ssl_dns);
    tls_append_names(alt_names, sizeof alt_names, "IP", settings->ssl_ip);
    if (host_is_address(settings->public_host))
        tls_append_names(alt_names, sizeof alt_names, "IP",
                         settings->public_host);

    EVP_PKEY *key = tls_make_key(settings->cert_key);
    /* alt_names starts with the comma tls_append_names() puts first. */
    X509 *certificate =
        key != NULL ? tls_make_certificate(name, key, alt_names + 1) : NULL;
    int result = certificate != NULL &&
                         SSL_CTX_use_certificate(context, certificate) == 1 &&
                         SSL_CTX_use_PrivateKey(context, key) == 1
                     ? 0 : -1;
    if (result < 0) {
        char reason[256];
        tls_error_text(reason, sizeof reason);
        parse_failure(error, error_size, "cannot make a certificate: %s",
                      reason);
    }
    X509_free(certificate);
    EVP_PKEY_free(key);
    return result;
}

/* Loads --cert (a PEM chain, leaf first, as certbot's fullchain.pem) and
 * --key into context. Returns 0, or -1 with one line naming the file. */
static int tls_load_chain(SSL_CTX *context, const struct settings *settings,
                          char *error, size_t error_size)
{
    char reason[256];
    const char *unreadable = access(settings->cert_file, R_OK) != 0
                                 ? settings->cert_file
                             : access(settings->key_file, R_OK) != 0
                                 ? settings->key_file : NULL;
    if (unreadable != NULL && errno == EACCES) {
        /* The usual cause: under systemd the proxy runs as a user of its
         * own, which may not read /etc/letsencrypt, or copies made by hand
         * belong to root. Name the user: systemd's users of their own may
         * have no name this process can look up, but $USER has it. */
        char user[64];
        struct passwd *entry = getpwuid(geteuid());
        const char *variable = getenv("USER");
        if (entry != NULL)
            snprintf(user, sizeof user, "%s", entry->pw_name);
        else if (variable != NULL && variable[0] != '\0')
            snprintf(user, sizeof user, "%s", variable);
        else
            snprintf(user, sizeof user, "%u", (unsigned)geteuid());
        bool certbots_own = strncmp(unreadable, "/etc/letsencrypt/", 17) == 0;
        return parse_failure(error, error_size,
                             "cannot read %s: permission denied for user %s. "
                             "%s (README.md, \"Put it on a server\")",
                             unreadable, user,
                             certbots_own
                                 ? "Under systemd, let the certbot deploy hook "
                                   "copy the files to the proxy's state "
                                   "folder and give those copies"
                                 : "If the certbot deploy hook put it there, "
                                   "run the hook again, as root: "
                                   "RENEWED_LINEAGE=/etc/letsencrypt/live/"
                                   "YOUR.NAME sh /etc/letsencrypt/renewal-"
                                   "hooks/deploy/whatsapp_proxy.sh");
    }
    if (unreadable != NULL)
        return parse_failure(error, error_size, "cannot read %s: %s",
                             unreadable, strerror(errno));
    if (SSL_CTX_use_certificate_chain_file(context, settings->cert_file) != 1) {
        tls_error_text(reason, sizeof reason);
        return parse_failure(error, error_size,
                             "%s is not a PEM certificate chain: %s",
                             settings->cert_file, reason);
    }
    /* The key is read on its own first, so that "not a key" and "a key,
     * but not this certificate's" get different messages. */
    FILE *file = fopen(settings->key_file, "r");
    EVP_PKEY *key =
        file != NULL ? PEM_read_PrivateKey(file, NULL, NULL, (void *)"")
                     : NULL; /* "": an encrypted key fails, never asks */
    if (file != NULL)
        fclose(file);
    if (key == NULL) {
        tls_error_text(reason, sizeof reason);
        return parse_failure(error, error_size, "%s is not a PEM key: %s",
                             settings->key_file, reason);
    }
    bool matches =
        X509_check_private_key(SSL_CTX_get0_certificate(context), key) == 1;
    bool used = matches && SSL_CTX_use_PrivateKey(context, key) == 1;
    EVP_PKEY_free(key);
    ERR_clear_error();
    if (!matches)
        return parse_failure(error, error_size,
                             "the key %s does not belong to the certificate "
                             "%s: give the key that was made with it (with "
                             "certbot: privkey.pem beside fullchain.pem)",
                             settings->key_file, settings->cert_file);
    if (!used)
        return parse_failure(error, error_size, "cannot use the key %s",
                             settings->key_file);
    return 0;
}

/* Returns true if name (the server name a client asked for, maybe NULL) is
 * one of the --sni names; names are compared without regard to case, as
 * DNS does. */
static bool tls_server_name_listed(const char *name)
{
    for (size_t i = 0; name != NULL && i < state.settings->sni_count; i++)
        if (strcasecmp(name, state.settings->sni_names[i]) == 0)
            return true;
    return false;
}

/* OpenSSL calls this during a handshake when --sni names are given, after
 * reading the ClientHello. A listed name goes on; another goes on too when
 * there is a decoy (the client then goes to it, section 9); without a
 * decoy the handshake fails with the "unrecognized_name" alert, as a
 * strict web server would. Counts matches and misses. */
static int tls_check_server_name(SSL *tls, int *alert, void *unused)
{
    (void)unused;
    bool listed = tls_server_name_listed(
        SSL_get_servername(tls, TLSEXT_NAMETYPE_host_name));
    counter_add(listed ? COUNTER_SNI_MATCHED : COUNTER_SNI_MISSED, 1);
    if (listed || state.settings->decoy_enabled)
        return SSL_TLSEXT_ERR_OK;
    *alert = SSL_AD_UNRECOGNIZED_NAME;
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

/* OpenSSL calls this when a client offers application protocols (ALPN).
 * Like a web server without HTTP/2, we choose "http/1.1" if it is
 * offered. Otherwise we choose none and go on without ALPN, as for a
 * client that offers nothing: a WhatsApp client must never fail here. */
static int tls_choose_protocol(SSL *tls, const unsigned char **chosen,
                               unsigned char *chosen_length,
                               const unsigned char *offered,
                               unsigned int offered_length, void *unused)
{
    static const unsigned char HTTP_1_1[] = "\x08http/1.1"; /* length, name */
    (void)tls;
    (void)unused;
    unsigned char *match;
    if (SSL_select_next_proto(&match, chosen_length, HTTP_1_1,
                              sizeof HTTP_1_1 - 1, offered,
                              offered_length) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *chosen = match;
    return SSL_TLSEXT_ERR_OK;
}

/* OpenSSL calls this first on a client's hello, before it chooses a
 * version. A client whose newest version is TLS 1.0 or 1.1 is refused
 * here with the internal_error alert, as nginx refuses one where Debian's
 * packaged configuration lists those versions: OpenSSL 3's security level
 * then leaves them no cipher. OpenSSL's own refusal (below the TLS 1.2
 * minimum set in tls_context_new()) would send protocol_version instead,
 * and tell a scanner that tries old versions on purpose that this is no
 * such web server. (nginx 1.27.3 and later leave TLS 1.0 and 1.1 off by
 * default and answer protocol_version; the packaged configurations are
 * the commoner sight.) SSL 3 gets protocol_version from both.
 * Returning SSL_CLIENT_HELLO_ERROR makes OpenSSL send *alert and end the
 * handshake. */
static int tls_refuse_old_versions(SSL *tls, int *alert, void *unused)
{
    (void)unused;
    /* A hello's version field says at most TLS 1.2: a TLS 1.3 client lists
     * its versions in an extension instead (a length byte, then two bytes
     * each), and then only that list counts. Values above TLS 1.3 in it
     * are drafts or GREASE (filler that keeps servers honest). A malformed
     * list is OpenSSL's to refuse, later. */
    int newest = (int)SSL_client_hello_get0_legacy_version(tls);
    const unsigned char *list;
    size_t length;
    if (SSL_client_hello_get0_ext(tls, TLSEXT_TYPE_supported_versions, &list,
                                  &length) == 1) {
        newest = 0;
        for (size_t i = 1; i + 1 < length; i += 2) {
            int version = list[i] << 8 | list[i + 1];
            if (version > newest && version <= TLS1_3_VERSION)
                newest = version;
        }
    }
    if (newest != TLS1_VERSION && newest != TLS1_1_VERSION)
        return SSL_CLIENT_HELLO_SUCCESS;
    *alert = SSL_AD_INTERNAL_ERROR;
    return SSL_CLIENT_HELLO_ERROR;
}

/* Makes the server TLS context with its certificate. Returns NULL with one
 * line in error on failure. The caller frees it with SSL_CTX_free(). */
static SSL_CTX *tls_context_new(const struct settings *settings, char *error,
                                size_t error_size)
{
    SSL_CTX *context = SSL_CTX_new(TLS_server_method());
    if (context == NULL) {
        parse_failure(error, error_size, "cannot start OpenSSL");
        return NULL;
    }

    /* TLS 1.0 and 1.1 have known weaknesses (BEAST, weak MACs); every app
     * that supports proxies speaks TLS 1.2 or 1.3. */
    SSL_CTX_set_min_proto_version(context, TLS1_2_VERSION);
    SSL_CTX_set_client_hello_cb(context, tls_refuse_old_versions, NULL);
    SSL_CTX_set_options(context,
                        /* Compression leaks secrets by length (CRIME). */
                        SSL_OP_NO_COMPRESSION |
                        /* A client asking to renegotiate again and again
                         * makes us do costly handshakes: refuse. */
                        SSL_OP_NO_RENEGOTIATION |
                        /* A client that drops TCP without TLS's close
                         * message is a normal end here, as for plain TCP:
                         * the payload has its own integrity (WhatsApp's
                         * encryption), so truncation attacks do not apply. */
                        SSL_OP_IGNORE_UNEXPECTED_EOF);
    /* The rest is chosen to look like a common web server to a scanner
     * that compares answers (section 9): nginx's defaults on Debian. Its
     * cipher list has only strong ciphers, and the client's order among
     * them wins (no SSL_OP_CIPHER_SERVER_PREFERENCE); sessions and
     * tickets last 5 minutes; ALPN picks http/1.1 when offered. */
    SSL_CTX_set_cipher_list(context, "HIGH:!aNULL:!MD5");
    SSL_CTX_set_timeout(context, 300);
    SSL_CTX_set_alpn_select_cb(context, tls_choose_protocol, NULL);
    SSL_CTX_set_mode(context,
                     /* Free OpenSSL's 16 KiB+ read and write buffers while a
                      * connection is idle: about 34 KiB saved per idle TLS
                      * connection, which is nearly all of them. */
                     SSL_MODE_RELEASE_BUFFERS |
                     /* Let SSL_write_ex() send part of a buffer and say how
                      * much, like write(); the rest stays in the source
                      * socket until the next try (section 10). */
                     SSL_MODE_ENABLE_PARTIAL_WRITE |
                     /* After WANT_WRITE, OpenSSL wants the same bytes
                      * again; section 10 offers them again from its
                      * scratch buffer, at the same or another address. */
                     SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* Read whatever the socket has, not one record's header and then its
     * body: half the read() calls on bulk transfers.
     * Bytes read ahead wait in OpenSSL, which SSL_has_pending() reports;
     * section 10 reads them before it waits for the socket. */
    SSL_CTX_set_read_ahead(context, 1);
    /* --sni: a secret server name works like a password (section 9). */
    if (settings->sni_count > 0)
        SSL_CTX_set_tlsext_servername_callback(context, tls_check_server_name);

    int loaded = settings->cert_file[0] != '\0'
                     ? tls_load_chain(context, settings, error, error_size)
                     : tls_make_own_certificate(context, settings, error, error_size);
    if (loaded < 0) {
        SSL_CTX_free(context);
        return NULL;
    }
    return context;
}

/* Returns when the certificate that context serves expires, as Unix
 * time, or 0 if it cannot tell. */
static time_t tls_certificate_expiry(SSL_CTX *context)
{
    X509 *certificate = SSL_CTX_get0_certificate(context);
    struct tm expiry;
    if (certificate == NULL ||
        ASN1_TIME_to_tm(X509_get0_notAfter(certificate), &expiry) != 1)
        return 0;
    return timegm(&expiry);
}

/* Writes the names the certificate in context is valid for (its DNS and
 * IP "subject alternative names") into out, separated by ", ". */
static void tls_certificate_names(SSL_CTX *context, char *out,
                                  size_t out_size)
{
    out[0] = '\0';
    X509 *certificate = SSL_CTX_get0_certificate(context);
    GENERAL_NAMES *names =
        certificate == NULL ? NULL : X509_get_ext_d2i(certificate,
                                                      NID_subject_alt_name,
                                                      NULL, NULL);
    for (int i = 0; i < sk_GENERAL_NAME_num(names); i++) {
        const GENERAL_NAME *name = sk_GENERAL_NAME_value(names, i);
        char text[INET6_ADDRSTRLEN] = "";
        if (name->type == GEN_DNS) {
            snprintf(text, sizeof text, "%.*s",
                     ASN1_STRING_length(name->d.dNSName),
                     (const char *)ASN1_STRING_get0_data(name->d.dNSName));
        } else if (name->type == GEN_IPADD) {
            int length = ASN1_STRING_length(name->d.iPAddress);
            if (length == 4 || length == 16)
                inet_ntop(length == 4 ? AF_INET : AF_INET6,
                          ASN1_STRING_get0_data(name->d.iPAddress), text,
                          sizeof text);
        }
        size_t used = strlen(out);
        if (text[0] != '\0')
            snprintf(out + used, out_size - used, "%s%s",
                     used > 0 ? ", " : "", text);
    }
    GENERAL_NAMES_free(names);
    if (out[0] == '\0' && certificate != NULL) /* old style: the name alone */
        X509_NAME_get_text_by_NID(X509_get_subject_name(certificate),
                                  NID_commonName, out, (int)out_size);
}

/* True if the certificate in context is valid for host, a name or an
 * address, as a client that checks it would judge (wildcards included). */
static bool tls_certificate_covers(SSL_CTX *context, const char *host)
{
    X509 *certificate = SSL_CTX_get0_certificate(context);
    return certificate != NULL &&
           (X509_check_host(certificate, host, 0, 0, NULL) == 1 ||
            X509_check_ip_asc(certificate, host, 0) == 1);
}

/* Whole days from now until expiry (Unix time); negative once past. */
static long days_until(time_t expiry)
{
    return (long)((expiry - time(NULL)) / 86400);
}

/* Logs the certificate now served: the names it is valid for and when it
 * expires. */
static void tls_log_certificate(SSL_CTX *context)
{
    char names[1024];
    tls_certificate_names(context, names, sizeof names);
    time_t expiry = tls_certificate_expiry(context);
    char date[32] = "?";
    strftime(date, sizeof date, "%Y-%m-%d", gmtime(&expiry));
    log_line(LOG_INFO, "certificate for %s; expires %s (in %ld days)", names,
             date, days_until(expiry));
}

/* Fewer days than this left on the certificate earns a daily warning. */
#define CERTIFICATE_WARN_DAYS 14

/* Warns, at most once a day, while the certificate served has fewer than
 * CERTIFICATE_WARN_DAYS left. The health thread (section 6) calls it on
 * every pass, so the first warning comes right after the start. */
static void tls_warn_if_expiring(void)
{
    time_t expiry = (time_t)atomic_load(&state.certificate_expires_at);
    time_t now = time(NULL);
    long long warned = atomic_load(&state.certificate_warned_at);
    if (expiry == 0 || expiry - now >= CERTIFICATE_WARN_DAYS * 86400L ||
        now - warned < 86400)
        return;
    atomic_store(&state.certificate_warned_at, (long long)now);
    long days_left = days_until(expiry);
    log_line(LOG_WARN, days_left < 0
                 ? "the certificate has expired: renew it (certbot renew), "
                   "then reload (systemctl reload whatsapp_proxy)"
                 : "the certificate expires in %ld days: renew it (certbot "
                   "renew), then reload (systemctl reload whatsapp_proxy)",
             days_left);
}

/* Replaces the certificate (SIGHUP): makes a new context from the same
 * settings (reading --cert and --key again, or making a new chain) and
 * swaps it in under tls_lock. Connections already open keep the context
 * they started with (each SSL holds a reference), so none is dropped. If
 * the new files are bad, the old certificate stays and the log says why. */
static void tls_reload(void)
{
    if (state.tls_context == NULL)
        return; /* no TLS listener */
    char error[512];
    SSL_CTX *fresh = tls_context_new(state.settings, error, sizeof error);
    if (fresh == NULL) {
        log_line(LOG_ERROR, "certificate reload failed, keeping the old "
                 "one: %s", error);
        return;
    }
    pthread_mutex_lock(&state.tls_lock);
    SSL_CTX *old = state.tls_context;
    state.tls_context = fresh;
    pthread_mutex_unlock(&state.tls_lock);
    SSL_CTX_free(old);
    atomic_store(&state.certificate_expires_at, tls_certificate_expiry(fresh));
    log_line(LOG_INFO, "certificate reloaded");
    tls_log_certificate(fresh);
    tls_save_made_certificate(fresh, state.settings);
}

/* Makes the SSL object for a new client on socket fd, or returns NULL.
 * The caller frees it with SSL_free(), which leaves fd open. The SSL takes
 * its own reference to the context, so a reload that replaces the context
 * later does not pull it from under this client. */
static SSL *tls_new(int fd)
{
    pthread_mutex_lock(&state.tls_lock);
    SSL *tls = SSL_new(state.tls_context);
    pthread_mutex_unlock(&state.tls_lock);
    if (tls != NULL && SSL_set_fd(tls, fd) != 1) {
        SSL_free(tls);
        tls = NULL;
    }
    return tls;
}

/* TLS records (RFC 8446, section 5.1): a 5-byte header, type 0x16 for a
 * handshake message, the version's first byte 3, a 2-byte length of at
 * most 2^14. A client's first record holds its ClientHello. */
#define TLS_RECORD_HEADER_BYTES 5
#define TLS_RECORD_MAX_BYTES 16384
#define TLS_HANDSHAKE_RECORD 0x16

/* Looks at the first bytes of a client of a TLS port; see
 * whatsapp_proxy.h. A pure function, like proxyhdr_decode(). */
enum hello_verdict tls_hello_look(const uint8_t *bytes, size_t seen,
                                  int *needed)
{
    if (bytes[0] != TLS_HANDSHAKE_RECORD || (seen >= 2 && bytes[1] != 3))
        return HELLO_NOT_TLS;
    *needed = TLS_RECORD_HEADER_BYTES;
    if (seen >= TLS_RECORD_HEADER_BYTES) {
        int length = bytes[3] << 8 | bytes[4];
        if (length > TLS_RECORD_MAX_BYTES)
            return HELLO_NOT_TLS;
        *needed += length;
    }
    return seen >= (size_t)*needed ? HELLO_WHOLE : HELLO_NEED_MORE;
}

/* How far one step took a handshake. */
enum handshake_progress {
    HANDSHAKE_DONE,        /* finished: the client's bytes can flow */
    HANDSHAKE_WANTS_READ,  /* step again once the socket is readable */
    HANDSHAKE_WANTS_WRITE, /* step again once the socket is writable */
    HANDSHAKE_FAILED       /* not TLS, or not a TLS we accept: give up */
};

/* Takes the server side of tls's handshake as far as it can go now. The
 * socket is non-blocking, so SSL_accept() never waits: it stops when the
 * client's next message has not arrived yet (or the socket cannot take
 * ours) and says which. The caller waits for that and steps again. A
 * failure is logged, with OpenSSL's reason, at debug level. */
static enum handshake_progress tls_handshake_step(SSL *tls)
{
    ERR_clear_error(); /* errors of an earlier client must not be blamed */
    int returned = SSL_accept(tls);
    if (returned == 1)
        return HANDSHAKE_DONE;
    switch (SSL_get_error(tls, returned)) {
    case SSL_ERROR_WANT_READ:
        return HANDSHAKE_WANTS_READ;
    case SSL_ERROR_WANT_WRITE:
        return HANDSHAKE_WANTS_WRITE;
    default: {
        char why[256];
        tls_error_text(why, sizeof why);
        log_line(LOG_DEBUG, "TLS handshake failed: %s", why);
        return HANDSHAKE_FAILED;
    }
    }
}

/* Whether the handshake on tls has begun: the client's hello has been
 * answered, and its last flight is awaited. NULL has not begun. */
static bool tls_handshake_begun(const SSL *tls)
{
    return tls != NULL && !SSL_in_before(tls);
}

/* ==== 6. Upstreams ==== */

/*
 * The upstreams are WhatsApp's servers: a pool of chat servers used in turn
 * (round-robin), and one media server. Clients never choose where their bytes
 * go: only these configured servers are ever dialled, so the proxy cannot be
 * used as an open relay to reach anything else.
 *
 * Names are resolved with getaddrinfo() at startup and again at every health
 * check, not for every client: a reconnect storm would otherwise send
 * thousands of DNS queries, and getaddrinfo() blocks, which a relay thread
 * serving thousands of clients must never do. IPv4 addresses are preferred,
 * because many small servers have no working IPv6 route.
 *
 * Health. A health thread connects to every server (the decoy too) every
 * --check-interval seconds (60, as the reference), and every few seconds
 * while one is down or its last check failed.
 * As in HAProxy: a server is taken out of rotation after 3 failures in a
 * row ("fall") and put back after 2 successes ("rise"); failed connects of
 * real clients count as failures too ("observe layer4"). The picker skips
 * servers that are down, but when all are down it still tries them: a wrong
 * verdict must not refuse everyone.
 *
 * Connecting. A client's connect is started here and finished by its relay
 * thread (section 10), which waits for thousands of them at once in epoll.
 * A connect that is refused or takes longer than --timeout-connect is tried
 * again, up to UPSTREAM_TRIES_MAX tries in all, as HAProxy does: on the
 * next server of the pool, or on the same one when it is the only one (a
 * refused try waits UPSTREAM_RETRY_DELAY_MS first). Then the client is
 * closed, with a FIN: the phone tries again or another proxy.
 */

/* HAProxy's defaults: fall 3, rise 2. */
#define UPSTREAM_FALL 3
#define UPSTREAM_RISE 2
/* Between checks of a server that is down (HAProxy's "downinter 3s"). */
#define UPSTREAM_DOWN_CHECK_MS 3000

struct upstream {
    struct upstream_spec spec;       /* name and port, from the settings */
    long long next_check_ms;         /* health thread only: when to check */
    /* Guarded by state.upstream_lock: */
    struct sockaddr_storage address; /* where spec.host resolved to */
    socklen_t address_length;        /* 0 while not resolved */
    bool up;                         /* in rotation */
    unsigned failures_in_row;
    unsigned successes_in_row;
    unsigned long long failures_total; /* failed checks and client connects */
    time_t last_check;               /* wall-clock time, 0 before the first */
    char last_result[64];            /* "ok", or why the check failed */
};

/* Resolves upstream's name and stores the address (taking upstream_lock).
 * Returns 0, or -1 with one line in error. Blocks while DNS answers. */
static int upstream_resolve(struct upstream *upstream, char *error,
                            size_t error_size)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_ADDRCONFIG};
    struct addrinfo *results = NULL;
    char port_text[8];
    snprintf(port_text, sizeof port_text, "%u", upstream->spec.port);

    int failure = getaddrinfo(upstream->spec.host, port_text, &hints, &results);
    if (failure != 0)
        return parse_failure(error, error_size, "cannot resolve %s: %s",
                             upstream->spec.host, gai_strerror(failure));
    /* SHORTCUT: only one address per name is kept, IPv4 first. Production
     * code would keep them all and try the next address when one fails,
     * or prefer IPv6 where it works (tutorial.md, exercise "IPv6 first"). */
    const struct addrinfo *chosen = results;
    for (const struct addrinfo *r = results; r != NULL; r = r->ai_next)
        if (r->ai_family == AF_INET) {
            chosen = r;
            break;
        }
    pthread_mutex_lock(&state.upstream_lock);
    memcpy(&upstream->address, chosen->ai_addr, chosen->ai_addrlen);
    upstream->address_length = chosen->ai_addrlen;
    pthread_mutex_unlock(&state.upstream_lock);
    freeaddrinfo(results);
    return 0;
}

/* Copies upstream's address into *address. Returns its length, or 0 if
 * its name has not resolved yet. Takes upstream_lock. */
static socklen_t upstream_address(struct upstream *upstream,
                                  struct sockaddr_storage *address)
{
    pthread_mutex_lock(&state.upstream_lock);
    socklen_t length = upstream->address_length;
    memcpy(address, &upstream->address, sizeof *address);
    pthread_mutex_unlock(&state.upstream_lock);
    return length;
}

/* Records one connect to upstream that worked (ok) or failed (with reason),
 * by the health thread (from_check) or for a client, and moves the server
 * in or out of rotation by the fall and rise rules. Takes upstream_lock. */
static void upstream_record(struct upstream *upstream, bool ok,
                            const char *reason, bool from_check)
{
    pthread_mutex_lock(&state.upstream_lock);
    bool was_up = upstream->up;
    if (ok) {
        upstream->failures_in_row = 0;
        upstream->successes_in_row++;
        if (!upstream->up && upstream->successes_in_row >= UPSTREAM_RISE)
            upstream->up = true;
    } else {
        upstream->successes_in_row = 0;
        upstream->failures_in_row++;
        upstream->failures_total++;
        if (upstream->up && upstream->failures_in_row >= UPSTREAM_FALL)
            upstream->up = false;
    }
    if (from_check) {
        upstream->last_check = time(NULL);
        snprintf(upstream->last_result, sizeof upstream->last_result, "%s",
                 ok ? "ok" : reason);
    }
    bool is_up = upstream->up;
    pthread_mutex_unlock(&state.upstream_lock);

    if (!was_up && is_up)
        log_line(LOG_INFO, "server %s port %u is up again",
                 upstream->spec.host, upstream->spec.port);
    if (was_up && !is_up)
        log_line(LOG_WARN, "server %s port %u is down (%s); skipping it",
                 upstream->spec.host, upstream->spec.port, reason);
}

/* Returns whether upstream is in rotation. Takes upstream_lock. */
static bool upstream_is_up(struct upstream *upstream)
{
    pthread_mutex_lock(&state.upstream_lock);
    bool up = upstream->up;
    pthread_mutex_unlock(&state.upstream_lock);
    return up;
}

/* Turns off Nagle's algorithm on fd: a relay must pass small chat messages
 * on at once, not hold them back hoping to fill a packet. */
static void socket_set_nodelay(int fd)
{
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
}

/* Starts a TCP connect to address from a new non-blocking socket, without
 * waiting for it. Returns the socket, or -1 with errno set if no socket
 * could be made or the connect failed at once. The result comes later,
 * when the socket turns writable: with no error, it has worked; else
 * socket_connect_result() says why not. */
static int socket_connect_start(const struct sockaddr_storage *address,
                                socklen_t length)
{
    int fd = socket(address->ss_family,
                    SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (const struct sockaddr *)address, length) == 0 ||
        errno == EINPROGRESS)
        return fd;
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

/* Returns 0 if the connect started on fd has worked, or the errno value
 * that says why it failed. Ask when fd has turned writable. */
static int socket_connect_result(int fd)
{
    int connect_error = 0;
    socklen_t error_length = sizeof connect_error;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &connect_error,
                   &error_length) < 0)
        return errno;
    return connect_error;
}

/* Connects a new TCP socket to address before deadline_ms, waiting for
 * it (the health thread's way). Returns the socket (the caller closes it)
 * or -1 with errno set. */
static int socket_connect(const struct sockaddr_storage *address,
                          socklen_t length, long long deadline_ms)
{
    int fd = socket_connect_start(address, length);
    if (fd < 0)
        return -1;
    enum wait_result waited = socket_wait(fd, POLLOUT, deadline_ms);
    int failure = waited == WAIT_READY       ? socket_connect_result(fd)
                  : waited == WAIT_TIMED_OUT ? ETIMEDOUT
                                             : ECANCELED;
    if (failure == 0)
        return fd;
    close(fd);
    errno = failure;
    return -1;
}

/* One client's way through a pool of servers: the chat pool (in
 * round-robin order), or the one media server, or the decoy. A relay
 * thread (section 10) holds it while it connects: upstream_attempt_next()
 * starts a connect, and when the socket turns writable
 * upstream_attempt_ended() says whether it worked (or, when
 * --timeout-connect passes first, upstream_attempt_failed() records that).
 * Nothing here waits: a relay thread serves thousands of other clients
 * meanwhile. */
struct upstream_attempts {
    struct upstream *pool;
    size_t pool_size;
    unsigned first;          /* where this client's round-robin turn starts */
    size_t looked_at;        /* servers of the pool looked at so far */
    unsigned tries;          /* connects started so far */
    struct upstream *trying; /* the server being connected to */
};

/* Begins attempts on a pool of pool_size servers. */
static void upstream_attempts_begin(struct upstream_attempts *attempts,
                                    struct upstream *pool, size_t pool_size)
{
    *attempts = (struct upstream_attempts){
        .pool = pool,
        .pool_size = pool_size,
        .first = pool_size == 1
                     ? 0 : atomic_fetch_add(&state.next_chat_upstream, 1)};
}

/* Records that the connect to the server being tried failed, for reason:
 * counted (COUNTER_UPSTREAM_CONNECT_FAILED), held against that server, and
 * logged. */
static void upstream_attempt_failed(struct upstream_attempts *attempts,
                                    const char *reason)
{
    struct upstream *upstream = attempts->trying;
    counter_add(COUNTER_UPSTREAM_CONNECT_FAILED, 1);
    upstream_record(upstream, false, reason, false);
    log_line(LOG_WARN, "cannot connect to %s port %u: %s",
             upstream->spec.host, upstream->spec.port, reason);
}

/* Starts a connect to the next server worth trying: one that is up (any
 * of them, when none is now: the failed tries of this very client may
 * have taken the last one down), going round the pool, at most
 * UPSTREAM_TRIES_MAX in all. Returns the socket, its connect under way,
 * or -1 when no server is left to try (errno EHOSTUNREACH) or no socket
 * can be made (see out_of_descriptors()). A server whose name has not resolved yet is a failed try: resolving
 * here would stop the relay thread while DNS answers, so the health thread
 * does it (section 6, the top). */
static int upstream_attempt_next(struct upstream_attempts *attempts)
{
    bool any_up = false;
    for (size_t i = 0; i < attempts->pool_size; i++)
        any_up |= upstream_is_up(&attempts->pool[i]);
    while (attempts->looked_at < attempts->pool_size * UPSTREAM_TRIES_MAX &&
           attempts->tries < UPSTREAM_TRIES_MAX) {
        size_t which = (attempts->first + attempts->looked_at) %
                       attempts->pool_size;
        struct upstream *upstream = &attempts->pool[which];
        attempts->looked_at++;
        if (any_up && !upstream_is_up(upstream))
            continue;
        attempts->tries++;
        attempts->trying = upstream;

        struct sockaddr_storage address;
        socklen_t length = upstream_address(upstream, &address);
        if (length == 0) {
            upstream_attempt_failed(attempts, "name does not resolve");
            continue;
        }
        int fd = socket_connect_start(&address, length);
        if (fd >= 0)
            return fd;
        if (out_of_descriptors(errno)) {
            /* Our own shortage: not held against the server. */
            int shortage = errno;
            log_line(LOG_WARN, "cannot make a socket: %s", strerror(errno));
            errno = shortage;
            return -1;
        }
        upstream_attempt_failed(attempts, strerror(errno));
    }
    errno = EHOSTUNREACH;
    return -1;
}

/* Returns whether another try is allowed after the one that just failed. */
static bool upstream_attempts_left(const struct upstream_attempts *attempts)
{
    return attempts->tries < UPSTREAM_TRIES_MAX;
}

/* Says whether the connect started on fd has worked, and records the
 * result against the server. events is what epoll reported on fd: writable
 * with no error or hang-up means connected, and only a failure needs the
 * system call that asks the socket why. */
static bool upstream_attempt_ended(struct upstream_attempts *attempts, int fd,
                                   uint32_t events)
{
    int failure = events & (EPOLLERR | EPOLLHUP) ? socket_connect_result(fd)
                                                 : 0;
    if (failure != 0) {
        upstream_attempt_failed(attempts, strerror(failure));
        return false;
    }
    socket_set_nodelay(fd);
    upstream_record(attempts->trying, true, NULL, false);
    return true;
}

/* Checks one server: resolve its name again (so a changed address is
 * followed), then a TCP connect within --timeout-connect, closed at once.
 * A chat server expects our PROXY header before anything else, so it gets
 * one, as HAProxy's checks send it: v2 LOCAL, or v1 "PROXY UNKNOWN", which
 * say "a connection of the proxy's own, no client behind it". Otherwise
 * every check would look to WhatsApp like a malformed client connection.
 * Returns whether both worked.
 * SHORTCUT: a server that accepts TCP but is broken above it passes this
 * check (layer 4 only, as the reference); a TLS handshake on port 443
 * would see more (tutorial.md, exercise "a deeper health check"). */
static bool upstream_check(struct upstream *upstream)
{
    char error[300];
    if (upstream_resolve(upstream, error, sizeof error) < 0) {
        upstream_record(upstream, false, "name does not resolve", true);
        return false;
    }
    struct sockaddr_storage address;
    socklen_t length = upstream_address(upstream, &address);
    int fd = socket_connect(&address, length,
                            now_ms() + state.settings->timeout_connect_ms);
    if (fd < 0 && (errno == ECANCELED || out_of_descriptors(errno)))
        return false; /* stopping, or our own shortage: not the server's */
    upstream_record(upstream, fd >= 0, fd >= 0 ? NULL : strerror(errno),
                    true);
    bool chat = upstream >= state.chat_upstreams &&
                upstream < state.chat_upstreams +
                               state.settings->chat_upstream_count;
    enum send_proxy kind = chat ? state.settings->send_proxy
                           : upstream == state.media_upstream
                               ? SEND_PROXY_NONE
                               : state.settings->decoy_send_proxy;
    struct proxy_addresses none = {.known = false};
    uint8_t header[PROXYHDR_ENCODED_MAX_BYTES];
    size_t header_length = proxyhdr_encode(kind, &none, header);
    if (fd >= 0 && header_length > 0)
        send(fd, header, header_length, MSG_NOSIGNAL); /* best effort */
    if (fd >= 0)
        close(fd);
    return fd >= 0;
}

/* How many decoy servers settings name: none, the site (--decoy), or
 * the site and its own TLS port (--decoy-tls-port), which is checked and
 * counted as a server of its own: it may be down while the site is up. */
static size_t decoy_count(const struct settings *settings)
{
    if (!settings->decoy_enabled)
        return 0;
    return settings->decoy_tls_port != 0 ? 2 : 1;
}

/* Returns server number i for the health thread: the chat pool, then the
 * media server, then the decoys. There are chat_upstream_count + 1 +
 * decoy_count() of them. */
static struct upstream *upstream_numbered(size_t i)
{
    size_t chat_count = state.settings->chat_upstream_count;
    return i < chat_count ? &state.chat_upstreams[i]
           : i == chat_count ? state.media_upstream
                             : &state.decoy_upstreams[i - chat_count - 1];
}

/* Returns whether some listener of settings sends its clients to the media
 * server (media true) or to the chat pool (media false). A server no
 * listener uses is neither checked nor reported. */
static bool upstream_pool_used(const struct settings *settings, bool media)
{
    for (size_t i = 0; i < settings->listener_count; i++)
        if (settings->listeners[i].media == media)
            return true;
    return false;
}

/* Returns whether server number i (as upstream_numbered() counts) serves a
 * listener: the decoy serves the chat ports only. */
static bool upstream_numbered_used(size_t i)
{
    size_t chat_count = state.settings->chat_upstream_count;
    return upstream_pool_used(state.settings, i == chat_count);
}

/* The health thread: checks each server when it is due (see the section
 * comment) until abort_fd says the proxy is going away. The first checks
 * come one interval after the start (sooner for a name that did not
 * resolve): servers begin in rotation, as in HAProxy, and a restart does
 * not hit every server at once. */
static void *upstream_health_run(void *unused)
{
    (void)unused;
    size_t count = state.settings->chat_upstream_count + 1 +
                   decoy_count(state.settings);
    for (;;) {
        tls_warn_if_expiring(); /* section 5: a daily word, if due */
        long long now = now_ms();
        long long next = now + state.settings->check_interval_ms;
        for (size_t i = 0; i < count; i++) {
            struct upstream *upstream = upstream_numbered(i);
            if (!upstream_numbered_used(i))
                continue;
            if (upstream->next_check_ms <= now) {
                bool ok = upstream_check(upstream);
                int pause_ms = ok && upstream_is_up(upstream)
                                   ? state.settings->check_interval_ms
                                   : UPSTREAM_DOWN_CHECK_MS;
                if (pause_ms > state.settings->check_interval_ms)
                    pause_ms = state.settings->check_interval_ms;
                upstream->next_check_ms = now_ms() + pause_ms;
            }
            if (upstream->next_check_ms < next)
                next = upstream->next_check_ms;
        }
        struct pollfd abort_watch = {.fd = state.abort_fd, .events = POLLIN};
        long long sleep_ms = next - now_ms();
        if (poll(&abort_watch, 1, sleep_ms > 0 ? (int)sleep_ms : 0) > 0)
            return NULL;
    }
}

/* ==== 7. Listeners ==== */

/*
 * A listener is one port that clients connect to, with its kind: plain or
 * TLS, with or without a PROXY header first, chat or media. Without an
 * address in --listen, a listener takes every IPv4 and IPv6 address of the
 * machine through one IPv6 socket with IPV6_V6ONLY off: IPv4 clients then
 * appear as ::ffff:a.b.c.d, which section 4 turns back into IPv4.
 *
 * Binding fails in two ways a volunteer meets on day one: the port is taken
 * (a web server on 80 or 443) or it is below 1024 and we are not root. The
 * message names the port and the fix.
 */

struct listener {
    struct listener_spec spec;
    int fd;                          /* the listening socket, or -1 */
    uint16_t port;                   /* the port really bound (spec.port 0) */
    atomic_uint connections_now;     /* its clients open right now */
    atomic_ullong connections_total; /* its clients since the start */
};

/* Writes the message for a failed bind() of port into error and returns -1.
 * flag_name is the flag that chose the port (--listen or --stats). */
static int listener_bind_failure(const struct listener_spec *spec,
                                 const char *flag_name, int error_number,
                                 char *error, size_t error_size)
{
    char program[PATH_MAX] = "./" PROGRAM_NAME;
    ssize_t length;
    switch (error_number) {
    case EADDRINUSE:
        return parse_failure(error, error_size,
                             "cannot listen on port %u: it is already in use "
                             "by another program (see which, as root, with: "
                             "ss -ltnp 'sport = :%u'). Stop that program, or "
                             "choose another port with %s",
                             spec->port, spec->port, flag_name);
    case EACCES:
        /* Name this very program in the setcap command, wherever it is. */
        length = readlink("/proc/self/exe", program, sizeof program - 1);
        if (length > 0)
            program[length] = '\0';
        return parse_failure(error, error_size,
                             "cannot listen on port %u: permission denied. "
                             "Ports below 1024 need root: run as root, or "
                             "allow this program once, as root, with: setcap "
                             "cap_net_bind_service=+ep %s (make setcap does "
                             "it; again after each build), or choose a port "
                             "above 1023 with %s", spec->port, program,
                             flag_name);
    case EADDRNOTAVAIL:
        return parse_failure(error, error_size,
                             "cannot listen on %s port %u: this machine has "
                             "no such address (leave the address out to use "
                             "all of them)", spec->address, spec->port);
    default:
        return parse_failure(error, error_size, "cannot listen on port %u: %s",
                             spec->port, strerror(error_number));
    }
}

/* Opens, binds and listens on listener->spec, chosen by flag_name; fills
 * listener->fd and listener->port. Returns 0, or -1 with one line in
 * error. */
static int listener_open(struct listener *listener, const char *flag_name,
                         char *error, size_t error_size)
{
    const struct listener_spec *spec = &listener->spec;
    struct sockaddr_storage address = {0};
    struct sockaddr_in *ipv4 = (struct sockaddr_in *)&address;
    struct sockaddr_in6 *ipv6 = (struct sockaddr_in6 *)&address;
    int on = 1;
    int off = 0;

    if (spec->address[0] == '\0' || strchr(spec->address, ':') != NULL) {
        ipv6->sin6_family = AF_INET6;
        ipv6->sin6_port = htons(spec->port);
        if (spec->address[0] == '\0')
            ipv6->sin6_addr = in6addr_any;
        else
            inet_pton(AF_INET6, spec->address, &ipv6->sin6_addr);
    } else {
        ipv4->sin_family = AF_INET;
        ipv4->sin_port = htons(spec->port);
        inet_pton(AF_INET, spec->address, &ipv4->sin_addr);
    }

    int fd = socket(address.ss_family,
                    SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 && spec->address[0] == '\0' && errno == EAFNOSUPPORT) {
        /* A machine with IPv6 switched off: take every IPv4 address. */
        memset(&address, 0, sizeof address);
        ipv4->sin_family = AF_INET;
        ipv4->sin_port = htons(spec->port);
        ipv4->sin_addr.s_addr = htonl(INADDR_ANY);
        fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    }
    if (fd < 0)
        return parse_failure(error, error_size, "cannot make a socket: %s",
                             strerror(errno));

    /* SO_REUSEADDR: restarting the proxy must not wait for the old
     * connections' TIME_WAIT to expire before it can bind again. */
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    /* Nagle's delay off once, here: every socket accept() returns inherits
     * it from the listening socket, which spares a system call per client. */
    socket_set_nodelay(fd);
    if (address.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY,
                   spec->address[0] == '\0' ? &off : &on, sizeof on);

    socklen_t length = address.ss_family == AF_INET6 ? sizeof *ipv6
                                                     : sizeof *ipv4;
    if (bind(fd, (struct sockaddr *)&address, length) < 0 ||
        listen(fd, LISTEN_BACKLOG) < 0) {
        int saved = errno;
        close(fd);
        listener_bind_failure(spec, flag_name, saved, error, error_size);
        errno = saved; /* for a caller that tells the causes apart */
        return -1;
    }
    length = sizeof address;
    getsockname(fd, (struct sockaddr *)&address, &length);
    listener->port = ntohs(address.ss_family == AF_INET6 ? ipv6->sin6_port
                                                         : ipv4->sin_port);
    listener->fd = fd;
    return 0;
}

/* Writes a short description such as "port 443 (chat, TLS, PROXY header
 * in)" into out, for logs and the --check summary. */
static void listener_describe(const struct listener_spec *spec, uint16_t port,
                              char *out, size_t out_size)
{
    const char *kind = spec->media ? "media, passthrough"
                       : spec->tls ? "chat, TLS"
                                   : "chat, plain";
    snprintf(out, out_size, "port %u%s%s (%s%s)", port,
             spec->address[0] != '\0' ? " on " : "", spec->address, kind,
             spec->accept_proxy ? ", PROXY header in" : "");
}

/* Writes a listener's label, "[ADDR:]PORT[/tls][/accept-proxy][/media]",
 * as --listen would take it: the short form, for the statistics (section
 * 12); listener_describe() above is the long form, for people. */
static void listener_label(const struct listener *listener, char *out,
                           size_t out_size)
{
    const struct listener_spec *spec = &listener->spec;
    bool ipv6 = strchr(spec->address, ':') != NULL;
    snprintf(out, out_size, "%s%s%s%s%u%s%s%s", ipv6 ? "[" : "",
             spec->address, ipv6 ? "]" : "", spec->address[0] ? ":" : "",
             listener->port, spec->tls ? "/tls" : "",
             spec->accept_proxy ? "/accept-proxy" : "",
             spec->media ? "/media" : "");
}

/* ==== 8. Admission ==== */

/*
 * Two limits decide whether a client is taken in:
 *
 *   - --maxconn (27,500 as in the reference): client connections at once,
 *     from accept() until the connection ends. Over it, a new client is
 *     closed at once, so that its app tries another proxy quickly, and every
 *     existing connection carries on untouched.
 *
 *   - --max-per-ip (off unless given): connections at once from one client
 *     address, so that one scanner or one abuser cannot use up --maxconn
 *     for everyone. The address is counted as soon as it is known: at
 *     accept(), or right after the PROXY header on a PROXY port, before any
 *     TLS work is spent on the client. It needs a table from address to
 *     count: a hash table of PER_IP_BUCKETS lists, under one mutex, with an
 *     entry only while that address has a connection open.
 *
 * And one rule for PROXY ports: a PROXY header is taken only from the
 * --trusted-proxy ranges (by default loopback and the private ranges, where
 * load balancers live); a connection from anywhere else is closed at once
 * and counted. A PROXY port open to the world would let anyone write any
 * address into a header.
 *
 * A client that is slow to say what it must say first (section 9) holds
 * nothing but its socket and a small struct meanwhile, in the event loop
 * of a relay thread (section 10). So there is no third limit on clients
 * "in their first steps": a flood of silent clients costs memory in
 * proportion, is bounded by --maxconn and --timeout-handshake, and holds
 * up nobody.
 */

/* Counts a newly accepted client of listener. Returns false, after counting
 * the rejection, when it is over --maxconn: the caller then closes it. */
static bool connection_admit(struct listener *listener)
{
    counter_add(COUNTER_CONNECTIONS_ACCEPTED, 1);
    atomic_fetch_add(&listener->connections_total, 1);
    unsigned before = atomic_fetch_add(&state.connections_now, 1);
    if (before >= state.settings->maxconn) {
        atomic_fetch_sub(&state.connections_now, 1);
        counter_add(COUNTER_REJECTED_MAXCONN, 1);
        log_line(LOG_DEBUG, "over --maxconn %u: closing a new client",
                 state.settings->maxconn);
        return false;
    }
    atomic_fetch_add(&listener->connections_now, 1);
    return true;
}

/* Returns whether address is in one of the --trusted-proxy ranges. */
static bool address_trusted(const struct sockaddr_storage *address)
{
    uint8_t length;
    const uint8_t *bytes = address_bytes(address, &length);
    for (size_t i = 0; i < state.settings->trusted_proxy_count; i++) {
        const struct address_range *range = &state.settings->trusted_proxies[i];
        if (range->length != length)
            continue;
        unsigned whole = range->prefix_bits / 8, rest = range->prefix_bits % 8;
        uint8_t mask = (uint8_t)(0xff << (8 - rest));
        if (memcmp(bytes, range->bytes, whole) == 0 &&
            (rest == 0 || (bytes[whole] & mask) == (range->bytes[whole] & mask)))
            return true;
    }
    return false;
}

/* One client address and its connections open now. */
struct per_ip {
    uint8_t address[16];   /* 4 bytes for IPv4, 16 for IPv6 */
    uint8_t length;
    unsigned connections;
    size_t bucket;         /* its index in state.per_ip_buckets */
    struct per_ip *next;   /* in that bucket */
};

/* Takes one connection for the client at address, if it has fewer than
 * --max-per-ip. Returns its table entry (give it back with per_ip_release()),
 * or NULL when the address is over the limit. Takes per_ip_lock.
 * SHORTCUT: --max-per-ip limits connections at once, not how fast one address
 * opens them; a limit on new connections per second would stop a client that
 * connects and leaves in a loop. And an IPv6 address is counted whole, but one
 * home usually has a whole /64 network of them; counting by the first 8 bytes
 * would stop that (tutorial.md, exercise "a rate limit per address", does both
 * here). */
static struct per_ip *per_ip_take(const struct sockaddr_storage *address)
{
    uint8_t length;
    const uint8_t *bytes = address_bytes(address, &length);
    uint32_t hash = 2166136261u; /* FNV-1a: simple and spreads well */
    for (uint8_t i = 0; i < length; i++)
        hash = (hash ^ bytes[i]) * 16777619u;
    size_t bucket_index = hash % PER_IP_BUCKETS;
    struct per_ip **bucket = &state.per_ip_buckets[bucket_index];

    pthread_mutex_lock(&state.per_ip_lock);
    struct per_ip *entry = *bucket;
    while (entry != NULL && (entry->length != length ||
                             memcmp(entry->address, bytes, length) != 0))
        entry = entry->next;
    if (entry == NULL) {
        entry = xcalloc(1, sizeof *entry);
        memcpy(entry->address, bytes, length);
        entry->length = length;
        entry->bucket = bucket_index;
        entry->next = *bucket;
        *bucket = entry;
    }
    if (entry->connections < state.settings->max_per_ip)
        entry->connections++;
    else
        entry = NULL;
    pthread_mutex_unlock(&state.per_ip_lock);
    return entry;
}

/* Gives back a connection taken with per_ip_take(); the entry is removed
 * when its address has none left. NULL is allowed. Takes per_ip_lock. */
static void per_ip_release(struct per_ip *entry)
{
    if (entry == NULL)
        return;
    pthread_mutex_lock(&state.per_ip_lock);
    if (--entry->connections == 0) {
        struct per_ip **link = &state.per_ip_buckets[entry->bucket];
        while (*link != entry)
            link = &(*link)->next;
        *link = entry->next;
        free(entry);
    }
    pthread_mutex_unlock(&state.per_ip_lock);
}

/* Counts the end of an admitted client's connection, wherever it ends.
 * The last one to end while the proxy stops wakes proxy_run(). */
static void connection_ended(struct listener *listener)
{
    atomic_fetch_sub(&listener->connections_now, 1);
    counter_add(COUNTER_CONNECTIONS_CLOSED, 1);
    if (atomic_fetch_sub(&state.connections_now, 1) == 1 && stop_requested) {
        pthread_mutex_lock(&state.stop_lock);
        pthread_cond_broadcast(&state.ended);
        pthread_mutex_unlock(&state.stop_lock);
    }
}

/* How long a thread rests from accepting when accept() fails for lack of
 * descriptors or memory: long enough not to spin, short enough to resume
 * quickly. */
#define ACCEPT_PAUSE_MS 100

/* While accept() keeps failing, say so at most this often in the log. */
#define ACCEPT_WARNING_EVERY_MS 10000

/* Accepts at most this many clients per listener per wake-up, then serves
 * other events: epoll reports the listener again at once if more clients
 * wait. So a relay thread never keeps its thousands of open connections
 * waiting behind a long run of new ones. 4 is HAProxy's default
 * (tune.maxaccept), which its manual says gave the best results. */
#define ACCEPT_BATCH 4

/* What accepting one client did. */
enum accept_result {
    ACCEPTED,      /* a new client, taken in: *fd and *peer are set */
    REFUSED,       /* a new client over --maxconn, closed at once */
    NONE_WAITING,  /* nobody waiting, or the client left before accept() */
    OUT_OF_FILES,  /* no descriptor or memory left (errno): rest a while */
    LISTENER_SHUT  /* the listening socket was shut: the proxy is stopping */
};

/* Accepts one waiting client of listener and applies --maxconn to it. */
static enum accept_result client_accept(struct listener *listener, int *fd,
                                        struct sockaddr_storage *peer)
{
    socklen_t length = sizeof *peer;
    *fd = accept4(listener->fd, (struct sockaddr *)peer, &length,
                  SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (*fd < 0) {
        if (out_of_descriptors(errno))
            return OUT_OF_FILES;
        return errno == EINVAL ? LISTENER_SHUT : NONE_WAITING;
    }
    if (!connection_admit(listener)) {
        close(*fd);
        return REFUSED;
    }
    return ACCEPTED;
}

/* Begins a rest of ACCEPT_PAUSE_MS from accepting, for every thread that
 * accepts: the process has run out of descriptors (error_number says
 * which; a client's socket or its upstream's could not be made), and a
 * waiting client would wake them again and again. The clients wait in the
 * kernel's queue meanwhile. Logs it, at most every ACCEPT_WARNING_EVERY_MS
 * whichever thread asks. */
static void accept_rest_begin(int error_number)
{
    long long now = now_ms();
    atomic_store(&state.accept_rest_until_ms, now + ACCEPT_PAUSE_MS);
    long long last = atomic_load(&state.accept_warned_ms);
    if (now - last > ACCEPT_WARNING_EVERY_MS &&
        atomic_compare_exchange_strong(&state.accept_warned_ms, &last, now))
        log_line(LOG_WARN, "cannot accept new clients: %s; trying again "
                 "every %d ms (raise the open-file limit, or lower "
                 "--maxconn)", strerror(error_number), ACCEPT_PAUSE_MS);
}

/* Returns how many milliseconds the rest from accepting still lasts, or 0
 * if there is none. */
static int accept_rest_left(long long now)
{
    long long until = atomic_load(&state.accept_rest_until_ms);
    return now < until ? (int)(until - now) : 0;
}

/* ==== 9. Conversation ==== */

/*
 * Before its bytes can be relayed, a client may have to say something
 * that the proxy reads itself, in this order:
 *
 *   1. its PROXY header, on a PROXY port (a balancer speaks for it);
 *   2. its TLS handshake, on a TLS port;
 *   3. its first bytes, when there is a decoy (--decoy) to choose.
 *
 * Then the proxy chooses the upstream (chat pool, media server, or decoy)
 * and connects. Each step is a state of the connection in a relay
 * thread's event loop (section 10): it reads what has arrived so far,
 * decides if it can, and otherwise waits for more with the thousands of
 * other connections, never blocking. This section holds what the steps
 * decide, as functions of the bytes heard so far; section 10 holds the
 * reading and the waiting. All three steps together must finish within
 * --timeout-handshake of accept(), so a client that connects and says
 * nothing (a scanner, or a "slowloris" attack that sends one byte a
 * second) is closed then.
 *
 * Reading the PROXY header without reading too far: the kernel lets us look
 * at received bytes without taking them (recv() with MSG_PEEK). We look,
 * ask proxyhdr_decode() how long the header is, and then take exactly that
 * many bytes. If the header is not complete yet, every byte we saw belongs
 * to it, so we take them all, keep them, and wait for more. The client's
 * first payload bytes stay in the socket for the relay.
 *
 * Probes and the decoy (--decoy, --sni). Censors find proxies by scanning:
 * they connect to open ports and block whatever answers like a proxy. With
 * --decoy HOST:PORT (an ordinary web site, a local nginx say), the proxy
 * reads the client's first bytes (inside TLS on TLS ports) before it
 * chooses where to relay. A WhatsApp client speaks first, so this costs it
 * nothing but a moment; a client whose first bytes are clearly not
 * WhatsApp goes to the web site instead, bytes and all, so a prober gets
 * that site's real pages. decoy_classify() decides, by one of two rules:
 *
 *   strict  (default) anything that does not start with WhatsApp's
 *           connection header is a probe: 'W' 'A' and two version bytes,
 *           optionally after the routing prefix 'E' 'D' 0 1, a 3-byte
 *           length and that many bytes (the header as public
 *           reimplementations write it). Every scanner's probe goes to
 *           the site: any HTTP method in any case, a stray CRLF, an SSH
 *           banner, random bytes. Only two things cannot: an empty
 *           connection (nothing to judge) and a probe that starts "WA".
 *   http    only an HTTP request line (GET, POST, ... in capitals) or a
 *           TLS record is a probe; everything else goes to the chat
 *           servers. The trade-off: should a future WhatsApp client start
 *           its stream some other way, strict would send it to the site,
 *           and http would not. So http is the fallback if users of a new
 *           app version cannot connect through a proxy with --decoy.
 *
 * The site should also know who is asking: with --decoy-send-proxy v1 or
 * v2, the decoy gets a PROXY header with the visitor's address (nginx:
 * `listen ... proxy_protocol`). Without one, every visitor reaches the
 * site from 127.0.0.1, and a page the site allows only to local visitors
 * (a status page) is served to anybody. Either way, the site must grant
 * nothing to loopback.
 *
 * A client of a TLS port that is not speaking TLS (plain HTTP sent to an
 * HTTPS port), or whose TLS hello is not whole at --timeout-handshake,
 * goes to the decoy too, with its bytes as they are. A plain-HTTP site
 * answers them as it answers any visitor, which no HTTPS server does;
 * with --decoy-tls-port, the site's own TLS port (nginx: a second
 * `listen ... ssl` with the same certificate) gets them instead, and
 * answers as web servers answer plain HTTP on an HTTPS port.
 *
 * With --sni NAME, a TLS client that asks for another server name (or for
 * none, as a scanner that only knows the address does) goes to the decoy
 * without a word read. A wildcard certificate and a secret name then work
 * as a password. What none of this hides: the traffic's shape and timing,
 * and the server's address once it is known.
 */

/* Where a client's bytes go. */
enum destination {
    TO_CHAT_SERVERS, /* the chat pool, with our PROXY header first */
    TO_MEDIA_SERVER, /* the media server, bytes as they are */
    TO_DECOY         /* the decoy web site (--decoy), bytes as they are */
};

/* The most routing information a WhatsApp client sends before 'W' 'A'
 * (a few bytes in practice), and so the most bytes read to decide. */
#define DECOY_ROUTING_MAX 1024
#define DECOY_FIRST_BYTES_MAX (4 + 3 + DECOY_ROUTING_MAX + 4)

/* What a connection needs during its first steps and until its upstream is
 * connected; then freed. It is kept apart from the connection so that an
 * open connection, the common case by far, stays small.
 *
 * heard[] keeps what the client has said so far, until it is enough to
 * decide: a PROXY header, or the first bytes for the decoy's choice (never
 * both at once: the header is dropped once decoded, before any first byte
 * is read). Its room is what the port needs (opening_room()), so a client
 * costs about 350 bytes here on a port with neither, 1.4 KiB on a port
 * with a decoy, and 4.4 KiB on an accept-proxy port, where a header may be
 * 4 KiB long. Those ports take headers only from --trusted-proxy
 * addresses (section 8): strangers cannot make many such openings. */
struct opening {
    struct upstream_attempts attempts; /* section 6 */
    enum destination destination;
    struct proxy_addresses addresses;  /* for our PROXY header and the log */
    uint32_t client_wait;              /* what the step waits for: EPOLLIN
                                          or EPOLLOUT on the client */
    int hello_needed;                  /* bytes of the TLS hello awaited
                                          (SO_RCVLOWAT), 0 before */
    size_t heard_length;
    size_t heard_room;                 /* the size of heard[] */
    uint8_t heard[];                   /* what the client said so far */
};

_Static_assert(PROXYHDR_V2_MAX_BYTES >= DECOY_FIRST_BYTES_MAX,
               "room for a PROXY header is room for the first bytes too");

/* The room in heard[] that a client of a port with this spec needs: see
 * struct opening. */
static size_t opening_room(const struct listener_spec *spec)
{
    if (spec->accept_proxy)
        return PROXYHDR_V2_MAX_BYTES;
    if (state.settings->decoy_enabled && !spec->media)
        return DECOY_FIRST_BYTES_MAX;
    return 0;
}

/* Classifies the first bytes of a client; see whatsapp_proxy.h and the
 * section comment. A pure function: bytes in, verdict out. */
enum decoy_verdict decoy_classify(const uint8_t *data, size_t length,
                                  bool strict)
{
    static const char *const HTTP_METHODS[] = {
        "GET ", "HEAD ", "POST ", "PUT ", "DELETE ", "OPTIONS ", "CONNECT ",
        "TRACE ", "PATCH ", "PRI "};
    static const uint8_t EDGE_PREFIX[4] = {'E', 'D', 0, 1};

    if (length == 0)
        return DECOY_NEED_MORE;
    if (!strict) {
        if (data[0] == 0x16) /* a TLS handshake record: 0x16 0x03 ... */
            return length < 2 ? DECOY_NEED_MORE
                   : data[1] == 0x03 ? DECOY_PROBE : DECOY_WHATSAPP;
        for (size_t i = 0; i < ARRAY_LENGTH(HTTP_METHODS); i++) {
            size_t method_length = strlen(HTTP_METHODS[i]);
            size_t compared = length < method_length ? length : method_length;
            if (memcmp(data, HTTP_METHODS[i], compared) == 0)
                return length < method_length ? DECOY_NEED_MORE : DECOY_PROBE;
        }
        return DECOY_WHATSAPP;
    }

    /* strict: [E D 0 1, 3-byte length, routing] W A major minor */
    size_t header_at = 0;
    size_t compared = length < 4 ? length : 4;
    if (memcmp(data, EDGE_PREFIX, compared) == 0) {
        if (length < 7)
            return DECOY_NEED_MORE;
        size_t routing = (size_t)data[4] << 16 | (size_t)data[5] << 8 | data[6];
        if (routing > DECOY_ROUTING_MAX)
            return DECOY_PROBE;
        header_at = 7 + routing;
    }
    for (size_t i = 0; i < 2; i++)
        if (length > header_at + i && data[header_at + i] != "WA"[i])
            return DECOY_PROBE;
    return length < header_at + 4 ? DECOY_NEED_MORE : DECOY_WHATSAPP;
}

/* Step 1: the PROXY header. `seen` more bytes have just been looked at
 * (not taken) behind the heard_length bytes taken before. Returns how many
 * of the seen bytes belong to the header, which the caller must take, and
 * sets *complete once they end it: then the addresses it carried, if any
 * (UNKNOWN and LOCAL carry none), replace opening->addresses, and nothing
 * heard is kept. Returns -1 if the header is malformed or too long. */
static int opening_hear_header(struct opening *opening, size_t seen,
                               bool *complete)
{
    struct proxy_addresses decoded;
    size_t have = opening->heard_length;
    int header_length = proxyhdr_decode(opening->heard, have + seen,
                                        &decoded);
    *complete = header_length > 0;
    if (header_length < 0 || (header_length == 0 &&
                              have + seen == opening->heard_room))
        return -1;
    if (!*complete) {
        opening->heard_length += seen;
        return (int)seen;
    }
    if (decoded.known)
        opening->addresses = decoded;
    opening->heard_length = 0;
    return header_length - (int)have;
}

/* Step 3: the first bytes, when there is a decoy. `seen` more bytes have just
 * been taken behind those heard before. Returns true once the bytes decide,
 * after setting opening->destination: the decoy for a probe, else the chat
 * pool. The heard bytes must then be relayed before anything else. */
static bool opening_hear_first_bytes(struct opening *opening, size_t seen)
{
    opening->heard_length += seen;
    enum decoy_verdict verdict =
        decoy_classify(opening->heard, opening->heard_length,
                       state.settings->decoy_strict);
    if (verdict == DECOY_NEED_MORE &&
        opening->heard_length < DECOY_FIRST_BYTES_MAX)
        return false;
    if (verdict != DECOY_WHATSAPP)
        opening->destination = TO_DECOY;
    return true;
}

/* Logs what happened to one client of listener, whose addresses are
 * known, at the given level. The client's address is written only with
 * --log-clients (see section 2). */
static void client_log(const struct listener *listener,
                       const struct proxy_addresses *addresses,
                       enum log_level level, const char *what)
{
    uint16_t port = listener->port;
    if (!state.settings->log_clients) {
        log_line(level, "a client of port %u: %s", port, what);
        return;
    }
    char address[INET6_ADDRSTRLEN];
    uint16_t client_port = address_to_text(&addresses->source, address);
    log_line(level, "client %s port %u of port %u: %s", address, client_port,
             port, what);
}

/* ==== 10. Relay ==== */

/*
 * A relay thread serves thousands of connections at once. It never blocks
 * on one of them: its sockets are non-blocking, and one epoll loop tells it
 * which sockets are ready. There is one relay thread per CPU, and they do
 * everything a connection needs, from accept() to close(): no connection
 * ever waits for a thread.
 *
 * A connection here is a "pair": the client's side and the upstream's
 * side, and two "flows" of bytes between them, one each way.
 *
 *        client side                          upstream side
 *       +-----------+  to_upstream flow  +-------------+
 *       | fd, [TLS] | -----------------> | fd          |
 *       |           | <----------------- |             |
 *       +-----------+   to_client flow   +-------------+
 *
 * The life of a pair, one state at a time (pair->state says which, and
 * each state waits for one thing, bounded by one timeout):
 *
 *   accept()
 *      |  (steps 1 to 3 only where the port and the settings need them;
 *      v   all three together within --timeout-handshake of accept)
 *   READING_HEADER ------ the PROXY header (section 9)
 *      |
 *   HANDSHAKING --------- first the client's whole TLS hello, looked at
 *      |                  in its socket and not taken; then the TLS
 *      |                  handshake, one step per event (5)
 *      |
 *   READING_FIRST_BYTES - the first bytes, for the decoy's choice (9)
 *      |
 *   CONNECTING ---------- to the upstream (6); --timeout-connect per try
 *      |        ^
 *      |   RETRY_WAIT ---- a try was refused: the next one in 1 s (6);
 *      |                   4 tries in all, then CLOSED
 *   RELAYING ------------ bytes both ways; --timeout-idle
 *      |
 *   HALF_CLOSED --------- one way has ended, the other goes on;
 *      |                  --timeout-fin while its source is silent,
 *      |                  --timeout-idle while its reader is slow
 *   CLOSED -------------- both ways ended, an error, or a timeout
 *
 * Waiting. A pair asks epoll for exactly what its state waits for: the
 * client readable while it reads what the client says first, the
 * upstream writable while it connects (a non-blocking connect() ends with
 * the socket turning writable), and while relaying what each flow waits
 * for. TLS makes this subtle: reading TLS may need to write (a key update),
 * and writing may need to read, so the wait comes from OpenSSL's answer
 * (SSL_ERROR_WANT_READ or WANT_WRITE), not from the direction of the flow.
 * And OpenSSL may already hold decrypted bytes that no socket event will
 * announce (SSL_has_pending()), so a flow keeps reading while they are
 * there.
 *
 * Moving bytes, with nothing held. A flow looks at the bytes waiting in
 * its source without taking them (recv() with MSG_PEEK, or SSL_peek_ex()),
 * writes them to its destination, and then takes exactly as many as the
 * destination took. What the destination cannot take yet stays where it
 * was, in the source's socket, and the flow waits until the destination
 * is writable: this is backpressure, and the kernel's TCP window passes it
 * on to the sender. So the proxy holds no payload of its own for any
 * connection, however slow its reader and however fast its sender: an
 * open pair costs its struct and its two sockets' kernel buffers, and on
 * TLS OpenSSL's state, which keeps at most one record each way (it frees
 * its buffers while a connection is idle, section 5). Reading and writing
 * in turn inside one flow, never waiting on one direction while the other
 * is stuck, is what keeps the relay from the deadlock of a naive blocking
 * loop (both sides writing, nobody reading).
 *
 * Ending. When a side ends its sending (TCP FIN, or TLS close_notify), the
 * flow passes the end on to the other side (shutdown() of the write half;
 * on TLS close_notify first): this is a half-close, and the other flow
 * carries on. When both flows have ended, the pair is closed. A half-close
 * is normal traffic, not a sign that the end is near: a phone may close
 * its sending and then read a large answer slowly, and every byte of it
 * must arrive. A socket whose peer has ended both ways may still hold
 * unread bytes: it is read to the end. An error or reset on either side
 * closes the pair at once, and each side is told as HAProxy tells it
 * (enum pair_end): a reset is passed on as a reset.
 *
 * Timers. Each relay thread keeps its pairs in five lists ordered by last
 * activity, most recent first, one per timeout (enum timer): opening pairs
 * (the first three states, --timeout-handshake from accept), connecting
 * pairs (--timeout-connect), pairs waiting to retry, open pairs
 * (--timeout-idle) and half-closed pairs waiting for their last source to
 * say more (--timeout-fin). Activity moves a pair to the front, so the
 * oldest pair is always at the back, and finding the expired ones never
 * means walking through the live ones. The list only times a pair; when
 * the time is up, its state says what happens (pair_timed_out()).
 *
 * Accepting. Every relay thread watches every listening socket in its own
 * epoll loop, with EPOLLEXCLUSIVE: the kernel wakes one of the waiting
 * threads for a new client instead of all of them, and that thread takes
 * it. (SO_REUSEPORT, one listening socket per thread, would spread clients
 * too, but by a hash of their addresses, blind to how busy each thread is,
 * and a client waiting in the queue of a busy thread cannot be taken by an
 * idle one.) A thread that holds two pairs more than another hands the new
 * one over (relay_thread_choose()) through that thread's inbox: a list
 * under a mutex, and an eventfd that wakes its epoll_wait().
 *
 * Fairness. Relaying comes before handshakes: a TLS handshake step costs
 * far more CPU than moving a chat message, so in each pass through the
 * loop the events of other pairs are served first, and at most
 * HANDSHAKE_STEPS_PER_PASS handshake steps follow: first those of
 * handshakes under way, then new ones, so that a client waits in that
 * queue once per handshake, not twice. The others stay ready, and epoll
 * reports them again in the next pass. A flood of handshakes then delays
 * established connections by one pass, not by the flood.
 *
 * Ownership: a pair belongs to exactly one relay thread, and only that
 * thread touches it or its SSL object.
 */

/* The states of a pair: see the section comment. */
enum pair_state {
    PAIR_ACCEPTED,            /* just accepted: its first step starts now */
    PAIR_READING_HEADER,      /* the client's PROXY header */
    PAIR_HANDSHAKING,         /* the TLS handshake */
    PAIR_READING_FIRST_BYTES, /* the first bytes, for the decoy's choice */
    PAIR_CONNECTING,          /* a connect to the upstream is under way */
    PAIR_RETRY_WAIT,          /* a try failed; the next one starts soon */
    PAIR_RELAYING,            /* bytes move both ways */
    PAIR_HALF_CLOSED,         /* one flow has ended, the other goes on */
    PAIR_CLOSED               /* sockets closed; freed after this batch */
};

/* What a flow is doing. */
enum flow_state {
    FLOW_OPEN,   /* bytes may come */
    FLOW_ENDING, /* the source has ended; pass the end on */
    FLOW_ENDED   /* the end has been passed on; nothing more goes this way */
};

/* What one look, write or end on a side did. */
enum io_status {
    IO_DONE,    /* some or all bytes moved */
    IO_BLOCKED, /* nothing more now; wait for the events it names */
    IO_END,     /* (look only) the peer has ended its sending */
    IO_ERROR    /* the connection is broken */
};

struct relay_pair;

/* One socket of a pair, or (with no pair) a listening socket. */
struct relay_side {
    int fd;
    SSL *tls;                /* TLS on the client side, or NULL */
    struct relay_pair *pair; /* the pair this side belongs to */
    uint32_t watched_events; /* what epoll watches on fd now */
    bool in_epoll;           /* false after a hang-up (see relay_on_event) */
    bool hung_up;            /* the peer ended both ways: read to the end */
};

/* Bytes moving one way, from one side to the other. */
struct relay_flow {
    struct relay_side *from;
    struct relay_side *to;
    enum flow_state state;
    struct relay_side *waiting_on; /* the side whose readiness we wait for */
    uint32_t waiting_events;       /* EPOLLIN or EPOLLOUT on waiting_on */
    enum counter byte_counter;     /* where the moved bytes are counted */
};

/* One client connection in a relay thread: 208 bytes while open. */
struct relay_pair {
    enum pair_state state;
    struct relay_side client;
    struct relay_side upstream;     /* fd -1 until a connect starts */
    struct relay_flow to_upstream;
    struct relay_flow to_client;
    struct opening *opening;        /* until connected, else NULL (9) */
    struct listener *listener;
    struct per_ip *per_ip;      /* with --max-per-ip, the client's address */
    long long last_active_ms;   /* now_ms() of the last activity */
    struct pair_list *timer;    /* the list that times it, or NULL */
    struct relay_pair *newer;   /* neighbours in that list; `older` also */
    struct relay_pair *older;   /* links the inbox and the closed pairs */
};

/* A doubly linked list of pairs, most recently active first. */
struct pair_list {
    struct relay_pair *newest;
    struct relay_pair *oldest;
    int timeout_ms;             /* how long its pairs may stay inactive */
    enum counter expired;       /* where a timed-out pair is counted (none
                                   for connects and retries: they go on) */
};

/* The timeouts that time a pair, one list each (see "Timers"). */
enum timer {
    TIMER_HANDSHAKE, /* the first steps: --timeout-handshake from accept */
    TIMER_CONNECT,   /* a connect under way: --timeout-connect */
    TIMER_RETRY,     /* the wait before the next try: UPSTREAM_RETRY_DELAY_MS */
    TIMER_IDLE,      /* relaying: --timeout-idle */
    TIMER_FIN,       /* half-closed, its source silent: --timeout-fin */
    TIMER_COUNT
};

struct relay_thread {
    pthread_t thread;
    int epoll_fd;
    int wake_fd;                  /* eventfd: the inbox has pairs, or stop */
    uint8_t *scratch;             /* RELAY_SCRATCH_BYTES, for every flow */

    atomic_uint pairs_now;        /* its pairs: see relay_thread_choose() */

    pthread_mutex_t inbox_lock;   /* guards the two fields below */
    struct relay_pair *inbox;     /* handed-over pairs, linked by `older` */
    bool stop;                    /* close everything and end */

    /* Owned by the thread alone: */
    struct relay_side listening[MAX_LISTENERS]; /* see relay_accept() */
    bool listeners_watched;       /* false during a rest from accepting */
    struct pair_list timers[TIMER_COUNT]; /* every pair is in one of them */
    struct relay_pair *closed_pairs;      /* to free after this epoll batch */
};

/* Links pair in front of list (it must not be in a list), as active at now. */
static void pair_list_push(struct pair_list *list, struct relay_pair *pair,
                           long long now)
{
    pair->timer = list;
    pair->last_active_ms = now;
    pair->newer = NULL;
    pair->older = list->newest;
    if (list->newest != NULL)
        list->newest->newer = pair;
    list->newest = pair;
    if (list->oldest == NULL)
        list->oldest = pair;
}

/* Unlinks pair from the list that times it, if any. */
static void pair_list_remove(struct relay_pair *pair)
{
    struct pair_list *list = pair->timer;
    if (list == NULL)
        return;
    if (pair->newer != NULL)
        pair->newer->older = pair->older;
    else
        list->newest = pair->older;
    if (pair->older != NULL)
        pair->older->newer = pair->newer;
    else
        list->oldest = pair->newer;
    pair->timer = NULL;
    pair->newer = pair->older = NULL;
}

/* Moves pair to the front of list, as active at now. */
static void pair_list_move(struct pair_list *list, struct relay_pair *pair,
                           long long now)
{
    pair_list_remove(pair);
    pair_list_push(list, pair, now);
}

/* Makes the pair for a newly accepted client of listener, whose addresses
 * (for our PROXY header and the log) are known. */
static struct relay_pair *pair_new(struct listener *listener, int client_fd,
                                   const struct proxy_addresses *addresses,
                                   struct per_ip *per_ip)
{
    struct relay_pair *pair = xcalloc(1, sizeof *pair);
    pair->listener = listener;
    pair->per_ip = per_ip;
    pair->client = (struct relay_side){.fd = client_fd, .pair = pair};
    pair->upstream = (struct relay_side){.fd = -1, .pair = pair};
    size_t room = opening_room(&listener->spec);
    pair->opening = xcalloc(1, sizeof *pair->opening + room);
    pair->opening->heard_room = room;
    pair->opening->addresses = *addresses;
    pair->opening->destination =
        listener->spec.media ? TO_MEDIA_SERVER : TO_CHAT_SERVERS;
    pair->to_upstream = (struct relay_flow){
        .from = &pair->client, .to = &pair->upstream,
        .byte_counter = COUNTER_BYTES_FROM_CLIENTS};
    pair->to_client = (struct relay_flow){
        .from = &pair->upstream, .to = &pair->client,
        .byte_counter = COUNTER_BYTES_TO_CLIENTS};
    return pair;
}

/* Chooses the relay thread for a new pair and counts the pair for it. The
 * relay thread that accepted the client (asking) keeps it, with no hand-over,
 * unless another holds at least two pairs fewer. Without this, the thread that
 * happens to wake for a burst of new clients could take them all, and 8 bulk
 * transfers on one thread move half as much. Handing over at any difference
 * would cost a hand-over for every other client when the threads are even. */
static struct relay_thread *relay_thread_choose(struct relay_thread *asking)
{
    struct relay_thread *chosen = asking;
    unsigned mine = atomic_load(&asking->pairs_now);
    unsigned fewest = mine > 0 ? mine - 1 : 0; /* another must hold fewer */
    for (unsigned i = 0; i < state.relay_thread_count; i++) {
        struct relay_thread *thread = &state.relay_threads[i];
        unsigned pairs = atomic_load(&thread->pairs_now);
        if (pairs < fewest) {
            chosen = thread;
            fewest = pairs;
        }
    }
    atomic_fetch_add(&chosen->pairs_now, 1);
    return chosen;
}

/* Hands pair to another relay thread through its inbox, and wakes it.
 * Takes that thread's inbox_lock. */
static void relay_inbox_push(struct relay_thread *thread,
                             struct relay_pair *pair)
{
    pthread_mutex_lock(&thread->inbox_lock);
    /* A non-empty inbox has woken the thread already, and it has yet to
     * take it: one wake-up will do for both. */
    bool wake = thread->inbox == NULL;
    pair->older = thread->inbox;
    thread->inbox = pair;
    pthread_mutex_unlock(&thread->inbox_lock);
    if (wake)
        eventfd_write(thread->wake_fd, 1);
}

/* Turns OpenSSL's verdict on a failed call on side into ours; on
 * IO_BLOCKED *wait is the event it waits for. */
static enum io_status side_tls_status(struct relay_side *side, uint32_t *wait)
{
    switch (SSL_get_error(side->tls, 0)) {
    case SSL_ERROR_WANT_READ:
        *wait = EPOLLIN;
        return IO_BLOCKED;
    case SSL_ERROR_WANT_WRITE:
        *wait = EPOLLOUT;
        return IO_BLOCKED;
    case SSL_ERROR_ZERO_RETURN: /* close_notify, or TCP FIN (see section 5) */
        return IO_END;
    default:
        return IO_ERROR;
    }
}

/* Copies up to capacity of the bytes that side has received into buffer,
 * without taking them: side_take() takes them. On IO_DONE *seen is the
 * count; on IO_BLOCKED *wait is the epoll event to wait for. On TLS, one
 * look sees at most one record (16 KiB): the rest waits in OpenSSL. */
static enum io_status side_look(struct relay_side *side, uint8_t *buffer,
                                size_t capacity, size_t *seen, uint32_t *wait)
{
    *wait = EPOLLIN;
    if (side->tls == NULL) {
        ssize_t count = recv(side->fd, buffer, capacity, MSG_PEEK);
        if (count > 0) {
            *seen = (size_t)count;
            return IO_DONE;
        }
        if (count == 0)
            return IO_END;
        return errno == EAGAIN || errno == EINTR ? IO_BLOCKED : IO_ERROR;
    }
    ERR_clear_error(); /* SSL_get_error() reads this thread's queue */
    if (SSL_peek_ex(side->tls, buffer, capacity, seen) == 1)
        return IO_DONE;
    return side_tls_status(side, wait);
}

/* Takes count bytes that side_look() has seen: they leave the socket (or
 * OpenSSL) for good. scratch may be overwritten. Cannot fail: the bytes
 * are there already. */
static void side_take(struct relay_side *side, uint8_t *scratch, size_t count)
{
    size_t taken = 0;
    if (side->tls == NULL) {
        /* On TCP, MSG_TRUNC drops the bytes without copying them. */
        ssize_t dropped = recv(side->fd, scratch, count, MSG_TRUNC);
        taken = dropped > 0 ? (size_t)dropped : 0;
    } else {
        SSL_read_ex(side->tls, scratch, count, &taken);
    }
    assert(taken == count);
    (void)taken;
}

/* Writes buffer[0..length) to side. *sent says how many bytes went; on
 * IO_BLOCKED the rest must be written again later (the same bytes, which
 * OpenSSL requires after a WANT_WRITE), when *wait is ready. */
static enum io_status side_write_now(struct relay_side *side,
                                     const uint8_t *buffer, size_t length,
                                     size_t *sent, uint32_t *wait)
{
    *sent = 0;
    *wait = EPOLLOUT;
    while (*sent < length) {
        size_t count = 0;
        if (side->tls == NULL) {
            ssize_t written = send(side->fd, buffer + *sent, length - *sent,
                                   MSG_NOSIGNAL);
            if (written < 0 && (errno == EAGAIN || errno == EINTR))
                return IO_BLOCKED;
            if (written < 0)
                return IO_ERROR;
            count = (size_t)written;
        } else {
            ERR_clear_error();
            if (SSL_write_ex(side->tls, buffer + *sent, length - *sent,
                             &count) != 1)
                return side_tls_status(side, wait) == IO_BLOCKED
                           ? IO_BLOCKED : IO_ERROR;
        }
        *sent += count;
    }
    return IO_DONE;
}

/* The same as side_write_now(), but a TLS write of many records is
 * "corked": OpenSSL writes each 16 KiB record with its own write(), and
 * TCP_CORK makes the kernel hold them until the cork is pulled, then send
 * them as a few large packets. Without it every record is a packet of its
 * own, and the phone (or, on loopback, the receiving process) is woken for
 * each one. Chat messages are much smaller than a record: not corked. */
static enum io_status side_write(struct relay_side *side, const uint8_t *buffer,
                                 size_t length, size_t *sent, uint32_t *wait)
{
    int cork = side->tls != NULL && length > TLS_RECORD_BYTES;
    if (cork)
        setsockopt(side->fd, IPPROTO_TCP, TCP_CORK, &cork, sizeof cork);
    enum io_status status = side_write_now(side, buffer, length, sent, wait);
    if (cork) {
        int pulled = 0;
        setsockopt(side->fd, IPPROTO_TCP, TCP_CORK, &pulled, sizeof pulled);
    }
    return status;
}

/* Ends the sending half of side: TLS close_notify (if TLS), then TCP FIN.
 * The reading half stays open. */
static enum io_status side_end_sending(struct relay_side *side, uint32_t *wait)
{
    if (side->tls != NULL) {
        ERR_clear_error();
        int returned = SSL_shutdown(side->tls);
        if (returned < 0 &&
            SSL_get_error(side->tls, returned) == SSL_ERROR_WANT_WRITE) {
            *wait = EPOLLOUT;
            return IO_BLOCKED;
        }
        /* Other failures: the peer is gone, and the FIN below tells the
         * same story. */
    }
    shutdown(side->fd, SHUT_WR);
    return IO_DONE;
}

/* Records what flow waits for before it can go on. */
static void flow_wait(struct relay_flow *flow, struct relay_side *side,
                      uint32_t events)
{
    flow->waiting_on = side;
    flow->waiting_events = events;
}

/* Moves bytes along flow until one side would block, using scratch to carry
 * them: look at what the source holds, write it, take what was written (see
 * the section comment). Sets *moved if any byte moved. Returns the side that
 * broke (a reset or other error: the pair must be closed), or NULL. */
static struct relay_side *flow_pump(struct relay_flow *flow, uint8_t *scratch,
                                    bool *moved)
{
    size_t moved_this_turn = 0;
    bool source_emptied = false;
    uint32_t wait = 0;
    flow_wait(flow, NULL, 0);

    for (;;) {
        /* 1. The source has ended: pass the end on. */
        if (flow->state == FLOW_ENDING) {
            if (side_end_sending(flow->to, &wait) == IO_BLOCKED) {
                flow_wait(flow, flow->to, wait);
                return NULL;
            }
            flow->state = FLOW_ENDED;
        }
        if (flow->state == FLOW_ENDED)
            return NULL;

        /* 2. Stop for now after RELAY_TURN_BYTES (other pairs' turn), or
         * once a plain source gave less than asked for (it is empty; epoll
         * says when more comes). But bytes that no socket event would
         * announce must be moved now: those OpenSSL has decrypted already,
         * and those of a socket that has hung up, watched no more. */
        bool tls_holds_bytes =
            flow->from->tls != NULL && SSL_has_pending(flow->from->tls);
        if ((moved_this_turn >= RELAY_TURN_BYTES || source_emptied) &&
            !tls_holds_bytes && !flow->from->hung_up) {
            flow_wait(flow, flow->from, EPOLLIN);
            return NULL;
        }

        /* 3. Look, write, take what was written.
         * SHORTCUT: every byte is copied into our scratch buffer and out
         * again. On plain sides, splice() through a pipe would let the
         * kernel move them without the copy (tutorial.md, exercise
         * "splice() for plain ports"). */
        size_t seen;
        enum io_status status =
            side_look(flow->from, scratch, RELAY_SCRATCH_BYTES, &seen, &wait);
        if (status == IO_ERROR)
            return flow->from;
        if (status == IO_BLOCKED) {
            flow_wait(flow, flow->from, wait);
            return NULL;
        }
        if (status == IO_END) {
            flow->state = FLOW_ENDING;
            continue;
        }
        source_emptied = flow->from->tls == NULL && seen < RELAY_SCRATCH_BYTES;
        size_t sent;
        status = side_write(flow->to, scratch, seen, &sent, &wait);
        if (sent > 0) {
            side_take(flow->from, scratch, sent);
            counter_add(flow->byte_counter, sent);
            moved_this_turn += sent;
            *moved = true;
        }
        if (status == IO_ERROR)
            return flow->to;
        if (status == IO_BLOCKED) {
            flow_wait(flow, flow->to, wait); /* the rest stays in the source */
            return NULL;
        }
    }
}

/* What pair waits for on side now, from its state: the events epoll must
 * watch there. */
static uint32_t pair_wanted_events(const struct relay_pair *pair,
                                   const struct relay_side *side)
{
    bool client = side == &pair->client;
    switch (pair->state) {
    case PAIR_ACCEPTED:
    case PAIR_READING_HEADER:
    case PAIR_HANDSHAKING:
    case PAIR_READING_FIRST_BYTES:
        return client ? pair->opening->client_wait : 0;
    case PAIR_CONNECTING:
        return client ? 0 : EPOLLOUT;
    case PAIR_RETRY_WAIT:
        return 0;
    case PAIR_RELAYING:
    case PAIR_HALF_CLOSED: {
        uint32_t wanted = 0;
        if (pair->to_upstream.waiting_on == side)
            wanted |= pair->to_upstream.waiting_events;
        if (pair->to_client.waiting_on == side)
            wanted |= pair->to_client.waiting_events;
        return wanted;
    }
    case PAIR_CLOSED:
        break;
    }
    return 0;
}

/* Asks epoll to watch on each side of pair exactly what the pair waits
 * for there. Calls epoll_ctl() only when that changes. */
static void relay_watch(struct relay_thread *thread, struct relay_pair *pair)
{
    struct relay_side *sides[2] = {&pair->client, &pair->upstream};
    for (size_t i = 0; i < 2; i++) {
        struct relay_side *side = sides[i];
        uint32_t wanted = pair_wanted_events(pair, side);
        if (!side->in_epoll || wanted == side->watched_events)
            continue;
        struct epoll_event event = {.events = wanted, .data.ptr = side};
        epoll_ctl(thread->epoll_fd, EPOLL_CTL_MOD, side->fd, &event);
        side->watched_events = wanted;
    }
}

/* Adds side's socket to the thread's epoll, watching what pair waits for
 * there. */
static void relay_watch_new(struct relay_thread *thread,
                            struct relay_side *side)
{
    side->watched_events = pair_wanted_events(side->pair, side);
    side->in_epoll = true;
    struct epoll_event event = {.events = side->watched_events,
                                .data.ptr = side};
    epoll_ctl(thread->epoll_fd, EPOLL_CTL_ADD, side->fd, &event);
}

/* How a pair ends, which decides what each side is told. An abort is passed on
 * as an abort, always, so that WhatsApp's servers can tell a phone that
 * vanished from one that said goodbye (HAProxy does so when it meets the reset
 * while reading, and sends a FIN otherwise; see tests/README.md, the
 * differential test); and a TLS client is always told with close_notify before
 * the FIN, the TLS way to say "this is the real end, not a cut connection". */
enum pair_end {
    END_FINISHED,       /* both flows ended: each side has had its FIN */
    END_CLIENT_BROKE,   /* reset or error on the client's side: the
                           upstream gets a reset (RST) */
    END_UPSTREAM_BROKE, /* reset or error on the upstream's side: the
                           client gets close_notify (TLS) and a FIN */
    END_TIMED_OUT       /* a timeout, the proxy stops, or it turns a
                           client away in its first steps: both sides get
                           close_notify (TLS) and a FIN, as a web server
                           closes */
};

/* How many bytes a clean close drops from a socket, at most, so that the
 * peer gets a FIN (see side_close()). */
#define CLOSE_DRAIN_BYTES (64 * 1024)

/* Closes side's socket as `end` says: with a reset (END_CLIENT_BROKE), or
 * else with close_notify first when TLS is up on it, and a FIN. Best
 * effort: a peer that cannot take the close_notify now does without. A
 * socket closed with bytes still unread in it sends RST instead of FIN, so
 * up to CLOSE_DRAIN_BYTES of them are dropped first: a client that has
 * sent a few bytes that no server will ever read still sees a clean end.
 * (A finished pair has read a plain socket to its end: none are left. TLS
 * ends at close_notify, and bytes may follow it.) Frees its SSL object. */
static void side_close(struct relay_side *side, enum pair_end end)
{
    if (side->fd < 0)
        return;
    if (end == END_CLIENT_BROKE) {
        /* A zero linger time makes close() send RST instead of FIN. */
        struct linger reset_now = {.l_onoff = 1, .l_linger = 0};
        setsockopt(side->fd, SOL_SOCKET, SO_LINGER, &reset_now,
                   sizeof reset_now);
    } else {
        if (side->tls != NULL && SSL_is_init_finished(side->tls)) {
            ERR_clear_error();
            SSL_shutdown(side->tls); /* sends close_notify once, if not yet */
        }
        uint8_t sink[4096];
        bool may_hold_bytes = end != END_FINISHED || side->tls != NULL;
        for (size_t dropped = 0; may_hold_bytes && dropped < CLOSE_DRAIN_BYTES;
             dropped += sizeof sink)
            if (recv(side->fd, sink, sizeof sink, MSG_TRUNC | MSG_DONTWAIT) <= 0)
                break; /* MSG_TRUNC: dropped without a copy */
    }
    SSL_free(side->tls); /* does not close fd: we do, here */
    side->tls = NULL;
    close(side->fd);     /* close() also removes fd from epoll */
    side->fd = -1;
}

/* Closes both sockets of pair as `end` says, and counts its end. The
 * memory is freed after the current epoll batch, which may still hold
 * events that point to it.
 * SHORTCUT: how long the connection lasted is not recorded; a histogram
 * of durations on the statistics page would show how clients behave
 * (tutorial.md, exercise "a connection-duration histogram"). */
static void relay_close(struct relay_thread *thread, struct relay_pair *pair,
                        enum pair_end end)
{
    pair_list_remove(pair);
    /* The broken side itself needs no goodbye: it cannot hear one. */
    side_close(&pair->client, end);
    side_close(&pair->upstream, end);
    free(pair->opening);
    pair->opening = NULL;
    atomic_fetch_sub(&thread->pairs_now, 1);
    per_ip_release(pair->per_ip);
    connection_ended(pair->listener);
    pair->state = PAIR_CLOSED;
    pair->older = thread->closed_pairs;
    thread->closed_pairs = pair;
}

/* Closes pair because `broken`, one of its sides, failed, and counts it. */
static void relay_close_broken(struct relay_thread *thread,
                               struct relay_pair *pair,
                               const struct relay_side *broken)
{
    counter_add(COUNTER_RELAY_ERROR, 1);
    relay_close(thread, pair, broken == &pair->client ? END_CLIENT_BROKE
                                                      : END_UPSTREAM_BROKE);
}

/* Closes a pair in its first steps: the client did not say what it had to
 * (what says why; counted in which, unless which is COUNTER_COUNT). */
static void relay_close_opening(struct relay_thread *thread,
                                struct relay_pair *pair, enum counter which,
                                const char *what)
{
    if (which != COUNTER_COUNT)
        counter_add(which, 1);
    client_log(pair->listener, &pair->opening->addresses, LOG_DEBUG, what);
    relay_close(thread, pair, END_TIMED_OUT);
}

/* Moves what can be moved on pair, then decides its fate: closed (error,
 * or both flows ended), or kept in the list whose timeout fits what it
 * waits for, at the front if anything moved. Updates what epoll watches.
 * Only the flows that wait on `woken`, the side epoll reported, can move
 * (NULL: try both): a flow waiting on the other side would find it as
 * blocked as before, at the cost of a system call.
 *
 * Which timeout? A half-closed pair whose open flow waits for its source
 * to say more is timed by --timeout-fin: that bounds a silence. But one
 * whose open flow has bytes waiting for a slow reader (it waits on its
 * destination) is timed by --timeout-idle like an open pair: closing it
 * sooner would drop those bytes, though both ends would see a clean end. */
static void relay_service(struct relay_thread *thread, struct relay_pair *pair,
                          const struct relay_side *woken, long long now)
{
    bool moved = false;
    struct relay_side *broken = NULL;
    struct relay_flow *flows[2] = {&pair->to_upstream, &pair->to_client};
    for (size_t i = 0; i < 2 && broken == NULL; i++)
        if (woken == NULL || flows[i]->waiting_on == woken)
            broken = flow_pump(flows[i], thread->scratch, &moved);
    if (broken != NULL) {
        relay_close_broken(thread, pair, broken);
        return;
    }
    bool upstream_ended = pair->to_upstream.state == FLOW_ENDED;
    bool client_ended = pair->to_client.state == FLOW_ENDED;
    if (upstream_ended && client_ended) {
        relay_close(thread, pair, END_FINISHED);
        return;
    }
    if (upstream_ended || client_ended)
        pair->state = PAIR_HALF_CLOSED;
    struct relay_flow *open_flow = upstream_ended ? &pair->to_client
                                                  : &pair->to_upstream;
    bool waits_for_silence = pair->state == PAIR_HALF_CLOSED &&
                             open_flow->waiting_on != open_flow->to;
    struct pair_list *list =
        &thread->timers[waits_for_silence ? TIMER_FIN : TIMER_IDLE];
    if (moved || pair->timer != list)
        pair_list_move(list, pair, now);
    relay_watch(thread, pair);
}

/* Starts connecting pair to the next server worth trying, and watches the
 * new socket until it turns writable. With no server left, counts the
 * client as unreachable and closes the pair; when that is our own shortage
 * (no descriptor for the socket), every thread also rests from accepting
 * (section 8), wherever the try was started. */
static void relay_connect_next(struct relay_thread *thread,
                               struct relay_pair *pair, long long now)
{
    struct opening *opening = pair->opening;
    int fd = upstream_attempt_next(&opening->attempts);
    if (fd < 0) {
        int failure = errno;
        counter_add(COUNTER_UPSTREAM_UNREACHABLE, 1);
        client_log(pair->listener, &opening->addresses, LOG_WARN,
                   "no server reachable; closing it");
        relay_close(thread, pair, END_UPSTREAM_BROKE);
        if (out_of_descriptors(failure))
            accept_rest_begin(failure);
        return;
    }
    pair->upstream.fd = fd;
    relay_watch_new(thread, &pair->upstream);
    pair_list_move(&thread->timers[TIMER_CONNECT], pair, now);
}

/* The connect of pair's upstream failed (and was recorded): closes that
 * socket, and tries again, at once after a timeout (at_once), else after
 * UPSTREAM_RETRY_DELAY_MS (section 6). */
static void relay_connect_failed(struct relay_thread *thread,
                                 struct relay_pair *pair, bool at_once,
                                 long long now)
{
    close(pair->upstream.fd);
    pair->upstream.fd = -1;
    pair->upstream.in_epoll = false;
    if (at_once || !upstream_attempts_left(&pair->opening->attempts)) {
        relay_connect_next(thread, pair, now);
        return;
    }
    pair->state = PAIR_RETRY_WAIT;
    pair_list_move(&thread->timers[TIMER_RETRY], pair, now);
}

/* The most bytes of a client sent in one go with our PROXY header. A WhatsApp
 * client's first message is a few hundred bytes, and a new connection's send
 * buffer (16 KiB or more, and empty) takes this much in one call. */
#define FIRST_BYTES_WITH_HEADER 4096

/* Sends what must reach pair's new upstream before the relaying starts:
 * our PROXY header (to chat servers, in the version of --send-proxy; to
 * the decoy, in that of --decoy-send-proxy, so that the site learns who
 * is asking), and the client's first bytes right behind it: those heard
 * already (section 9), or else those waiting in the client's socket,
 * which are looked at and taken only once they are sent. One send(), so
 * the server gets the header and what follows in one TCP segment instead
 * of two, and wakes once for both: one packet fewer for every new client.
 * Returns false if the connection is broken. */
static bool relay_send_opening(struct relay_thread *thread,
                               struct relay_pair *pair)
{
    struct opening *opening = pair->opening;
    uint8_t *out = thread->scratch;
    size_t length = 0;
    if (opening->destination == TO_CHAT_SERVERS)
        length = proxyhdr_encode(state.settings->send_proxy,
                                 &opening->addresses, out);
    else if (opening->destination == TO_DECOY)
        length = proxyhdr_encode(state.settings->decoy_send_proxy,
                                 &opening->addresses, out);
    size_t first = opening->heard_length;
    memcpy(out + length, opening->heard, first);
    size_t peeked = 0;
    uint32_t unused;
    if (first == 0 && length > 0 &&
        side_look(&pair->client, out + length, FIRST_BYTES_WITH_HEADER,
                  &peeked, &unused) == IO_DONE)
        first = peeked;
    if (length + first == 0)
        return true;
    /* The send buffer is empty, so a short count means a broken connection. */
    if (send(pair->upstream.fd, out, length + first, MSG_NOSIGNAL) !=
        (ssize_t)(length + first))
        return false;
    if (peeked > 0)
        side_take(&pair->client, out, peeked);
    counter_add(COUNTER_BYTES_FROM_CLIENTS, first);
    return true;
}

/* The upstream of pair is connected: sends what must go first, then
 * starts relaying, both sides watched for reading, and the bytes that no
 * socket event will announce (held decrypted by OpenSSL) moved at once. */
static void relay_connected(struct relay_thread *thread,
                            struct relay_pair *pair, long long now)
{
    struct opening *opening = pair->opening;
    if (!relay_send_opening(thread, pair)) {
        relay_close_broken(thread, pair, &pair->upstream);
        return;
    }
    counter_add(opening->destination == TO_DECOY
                    ? COUNTER_DECOYED : COUNTER_CONNECTIONS_RELAYED, 1);
    free(opening);
    pair->opening = NULL;
    pair->state = PAIR_RELAYING;
    flow_wait(&pair->to_upstream, &pair->client, EPOLLIN);
    flow_wait(&pair->to_client, &pair->upstream, EPOLLIN);
    pair_list_move(&thread->timers[TIMER_IDLE], pair, now);
    if (pair->client.tls != NULL && SSL_has_pending(pair->client.tls))
        relay_service(thread, pair, NULL, now);
    else
        relay_watch(thread, pair);
}

/* The step that follows `done` for pair: the next one its port and the
 * settings need, in the order of the section comment; CONNECTING when
 * none is left. */
static enum pair_state pair_step_after(const struct relay_pair *pair,
                                       enum pair_state done)
{
    const struct listener_spec *spec = &pair->listener->spec;
    switch (done) {
    case PAIR_ACCEPTED:
        if (spec->accept_proxy)
            return PAIR_READING_HEADER;
        /* fall through */
    case PAIR_READING_HEADER:
        if (spec->tls)
            return PAIR_HANDSHAKING;
        /* fall through */
    case PAIR_HANDSHAKING:
        if (state.settings->decoy_enabled && !spec->media)
            return PAIR_READING_FIRST_BYTES;
        /* fall through */
    default:
        return PAIR_CONNECTING;
    }
}

static void pair_read_header(struct relay_thread *thread,
                             struct relay_pair *pair, long long now);
static void pair_read_first_bytes(struct relay_thread *thread,
                                  struct relay_pair *pair, long long now);

/* Moves pair on from the step `done` to the next one, and starts it:
 * what it waits for, and its first try where the bytes it needs have
 * probably arrived already. Our own shortage on the way (no descriptor for
 * the upstream, no memory for an SSL object) closes the pair and makes
 * every thread rest from accepting (section 8). */
static void pair_step_on(struct relay_thread *thread, struct relay_pair *pair,
                         enum pair_state done, long long now)
{
    struct opening *opening = pair->opening;
    pair->state = pair_step_after(pair, done);
    opening->client_wait = EPOLLIN;
    switch (pair->state) {
    case PAIR_READING_HEADER:
        pair_read_header(thread, pair, now);
        return;
    case PAIR_HANDSHAKING:
        /* Not stepped here: epoll reports the hello at once, and the
         * costly steps of a burst of new clients then wait behind other
         * clients' events ("Fairness"). No SSL object until the hello is
         * whole (pair_await_hello()): a silent client costs none. */
        relay_watch(thread, pair);
        return;
    case PAIR_READING_FIRST_BYTES:
        /* --sni: a TLS client that asks for another name goes to the decoy
         * without a word read. */
        if (pair->client.tls != NULL && state.settings->sni_count > 0 &&
            !tls_server_name_listed(SSL_get_servername(
                pair->client.tls, TLSEXT_NAMETYPE_host_name))) {
            opening->destination = TO_DECOY;
            pair_step_on(thread, pair, PAIR_READING_FIRST_BYTES, now);
            return;
        }
        pair_read_first_bytes(thread, pair, now);
        return;
    default:
        break;
    }
    /* PAIR_CONNECTING. SHORTCUT: a media client goes to the one media server
     * whatever name it asks for in its TLS ClientHello; reading that name
     * (SNI) and allowing only WhatsApp's media hosts would be stricter
     * (tutorial.md, exercise "an allow-list of media host names"). */
    if (opening->destination == TO_CHAT_SERVERS)
        upstream_attempts_begin(&opening->attempts, state.chat_upstreams,
                                state.settings->chat_upstream_count);
    else if (opening->destination == TO_MEDIA_SERVER)
        upstream_attempts_begin(&opening->attempts, state.media_upstream, 1);
    else {
        /* The decoy: with --decoy-tls-port, what a client of a TLS port
         * sent before any TLS goes to the site's own TLS port (9). */
        bool before_tls = pair->listener->spec.tls &&
                          pair->client.tls == NULL &&
                          decoy_count(state.settings) == 2;
        upstream_attempts_begin(&opening->attempts,
                                &state.decoy_upstreams[before_tls ? 1 : 0], 1);
    }
    relay_watch(thread, pair); /* nothing more on the client meanwhile */
    relay_connect_next(thread, pair, now);
}

/* Step 1, on what has arrived: the PROXY header (section 9). With
 * --max-per-ip, the address it carries is counted at once. */
static void pair_read_header(struct relay_thread *thread,
                             struct relay_pair *pair, long long now)
{
    struct opening *opening = pair->opening;
    size_t seen;
    uint32_t wait;
    enum io_status status =
        side_look(&pair->client, opening->heard + opening->heard_length,
                  opening->heard_room - opening->heard_length, &seen, &wait);
    if (status == IO_BLOCKED) {
        relay_watch(thread, pair);
        return;
    }
    bool complete = false;
    int belongs = status == IO_DONE
                      ? opening_hear_header(opening, seen, &complete) : -1;
    if (belongs < 0) {
        relay_close_opening(thread, pair, COUNTER_BAD_PROXY_HEADER,
                            "bad PROXY header");
        return;
    }
    side_take(&pair->client, thread->scratch, (size_t)belongs);
    if (!complete) {
        relay_watch(thread, pair);
        return;
    }
    if (state.settings->max_per_ip > 0) {
        pair->per_ip = per_ip_take(&opening->addresses.source);
        if (pair->per_ip == NULL) {
            relay_close_opening(thread, pair, COUNTER_REJECTED_PER_IP,
                                "over --max-per-ip");
            return;
        }
    }
    pair_step_on(thread, pair, PAIR_READING_HEADER, now);
}

/* Sets how many bytes side's socket must hold before epoll reports it readable
 * (SO_RCVLOWAT; 1 is the normal), so that a step waiting for a whole record is
 * not woken for each piece of it. A FIN or an error wakes it anyway. */
static void side_wake_at(struct relay_side *side, int bytes)
{
    setsockopt(side->fd, SOL_SOCKET, SO_RCVLOWAT, &bytes, sizeof bytes);
}

/* The wait for the whole hello is over: the client's socket wakes its
 * relay thread for every byte again. */
static void pair_hello_wait_ends(struct relay_pair *pair)
{
    if (pair->opening->hello_needed > 1)
        side_wake_at(&pair->client, 1);
    pair->opening->hello_needed = 0;
}

/* A client of a TLS port that is not speaking TLS, or that stopped (or was too
 * slow) before its hello was whole, still has every byte it sent in its
 * socket. With a decoy it goes there, bytes and all (to the site's own TLS
 * port with --decoy-tls-port), so a prober that sent plain HTTP to an HTTPS
 * port gets the site's own answer; without a decoy it is closed and counted as
 * a failed handshake. (A made-up error page would claim a web site that is not
 * there; closing is what a TLS-only server does.) */
static void pair_hello_failed(struct relay_thread *thread,
                              struct relay_pair *pair, const char *what,
                              long long now)
{
    pair_hello_wait_ends(pair);
    if (!state.settings->decoy_enabled) {
        relay_close_opening(thread, pair, COUNTER_TLS_HANDSHAKE_FAILED, what);
        return;
    }
    pair->opening->destination = TO_DECOY;
    pair_step_on(thread, pair, PAIR_READING_FIRST_BYTES, now); /* connect */
}

/* Step 2, first half, on what has arrived: the client's first TLS record,
 * its hello, is awaited whole in the socket, looked at and not taken
 * (section 9 explains looking without taking). Only then is the SSL object
 * made, so a silent client costs none, and a client that is not TLS, or
 * stops halfway, can still be handed to the decoy with what it sent. */
static void pair_await_hello(struct relay_thread *thread,
                             struct relay_pair *pair, long long now)
{
    struct opening *opening = pair->opening;
    size_t seen = 0;
    uint32_t wait;
    enum io_status status =
        side_look(&pair->client, thread->scratch,
                  TLS_RECORD_HEADER_BYTES + TLS_RECORD_MAX_BYTES, &seen, &wait);
    if (status == IO_BLOCKED) {
        relay_watch(thread, pair);
        return;
    }
    if (status != IO_DONE) {
        relay_close_opening(thread, pair, COUNTER_COUNT,
                            "closed before its TLS hello");
        return;
    }
    int needed = 0;
    enum hello_verdict verdict = tls_hello_look(thread->scratch, seen, &needed);
    if (verdict == HELLO_NOT_TLS) {
        pair_hello_failed(thread, pair, "not TLS on a TLS port", now);
        return;
    }
    if (verdict == HELLO_NEED_MORE) {
        /* Woken while it waited for this very count: a FIN or an error
         * came instead of the rest. */
        if (opening->hello_needed == needed) {
            pair_hello_failed(thread, pair, "stopped within its TLS hello",
                              now);
            return;
        }
        opening->hello_needed = needed;
        side_wake_at(&pair->client, needed);
        relay_watch(thread, pair);
        return;
    }
    pair_hello_wait_ends(pair);
    pair->client.tls = tls_new(pair->client.fd);
    if (pair->client.tls == NULL) {
        relay_close_opening(thread, pair, COUNTER_TLS_HANDSHAKE_FAILED,
                            "no memory for TLS");
        accept_rest_begin(ENOMEM);
        return;
    }
    relay_watch(thread, pair); /* readable at once: the hello is there */
}

/* Step 2, one call further: the TLS handshake (section 5), once the
 * client's hello is whole. */
static void pair_handshake_step(struct relay_thread *thread,
                                struct relay_pair *pair, long long now)
{
    if (pair->client.tls == NULL) {
        pair_await_hello(thread, pair, now);
        return;
    }
    enum handshake_progress progress = tls_handshake_step(pair->client.tls);
    if (progress == HANDSHAKE_FAILED) {
        relay_close_opening(thread, pair, COUNTER_TLS_HANDSHAKE_FAILED,
                            "TLS handshake failed");
        return;
    }
    if (progress != HANDSHAKE_DONE) {
        pair->opening->client_wait =
            progress == HANDSHAKE_WANTS_READ ? EPOLLIN : EPOLLOUT;
        relay_watch(thread, pair);
        return;
    }
    pair_step_on(thread, pair, PAIR_HANDSHAKING, now);
}

/* Step 3, on what has arrived: the first bytes, for the decoy's choice
 * (section 9). */
static void pair_read_first_bytes(struct relay_thread *thread,
                                  struct relay_pair *pair, long long now)
{
    struct opening *opening = pair->opening;
    size_t seen;
    uint32_t wait;
    enum io_status status =
        side_look(&pair->client, opening->heard + opening->heard_length,
                  DECOY_FIRST_BYTES_MAX - opening->heard_length, &seen, &wait);
    if (status == IO_BLOCKED) {
        opening->client_wait = wait;
        relay_watch(thread, pair);
        return;
    }
    if (status != IO_DONE) {
        relay_close_opening(thread, pair, COUNTER_COUNT,
                            "closed before its first bytes");
        return;
    }
    side_take(&pair->client, thread->scratch, seen);
    if (!opening_hear_first_bytes(opening, seen)) {
        opening->client_wait = EPOLLIN;
        relay_watch(thread, pair);
        return;
    }
    pair_step_on(thread, pair, PAIR_READING_FIRST_BYTES, now);
}

/* Starts a new pair in this thread: its socket joins the thread's epoll,
 * and its first step begins (see pair_step_on()). */
static void relay_start(struct relay_thread *thread, struct relay_pair *pair,
                        long long now)
{
    pair_list_push(&thread->timers[TIMER_HANDSHAKE], pair, now);
    pair->opening->client_wait = 0;
    relay_watch_new(thread, &pair->client);
    pair_step_on(thread, pair, PAIR_ACCEPTED, now);
}

/* Starts (watch true) or stops watching this thread's listening sockets.
 * A listener is in thread->listening[] at the same index as in
 * state.listeners[]; a relay_side without a pair is a listening socket. */
static void relay_watch_listeners(struct relay_thread *thread, bool watch)
{
    for (size_t i = 0; i < state.listener_count; i++) {
        struct relay_side *listening = &thread->listening[i];
        if (listening->fd < 0)
            continue;
        struct epoll_event event = {.events = EPOLLIN | EPOLLEXCLUSIVE,
                                    .data.ptr = listening};
        epoll_ctl(thread->epoll_fd, watch ? EPOLL_CTL_ADD : EPOLL_CTL_DEL,
                  listening->fd, &event);
    }
}

/* Accepts up to ACCEPT_BATCH waiting clients of one listening socket and
 * starts each here or in a less busy thread (see the section comment).
 * Where the client's address is known now (no PROXY header to wait for),
 * --max-per-ip counts it at once. Out of descriptors, for the client or
 * for its upstream, accepting rests (section 8); a socket shut at stop is
 * watched no more. */
static void relay_accept(struct relay_thread *thread,
                         struct relay_side *listening, long long now)
{
    struct listener *listener =
        &state.listeners[listening - thread->listening];
    for (int i = 0; i < ACCEPT_BATCH && accept_rest_left(now) == 0; i++) {
        int fd;
        struct sockaddr_storage peer;
        enum accept_result result = client_accept(listener, &fd, &peer);
        if (result == NONE_WAITING)
            return;
        if (result == OUT_OF_FILES) {
            accept_rest_begin(errno);
            return;
        }
        if (result == LISTENER_SHUT) {
            epoll_ctl(thread->epoll_fd, EPOLL_CTL_DEL, listening->fd, NULL);
            listening->fd = -1;
            return;
        }
        if (result == REFUSED)
            continue;
        struct proxy_addresses addresses = {.known = true, .source = peer};
        socklen_t length = sizeof addresses.destination;
        getsockname(fd, (struct sockaddr *)&addresses.destination, &length);
        address_unmap_ipv4(&addresses.source);
        address_unmap_ipv4(&addresses.destination);
        if (listener->spec.accept_proxy && !address_trusted(&addresses.source)) {
            counter_add(COUNTER_REJECTED_UNTRUSTED, 1);
            close(fd);
            connection_ended(listener);
            continue;
        }
        struct per_ip *per_ip = NULL;
        if (state.settings->max_per_ip > 0 && !listener->spec.accept_proxy) {
            per_ip = per_ip_take(&addresses.source);
            if (per_ip == NULL) {
                counter_add(COUNTER_REJECTED_PER_IP, 1);
                close(fd);
                connection_ended(listener);
                continue;
            }
        }
        struct relay_pair *pair = pair_new(listener, fd, &addresses, per_ip);
        struct relay_thread *chosen = relay_thread_choose(thread);
        /* A start that runs out of descriptors begins a rest, which the
         * loop's condition sees. */
        if (chosen != thread)
            relay_inbox_push(chosen, pair);
        else
            relay_start(thread, pair, now);
    }
}

/* Handles epoll's report of events on side, as its pair's state says. */
static void relay_on_event(struct relay_thread *thread, struct relay_side *side,
                           uint32_t events, long long now)
{
    struct relay_pair *pair = side->pair;
    if (pair == NULL) {
        relay_accept(thread, side, now);
        return;
    }
    if (pair->state == PAIR_CLOSED)
        return; /* closed earlier in this batch */
    /* A client that resets or vanishes before its bytes flow: nothing is
     * left to do for it. (While relaying, its flows find out themselves.) */
    bool relaying = pair->state == PAIR_RELAYING ||
                    pair->state == PAIR_HALF_CLOSED;
    if (!relaying && side == &pair->client &&
        (events & (EPOLLERR | EPOLLHUP)) != 0) {
        relay_close_opening(thread, pair, COUNTER_COUNT,
                            "gone before its bytes could flow");
        return;
    }
    switch (pair->state) {
    case PAIR_READING_HEADER:
        pair_read_header(thread, pair, now);
        return;
    case PAIR_HANDSHAKING:
        pair_handshake_step(thread, pair, now);
        return;
    case PAIR_READING_FIRST_BYTES:
        pair_read_first_bytes(thread, pair, now);
        return;
    case PAIR_CONNECTING:
        if (side != &pair->upstream)
            return; /* the client is not watched meanwhile */
        if (upstream_attempt_ended(&pair->opening->attempts, side->fd, events))
            relay_connected(thread, pair, now);
        else
            relay_connect_failed(thread, pair, false, now);
        return;
    case PAIR_RETRY_WAIT:
        return; /* only the client is in epoll, and watched for nothing */
    default:
        break;
    }
    if (events & EPOLLERR) {
        relay_close_broken(thread, pair, side);
        return;
    }
    /* EPOLLHUP: both directions of that socket are shut, but bytes may
     * still wait in it, unread. It is reported even when we watch nothing,
     * so a pair waiting for its other side would be woken again and again:
     * take the socket out of epoll, and mark it hung up, so that its flow
     * reads it to the end without waiting for an event (flow_pump()). */
    if (events & EPOLLHUP)
        side->hung_up = true;
    relay_service(thread, pair, side, now);
    if (side->hung_up && pair->state != PAIR_CLOSED && side->in_epoll) {
        epoll_ctl(thread->epoll_fd, EPOLL_CTL_DEL, side->fd, NULL);
        side->in_epoll = false;
    }
}

/* Returns the earlier of two waits in milliseconds (-1: none). */
static int wait_earlier(int first_ms, int second_ms)
{
    if (first_ms < 0 || (second_ms >= 0 && second_ms < first_ms))
        return second_ms;
    return first_ms;
}

/* Does what the state of pair calls for when its timer has run out (see
 * "Timers"): the next try of a connect, or else the end of the pair, counted
 * in the list's counter. But with a decoy, a client that has not shown what it
 * is (its TLS hello is not whole, or its first bytes do not decide) goes to
 * the decoy with what it sent, as to a web server, which waits longer: a
 * scanner then sees the site's own patience, not a proxy's timeout. */
static void pair_timed_out(struct relay_thread *thread,
                           struct relay_pair *pair, long long now)
{
    bool undecided = pair->state == PAIR_READING_FIRST_BYTES ||
                     (pair->state == PAIR_HANDSHAKING &&
                      pair->client.tls == NULL);
    if (pair->state == PAIR_CONNECTING) {
        upstream_attempt_failed(&pair->opening->attempts,
                                strerror(ETIMEDOUT));
        relay_connect_failed(thread, pair, true, now);
    } else if (pair->state == PAIR_RETRY_WAIT) {
        pair->state = PAIR_CONNECTING;
        relay_connect_next(thread, pair, now);
    } else if (undecided && state.settings->decoy_enabled) {
        pair_hello_failed(thread, pair, "undecided at the timeout", now);
    } else {
        counter_add(pair->timer->expired, 1);
        relay_close(thread, pair, END_TIMED_OUT);
    }
}

/* Deals with every pair whose timer has run out: each leaves the back of
 * its list, closed or moved on, maybe to another list (a retry's wait
 * ends in a connect). Only then, every list settled, returns how long
 * epoll_wait() may sleep until the next one runs out (-1: none timed). */
static int relay_expire(struct relay_thread *thread, long long now)
{
    struct pair_list *timers = thread->timers;
    for (size_t i = 0; i < TIMER_COUNT; i++)
        while (timers[i].oldest != NULL &&
               timers[i].oldest->last_active_ms + timers[i].timeout_ms <= now)
            pair_timed_out(thread, timers[i].oldest, now);
    int sleep_ms = -1;
    for (size_t i = 0; i < TIMER_COUNT; i++)
        if (timers[i].oldest != NULL)
            sleep_ms = wait_earlier(sleep_ms,
                                    (int)(timers[i].oldest->last_active_ms +
                                          timers[i].timeout_ms - now));
    return sleep_ms;
}

/* Takes the pairs waiting in the inbox and starts them. Returns true if the
 * thread was asked to stop. */
static bool relay_take_inbox(struct relay_thread *thread, long long now)
{
    eventfd_t ignored;
    eventfd_read(thread->wake_fd, &ignored);

    pthread_mutex_lock(&thread->inbox_lock);
    struct relay_pair *arrived = thread->inbox;
    thread->inbox = NULL;
    bool stop = thread->stop;
    pthread_mutex_unlock(&thread->inbox_lock);

    while (arrived != NULL) {
        struct relay_pair *pair = arrived;
        arrived = pair->older;
        pair->older = NULL;
        relay_start(thread, pair, now);
    }
    return stop;
}

/* Frees the pairs closed during the last batch of events. */
static void relay_free_closed(struct relay_thread *thread)
{
    while (thread->closed_pairs != NULL) {
        struct relay_pair *pair = thread->closed_pairs;
        thread->closed_pairs = pair->older;
        free(pair);
    }
}

/* Stops watching the listening sockets while a rest from accepting lasts
 * (section 8), and watches them again after it. Returns how many
 * milliseconds the rest still lasts, or -1 if there is none. */
static int relay_accept_rest(struct relay_thread *thread, long long now)
{
    int left = accept_rest_left(now);
    bool watch = left == 0;
    if (watch != thread->listeners_watched) {
        relay_watch_listeners(thread, watch);
        thread->listeners_watched = watch;
    }
    return watch ? -1 : left;
}

/* When a pass of the event loop serves an event ("Fairness"): at once, or
 * else as one of at most HANDSHAKE_STEPS_PER_PASS handshake steps, those of
 * handshakes under way before new ones. A step of an ECDSA P-256 handshake
 * costs 0.1 to 0.3 ms, which an established connection may wait per step. */
#define HANDSHAKE_STEPS_PER_PASS 4
enum turn { TURN_AT_ONCE, TURN_HANDSHAKE_BEGUN, TURN_HANDSHAKE_NEW };

static enum turn event_turn(const struct relay_side *side)
{
    const struct relay_pair *pair = side != NULL ? side->pair : NULL;
    if (pair == NULL || pair->state != PAIR_HANDSHAKING)
        return TURN_AT_ONCE;
    return tls_handshake_begun(pair->client.tls) ? TURN_HANDSHAKE_BEGUN
                                                 : TURN_HANDSHAKE_NEW;
}

/* The body of a relay thread: wait for events, serve them (handshakes
 * last), expire what timed out; at stop, close every pair. */
static void *relay_thread_run(void *argument)
{
    struct relay_thread *thread = argument;
    struct epoll_event events[64];
    bool stop = false;

    while (!stop) {
        long long before = now_ms();
        int sleep_ms = wait_earlier(relay_expire(thread, before),
                                    relay_accept_rest(thread, before));
        int ready = epoll_wait(thread->epoll_fd, events, ARRAY_LENGTH(events),
                               sleep_ms);
        long long now = now_ms();
        enum turn turn[ARRAY_LENGTH(events)];
        for (int i = 0; i < ready; i++) {
            struct relay_side *side = events[i].data.ptr;
            turn[i] = event_turn(side);
            if (side == NULL)
                stop = relay_take_inbox(thread, now);
            else if (turn[i] == TURN_AT_ONCE)
                relay_on_event(thread, side, events[i].events, now);
        }
        int steps = 0;
        for (enum turn t = TURN_HANDSHAKE_BEGUN; t <= TURN_HANDSHAKE_NEW; t++)
            for (int i = 0; i < ready && steps < HANDSHAKE_STEPS_PER_PASS; i++)
                if (turn[i] == t) {
                    relay_on_event(thread, events[i].data.ptr,
                                   events[i].events, now);
                    steps++;
                }
        relay_free_closed(thread);
    }

    for (size_t i = 0; i < TIMER_COUNT; i++)
        while (thread->timers[i].oldest != NULL)
            relay_close(thread, thread->timers[i].oldest, END_TIMED_OUT);
    relay_free_closed(thread);
    return NULL;
}

/* ==== 11. Check summary ==== */

/*
 * `whatsapp_proxy --check` answers a volunteer's two questions before going
 * live: "are my settings right?" and "what do I tell my users?". It parses
 * everything, binds each port for a moment and lets it go, makes or loads
 * the certificate, resolves every upstream, and prints the fields to type
 * into the app (Settings > Storage and data > Proxy), a share link and, on
 * a terminal where the qrencode program is installed, a QR code of it. Each thing that would
 * stop a start, or leave users without chat or media, is a PROBLEM line
 * with its fix; "Ready." (exit status 0) means a start would work.
 *
 * The share link's format is the one seen in use (wa.me/proxy?...), not
 * one WhatsApp publishes: the three settings can always be typed by hand.
 */

/* Writes the share link; see whatsapp_proxy.h. The parameter names are the
 * ones seen in use; WhatsApp publishes no grammar for them. */
int share_link_format(const char *host, uint16_t chat_port,
                      uint16_t media_port, bool chat_tls, char *out,
                      size_t out_size)
{
    /* An IPv6 address goes in brackets, as in any URL. */
    bool ipv6 = strchr(host, ':') != NULL;
    return snprintf(out, out_size,
                    "https://wa.me/proxy?host=%s%s%s&chatPort=%u"
                    "&mediaPort=%u&chatTLS=%s", ipv6 ? "[" : "", host,
                    ipv6 ? "]" : "", chat_port, media_port,
                    chat_tls ? "true" : "false");
}

/* Returns the listener users should be told about: the first of the wanted
 * kind (media or chat) that takes clients directly (no PROXY header), with
 * TLS chat ports first, as the app's default is TLS on 443. NULL if none. */
static const struct listener_spec *check_user_listener(
    const struct settings *settings, bool media)
{
    const struct listener_spec *best = NULL;
    for (size_t i = 0; i < settings->listener_count; i++) {
        const struct listener_spec *spec = &settings->listeners[i];
        if (spec->media != media || spec->accept_proxy)
            continue;
        if (best == NULL || (spec->tls && !best->tls))
            best = spec;
    }
    return best;
}

/* Writes the share link for settings into out and returns true; or writes
 * why there is none (a few words) and returns false. Used by --check, the
 * start-up log and the statistics page. */
static bool share_link_for(const struct settings *settings, char *out,
                           size_t out_size)
{
    const struct listener_spec *chat = check_user_listener(settings, false);
    const struct listener_spec *media = check_user_listener(settings, true);
    const char *host = settings->public_host;
    const char *missing =
        host[0] == '\0' ? "give your server's name with --public-host"
        : !host_is_name(host) && !host_is_address(host)
            ? "--public-host is not a host name"
        : chat == NULL  ? "no chat port takes clients directly"
        : media == NULL ? "no media port takes clients directly"
                        : NULL;
    if (missing != NULL) {
        snprintf(out, out_size, "no share link: %s", missing);
        return false;
    }
    share_link_format(host, chat->port, media->port, chat->tls, out,
                      out_size);
    return true;
}

/* Prints a QR code of link to stdout with the qrencode program (Debian
 * package qrencode), so that a phone's camera can take the link from the
 * screen. Returns false if qrencode is not installed or fails. The proxy
 * needs no QR library: this runs only for --check. */
static bool check_print_qr_code(const char *link)
{
    char *const arguments[] = {"qrencode", "-t", "ANSIUTF8", "-m", "2",
                               (char *)link, NULL};
    fflush(stdout);
    pid_t child;
    if (posix_spawnp(&child, "qrencode", NULL, NULL, arguments, environ) != 0)
        return false;
    int status;
    return waitpid(child, &status, 0) == child && WIFEXITED(status) &&
           WEXITSTATUS(status) == 0;
}

/* Binds the port of spec for a moment, as a start would, and lets it go.
 * Returns false with the reason (naming the port and the fix) in problem. */
static bool check_port_free(const struct listener_spec *spec, char *problem,
                            size_t problem_size)
{
    struct listener trial = {.spec = *spec, .fd = -1};
    if (listener_open(&trial, "--listen", problem, problem_size) < 0) {
        if (errno == EADDRINUSE) { /* listener_open() leaves it there */
            size_t used = strlen(problem);
            snprintf(problem + used, problem_size - used, " (if that is "
                     "this proxy, already running, all is well for it; "
                     "stop it first to check a new setting)");
        }
        return false;
    }
    close(trial.fd);
    return true;
}

/* Resolves one upstream and prints a line about it. Returns false if its
 * name does not resolve. */
static bool check_upstream(struct upstream *upstream)
{
    char error[300];
    if (upstream_resolve(upstream, error, sizeof error) < 0) {
        printf("  %s:%u  PROBLEM: %s\n", upstream->spec.host,
               upstream->spec.port, error);
        return false;
    }
    char address[INET6_ADDRSTRLEN];
    address_to_text(&upstream->address, address);
    printf("  %s:%u  (%s)\n", upstream->spec.host, upstream->spec.port,
           address);
    return true;
}

/* Prints the listeners, each PROBLEM if its port cannot be bound now, and
 * the trusted balancers. Returns false on a PROBLEM. */
static bool check_listeners(const struct settings *settings)
{
    bool ready = true, any_proxy = false;
    char line[HOST_NAME_BYTES + 128];
    char problem[512];
    printf("Listeners:\n");
    for (size_t i = 0; i < settings->listener_count; i++) {
        const struct listener_spec *spec = &settings->listeners[i];
        listener_describe(spec, spec->port, line, sizeof line);
        bool free_now = check_port_free(spec, problem, sizeof problem);
        printf("  %s%s%s\n", line, free_now ? "" : "  PROBLEM: ",
               free_now ? "" : problem);
        ready &= free_now;
        any_proxy |= spec->accept_proxy;
    }
    for (size_t i = 0; any_proxy && i < settings->trusted_proxy_count; i++)
        printf("%s%s", i == 0 ? "PROXY headers are taken only from "
                                "(--trusted-proxy): " : ", ",
               settings->trusted_proxies[i].text);
    if (any_proxy)
        printf("\n");
    if (check_user_listener(settings, true) == NULL &&
        !upstream_pool_used(settings, true)) {
        printf("  PROBLEM: no media port: photos, videos and voice messages "
               "will not get through. Add one, for example --listen "
               "587/media\n");
        ready = false;
    }
    return ready;
}

/* Prints the certificate: where it comes from, the names it is valid for
 * and when it expires. PROBLEM if it cannot be made or loaded, if it has
 * expired, or if it does not cover --public-host. Returns false then. */
static bool check_certificate(const struct settings *settings)
{
    char text[1024];
    SSL_CTX *context = tls_context_new(settings, text, sizeof text);
    if (context == NULL) {
        printf("Certificate: PROBLEM: %s\n", text);
        return false;
    }
    bool ready = true;
    printf("Certificate: %s\n", settings->cert_file[0] != '\0'
                                    ? settings->cert_file
                                    : "made at start (a new one each time)");
    tls_certificate_names(context, text, sizeof text);
    printf("  valid for: %s\n", text);
    time_t expiry = tls_certificate_expiry(context);
    long days_left = days_until(expiry);
    strftime(text, sizeof text, "%Y-%m-%d", gmtime(&expiry));
    printf("  expires:   %s (in %ld days)%s\n", text, days_left,
           days_left < 0 ? "  PROBLEM: it has expired; renew it"
           : days_left < CERTIFICATE_WARN_DAYS ? "  (renew it soon)" : "");
    ready &= days_left >= 0;
    const char *host = settings->public_host;
    if ((host_is_name(host) || host_is_address(host)) &&
        !tls_certificate_covers(context, host)) {
        printf("  PROBLEM: it is not valid for %s (--public-host). Give a "
               "certificate for that name, or the name it is for\n", host);
        ready = false;
    }
    SSL_CTX_free(context);
    return ready;
}

/* Prints what to tell users: the three settings, the share link and its
 * QR code. PROBLEM if --public-host is given but is not a host name.
 * Returns false then. */
static bool check_users(const struct settings *settings)
{
    const struct listener_spec *chat = check_user_listener(settings, false);
    const struct listener_spec *media = check_user_listener(settings, true);
    const char *host = settings->public_host;
    bool host_valid = host_is_name(host) || host_is_address(host);
    printf("\nWhat to tell WhatsApp users (Settings > Storage and data > "
           "Proxy):\n");
    if (host[0] == '\0')
        printf("  Proxy host:  YOUR.SERVER.NAME   (give your server's name "
               "or address with --public-host)\n");
    else if (!host_valid)
        printf("  Proxy host:  PROBLEM: --public-host \"%s\" is not a host "
               "name. Give the name alone, as users type it: for example "
               "proxy.example.org, not https://proxy.example.org/\n", host);
    else
        printf("  Proxy host:  %s\n", host);
    if (chat != NULL)
        printf("  Chat port:   %u, TLS %s\n", chat->port,
               chat->tls ? "on" : "off");
    if (media != NULL)
        printf("  Media port:  %u\n", media->port);

    char link[HOST_NAME_BYTES + 128];
    if (share_link_for(settings, link, sizeof link)) {
        printf("  Share link:  %s\n", link);
        printf("  (The link's format is the one seen in use; WhatsApp does "
               "not publish it.\n   Users can always type the settings above "
               "by hand.)\n");
        /* A QR code only where a person looks: not into a pipe or a log. */
        if (isatty(STDOUT_FILENO) && !check_print_qr_code(link))
            printf("  (For a QR code of the link here, install qrencode, as "
                   "root: apt-get install -y qrencode)\n");
    } else if (chat == NULL || media == NULL) {
        bool media_missing = chat != NULL;
        printf(upstream_pool_used(settings, media_missing)
                   ? "  (no share link: the %s ports take clients through a "
                     "load balancer; give users the balancer's name and "
                     "ports)\n"
                   : "  (no share link: there is no %s port)\n",
               media_missing ? "media" : "chat");
    } else {
        printf("  (%s)\n", link);
    }
    return host[0] == '\0' || host_valid;
}

/* Prints the whole --check summary to stdout. Returns the exit status: 0 if
 * a start would work and users get chat and media, else 1. */
static int check_summary_print(const struct settings *settings)
{
    static const char *const HEADER_NAMES[] = {"none", "PROXY v1",
                                               "PROXY v2"};
    printf(PROGRAM_NAME " " PROGRAM_VERSION ": checking the settings\n\n");
    bool ready = check_listeners(settings);

    bool chat_used = upstream_pool_used(settings, false);
    if (chat_used) {
        printf("\nChat servers, in turn (header sent: %s; health checks "
               "send %s):\n", HEADER_NAMES[settings->send_proxy],
               settings->send_proxy == SEND_PROXY_V2   ? "PROXY v2 LOCAL"
               : settings->send_proxy == SEND_PROXY_V1 ? "PROXY UNKNOWN"
                                                       : "nothing");
        for (size_t i = 0; i < settings->chat_upstream_count; i++) {
            struct upstream upstream = {.spec = settings->chat_upstreams[i]};
            ready &= check_upstream(&upstream);
        }
    }
    if (upstream_pool_used(settings, true)) {
        printf("\nMedia server:\n");
        struct upstream media = {.spec = settings->media_upstream};
        ready &= check_upstream(&media);
    }
    if (settings->decoy_enabled && chat_used) {
        printf("\nDecoy web site for clients that are not WhatsApp (rule "
               "%s):\n", settings->decoy_strict ? "strict" : "http");
        struct upstream decoy = {.spec = settings->decoy};
        ready &= check_upstream(&decoy);
        if (settings->decoy_tls_port != 0) {
            printf("\nThe decoy's own TLS port, for what is not TLS on a TLS "
                   "port:\n");
            decoy.spec.port = settings->decoy_tls_port;
            ready &= check_upstream(&decoy);
        }
    }
    for (size_t i = 0; i < settings->sni_count; i++)
        printf("%s%s", i == 0 ? "\nTLS server names served (--sni): " : ", ",
               settings->sni_names[i]);
    if (settings->sni_count > 0)
        printf("\n");

    printf("\nLimits: --maxconn %u; timeouts in seconds: connect %.1f, idle "
           "%.1f, fin %.1f, handshake %.1f\n", settings->maxconn,
           settings->timeout_connect_ms / 1000.0,
           settings->timeout_idle_ms / 1000.0,
           settings->timeout_fin_ms / 1000.0,
           settings->timeout_handshake_ms / 1000.0);
    bool any_tls = false;
    for (size_t i = 0; i < settings->listener_count; i++)
        any_tls |= settings->listeners[i].tls;
    if (any_tls)
        ready &= check_certificate(settings);
    ready &= check_users(settings);
    printf("\n%s\n", ready ? "Ready." : "NOT ready: see PROBLEM above.");
    return ready ? 0 : 1;
}

/* ==== 12. Statistics ==== */

/*
 * A volunteer wants to see at a glance that the proxy works and who is
 * waiting on what; a monitoring system wants numbers. A small HTTP server
 * on --stats (127.0.0.1:8199 by default: reach it through an SSH tunnel,
 * `ssh -L 8199:localhost:8199 server`) answers:
 *
 *   GET /          an HTML page that refreshes itself: uptime, connections
 *                  per listener, bytes, problems by kind, each server's state;
 *   GET /metrics   the same numbers in Prometheus' text format;
 *   GET /healthz   200 while at least one chat server is up, else 503 (the
 *                  reference's container health check);
 *   anything else  404.
 *
 * It runs in its own thread with non-blocking sockets and one poll() loop,
 * so a slow or malicious statistics client can hold nothing but its own
 * slot, for STATS_TIMEOUT_MS at most, and never touches the relay. When
 * every slot is taken, the client that has waited longest without a
 * request makes room for the newcomer: silent clients cannot keep a
 * monitor's /healthz out. Numbers are read
 * from the atomics and, under upstream_lock, from the server list.
 */

#define STATS_CLIENTS_MAX 16      /* more at once are closed at once */
#define STATS_REQUEST_BYTES 2048  /* longer requests are refused */
#define STATS_TIMEOUT_MS 5000     /* to send a request and read the answer */
#define STATS_REFRESH_SECONDS 10  /* how often the HTML page reloads */

/* The name (after "whatsapp_proxy_") and help line of every counter. */
static const struct {
    const char *name;
    const char *help;
} COUNTER_INFO[COUNTER_COUNT] = {
    [COUNTER_CONNECTIONS_ACCEPTED] = {"connections_accepted_total",
        "Client connections accepted, including those over maxconn."},
    [COUNTER_CONNECTIONS_RELAYED] = {"connections_relayed_total",
        "Client connections that reached a server."},
    [COUNTER_CONNECTIONS_CLOSED] = {"connections_closed_total",
        "Client connections that have ended."},
    [COUNTER_REJECTED_MAXCONN] = {"rejected_maxconn_total",
        "Client connections closed at once because maxconn was reached."},
    [COUNTER_BAD_PROXY_HEADER] = {"bad_proxy_header_total",
        "Connections closed for a malformed or missing PROXY header."},
    [COUNTER_TLS_HANDSHAKE_FAILED] = {"tls_handshake_failed_total",
        "Connections whose TLS handshake failed."},
    [COUNTER_HANDSHAKE_TIMEOUT] = {"handshake_timeout_total",
        "Connections closed because the PROXY header, TLS or (with a decoy) "
        "the first bytes took too long."},
    [COUNTER_UPSTREAM_UNREACHABLE] = {"upstream_unreachable_total",
        "Connections closed because no server could be reached."},
    [COUNTER_UPSTREAM_CONNECT_FAILED] = {"upstream_connect_failed_total",
        "Failed connects to a server for a client (each try)."},
    [COUNTER_IDLE_TIMEOUT] = {"idle_timeout_total",
        "Connections closed after timeout-idle without a byte."},
    [COUNTER_FIN_TIMEOUT] = {"fin_timeout_total",
        "Half-closed connections closed after timeout-fin."},
    [COUNTER_RELAY_ERROR] = {"relay_error_total",
        "Connections ended by a reset or another error while relaying."},
    [COUNTER_BYTES_FROM_CLIENTS] = {"bytes_from_clients_total",
        "Bytes relayed from clients to servers."},
    [COUNTER_BYTES_TO_CLIENTS] = {"bytes_to_clients_total",
        "Bytes relayed from servers to clients."},
    [COUNTER_DECOYED] = {"decoyed_total",
        "Clients that were not WhatsApp, handed to the decoy web site."},
    [COUNTER_SNI_MATCHED] = {"sni_matched_total",
        "TLS handshakes that asked for a server name given with --sni."},
    [COUNTER_SNI_MISSED] = {"sni_missed_total",
        "TLS handshakes that asked for another server name, or none."},
    [COUNTER_REJECTED_PER_IP] = {"rejected_per_ip_total",
        "Client connections closed at once because of max-per-ip."},
    [COUNTER_REJECTED_UNTRUSTED] = {"rejected_untrusted_total",
        "Connections to a PROXY port from outside trusted-proxy, closed."},
};

/* What the HTML page says about a counter that is not zero: what
 * happened, in plain words, and what to do about it. Counters of normal
 * traffic (timeouts, resets) are on /metrics only. */
static const struct {
    enum counter which;
    const char *what;
    const char *fix;
} STATS_PROBLEMS[] = {
    {COUNTER_UPSTREAM_UNREACHABLE, "users who could not be connected to "
     "WhatsApp", "check this server's internet connection and DNS; see "
     "Servers below"},
    {COUNTER_REJECTED_MAXCONN, "users turned away because the proxy was "
     "full (--maxconn)", "raise --maxconn if there is memory to spare, or "
     "start a second proxy"},
    {COUNTER_UPSTREAM_CONNECT_FAILED, "tries to reach a WhatsApp server "
     "that failed (each one is tried again)", "a few are normal; many: see "
     "Servers below"},
    {COUNTER_TLS_HANDSHAKE_FAILED, "visitors whose TLS handshake failed",
     "mostly scanners; if users cannot connect, run --check"},
    {COUNTER_HANDSHAKE_TIMEOUT, "visitors that said too little in time "
     "(--timeout-handshake)", "mostly scanners; nothing to do"},
    {COUNTER_BAD_PROXY_HEADER, "connections to a PROXY port without a valid "
     "PROXY header", "make your load balancer send one (send-proxy-v2)"},
    {COUNTER_REJECTED_UNTRUSTED, "connections to a PROXY port from outside "
     "--trusted-proxy", "if that is your load balancer, add its address "
     "with --trusted-proxy"},
    {COUNTER_REJECTED_PER_IP, "connections over --max-per-ip", "many users "
     "behind one address (a mobile network)? raise --max-per-ip"},
    {COUNTER_DECOYED, "visitors that were not WhatsApp, shown the decoy web "
     "site", "nothing to do: this is --decoy at work"},
    {COUNTER_SNI_MISSED, "TLS visitors that asked for a name not in --sni",
     "nothing to do: scanners, sent away"},
};

/* Writes a byte count the way people read it ("1.5 GB") into out. */
static void bytes_human(unsigned long long bytes, char *out, size_t out_size)
{
    static const char *const UNITS[] = {"bytes", "kB", "MB", "GB", "TB",
                                        "PB"};
    double value = (double)bytes;
    size_t unit = 0;
    while (value >= 1000 && unit + 1 < ARRAY_LENGTH(UNITS)) {
        value /= 1000;
        unit++;
    }
    snprintf(out, out_size, unit == 0 ? "%.0f %s" : "%.1f %s", value,
             UNITS[unit]);
}

/* A text that grows as it is written, for building answers. */
struct text {
    char *data;      /* NUL-terminated, owned; NULL while empty */
    size_t length;
    size_t capacity;
};

/* Appends printf-style text, growing the buffer as needed. */
__attribute__((format(printf, 2, 3)))
static void text_printf(struct text *text, const char *format, ...)
{
    for (;;) {
        size_t room = text->capacity - text->length;
        va_list arguments;
        va_start(arguments, format);
        int needed = vsnprintf(text->data ? text->data + text->length : NULL,
                               room, format, arguments);
        va_end(arguments);
        if (needed >= 0 && (size_t)needed < room) {
            text->length += (size_t)needed;
            return;
        }
        size_t capacity = text->capacity * 2 + (size_t)needed + 256;
        char *grown = realloc(text->data, capacity);
        if (grown == NULL)
            out_of_memory(capacity);
        text->data = grown;
        text->capacity = capacity;
    }
}

static void text_free(struct text *text)
{
    free(text->data);
    *text = (struct text){0};
}

/* Parses an HTTP request at data[0..length): see whatsapp_proxy.h. */
int stats_request_parse(const uint8_t *data, size_t length, char *path,
                        size_t path_size)
{
    /* The request is complete at the blank line that ends the headers. */
    const uint8_t *end = memmem(data, length, "\r\n\r\n", 4);
    if (end == NULL)
        return length >= STATS_REQUEST_BYTES ? STATS_REQUEST_BAD : 0;

    const uint8_t *line_end = memchr(data, '\r', (size_t)(end - data) + 1);
    const uint8_t *first_space = memchr(data, ' ', (size_t)(line_end - data));
    if (first_space == NULL)
        return STATS_REQUEST_BAD;
    const uint8_t *target = first_space + 1;
    const uint8_t *second_space =
        memchr(target, ' ', (size_t)(line_end - target));
    if (second_space == NULL || target[0] != '/' ||
        (size_t)(line_end - second_space) < 9 ||
        memcmp(second_space + 1, "HTTP/1.", 7) != 0)
        return STATS_REQUEST_BAD;

    size_t method_length = (size_t)(first_space - data);
    bool get = method_length == 3 && memcmp(data, "GET", 3) == 0;
    bool head = method_length == 4 && memcmp(data, "HEAD", 4) == 0;
    if (!get && !head)
        return STATS_REQUEST_METHOD_NOT_ALLOWED;

    /* The path without "?query"; only printable ASCII. */
    size_t path_length = 0;
    for (const uint8_t *p = target; p < second_space && *p != '?'; p++) {
        if (*p <= 0x20 || *p >= 0x7F || path_length + 1 >= path_size)
            return STATS_REQUEST_BAD;
        path[path_length++] = (char)*p;
    }
    path[path_length] = '\0';
    return get ? STATS_REQUEST_GET : STATS_REQUEST_HEAD;
}

/* A copy of one server's state, taken under upstream_lock. */
struct upstream_view {
    const char *pool; /* "chat" or "media" */
    struct upstream_spec spec;
    bool up;
    unsigned long long failures_total;
    time_t last_check;
    char last_result[64];
};

/* Copies the state of every server into views (room for chat pool + 1).
 * Returns how many. Takes upstream_lock. */
static size_t upstream_views(struct upstream_view *views)
{
    size_t count = state.settings->chat_upstream_count + 1;
    pthread_mutex_lock(&state.upstream_lock);
    for (size_t i = 0; i < count; i++) {
        const struct upstream *upstream = i + 1 < count
                                              ? &state.chat_upstreams[i]
                                              : state.media_upstream;
        views[i] = (struct upstream_view){
            .pool = i + 1 < count ? "chat" : "media",
            .spec = upstream->spec,
            .up = upstream->up,
            .failures_total = upstream->failures_total,
            .last_check = upstream->last_check,
        };
        memcpy(views[i].last_result, upstream->last_result,
               sizeof views[i].last_result);
    }
    pthread_mutex_unlock(&state.upstream_lock);
    return count;
}

/* Returns true while at least one chat server is up. */
static bool stats_healthy(void)
{
    for (size_t i = 0; i < state.settings->chat_upstream_count; i++)
        if (upstream_is_up(&state.chat_upstreams[i]))
            return true;
    return false;
}

/* Writes the Prometheus text format: for every metric a HELP and a TYPE
 * line, then its samples, names prefixed "whatsapp_proxy_". */
static void stats_render_metrics(struct text *out)
{
    text_printf(out, "# HELP whatsapp_proxy_uptime_seconds Seconds since "
                "the proxy started.\n# TYPE whatsapp_proxy_uptime_seconds "
                "gauge\nwhatsapp_proxy_uptime_seconds %lld\n",
                (long long)(time(NULL) - state.started_at));
    text_printf(out, "# HELP whatsapp_proxy_connections Client connections "
                "open now.\n# TYPE whatsapp_proxy_connections gauge\n"
                "whatsapp_proxy_connections %u\n", proxy_connections_now());
    text_printf(out, "# HELP whatsapp_proxy_maxconn The --maxconn limit.\n"
                "# TYPE whatsapp_proxy_maxconn gauge\n"
                "whatsapp_proxy_maxconn %u\n", state.settings->maxconn);
    long long expiry = atomic_load(&state.certificate_expires_at);
    if (expiry != 0)
        text_printf(out, "# HELP whatsapp_proxy_certificate_expiry_timestamp_"
                    "seconds Unix time when the certificate served expires."
                    "\n# TYPE whatsapp_proxy_certificate_expiry_timestamp_"
                    "seconds gauge\nwhatsapp_proxy_certificate_expiry_"
                    "timestamp_seconds %lld\n", expiry);
    for (size_t i = 0; i < COUNTER_COUNT; i++)
        text_printf(out, "# HELP whatsapp_proxy_%s %s\n# TYPE "
                    "whatsapp_proxy_%s counter\nwhatsapp_proxy_%s %llu\n",
                    COUNTER_INFO[i].name, COUNTER_INFO[i].help,
                    COUNTER_INFO[i].name, COUNTER_INFO[i].name,
                    proxy_counter((enum counter)i));

    text_printf(out, "# HELP whatsapp_proxy_listener_connections Client "
                "connections open now, by listener.\n# TYPE "
                "whatsapp_proxy_listener_connections gauge\n");
    char label[96];
    for (size_t i = 0; i < state.listener_count; i++) {
        listener_label(&state.listeners[i], label, sizeof label);
        text_printf(out, "whatsapp_proxy_listener_connections{listener=\"%s\"}"
                    " %u\n", label,
                    atomic_load(&state.listeners[i].connections_now));
    }
    text_printf(out, "# HELP whatsapp_proxy_listener_connections_total Client "
                "connections accepted, by listener.\n# TYPE "
                "whatsapp_proxy_listener_connections_total counter\n");
    for (size_t i = 0; i < state.listener_count; i++) {
        listener_label(&state.listeners[i], label, sizeof label);
        text_printf(out, "whatsapp_proxy_listener_connections_total{listener="
                    "\"%s\"} %llu\n", label,
                    atomic_load(&state.listeners[i].connections_total));
    }

    struct upstream_view views[MAX_UPSTREAMS + 1];
    size_t count = upstream_views(views);
    static const char *const UPSTREAM_METRICS[3][3] = {
        {"upstream_up", "gauge", "1 while the server is in rotation."},
        {"upstream_failures_total", "counter",
         "Failed health checks and client connects, by server."},
        {"upstream_last_check_timestamp_seconds", "gauge",
         "Unix time of the last health check (0: none yet)."},
    };
    for (size_t m = 0; m < 3; m++) {
        text_printf(out, "# HELP whatsapp_proxy_%s %s\n# TYPE "
                    "whatsapp_proxy_%s %s\n", UPSTREAM_METRICS[m][0],
                    UPSTREAM_METRICS[m][2], UPSTREAM_METRICS[m][0],
                    UPSTREAM_METRICS[m][1]);
        for (size_t i = 0; i < count; i++) {
            unsigned long long value = m == 0   ? views[i].up
                                       : m == 1 ? views[i].failures_total
                                                : (unsigned long long)
                                                      views[i].last_check;
            /* Host names cannot hold '"', '\\' or newlines (section 3
             * accepts only a name and a port), so no escaping is needed. */
            text_printf(out, "whatsapp_proxy_%s{upstream=\"%s:%u\",pool=\"%s\"}"
                        " %llu\n", UPSTREAM_METRICS[m][0], views[i].spec.host,
                        views[i].spec.port, views[i].pool, value);
        }
    }
}

/* Writes into out the page's first line: whether all is well and, if
 * not, what is wrong and what to do, the most urgent first. Returns true
 * if all is well. */
static bool stats_status(char *out, size_t out_size)
{
    long long expiry = atomic_load(&state.certificate_expires_at);
    long days_left = days_until((time_t)expiry);
    unsigned now = proxy_connections_now();
    if (!stats_healthy())
        snprintf(out, out_size, "No WhatsApp chat server can be reached, so "
                 "no user can chat. Check this server's internet connection "
                 "and DNS (see Servers below).");
    else if (expiry != 0 && days_left < 0)
        snprintf(out, out_size, "The certificate has expired. Renew it "
                 "(certbot renew), then reload: systemctl reload "
                 "whatsapp_proxy.");
    else if ((unsigned long long)now * 10 >=
             (unsigned long long)state.settings->maxconn * 9)
        snprintf(out, out_size, "The proxy is nearly full: %u connections of "
                 "%u (--maxconn). Raise --maxconn if there is memory to "
                 "spare, or start a second proxy.", now,
                 state.settings->maxconn);
    else if (expiry != 0 && days_left < CERTIFICATE_WARN_DAYS)
        snprintf(out, out_size, "The certificate expires in %ld days. Renew "
                 "it (certbot renew), then reload: systemctl reload "
                 "whatsapp_proxy.", days_left);
    else {
        snprintf(out, out_size, "All is well.");
        return true;
    }
    return false;
}

/* Writes the HTML page a person reads at a glance: first whether all is
 * well, then how to share the proxy, then the numbers, in units people
 * read. Problems are listed only when they happened, each with what to
 * do. Every string in it comes from the settings or from us, never from a
 * client, and the host names in it are checked names (section 3). */
static void stats_render_page(struct text *out)
{
    long long uptime = (long long)(time(NULL) - state.started_at);
    char status[300], to_servers[32], to_clients[32];
    bool well = stats_status(status, sizeof status);
    bytes_human(proxy_counter(COUNTER_BYTES_FROM_CLIENTS), to_servers,
                sizeof to_servers);
    bytes_human(proxy_counter(COUNTER_BYTES_TO_CLIENTS), to_clients,
                sizeof to_clients);
    text_printf(out,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"refresh\" content=\"%d\">"
        "<title>" PROGRAM_NAME "</title><style>"
        "body{font-family:sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:.3em .8em;text-align:left}"
        "th{background:#eee}.up{color:#080}.down{color:#b00;font-weight:bold}"
        "</style></head><body>\n<h1>" PROGRAM_NAME " " PROGRAM_VERSION
        "</h1>\n<p class=\"%s\" style=\"font-size:1.3em\">%s</p>\n"
        "<p>Up for %lld d %02lld:%02lld:%02lld. <b>%u</b> connection%s now "
        "(limit %u). Relayed: %s to WhatsApp, %s to users.</p>\n",
        STATS_REFRESH_SECONDS, well ? "up" : "down", status, uptime / 86400,
        uptime % 86400 / 3600, uptime % 3600 / 60, uptime % 60,
        proxy_connections_now(), proxy_connections_now() == 1 ? "" : "s",
        state.settings->maxconn, to_servers, to_clients);

    char link[HOST_NAME_BYTES + 128];
    if (share_link_for(state.settings, link, sizeof link)) {
        /* In HTML, each & of the link is written &amp;. */
        text_printf(out, "<p>Share link for users: ");
        for (const char *c = link; *c != '\0'; c++)
            text_printf(out, *c == '&' ? "&amp;" : "%c", *c);
        text_printf(out, "</p>\n");
    } else {
        text_printf(out, "<p>(%s)</p>\n", link);
    }
    long long expiry = atomic_load(&state.certificate_expires_at);
    if (expiry != 0) {
        char date[32];
        time_t when = (time_t)expiry;
        struct tm utc;
        gmtime_r(&when, &utc);
        strftime(date, sizeof date, "%Y-%m-%d", &utc);
        long days_left = days_until((time_t)expiry);
        text_printf(out, "<p>Certificate expires %s (<span class=\"%s\">in "
                    "%ld days</span>).</p>\n", date,
                    days_left < CERTIFICATE_WARN_DAYS ? "down" : "up",
                    days_left);
    }

    text_printf(out, "<h2>Listeners</h2>\n<table><tr><th>listener</th>"
                "<th>open now</th><th>since start</th></tr>\n");
    char label[96];
    for (size_t i = 0; i < state.listener_count; i++) {
        listener_label(&state.listeners[i], label, sizeof label);
        text_printf(out, "<tr><td>%s</td><td>%u</td><td>%llu</td></tr>\n",
                    label, atomic_load(&state.listeners[i].connections_now),
                    atomic_load(&state.listeners[i].connections_total));
    }
    text_printf(out, "</table>\n");

    bool any = false;
    for (size_t i = 0; i < ARRAY_LENGTH(STATS_PROBLEMS); i++) {
        unsigned long long count = proxy_counter(STATS_PROBLEMS[i].which);
        if (count == 0)
            continue;
        if (!any)
            text_printf(out, "<h2>Since the start</h2>\n<table><tr>"
                        "<th>what happened</th><th>how often</th>"
                        "<th>what to do</th></tr>\n");
        any = true;
        text_printf(out, "<tr><td>%s</td><td>%llu</td><td>%s</td></tr>\n",
                    STATS_PROBLEMS[i].what, count, STATS_PROBLEMS[i].fix);
    }
    if (any)
        text_printf(out, "</table>\n");

    text_printf(out, "<h2>Servers</h2>\n<table><tr><th>server</th>"
                "<th>pool</th><th>state</th><th>last check</th>"
                "<th>result</th><th>failures</th></tr>\n");
    struct upstream_view views[MAX_UPSTREAMS + 1];
    size_t count = upstream_views(views);
    for (size_t i = 0; i < count; i++) {
        char when[32] = "not yet";
        if (views[i].last_check != 0) {
            struct tm utc;
            gmtime_r(&views[i].last_check, &utc);
            strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", &utc);
        }
        text_printf(out, "<tr><td>%s:%u</td><td>%s</td><td class=\"%s\">%s"
                    "</td><td>%s</td><td>%s</td><td>%llu</td></tr>\n",
                    views[i].spec.host, views[i].spec.port, views[i].pool,
                    views[i].up ? "up" : "down", views[i].up ? "up" : "DOWN",
                    when, views[i].last_result, views[i].failures_total);
    }
    text_printf(out, "</table>\n<p>Numbers for machines: <a href=\"/metrics\">"
                "/metrics</a>. Health: <a href=\"/healthz\">/healthz</a>."
                "</p>\n</body></html>\n");
}

/* Builds the whole HTTP answer to a request (the result of
 * stats_request_parse() and the path) into out. */
static void stats_answer(int request, const char *path, struct text *out)
{
    struct text body = {0};
    int status = 200;
    const char *type = "text/plain; charset=utf-8";

    if (request == STATS_REQUEST_BAD) {
        status = 400;
        text_printf(&body, "bad request\n");
    } else if (request == STATS_REQUEST_METHOD_NOT_ALLOWED) {
        status = 405;
        text_printf(&body, "only GET and HEAD\n");
    } else if (strcmp(path, "/") == 0) {
        type = "text/html; charset=utf-8";
        stats_render_page(&body);
    } else if (strcmp(path, "/metrics") == 0) {
        /* SHORTCUT: two formats only; a third, JSON at /stats.json, would
         * suit scripts (tutorial.md, exercise "a second stats format"). */
        type = "text/plain; version=0.0.4; charset=utf-8";
        stats_render_metrics(&body);
    } else if (strcmp(path, "/healthz") == 0) {
        bool healthy = stats_healthy();
        status = healthy ? 200 : 503;
        text_printf(&body, "%s\n", healthy ? "ok" : "no chat server is up");
    } else {
        status = 404;
        text_printf(&body, "not found\n");
    }

    const char *reason = status == 200   ? "OK"
                         : status == 400 ? "Bad Request"
                         : status == 404 ? "Not Found"
                         : status == 405 ? "Method Not Allowed"
                                         : "Service Unavailable";
    text_printf(out, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n"
                "Content-Length: %zu\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n\r\n", status, reason, type, body.length);
    if (request != STATS_REQUEST_HEAD && body.length > 0)
        text_printf(out, "%s", body.data);
    text_free(&body);
}

/* One statistics client, in the statistics thread. */
struct stats_client {
    int fd;                               /* -1 while the slot is free */
    uint8_t request[STATS_REQUEST_BYTES];
    size_t request_length;
    struct text answer;                   /* empty until the request ends */
    size_t answer_sent;
    long long deadline_ms;
};

static void stats_client_close(struct stats_client *client)
{
    close(client->fd);
    client->fd = -1;
    text_free(&client->answer);
}

/* Moves one client on: reads its request until complete, then writes the
 * answer. Closes the client when done or broken. Never blocks. */
static void stats_client_serve(struct stats_client *client)
{
    if (client->answer.length == 0) {
        ssize_t got = recv(client->fd, client->request + client->request_length,
                           sizeof client->request - client->request_length, 0);
        if (got < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (got <= 0) {
            stats_client_close(client);
            return;
        }
        client->request_length += (size_t)got;
        char path[256];
        int request = stats_request_parse(client->request,
                                          client->request_length, path,
                                          sizeof path);
        if (request == 0)
            return; /* not complete yet */
        stats_answer(request, path, &client->answer);
    }
    ssize_t sent = send(client->fd, client->answer.data + client->answer_sent,
                        client->answer.length - client->answer_sent,
                        MSG_NOSIGNAL);
    if (sent < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (sent > 0)
        client->answer_sent += (size_t)sent;
    if (sent < 0 || client->answer_sent == client->answer.length)
        stats_client_close(client);
}

/* The statistics thread: one poll() loop over its listener, its clients
 * and abort_fd, until abort_fd says the proxy is going away. While the
 * process is out of descriptors it rests from accepting, as the relay
 * threads do (section 8): a waiting client would make poll() return at
 * once, again and again. */
/* Finds a slot for a new statistics client: a free one; else the one that
 * has waited longest for a request and still has none, which is closed to
 * make room. So silent clients, however many and however often renewed,
 * can never keep a monitor's /healthz out: a new client always gets a slot
 * unless every slot is busy sending an answer. NULL then. */
static struct stats_client *stats_slot_for_new(struct stats_client *clients)
{
    struct stats_client *oldest_silent = NULL;
    for (size_t i = 0; i < STATS_CLIENTS_MAX; i++) {
        if (clients[i].fd < 0)
            return &clients[i];
        if (clients[i].answer.length == 0 &&
            (oldest_silent == NULL ||
             clients[i].deadline_ms < oldest_silent->deadline_ms))
            oldest_silent = &clients[i];
    }
    if (oldest_silent != NULL)
        stats_client_close(oldest_silent);
    return oldest_silent;
}

static void *stats_run(void *unused)
{
    (void)unused;
    struct stats_client clients[STATS_CLIENTS_MAX];
    for (size_t i = 0; i < STATS_CLIENTS_MAX; i++)
        clients[i] = (struct stats_client){.fd = -1};

    for (;;) {
        struct pollfd watched[2 + STATS_CLIENTS_MAX];
        watched[0] = (struct pollfd){.fd = state.abort_fd, .events = POLLIN};
        long long now = now_ms();
        int rest_ms = accept_rest_left(now);
        watched[1] = (struct pollfd){.fd = state.stats_listener->fd,
                                     .events = rest_ms > 0 ? 0 : POLLIN};
        long long next_deadline = now + (rest_ms > 0 ? rest_ms
                                                     : STATS_TIMEOUT_MS);
        for (size_t i = 0; i < STATS_CLIENTS_MAX; i++) {
            struct stats_client *client = &clients[i];
            if (client->fd >= 0 && client->deadline_ms <= now)
                stats_client_close(client); /* too slow: its slot is freed */
            watched[2 + i] = (struct pollfd){
                .fd = client->fd,
                .events = client->answer.length ? POLLOUT : POLLIN};
            if (client->fd >= 0 && client->deadline_ms < next_deadline)
                next_deadline = client->deadline_ms;
        }
        if (poll(watched, ARRAY_LENGTH(watched),
                 (int)(next_deadline - now) + 1) < 0 && errno != EINTR)
            break;
        if (watched[0].revents != 0)
            break;

        for (size_t i = 0; i < STATS_CLIENTS_MAX; i++)
            if (clients[i].fd >= 0 && watched[2 + i].revents != 0)
                stats_client_serve(&clients[i]);
        if (watched[1].revents != 0) {
            int fd = accept4(state.stats_listener->fd, NULL, NULL,
                             SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0 && out_of_descriptors(errno))
                accept_rest_begin(errno);
            struct stats_client *slot = fd >= 0 ? stats_slot_for_new(clients)
                                                : NULL;
            if (slot != NULL)
                *slot = (struct stats_client){
                    .fd = fd, .deadline_ms = now_ms() + STATS_TIMEOUT_MS};
            else if (fd >= 0)
                close(fd); /* every slot is sending an answer */
        }
    }
    for (size_t i = 0; i < STATS_CLIENTS_MAX; i++)
        if (clients[i].fd >= 0)
            stats_client_close(&clients[i]);
    return NULL;
}

/* ==== 13. Starting and stopping ==== */

/*
 * proxy_open() makes everything ready in dependency order and fails with one
 * line before any client is served. Then the relay threads serve every
 * client (section 10), and the main thread, in proxy_run(), only waits:
 * for a certificate reload (SIGHUP), done here, off the relay threads, and
 * for a stop, and then it runs the orderly end:
 *
 *   1. shut the listening sockets (shutdown()): new clients are refused at
 *      once, so their apps move on to another proxy, and the relay threads
 *      stop watching them. They are closed in step 5, when no relay thread
 *      can be accepting on them any more;
 *   2. let the connections in flight end by themselves, for up to --grace
 *      seconds (30): a chat connection usually lasts longer, but a transfer
 *      under way gets to finish;
 *   3. write abort_fd: the health thread and the statistics thread give up
 *      their waits and end; join them;
 *   4. tell every relay thread to close what is left, and join them;
 *   5. free everything, so that proxy_open() can run again (the tests do).
 *
 * Signals only set a flag and write main_wake_fd; the main thread does the
 * work outside the signal handler, where anything may be called.
 *
 * Privileges. Ports below 1024 and the key files need root, so the proxy
 * binds and reads first and then, with --user, becomes that user for good
 * (groups, then group, then user: in the other order it could no longer
 * change its groups), and checks that it cannot become root again. Without
 * --user, a proxy started as root stays root and says so in a warning: it
 * must keep working for a volunteer who typed `sudo make run`, and the
 * systemd unit in contrib/ runs it as an unprivileged user with only the
 * right to bind low ports. Note that after dropping privileges a SIGHUP can
 * only reload certificate files that user may read.
 */

/* Raises the soft open-file limit to the hard one: every connection needs
 * two descriptors (client and upstream). Warns if that is below maxconn. */
static void descriptor_limit_raise(unsigned maxconn)
{
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0)
        return;
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
    /* Two per connection, and about 100 for the proxy's own use. */
    rlim_t needed = (rlim_t)maxconn * 2 + 100;
    rlim_t allowed = limit.rlim_cur > 100 ? (limit.rlim_cur - 100) / 2 : 0;
    if (limit.rlim_cur < needed)
        log_line(LOG_WARN, "the open-file limit (%llu) allows about %llu "
                 "connections, fewer than --maxconn %u: raise it with "
                 "LimitNOFILE= in the systemd unit or ulimit -n",
                 (unsigned long long)limit.rlim_cur,
                 (unsigned long long)allowed, maxconn);
}

/* Becomes user for good (see the section comment). Returns 0, or -1 with
 * one line in error. */
static int privileges_drop(const char *user, char *error, size_t error_size)
{
    struct passwd *account = getpwnam(user);
    if (account == NULL)
        return parse_failure(error, error_size, "bad --user '%s': no such "
                             "user on this machine", user);
    if (initgroups(user, account->pw_gid) != 0 ||
        setgid(account->pw_gid) != 0 || setuid(account->pw_uid) != 0)
        return parse_failure(error, error_size, "cannot become user %s: %s "
                             "(only root can switch users)", user,
                             strerror(errno));
    if (account->pw_uid != 0 && setuid(0) == 0)
        return parse_failure(error, error_size, "after becoming %s the "
                             "proxy could become root again: refusing to "
                             "run", user);
    log_line(LOG_INFO, "now running as user %s", user);
    return 0;
}

/* Starts the relay threads. Returns 0, or -1 with one line in error. */
static int relay_threads_start(unsigned count, char *error, size_t error_size)
{
    /* First every thread's state, then the threads: a relay thread that
     * accepts a client may hand it to any other (relay_thread_choose()),
     * so all of them must be complete before the first one runs. */
    state.relay_threads = xcalloc(count, sizeof *state.relay_threads);
    for (unsigned i = 0; i < count; i++) {
        struct relay_thread *thread = &state.relay_threads[i];
        thread->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        thread->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        thread->scratch = xmalloc(RELAY_SCRATCH_BYTES);
        pthread_mutex_init(&thread->inbox_lock, NULL);
        state.relay_thread_count = i + 1; /* so that a failure frees it */
        struct epoll_event wake = {.events = EPOLLIN, .data.ptr = NULL};
        if (thread->epoll_fd < 0 || thread->wake_fd < 0 ||
            epoll_ctl(thread->epoll_fd, EPOLL_CTL_ADD, thread->wake_fd,
                      &wake) < 0)
            return parse_failure(error, error_size,
                                 "cannot start relay thread %u: %s", i,
                                 strerror(errno));
        /* Every relay thread accepts on every port (section 10). */
        for (size_t l = 0; l < state.listener_count; l++)
            thread->listening[l] =
                (struct relay_side){.fd = state.listeners[l].fd};
        const struct settings *settings = state.settings;
        struct pair_list *timers = thread->timers; /* see enum timer */
        timers[TIMER_HANDSHAKE].timeout_ms = settings->timeout_handshake_ms;
        timers[TIMER_HANDSHAKE].expired = COUNTER_HANDSHAKE_TIMEOUT;
        timers[TIMER_CONNECT].timeout_ms = settings->timeout_connect_ms;
        timers[TIMER_RETRY].timeout_ms = UPSTREAM_RETRY_DELAY_MS;
        timers[TIMER_IDLE].timeout_ms = settings->timeout_idle_ms;
        timers[TIMER_IDLE].expired = COUNTER_IDLE_TIMEOUT;
        timers[TIMER_FIN].timeout_ms = settings->timeout_fin_ms;
        timers[TIMER_FIN].expired = COUNTER_FIN_TIMEOUT;
        relay_watch_listeners(thread, true);
        thread->listeners_watched = true;
    }
    for (unsigned i = 0; i < count; i++) {
        struct relay_thread *thread = &state.relay_threads[i];
        int failure = pthread_create(&thread->thread, NULL, relay_thread_run,
                                     thread);
        if (failure != 0) {
            thread->thread = 0;
            return parse_failure(error, error_size,
                                 "cannot start relay thread %u: %s", i,
                                 strerror(failure));
        }
    }
    return 0;
}

/* Asks every relay thread to close its pairs and end, joins them, and frees
 * them with their descriptors. */
static void relay_threads_stop(void)
{
    for (unsigned i = 0; i < state.relay_thread_count; i++) {
        struct relay_thread *thread = &state.relay_threads[i];
        pthread_mutex_lock(&thread->inbox_lock);
        thread->stop = true;
        pthread_mutex_unlock(&thread->inbox_lock);
        eventfd_write(thread->wake_fd, 1);
    }
    for (unsigned i = 0; i < state.relay_thread_count; i++) {
        struct relay_thread *thread = &state.relay_threads[i];
        if (thread->thread != 0)
            pthread_join(thread->thread, NULL);
        /* A thread that never ran (its start failed) may have been handed
         * pairs by one that did. */
        while (thread->inbox != NULL) {
            struct relay_pair *pair = thread->inbox;
            thread->inbox = pair->older;
            relay_close(thread, pair, END_TIMED_OUT);
        }
        relay_free_closed(thread);
        close(thread->epoll_fd);
        close(thread->wake_fd);
        free(thread->scratch);
        pthread_mutex_destroy(&thread->inbox_lock);
    }
    free(state.relay_threads);
    state.relay_threads = NULL;
    state.relay_thread_count = 0;
}

/* Frees what proxy_open() made, in reverse order; safe on a half-made state
 * (everything starts as NULL or -1). Threads must have ended first. */
static void proxy_free(void)
{
    for (size_t i = 0; i < state.listener_count; i++)
        if (state.listeners[i].fd >= 0)
            close(state.listeners[i].fd);
    free(state.listeners);
    state.listeners = NULL;
    state.listener_count = 0;
    if (state.stats_listener != NULL && state.stats_listener->fd >= 0)
        close(state.stats_listener->fd);
    free(state.stats_listener);
    state.stats_listener = NULL;
    free(state.chat_upstreams);
    free(state.media_upstream);
    free(state.decoy_upstreams);
    state.chat_upstreams = state.media_upstream = state.decoy_upstreams = NULL;
    SSL_CTX_free(state.tls_context);
    state.tls_context = NULL;
    if (state.abort_fd >= 0)
        close(state.abort_fd);
    state.abort_fd = -1;
    /* main_wake_fd stays open: see proxy_open(). */
    pthread_cond_destroy(&state.ended);
}

/* Makes the upstream list from the settings; every server starts in
 * rotation, its first health check one interval from now. A name that does
 * not resolve now is tried again later. */
static void upstreams_prepare(const struct settings *settings)
{
    size_t count = settings->chat_upstream_count;
    state.chat_upstreams = xcalloc(count, sizeof *state.chat_upstreams);
    state.media_upstream = xcalloc(1, sizeof *state.media_upstream);
    if (settings->decoy_enabled)
        state.decoy_upstreams = xcalloc(decoy_count(settings),
                                        sizeof *state.decoy_upstreams);
    size_t total = count + 1 + decoy_count(settings);
    for (size_t i = 0; i < total; i++) {
        struct upstream *upstream = upstream_numbered(i);
        upstream->spec = i < count    ? settings->chat_upstreams[i]
                         : i == count ? settings->media_upstream
                                      : settings->decoy;
        if (i == count + 2) /* the decoy's own TLS port */
            upstream->spec.port = settings->decoy_tls_port;
        upstream->up = true;
        upstream->next_check_ms = now_ms() + settings->check_interval_ms;
        snprintf(upstream->last_result, sizeof upstream->last_result,
                 upstream_numbered_used(i) ? "not checked yet"
                                           : "not used by any listener");
        char warning[300];
        if (upstream_numbered_used(i) &&
            upstream_resolve(upstream, warning, sizeof warning) < 0) {
            log_line(LOG_WARN, "%s%s (trying again every %d s)",
                     i > count ? "--decoy: " : "", warning,
                     UPSTREAM_DOWN_CHECK_MS / 1000);
            upstream->next_check_ms = now_ms() + UPSTREAM_DOWN_CHECK_MS;
        }
    }
}

/* Binds every listener and the statistics port. Returns 0 or -1 with one
 * line in error. */
static int listeners_open(const struct settings *settings, char *error,
                          size_t error_size)
{
    state.listeners = xcalloc(settings->listener_count,
                              sizeof *state.listeners);
    state.listener_count = settings->listener_count;
    for (size_t i = 0; i < settings->listener_count; i++)
        state.listeners[i].fd = -1;
    for (size_t i = 0; i < settings->listener_count; i++) {
        state.listeners[i].spec = settings->listeners[i];
        if (listener_open(&state.listeners[i], "--listen", error,
                          error_size) < 0)
            return -1;
    }
    if (!settings->stats_enabled)
        return 0;
    state.stats_listener = xcalloc(1, sizeof *state.stats_listener);
    state.stats_listener->fd = -1;
    state.stats_listener->spec = settings->stats;
    if (listener_open(state.stats_listener, "--stats (or --stats off)",
                      error, error_size) < 0)
        return -1;
    return 0;
}

/* Makes everything ready to serve; see whatsapp_proxy.h. */
int proxy_open(struct settings *settings, char *error, size_t error_size)
{
    state.settings = settings;
    atomic_store(&state.log_level, settings->log_level);
    for (size_t i = 0; i < COUNTER_COUNT; i++)
        atomic_store(&state.counters[i], 0);
    atomic_store(&state.next_chat_upstream, 0); /* first client, first server */
    atomic_store(&state.accept_rest_until_ms, 0);
    atomic_store(&state.accept_warned_ms, LLONG_MIN / 2); /* never warned */
    atomic_store(&state.certificate_expires_at, 0);
    atomic_store(&state.certificate_warned_at, 0);
    stop_requested = 0;
    state.reload_requested = 0;
    state.started_at = time(NULL);
    /* Writing to a socket whose peer is gone must fail with EPIPE, not
     * kill the whole process with SIGPIPE (OpenSSL writes with write()). */
    signal(SIGPIPE, SIG_IGN);

    /* The grace period's timed wait needs a monotonic clock, which only a
     * condition made at run time can have. */
    pthread_condattr_t attributes;
    pthread_condattr_init(&attributes);
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC);
    pthread_cond_init(&state.ended, &attributes);
    pthread_condattr_destroy(&attributes);

    state.abort_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    /* main_wake_fd is made once and never closed: a signal may ask for a
     * stop at any moment, even while the previous stop is ending, and must
     * never write to a descriptor that has been closed (or reused). */
    if (state.main_wake_fd < 0)
        state.main_wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (state.abort_fd < 0 || state.main_wake_fd < 0) {
        parse_failure(error, error_size, "cannot make an eventfd: %s",
                      strerror(errno));
        goto failed;
    }

    bool any_tls = false;
    for (size_t i = 0; i < settings->listener_count; i++)
        any_tls |= settings->listeners[i].tls;
    if (any_tls) {
        state.tls_context = tls_context_new(settings, error, error_size);
        if (state.tls_context == NULL)
            goto failed;
    }
    upstreams_prepare(settings);
    if (listeners_open(settings, error, error_size) < 0)
        goto failed;
    if (state.tls_context != NULL) {
        atomic_store(&state.certificate_expires_at,
                     tls_certificate_expiry(state.tls_context));
        tls_log_certificate(state.tls_context);
        tls_save_made_certificate(state.tls_context, settings); /* ports bound */
    }

    if (settings->user[0] != '\0') {
        if (privileges_drop(settings->user, error, error_size) < 0)
            goto failed;
    } else if (geteuid() == 0) {
        log_line(LOG_WARN, "running as root: give --user NAME (for example "
                 "--user nobody) to drop privileges after binding");
    }

    descriptor_limit_raise(settings->maxconn);
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned threads = settings->relay_threads
                           ? settings->relay_threads
                           : (unsigned)(cpus > 0 ? cpus : 1);
    if (relay_threads_start(threads, error, error_size) < 0) {
        relay_threads_stop();
        goto failed;
    }
    bool health = pthread_create(&state.health_thread, NULL,
                                 upstream_health_run, NULL) == 0;
    bool stats = state.stats_listener == NULL ||
                 pthread_create(&state.stats_thread, NULL, stats_run,
                                NULL) == 0;
    if (!health || !stats) {
        /* The threads that did start end when abort_fd is written. */
        eventfd_write(state.abort_fd, 1);
        if (health)
            pthread_join(state.health_thread, NULL);
        if (stats && state.stats_listener != NULL)
            pthread_join(state.stats_thread, NULL);
        relay_threads_stop();
        parse_failure(error, error_size, "cannot start a thread");
        goto failed;
    }
    return 0;
failed:
    proxy_free();
    return -1;
}

/* What the main thread does while the relay threads serve: waits for a signal,
 * reloads the certificate when asked, and returns when a stop is requested. */
static void main_wait_for_stop(void)
{
    while (!stop_requested) {
        if (atomic_exchange(&state.reload_requested, 0))
            tls_reload();
        struct pollfd wake = {.fd = state.main_wake_fd, .events = POLLIN};
        if (poll(&wake, 1, -1) > 0) {
            eventfd_t ignored;
            eventfd_read(state.main_wake_fd, &ignored);
        }
    }
}

/* Waits until no client connection is left or grace_ms have passed.
 * Returns how many were still open. */
static unsigned connections_drain(int grace_ms)
{
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    long long end_ns = deadline.tv_nsec + grace_ms * 1000000LL;
    deadline.tv_sec += end_ns / 1000000000;
    deadline.tv_nsec = end_ns % 1000000000;
    pthread_mutex_lock(&state.stop_lock);
    while (atomic_load(&state.connections_now) > 0 &&
           pthread_cond_timedwait(&state.ended, &state.stop_lock,
                                  &deadline) == 0)
        ;
    pthread_mutex_unlock(&state.stop_lock);
    return atomic_load(&state.connections_now);
}

/* Waits for a stop, then the orderly end; see whatsapp_proxy.h and the
 * section comment for the five steps. */
void proxy_run(void)
{
    main_wait_for_stop();

    for (size_t i = 0; i < state.listener_count; i++)        /* step 1 */
        shutdown(state.listeners[i].fd, SHUT_RDWR);
    unsigned open_now = proxy_connections_now();
    if (open_now > 0)
        log_line(LOG_INFO, "stopping: no new clients; waiting up to %.0f s "
                 "for %u connection%s to end", state.settings->grace_ms /
                 1000.0, open_now, open_now == 1 ? "" : "s");
    unsigned left = connections_drain(state.settings->grace_ms); /* step 2 */
    if (left > 0)
        log_line(LOG_INFO, "grace period over: closing %u connection%s", left,
                 left == 1 ? "" : "s");

    eventfd_write(state.abort_fd, 1);                         /* step 3 */
    pthread_join(state.health_thread, NULL);
    if (state.stats_listener != NULL)
        pthread_join(state.stats_thread, NULL);

    relay_threads_stop();                                     /* step 4 */
    proxy_free();                                             /* step 5 */
}

/* Asks proxy_run() to end; see whatsapp_proxy.h. Only async-signal-safe
 * calls here: an atomic store and a write(). */
void proxy_request_stop(void)
{
    stop_requested = 1;
    if (state.main_wake_fd >= 0)
        eventfd_write(state.main_wake_fd, 1);
}

/* Asks for a certificate reload; see whatsapp_proxy.h. */
void proxy_request_reload(void)
{
    state.reload_requested = 1;
    if (state.main_wake_fd >= 0)
        eventfd_write(state.main_wake_fd, 1);
}

uint16_t proxy_listener_port(size_t index)
{
    return index < state.listener_count ? state.listeners[index].port : 0;
}

uint16_t proxy_stats_port(void)
{
    return state.stats_listener != NULL ? state.stats_listener->port : 0;
}

static void on_signal(int signal_number)
{
    if (signal_number == SIGHUP)
        proxy_request_reload();
    else
        proxy_request_stop();
}

/* SIGTERM (systemd, docker stop) and SIGINT (Ctrl-C) stop the proxy;
 * SIGHUP (certbot's deploy hook) reloads the certificate. */
static void signals_install(void)
{
    struct sigaction action = {.sa_handler = on_signal};
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGHUP, &action, NULL);
}

/* Logs what the proxy serves, one line per port, then the "ready" line
 * (scripts wait for it). */
static void log_ready(void)
{
    for (size_t i = 0; i < state.listener_count; i++) {
        char line[160];
        listener_describe(&state.listeners[i].spec, state.listeners[i].port,
                          line, sizeof line);
        log_line(LOG_INFO, "listening on %s", line);
    }
    if (state.stats_listener != NULL)
        log_line(LOG_INFO, "statistics on http://%s:%u/",
                 state.stats_listener->spec.address,
                 state.stats_listener->port);
    char link[HOST_NAME_BYTES + 128];
    bool linked = share_link_for(state.settings, link, sizeof link);
    log_line(LOG_INFO, "%s%s", linked ? "share link for users: " : "", link);
    log_line(LOG_INFO, PROGRAM_NAME " " PROGRAM_VERSION " ready; %u relay "
             "threads; --maxconn %u", state.relay_thread_count,
             state.settings->maxconn);
}

int main(int argc, char **argv)
{
    char error[512];
    struct settings *settings = settings_new(); /* the reference's defaults */
    int status = 0;

    switch (settings_parse(settings, argc, argv, error, sizeof error)) {
    case PARSE_RUN:
        break;
    case PARSE_EXIT_OK:
        goto out;
    case PARSE_ERROR:
        fprintf(stderr, PROGRAM_NAME ": %s\n", error);
        status = 2;
        goto out;
    }
    atomic_store(&state.log_level, settings->log_level); /* for --check too */

    if (settings->check_only) {                 /* --check: report and exit */
        status = check_summary_print(settings);
        goto out;
    }
    signals_install();                          /* before any thread starts */
    if (proxy_open(settings, error, sizeof error) < 0) { /* bind, certs, ... */
        fprintf(stderr, PROGRAM_NAME ": %s\n", error);
        status = 2;
        goto out;
    }
    log_ready();                                /* "listening on ..." */
    proxy_run();                                /* until a stop signal */
    log_line(LOG_INFO, "stopped");
out:
    settings_free(settings);
    return status;
}
