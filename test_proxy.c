/*
 * test_proxy.c - the tests of whatsapp_proxy, with the Check framework.
 *
 * The tests follow the sections of whatsapp_proxy.c in the same order: one
 * test case (TCase) per section, with the section's name. Run them all with
 * `make test`, one section with
 *
 *     CK_RUN_CASE="PROXY protocol" make test
 *
 * and debug a crash in gdb with CK_FORK=no (Check then runs every test in
 * one process instead of forking one per test).
 *
 * Most tests start the real proxy inside this process (proxy_open() and
 * proxy_run() in a thread), configured with command-line flags exactly as an
 * operator would, on loopback ports the kernel picks (port 0). A "fake
 * upstream" started by the test stands in for WhatsApp's servers: it reads
 * the PROXY header the proxy sends, remembers it, and then echoes, or holds,
 * or answers, as the test asks. Tests of error messages run the built
 * binary ./whatsapp_proxy and read what it prints.
 *
 * Rules every test here keeps: it asserts something that fails when the
 * feature is missing; it waits for conditions, never for a fixed time; every
 * wait has a deadline; and it stops every thread and process it starts.
 */

#include "whatsapp_proxy.h"

#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <linux/tcp.h> /* struct tcp_info with tcpi_data_segs_in */
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* ==== Helpers shared by every section ==== */

/* Every wait below is multiplied by this: 1 normally, more under valgrind
 * (`make valgrind` sets TEST_TIME_SCALE), where everything is slower. */
static int time_scale = 1;
/* How long a test waits for something that should happen at once. */
#define PROMPTLY_MS (3000 * time_scale)
/* How long a test waits for something slow (a large transfer). */
#define SLOWLY_MS (30000 * time_scale)

static long long clock_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

/* Waits until counter reaches at least value, or timeout_ms pass. Returns
 * true if it did. Polls every millisecond: counters have no event to wait on. */
static bool counter_reaches(enum counter which, unsigned long long value,
                            int timeout_ms)
{
    long long deadline = clock_ms() + timeout_ms;
    while (proxy_counter(which) < value) {
        if (clock_ms() > deadline)
            return false;
        usleep(1000);
    }
    return true;
}

/* Waits until the proxy holds exactly `count` client connections. */
static bool connections_become(unsigned count, int timeout_ms)
{
    long long deadline = clock_ms() + timeout_ms;
    while (proxy_connections_now() != count) {
        if (clock_ms() > deadline)
            return false;
        usleep(1000);
    }
    return true;
}

/* ---- The proxy under test ---- */

static struct {
    struct settings *settings;
    pthread_t thread;
    bool running;
    char cert_dir[64];
} proxy;

static void *proxy_thread_run(void *unused)
{
    (void)unused;
    proxy_run();
    return NULL;
}

/* Appends the flags of a NULL-terminated list (first, then flags) to
 * argv[*argc], keeping room for the final NULL in 64 slots. */
static void flags_append(char **argv, int *argc, const char *first,
                         va_list flags)
{
    for (const char *flag = first; flag != NULL;
         flag = va_arg(flags, const char *)) {
        ck_assert_int_lt(*argc, 62);
        argv[(*argc)++] = (char *)flag;
    }
}

/* Starts the proxy with argv[0..argc) after the test defaults (see
 * proxy_start()). */
static void proxy_start_argv(char **flags, int flag_count)
{
    char *argv[64];
    int argc = 0;
    snprintf(proxy.cert_dir, sizeof proxy.cert_dir, "/tmp/wp_test_XXXXXX");
    ck_assert_msg(mkdtemp(proxy.cert_dir) != NULL, "a temporary folder");
    const char *defaults[] = {"whatsapp_proxy", "--log-level", "error",
                              "--stats", "off", "--check-interval", "3600",
                              "--grace", "5", "--cert-dir", proxy.cert_dir};
    for (size_t i = 0; i < sizeof defaults / sizeof defaults[0]; i++)
        argv[argc++] = (char *)defaults[i];
    ck_assert_int_lt(argc + flag_count, 64);
    for (int i = 0; i < flag_count; i++)
        argv[argc++] = flags[i];
    argv[argc] = NULL;

    char error[512] = "";
    proxy.settings = settings_new();
    ck_assert_msg(settings_parse(proxy.settings, argc, argv, error,
                                 sizeof error) == PARSE_RUN,
                  "the test's flags should parse, but: %s", error);
    ck_assert_msg(proxy_open(proxy.settings, error, sizeof error) == 0,
                  "the proxy should start, but: %s", error);
    ck_assert_int_eq(pthread_create(&proxy.thread, NULL, proxy_thread_run,
                                    NULL), 0);
    proxy.running = true;
}

/* Starts the proxy with the given flags (a NULL-terminated list), after
 * quiet defaults for tests: errors-only logging, no statistics port, no
 * health checks during the test, a fresh certificate folder. Fails the test
 * if the proxy does not start. */
static void proxy_start(const char *first_flag, ...)
{
    char *flags[64];
    int count = 0;
    va_list rest;
    va_start(rest, first_flag);
    flags_append(flags, &count, first_flag, rest);
    va_end(rest);
    proxy_start_argv(flags, count);
}

/* Waits for the proxy started by proxy_start() to end (someone asked it
 * to stop), and removes what it left: its settings, its certificate
 * folder. */
static void proxy_join(void)
{
    pthread_join(proxy.thread, NULL);
    settings_free(proxy.settings);
    proxy.running = false;
    char command[128];
    snprintf(command, sizeof command, "rm -rf %s", proxy.cert_dir);
    ck_assert_int_eq(system(command), 0);
}

/* Stops the proxy started by proxy_start() and waits for it to end. */
static void proxy_stop(void)
{
    if (!proxy.running)
        return;
    proxy_request_stop();
    proxy_join();
}

/* A "--listen"-style text for port on 127.0.0.1, in a static ring of
 * buffers so that a few can be used in one call. */
static const char *address_text(const char *format, uint16_t port)
{
    static char ring[8][64];
    static unsigned next;
    char *text = ring[next++ % 8];
    snprintf(text, sizeof ring[0], format, port);
    return text;
}

/* ---- Plain sockets ---- */

/* Connects to host (an IPv4 or IPv6 literal) and port; fails the test if
 * that does not work. Returns a blocking socket. */
static int connect_to(const char *host, uint16_t port)
{
    struct sockaddr_storage address = {0};
    socklen_t length;
    if (strchr(host, ':') != NULL) {
        struct sockaddr_in6 *ipv6 = (struct sockaddr_in6 *)&address;
        ipv6->sin6_family = AF_INET6;
        ipv6->sin6_port = htons(port);
        inet_pton(AF_INET6, host, &ipv6->sin6_addr);
        length = sizeof *ipv6;
    } else {
        struct sockaddr_in *ipv4 = (struct sockaddr_in *)&address;
        ipv4->sin_family = AF_INET;
        ipv4->sin_port = htons(port);
        inet_pton(AF_INET, host, &ipv4->sin_addr);
        length = sizeof *ipv4;
    }
    int fd = socket(address.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(fd, 0);
    ck_assert_msg(connect(fd, (struct sockaddr *)&address, length) == 0,
                  "connecting to %s port %u should work: %s", host, port,
                  strerror(errno));
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    return fd;
}

static int connect_local(uint16_t port)
{
    return connect_to("127.0.0.1", port);
}

/* Opens a listening socket on 127.0.0.1 and a free port; *port gets it. */
static int listen_local(uint16_t *port, int backlog)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in address = {.sin_family = AF_INET,
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&address, sizeof address), 0);
    ck_assert_int_eq(listen(fd, backlog), 0);
    socklen_t length = sizeof address;
    getsockname(fd, (struct sockaddr *)&address, &length);
    *port = ntohs(address.sin_port);
    return fd;
}

/* Returns a port on which nothing listens. It is taken below the kernel's
 * range of ephemeral ports (32768 and up by default), because a connect()
 * on loopback to a free port inside that range can, rarely, pick that very
 * port for itself and connect to itself. */
static uint16_t closed_port(void)
{
    static unsigned next;
    for (int tries = 0; tries < 1000; tries++) {
        uint16_t port = (uint16_t)(20000 + (getpid() * 7 + next++) % 12000);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in address = {.sin_family = AF_INET,
                                      .sin_port = htons(port),
                                      .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        bool free_port = bind(fd, (struct sockaddr *)&address,
                              sizeof address) == 0;
        close(fd);
        if (free_port)
            return port;
    }
    ck_abort_msg("no free port below 32000");
    return 0;
}

/* Waits up to timeout_ms for fd to become readable. */
static bool readable_within(int fd, int timeout_ms)
{
    struct pollfd watched = {.fd = fd, .events = POLLIN};
    return poll(&watched, 1, timeout_ms) == 1;
}

/* Sends all of data, or fails the test. */
static void send_all(int fd, const void *data, size_t length)
{
    const uint8_t *bytes = data;
    while (length > 0) {
        ssize_t sent = send(fd, bytes, length, MSG_NOSIGNAL);
        ck_assert_msg(sent > 0, "sending should work: %s", strerror(errno));
        bytes += sent;
        length -= (size_t)sent;
    }
}

/* Receives exactly length bytes within timeout_ms. Returns how many came
 * (fewer if the peer closed or time ran out). */
static size_t receive_exactly(int fd, void *buffer, size_t length,
                              int timeout_ms)
{
    uint8_t *bytes = buffer;
    size_t got = 0;
    long long deadline = clock_ms() + timeout_ms;
    while (got < length) {
        long long left = deadline - clock_ms();
        if (left <= 0 || !readable_within(fd, (int)left))
            break;
        ssize_t count = read(fd, bytes + got, length - got);
        if (count <= 0)
            break;
        got += (size_t)count;
    }
    return got;
}

/* True if the peer ends the connection (EOF or reset) within timeout_ms,
 * reading and ignoring anything before that. */
static bool closed_within(int fd, int timeout_ms)
{
    long long deadline = clock_ms() + timeout_ms;
    uint8_t sink[4096];
    for (;;) {
        long long left = deadline - clock_ms();
        if (left <= 0 || !readable_within(fd, (int)left))
            return false;
        ssize_t count = recv(fd, sink, sizeof sink, 0);
        if (count == 0 || (count < 0 && errno == ECONNRESET))
            return true;
    }
}

/* Sends text and checks that the same bytes come back. */
static void expect_echo(int fd, const char *text)
{
    char back[256];
    size_t length = strlen(text);
    send_all(fd, text, length);
    ck_assert_msg(receive_exactly(fd, back, length, PROMPTLY_MS) == length,
                  "the %zu bytes sent should come back", length);
    ck_assert_msg(memcmp(back, text, length) == 0,
                  "the bytes should come back unchanged");
}

/* ---- TLS clients ---- */

/* Does a TLS handshake as a client on fd (no certificate check, as the
 * WhatsApp app does not check either), asking for server_name (NULL: none).
 * Returns the SSL or NULL on failure. max_version 0 means any. The caller
 * frees with tls_client_close(). */
static SSL *tls_client_start_named(int fd, int max_version,
                                   const char *server_name)
{
    SSL_CTX *context = SSL_CTX_new(TLS_client_method());
    if (max_version != 0) {
        SSL_CTX_set_security_level(context, 0);
        SSL_CTX_set_min_proto_version(context, 0);
        SSL_CTX_set_max_proto_version(context, max_version);
    }
    SSL *tls = SSL_new(context);
    SSL_CTX_free(context); /* the SSL keeps its own reference */
    SSL_set_fd(tls, fd);
    if (server_name != NULL)
        SSL_set_tlsext_host_name(tls, server_name);
    if (SSL_connect(tls) != 1) {
        ERR_clear_error();
        SSL_free(tls);
        return NULL;
    }
    return tls;
}

static SSL *tls_client_start(int fd, int max_version)
{
    return tls_client_start_named(fd, max_version, NULL);
}

static void tls_client_close(SSL *tls)
{
    SSL_free(tls);
}

/* Writes all of data over TLS, or fails the test. */
static void tls_send_all(SSL *tls, const void *data, size_t length)
{
    size_t written = 0;
    ck_assert_msg(SSL_write_ex(tls, data, length, &written) == 1 &&
                      written == length, "writing over TLS should work");
}

/* Reads exactly length bytes over TLS (blocking socket). Returns the count
 * read, fewer if the connection ended. */
static size_t tls_receive_exactly(SSL *tls, void *buffer, size_t length)
{
    size_t got = 0;
    while (got < length) {
        size_t count = 0;
        if (SSL_read_ex(tls, (uint8_t *)buffer + got, length - got, &count) != 1)
            break;
        got += count;
    }
    return got;
}

/* Returns the subject common name of the certificate the server sent. */
static void tls_peer_common_name(SSL *tls, char *out, size_t out_size)
{
    X509 *certificate = SSL_get1_peer_certificate(tls);
    ck_assert_ptr_nonnull(certificate);
    X509_NAME_get_text_by_NID(X509_get_subject_name(certificate),
                              NID_commonName, out, (int)out_size);
    X509_free(certificate);
}

/* Sets a receive timeout on fd so that a blocking TLS read cannot hang a
 * test forever. */
static void socket_timeout(int fd, int timeout_ms)
{
    struct timeval limit = {.tv_sec = timeout_ms / 1000,
                            .tv_usec = (timeout_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
}

/* ---- The fake upstream ---- */

/* What the fake upstream does with each connection after the header. */
enum upstream_mode {
    UPSTREAM_ECHO,        /* send back every byte until EOF, then close */
    UPSTREAM_HOLD,        /* read nothing and send nothing until stopped */
    UPSTREAM_REPLY_AT_EOF,/* read until EOF, then send "reply" and close */
    UPSTREAM_HALF_CLOSE,  /* send "from upstream", shut its write side,
                             then read until EOF */
    UPSTREAM_RESET,       /* read the first bytes, then reset (RST) */
    UPSTREAM_WEB_SITE,    /* answer the first bytes with WEB_PAGE, close */
};

/* What the fake "decoy" web site answers. */
static const char WEB_PAGE[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 27\r\n"
    "Connection: close\r\n\r\n<h1>Bakery on Main St</h1>\n";

#define UPSTREAM_CONNECTIONS_MAX 256

/* A stand-in for a WhatsApp server, run by the test on loopback. */
struct fake_upstream {
    int listen_fd;
    uint16_t port;
    enum upstream_mode mode;
    bool expects_header;          /* false for media: no PROXY header */
    int stop_pipe[2];             /* written to stop every thread */
    pthread_t acceptor;
    pthread_mutex_t lock;         /* guards everything below */
    pthread_t handlers[UPSTREAM_CONNECTIONS_MAX];
    int handler_count;
    int connections;              /* connections accepted */
    struct proxy_addresses header; /* the last PROXY header decoded */
    int header_length;            /* its length, 0 before any */
    uint8_t header_bytes[PROXYHDR_V2_MAX_BYTES]; /* and its bytes */
    size_t received_after_eof;    /* HALF_CLOSE: bytes read after our FIN */
    uint8_t first_payload[64];    /* first bytes after the header */
    size_t first_payload_length;
};

struct upstream_connection {
    struct fake_upstream *upstream;
    int fd;
};

/* Sends all of data; returns false if the connection broke. The fake
 * upstream uses this instead of send_all(): a broken connection is what
 * some tests cause on purpose. */
static bool send_quietly(int fd, const void *data, size_t length)
{
    const uint8_t *bytes = data;
    while (length > 0) {
        ssize_t sent = send(fd, bytes, length, MSG_NOSIGNAL);
        if (sent <= 0)
            return false;
        bytes += sent;
        length -= (size_t)sent;
    }
    return true;
}

/* Waits until fd is readable or the upstream is stopped. */
static bool upstream_wait_readable(struct fake_upstream *upstream, int fd)
{
    struct pollfd watched[2] = {{.fd = fd, .events = POLLIN},
                                {.fd = upstream->stop_pipe[0],
                                 .events = POLLIN}};
    return poll(watched, 2, SLOWLY_MS) > 0 && watched[1].revents == 0;
}

/* Reads the PROXY header one byte at a time (slow, but it can never read
 * past the header) and records it. Returns false on a malformed one. */
static bool upstream_read_header(struct fake_upstream *upstream, int fd)
{
    uint8_t header[PROXYHDR_V2_MAX_BYTES];
    size_t have = 0;
    struct proxy_addresses decoded = {0};
    int length = 0;
    while (length == 0 && have < sizeof header &&
           upstream_wait_readable(upstream, fd)) {
        if (recv(fd, header + have, 1, 0) != 1)
            return false;
        have++;
        length = proxyhdr_decode(header, have, &decoded);
    }
    if (length <= 0)
        return false;
    pthread_mutex_lock(&upstream->lock);
    upstream->header = decoded;
    upstream->header_length = length;
    memcpy(upstream->header_bytes, header, (size_t)length);
    pthread_mutex_unlock(&upstream->lock);
    return true;
}

static void *upstream_connection_run(void *argument)
{
    struct upstream_connection *connection = argument;
    struct fake_upstream *upstream = connection->upstream;
    int fd = connection->fd;
    free(connection);
    uint8_t buffer[65536];

    if (upstream->expects_header && !upstream_read_header(upstream, fd))
        goto out;
    if (upstream->mode == UPSTREAM_HOLD) {
        upstream_wait_readable(upstream, upstream->stop_pipe[0]);
        goto out;
    }
    if (upstream->mode == UPSTREAM_HALF_CLOSE) {
        send_quietly(fd, "from upstream", 13);
        shutdown(fd, SHUT_WR);
    }
    bool first = true;
    while (upstream_wait_readable(upstream, fd)) {
        ssize_t count = recv(fd, buffer, sizeof buffer, 0);
        if (count <= 0)
            break;
        if (first) {
            pthread_mutex_lock(&upstream->lock);
            upstream->first_payload_length =
                (size_t)count < sizeof upstream->first_payload
                    ? (size_t)count : sizeof upstream->first_payload;
            memcpy(upstream->first_payload, buffer,
                   upstream->first_payload_length);
            pthread_mutex_unlock(&upstream->lock);
            first = false;
        }
        if (upstream->mode == UPSTREAM_ECHO &&
            !send_quietly(fd, buffer, (size_t)count))
            break;
        if (upstream->mode == UPSTREAM_WEB_SITE) {
            send_quietly(fd, WEB_PAGE, strlen(WEB_PAGE));
            break;
        }
        if (upstream->mode == UPSTREAM_RESET) {
            /* Closing with a zero linger time sends RST instead of FIN. */
            struct linger abort_now = {.l_onoff = 1, .l_linger = 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_now,
                       sizeof abort_now);
            break;
        }
        if (upstream->mode == UPSTREAM_HALF_CLOSE) {
            pthread_mutex_lock(&upstream->lock);
            upstream->received_after_eof += (size_t)count;
            pthread_mutex_unlock(&upstream->lock);
        }
    }
    if (upstream->mode == UPSTREAM_REPLY_AT_EOF)
        send_quietly(fd, "reply", 5);
out:
    close(fd);
    return NULL;
}

static void *upstream_acceptor_run(void *argument)
{
    struct fake_upstream *upstream = argument;
    while (upstream_wait_readable(upstream, upstream->listen_fd)) {
        int fd = accept4(upstream->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        pthread_mutex_lock(&upstream->lock);
        upstream->connections++;
        if (upstream->handler_count == UPSTREAM_CONNECTIONS_MAX) {
            pthread_mutex_unlock(&upstream->lock);
            close(fd);
            continue;
        }
        struct upstream_connection *connection = malloc(sizeof *connection);
        *connection = (struct upstream_connection){upstream, fd};
        pthread_create(&upstream->handlers[upstream->handler_count++], NULL,
                       upstream_connection_run, connection);
        pthread_mutex_unlock(&upstream->lock);
    }
    return NULL;
}

/* Starts a fake upstream on a free loopback port. */
static struct fake_upstream *fake_upstream_start(enum upstream_mode mode,
                                                 bool expects_header)
{
    struct fake_upstream *upstream = calloc(1, sizeof *upstream);
    upstream->mode = mode;
    upstream->expects_header = expects_header;
    upstream->listen_fd = listen_local(&upstream->port, 128);
    ck_assert_int_eq(pipe(upstream->stop_pipe), 0);
    pthread_mutex_init(&upstream->lock, NULL);
    pthread_create(&upstream->acceptor, NULL, upstream_acceptor_run, upstream);
    return upstream;
}

/* Stops a fake upstream and every thread it started. */
static void fake_upstream_stop(struct fake_upstream *upstream)
{
    ck_assert_int_eq(write(upstream->stop_pipe[1], "x", 1), 1);
    pthread_join(upstream->acceptor, NULL);
    for (int i = 0; i < upstream->handler_count; i++)
        pthread_join(upstream->handlers[i], NULL);
    close(upstream->listen_fd);
    close(upstream->stop_pipe[0]);
    close(upstream->stop_pipe[1]);
    pthread_mutex_destroy(&upstream->lock);
    free(upstream);
}

static int upstream_connections(struct fake_upstream *upstream)
{
    pthread_mutex_lock(&upstream->lock);
    int count = upstream->connections;
    pthread_mutex_unlock(&upstream->lock);
    return count;
}

/* Waits until the upstream has accepted `count` connections. (Two clients
 * that connect one after the other may reach the round-robin in either
 * order: the relay threads race. Waiting settles the order.) */
static bool upstream_connections_become(struct fake_upstream *upstream,
                                        int count)
{
    long long deadline = clock_ms() + PROMPTLY_MS;
    while (upstream_connections(upstream) != count) {
        if (clock_ms() > deadline)
            return false;
        usleep(1000);
    }
    return true;
}

/* Waits until the upstream has decoded a PROXY header; copies it out. */
static bool upstream_header_within(struct fake_upstream *upstream,
                                   struct proxy_addresses *out, int timeout_ms)
{
    long long deadline = clock_ms() + timeout_ms;
    for (;;) {
        pthread_mutex_lock(&upstream->lock);
        bool seen = upstream->header_length > 0;
        if (seen)
            *out = upstream->header;
        pthread_mutex_unlock(&upstream->lock);
        if (seen)
            return true;
        if (clock_ms() > deadline)
            return false;
        usleep(1000);
    }
}

/* The most common start of a test: an echo fake upstream that expects a
 * PROXY header, and the proxy started with the flags (a NULL-terminated
 * list) and that upstream as its one chat server. */
static struct fake_upstream *proxy_start_before_echo(const char *first_flag,
                                                     ...)
{
    struct fake_upstream *upstream = fake_upstream_start(UPSTREAM_ECHO, true);
    char *flags[64];
    int count = 0;
    va_list rest;
    va_start(rest, first_flag);
    flags_append(flags, &count, first_flag, rest);
    va_end(rest);
    flags[count++] = "--upstream";
    flags[count++] = (char *)address_text("127.0.0.1:%u", upstream->port);
    proxy_start_argv(flags, count);
    return upstream;
}

/* And its end: the proxy first, so that no connection to the upstream is
 * left for it to wait on. */
static void proxy_and_upstream_stop(struct fake_upstream *upstream)
{
    proxy_stop();
    fake_upstream_stop(upstream);
}

/* Writes the IP address and port of a sockaddr as "1.2.3.4:5". */
static void address_format(const struct sockaddr_storage *address, char *out,
                           size_t out_size)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    uint16_t port = 0;
    if (address->ss_family == AF_INET) {
        const struct sockaddr_in *ipv4 = (const struct sockaddr_in *)address;
        inet_ntop(AF_INET, &ipv4->sin_addr, ip, sizeof ip);
        port = ntohs(ipv4->sin_port);
    } else if (address->ss_family == AF_INET6) {
        const struct sockaddr_in6 *ipv6 = (const struct sockaddr_in6 *)address;
        inet_ntop(AF_INET6, &ipv6->sin6_addr, ip, sizeof ip);
        port = ntohs(ipv6->sin6_port);
    }
    snprintf(out, out_size, "%s:%u", ip, port);
}

/* ---- Running the built binary ---- */

/* Runs ./whatsapp_proxy with arguments (NULL-terminated), waits at most 20
 * seconds, and returns its exit status; its stdout and stderr are put in
 * out and err (each out_size bytes, terminated). */
static int binary_run(char *out, char *err, size_t out_size, ...)
{
    char *argv[32] = {"./whatsapp_proxy"};
    int argc = 1;
    va_list arguments;
    va_start(arguments, out_size);
    for (char *argument = va_arg(arguments, char *); argument != NULL;
         argument = va_arg(arguments, char *))
        argv[argc++] = argument;
    va_end(arguments);
    argv[argc] = NULL;

    int out_pipe[2], err_pipe[2];
    ck_assert_int_eq(pipe(out_pipe), 0);
    ck_assert_int_eq(pipe(err_pipe), 0);
    pid_t child = fork();
    ck_assert_int_ge(child, 0);
    if (child == 0) {
        dup2(out_pipe[1], STDOUT_FILENO);
        dup2(err_pipe[1], STDERR_FILENO);
        execv(argv[0], argv);
        _exit(127);
    }
    close(out_pipe[1]);
    close(err_pipe[1]);
    size_t out_length = receive_exactly(out_pipe[0], out, out_size - 1, 20000);
    size_t err_length = receive_exactly(err_pipe[0], err, out_size - 1, 2000);
    out[out_length] = err[err_length] = '\0';
    close(out_pipe[0]);
    close(err_pipe[0]);

    int status = 0;
    long long deadline = clock_ms() + 20000;
    while (waitpid(child, &status, WNOHANG) == 0) {
        if (clock_ms() > deadline) {
            kill(child, SIGKILL);
            waitpid(child, &status, 0);
            ck_abort_msg("./whatsapp_proxy should exit by itself");
        }
        usleep(1000);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* Counts the lines of text. */
static int line_count(const char *text)
{
    int lines = 0;
    for (; *text; text++)
        lines += *text == '\n';
    return lines;
}

/* ./whatsapp_proxy running in the background, with its log in a pipe. */
struct running_binary {
    pid_t pid;
    int log_fd;        /* the read end of its stderr */
    char log[16384];   /* what it logged so far */
    size_t logged;
};

/* Reads the binary's log until it contains needle or timeout_ms pass. */
static bool binary_log_shows(struct running_binary *binary, const char *needle,
                             int timeout_ms)
{
    long long deadline = clock_ms() + timeout_ms;
    while (strstr(binary->log, needle) == NULL &&
           binary->logged < sizeof binary->log - 1) {
        long long left = deadline - clock_ms();
        if (left <= 0 || !readable_within(binary->log_fd, (int)left))
            return false;
        ssize_t count = read(binary->log_fd, binary->log + binary->logged,
                             sizeof binary->log - 1 - binary->logged);
        if (count <= 0)
            return false;
        binary->logged += (size_t)count;
        binary->log[binary->logged] = '\0';
    }
    return strstr(binary->log, needle) != NULL;
}

/* Starts ./whatsapp_proxy with the arguments (NULL-terminated) and an
 * open-file limit of max_files (0: unchanged), and waits for the "ready"
 * line of its log. (Polling its port with connect() would be wrong: on
 * loopback a connect to a free port can, rarely, pick that very port for
 * itself and connect to itself.) */
static void binary_start(struct running_binary *binary, int max_files, ...)
{
    /* The limit is set by a shell (`ulimit -n`), not by setrlimit() here:
     * under valgrind this process's setrlimit() does not reach the child. */
    char limit_command[64];
    snprintf(limit_command, sizeof limit_command,
             "%s exec ./whatsapp_proxy \"$@\"",
             max_files > 0 ? "ulimit -n $0 &&" : "");
    char max_files_text[16];
    snprintf(max_files_text, sizeof max_files_text, "%d", max_files);
    char *argv[32] = {"sh", "-c", limit_command, max_files_text};
    int argc = 4;
    va_list arguments;
    va_start(arguments, max_files);
    for (char *argument = va_arg(arguments, char *); argument != NULL;
         argument = va_arg(arguments, char *))
        argv[argc++] = argument;
    va_end(arguments);
    argv[argc] = NULL;

    int log_pipe[2];
    ck_assert_int_eq(pipe(log_pipe), 0);
    binary->pid = fork();
    ck_assert_int_ge(binary->pid, 0);
    if (binary->pid == 0) {
        dup2(log_pipe[1], STDERR_FILENO);
        execv("/bin/sh", argv);
        _exit(127);
    }
    close(log_pipe[1]);
    binary->log_fd = log_pipe[0];
    binary->logged = 0;
    binary->log[0] = '\0';
    ck_assert_msg(binary_log_shows(binary, " ready;", SLOWLY_MS),
                  "the binary starts: %s", binary->log);
}

/* Sends SIGTERM (if signal_first) and waits for the binary to exit, with
 * SIGKILL after SLOWLY_MS. Returns its exit status (128 + signal if
 * killed). The rest of its log is in binary->log. */
static int binary_wait(struct running_binary *binary, bool signal_first)
{
    if (signal_first)
        kill(binary->pid, SIGTERM);
    int status = 0;
    long long deadline = clock_ms() + SLOWLY_MS;
    while (waitpid(binary->pid, &status, WNOHANG) == 0) {
        if (clock_ms() > deadline) {
            kill(binary->pid, SIGKILL);
            waitpid(binary->pid, &status, 0);
            break;
        }
        usleep(1000);
    }
    binary_log_shows(binary, "\n\n(never)", 100); /* reads what is left */
    close(binary->log_fd);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ==== 1. Settings and limits ==== */

/* The defaults are the reference's servers, limits and timeouts, and the
 * ports a phone connects to directly (no PROXY-header port: those are for
 * a balancer, asked for with --listen). The --check summary shows them
 * without binding anything. */
START_TEST(test_defaults_are_the_reference_ones)
{
    char out[16384], err[16384];
    binary_run(out, err, sizeof out, "--check", "--cert-dir", "/tmp", NULL);
    ck_assert_msg(strstr(out, "PROXY header in") == NULL,
                  "no default port expects a PROXY header: %s", out);
    const char *expected[] = {
        "port 80 (chat, plain)", "port 443 (chat, TLS)",
        "port 5222 (chat, plain)", "port 587 (media, passthrough)",
        "port 7777 (media, passthrough)",
        "g.whatsapp.net:5222", "g.whatsapp.net:80", "g.whatsapp.net:443",
        "g-fallback.whatsapp.net:5222", "g-fallback.whatsapp.net:80",
        "g-fallback.whatsapp.net:443", "whatsapp.net:443",
        "header sent: PROXY v2", "--maxconn 27500", "connect 5.0",
        "idle 200.0", "fin 1.0", "handshake 60.0"};
    for (size_t i = 0; i < sizeof expected / sizeof expected[0]; i++)
        ck_assert_msg(strstr(out, expected[i]) != NULL,
                      "--check should show the default '%s'", expected[i]);
}
END_TEST

/* ==== 2. Logging and errors ==== */

/* Sends this process's stderr (where the proxy logs) to a temporary file
 * until stderr_capture_end(). */
struct stderr_capture {
    int file_fd;
    int saved_stderr;
};

static struct stderr_capture stderr_capture_begin(void)
{
    char path[] = "/tmp/wp_log_XXXXXX";
    struct stderr_capture capture = {.file_fd = mkstemp(path)};
    unlink(path); /* the open descriptor keeps it until closed */
    fflush(stderr);
    capture.saved_stderr = dup(STDERR_FILENO);
    dup2(capture.file_fd, STDERR_FILENO);
    return capture;
}

/* Waits until what was logged so far contains needle. */
static bool stderr_capture_shows(struct stderr_capture *capture,
                                 const char *needle, int timeout_ms)
{
    char log[8192];
    long long deadline = clock_ms() + timeout_ms;
    for (;;) {
        fflush(stderr);
        ssize_t length = pread(capture->file_fd, log, sizeof log - 1, 0);
        log[length > 0 ? length : 0] = '\0';
        if (strstr(log, needle) != NULL)
            return true;
        if (clock_ms() > deadline)
            return false;
        usleep(1000);
    }
}

/* Puts stderr back and copies what was logged into log (size bytes). */
static void stderr_capture_end(struct stderr_capture *capture, char *log,
                               size_t size)
{
    fflush(stderr);
    dup2(capture->saved_stderr, STDERR_FILENO);
    close(capture->saved_stderr);
    ssize_t length = pread(capture->file_fd, log, size - 1, 0);
    log[length > 0 ? length : 0] = '\0';
    close(capture->file_fd);
}

/* Runs one client through an accept-proxy port whose header says it comes
 * from 203.0.113.7, to an unreachable server (which logs a warning), and
 * returns whether the log mentioned that address. */
static bool log_mentions_client(bool log_clients)
{
    struct stderr_capture capture = stderr_capture_begin();

    proxy_start("--listen", "127.0.0.1:0/accept-proxy", "--upstream",
                address_text("127.0.0.1:%u", closed_port()),
                "--log-level", "warn",
                log_clients ? "--log-clients" : NULL, NULL);
    int client = connect_local(proxy_listener_port(0));
    send_all(client, "PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n", 44);
    ck_assert_msg(counter_reaches(COUNTER_UPSTREAM_UNREACHABLE, 1,
                                  PROMPTLY_MS + 3000), /* after 4 tries */
                  "the proxy finds no server reachable for the client");
    close(client);
    proxy_stop();

    char log[8192];
    stderr_capture_end(&capture, log, sizeof log);
    ck_assert_msg(strstr(log, "no server reachable") != NULL,
                  "the failure should be logged");
    return strstr(log, "203.0.113.7") != NULL;
}

START_TEST(test_client_addresses_stay_out_of_logs_by_default)
{
    ck_assert_msg(!log_mentions_client(false),
                  "without --log-clients no client address is logged");
}
END_TEST

START_TEST(test_log_clients_writes_client_addresses)
{
    ck_assert_msg(log_mentions_client(true),
                  "with --log-clients the client address is logged");
}
END_TEST

/* ==== 3. Command line ==== */

START_TEST(test_listener_spec_accepts_every_documented_form)
{
    struct listener_spec spec;
    char error[256];
    ck_assert_int_eq(listener_spec_parse("443/tls", &spec, error, sizeof error),
                     0);
    ck_assert_msg(spec.port == 443 && spec.tls && !spec.accept_proxy &&
                  !spec.media && spec.address[0] == '\0',
                  "443/tls is TLS on port 443 of every address, no header");
    ck_assert_int_eq(listener_spec_parse("[::1]:8443/tls/accept-proxy", &spec,
                                         error, sizeof error), 0);
    ck_assert_str_eq(spec.address, "::1");
    ck_assert_msg(spec.port == 8443 && spec.tls && spec.accept_proxy,
                  "the port is 8443, with TLS and a PROXY header in");
    ck_assert_int_eq(listener_spec_parse("127.0.0.1:7777/media/accept-proxy",
                                         &spec, error, sizeof error), 0);
    ck_assert_str_eq(spec.address, "127.0.0.1");
    ck_assert_msg(spec.port == 7777 && spec.media && spec.accept_proxy,
                  "the port is 7777, for media, with a PROXY header in");
    ck_assert_int_eq(listener_spec_parse("0", &spec, error, sizeof error), 0);
    ck_assert_int_eq(spec.port, 0);
}
END_TEST

START_TEST(test_listener_spec_refuses_bad_ones_with_a_reason)
{
    const char *bad[] = {"443/tls/media", "70000", "abc", "80/foo", "",
                         "/tls", "::1:80", "1.2.3:80", "[::1]80", "-1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct listener_spec spec;
        char error[256] = "";
        ck_assert_msg(listener_spec_parse(bad[i], &spec, error,
                                          sizeof error) == -1,
                      "'%s' should be refused", bad[i]);
        ck_assert_msg(strstr(error, "--listen") != NULL,
                      "the reason for '%s' should name --listen: %s", bad[i],
                      error);
    }
}
END_TEST

START_TEST(test_host_port_parse_takes_names_and_bracketed_ipv6)
{
    char host[256], error[256];
    uint16_t port;
    ck_assert_int_eq(host_port_parse("g.whatsapp.net:5222", host, sizeof host,
                                     &port, error, sizeof error), 0);
    ck_assert_str_eq(host, "g.whatsapp.net");
    ck_assert_int_eq(port, 5222);
    ck_assert_int_eq(host_port_parse("[::1]:80", host, sizeof host, &port,
                                     error, sizeof error), 0);
    ck_assert_str_eq(host, "::1");
    ck_assert_int_eq(port, 80);
    const char *bad[] = {"g.whatsapp.net", "host:", ":80", "host:99999",
                         "host:0", "::1:80"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(host_port_parse(bad[i], host, sizeof host, &port, error,
                                      sizeof error) == -1,
                      "'%s' should be refused", bad[i]);
}
END_TEST

START_TEST(test_seconds_parse_takes_decimals_and_refuses_nonsense)
{
    int ms = 0;
    char error[256];
    ck_assert_int_eq(seconds_parse("200", "--timeout-idle", &ms, error,
                                   sizeof error), 0);
    ck_assert_int_eq(ms, 200000);
    ck_assert_int_eq(seconds_parse("0.25", "--timeout-idle", &ms, error,
                                   sizeof error), 0);
    ck_assert_int_eq(ms, 250);
    const char *bad[] = {"-1", "abc", "", "0", "5s", "1e99"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_msg(seconds_parse(bad[i], "--timeout-idle", &ms, error,
                                    sizeof error) == -1,
                      "'%s' should be refused", bad[i]);
        ck_assert_msg(strstr(error, "--timeout-idle") != NULL,
                      "the reason should name the flag: %s", error);
    }
}
END_TEST

/* Parses argv (NULL-terminated) into fresh settings; returns the result and
 * leaves the error text in error. */
static enum parse_result parse_flags(char *error, size_t error_size, ...)
{
    char *argv[16] = {"whatsapp_proxy"};
    int argc = 1;
    va_list arguments;
    va_start(arguments, error_size);
    for (char *flag = va_arg(arguments, char *); flag != NULL;
         flag = va_arg(arguments, char *))
        argv[argc++] = flag;
    va_end(arguments);
    struct settings *settings = settings_new();
    enum parse_result result = settings_parse(settings, argc, argv, error,
                                              error_size);
    settings_free(settings);
    return result;
}

START_TEST(test_settings_parse_names_the_flag_that_is_wrong)
{
    char error[256] = "";
    ck_assert_int_eq(parse_flags(error, sizeof error, "--bogus", NULL),
                     PARSE_ERROR);
    ck_assert_msg(strstr(error, "--bogus") != NULL, "names --bogus: %s", error);
    ck_assert_int_eq(parse_flags(error, sizeof error, "--listen", NULL),
                     PARSE_ERROR);
    ck_assert_msg(strstr(error, "--listen needs a value") != NULL,
                  "says --listen needs a value: %s", error);
    ck_assert_int_eq(parse_flags(error, sizeof error, "--send-proxy", "v3",
                                 NULL), PARSE_ERROR);
    ck_assert_msg(strstr(error, "--send-proxy") != NULL, "names the flag");
    ck_assert_int_eq(parse_flags(error, sizeof error, "--cert", "a.pem", NULL),
                     PARSE_ERROR);
    ck_assert_msg(strstr(error, "--key") != NULL, "asks for --key too");
    ck_assert_int_eq(parse_flags(error, sizeof error, "--ssl-ip", "1.2.3",
                                 NULL), PARSE_ERROR);
    ck_assert_int_eq(parse_flags(error, sizeof error, "--maxconn=0", NULL),
                     PARSE_ERROR);
    ck_assert_int_eq(parse_flags(error, sizeof error, "--maxconn=10",
                                 "--timeout-idle", "1.5", NULL), PARSE_RUN);
}
END_TEST

/* Flags that only make sense with another, and host names that are not
 * names, are refused with a line that says so. */
START_TEST(test_settings_parse_refuses_what_cannot_work)
{
    char error[256] = "";
    ck_assert_int_eq(parse_flags(error, sizeof error, "--listen", "80",
                                 "--sni", "secret.example.org", NULL),
                     PARSE_ERROR);
    ck_assert_msg(strstr(error, "--sni needs a TLS listener") != NULL,
                  "--sni without a TLS port says why: %s", error);
    ck_assert_int_eq(parse_flags(error, sizeof error, "--decoy-rule",
                                 "strict", NULL), PARSE_ERROR);
    ck_assert_msg(strstr(error, "--decoy") != NULL,
                  "--decoy-rule without --decoy says why: %s", error);
    const char *bad_tls_ports[] = {"0", "65536", "https", ""};
    for (size_t i = 0; i < 4; i++) {
        ck_assert_int_eq(parse_flags(error, sizeof error, "--listen", "443/tls",
                                     "--decoy", "127.0.0.1:8081",
                                     "--decoy-tls-port", bad_tls_ports[i],
                                     NULL), PARSE_ERROR);
        ck_assert_msg(strstr(error, "bad --decoy-tls-port") != NULL,
                      "--decoy-tls-port '%s' is refused: %s", bad_tls_ports[i],
                      error);
    }
    ck_assert_int_eq(parse_flags(error, sizeof error, "--listen", "80",
                                 "--decoy", "127.0.0.1:8081",
                                 "--decoy-tls-port", "8444", NULL),
                     PARSE_ERROR);
    ck_assert_msg(strstr(error, "needs a TLS listener") != NULL,
                  "--decoy-tls-port without a TLS port says why: %s", error);
    /* A decoy on one of the proxy's own ports would send each client back
     * to the proxy, again and again. */
    ck_assert_int_eq(parse_flags(error, sizeof error, "--listen", "443/tls",
                                 "--decoy", "127.0.0.1:8081",
                                 "--decoy-tls-port", "443", NULL),
                     PARSE_ERROR);
    ck_assert_msg(strstr(error, "proxy's own") != NULL,
                  "a decoy TLS port that is the proxy's own is refused: %s",
                  error);
    ck_assert_int_eq(parse_flags(error, sizeof error, "--listen", "443/tls",
                                 "--decoy", "localhost:443", NULL),
                     PARSE_ERROR);
    ck_assert_int_eq(parse_flags(error, sizeof error, "--listen", "443/tls",
                                 "--decoy", "127.0.0.1:8081",
                                 "--decoy-tls-port", "8444", NULL),
                     PARSE_RUN);
    ck_assert_int_eq(parse_flags(error, sizeof error, "--upstream",
                                 "a\"b<i>:80", NULL), PARSE_ERROR);
    ck_assert_msg(strstr(error, "letters, digits, dots and hyphens") != NULL,
                  "a host name with quotes or markup is refused: %s", error);
}
END_TEST

/* --trusted-proxy takes an address with or without /BITS, IPv4 or IPv6,
 * and names the flag when the text is wrong. */
START_TEST(test_trusted_proxy_takes_ranges_and_refuses_nonsense)
{
    char error[512];
    const char *good[] = {"10.0.0.0/8", "192.0.2.7", "::1", "fd00::/8",
                          "0.0.0.0/0"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        ck_assert_msg(parse_flags(error, sizeof error, "--trusted-proxy",
                                  good[i], NULL) == PARSE_RUN,
                      "--trusted-proxy %s is taken: %s", good[i], error);
    const char *bad[] = {"10.0.0.0/33", "::/129", "10.0.0/8", "nonsense",
                         "10.0.0.0/", "10.0.0.0/8x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_int_eq(parse_flags(error, sizeof error, "--trusted-proxy",
                                     bad[i], NULL), PARSE_ERROR);
        ck_assert_msg(strstr(error, "--trusted-proxy") != NULL,
                      "the message names the flag: %s", error);
    }
}
END_TEST

/* Every flag of the option table is shown by --help and known to the
 * parser. The list comes from the table itself, so a new flag is covered
 * without editing this test. */
START_TEST(test_help_lists_every_flag_and_exits_zero)
{
    char out[16384], err[16384];
    ck_assert_int_eq(binary_run(out, err, sizeof out, "--help", NULL), 0);
    size_t count = 0;
    for (const char *flag; (flag = settings_flag_name(count)) != NULL;
         count++) {
        char shown[64];
        snprintf(shown, sizeof shown, "\n  %s", flag);
        bool listed = false; /* "--check" must not match "--check-..." */
        for (const char *at = strstr(out, shown); at != NULL && !listed;
             at = strstr(at + 1, shown)) {
            char after = at[strlen(shown)];
            listed = after == ' ' || after == '\n';
        }
        ck_assert_msg(listed, "--help shows %s", flag);
        char error[512] = "";
        parse_flags(error, sizeof error, flag, NULL);
        ck_assert_msg(strstr(error, "unknown option") == NULL,
                      "the parser knows %s: %s", flag, error);
    }
    ck_assert_msg(count >= 30, "the table has every flag (%zu)", count);
}
END_TEST

/* Bad input to the binary: one line naming the problem, exit status 2. */
static void expect_one_line_error(const char *needle, ...)
{
    char *argv[8] = {0};
    int argc = 0;
    va_list arguments;
    va_start(arguments, needle);
    for (char *argument = va_arg(arguments, char *); argument != NULL;
         argument = va_arg(arguments, char *))
        argv[argc++] = argument;
    va_end(arguments);
    argv[argc] = NULL;

    char out[4096], err[4096];
    int status = binary_run(out, err, sizeof out, argv[0], argv[1], argv[2],
                            argv[3], argv[4], argv[5], argv[6], NULL);
    ck_assert_msg(status == 2, "bad input should exit 2, not %d", status);
    ck_assert_msg(line_count(err) == 1, "one line of error, got: %s", err);
    ck_assert_msg(strstr(err, needle) != NULL, "the error names '%s': %s",
                  needle, err);
}

START_TEST(test_binary_refuses_bad_input_with_one_line_and_status_2)
{
    expect_one_line_error("--bogus", "--bogus", NULL);
    expect_one_line_error("99999", "--listen", "99999", NULL);
    expect_one_line_error("443/tls/media", "--listen", "443/tls/media", NULL);
    expect_one_line_error("foo", "--listen", "80/foo", NULL);
    expect_one_line_error("/nonexistent/cert.pem", "--listen", "127.0.0.1:0/tls",
                          "--cert", "/nonexistent/cert.pem", "--key",
                          "/nonexistent/key.pem", NULL);
}
END_TEST

/* ==== 4. PROXY protocol ==== */

/* Fills an IPv4 address and port into a sockaddr_storage. */
static struct sockaddr_storage ipv4_address(const char *ip, uint16_t port)
{
    struct sockaddr_storage address = {0};
    struct sockaddr_in *ipv4 = (struct sockaddr_in *)&address;
    ipv4->sin_family = AF_INET;
    ipv4->sin_port = htons(port);
    inet_pton(AF_INET, ip, &ipv4->sin_addr);
    return address;
}

static struct sockaddr_storage ipv6_address(const char *ip, uint16_t port)
{
    struct sockaddr_storage address = {0};
    struct sockaddr_in6 *ipv6 = (struct sockaddr_in6 *)&address;
    ipv6->sin6_family = AF_INET6;
    ipv6->sin6_port = htons(port);
    inet_pton(AF_INET6, ip, &ipv6->sin6_addr);
    return address;
}

static void expect_address(const struct sockaddr_storage *address,
                           const char *expected)
{
    char text[80];
    address_format(address, text, sizeof text);
    ck_assert_msg(strcmp(text, expected) == 0, "expected %s, got %s",
                  expected, text);
}

START_TEST(test_proxyhdr_v1_tcp4_round_trips)
{
    struct proxy_addresses sent = {
        .known = true,
        .source = ipv4_address("203.0.113.7", 40000),
        .destination = ipv4_address("192.0.2.1", 443)};
    uint8_t header[PROXYHDR_ENCODED_MAX_BYTES];
    size_t length = proxyhdr_encode_v1(&sent, header, sizeof header);
    const char expected[] = "PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n";
    ck_assert_uint_eq(length, strlen(expected));
    ck_assert_msg(memcmp(header, expected, length) == 0,
                  "the v1 header is the expected text line");

    struct proxy_addresses decoded = {0};
    ck_assert_int_eq(proxyhdr_decode(header, length, &decoded), (int)length);
    ck_assert_msg(decoded.known, "a TCP4 header carries known addresses");
    expect_address(&decoded.source, "203.0.113.7:40000");
    expect_address(&decoded.destination, "192.0.2.1:443");
}
END_TEST

START_TEST(test_proxyhdr_v1_tcp6_and_unknown_decode)
{
    const char tcp6[] = "PROXY TCP6 2001:db8::7 2001:db8::1 40000 8443\r\n";
    struct proxy_addresses decoded = {0};
    ck_assert_int_eq(proxyhdr_decode((const uint8_t *)tcp6, strlen(tcp6),
                                     &decoded), (int)strlen(tcp6));
    expect_address(&decoded.source, "2001:db8::7:40000");
    expect_address(&decoded.destination, "2001:db8::1:8443");

    const char unknown[] = "PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
    decoded.known = true;
    ck_assert_int_eq(proxyhdr_decode((const uint8_t *)unknown,
                                     strlen(unknown), &decoded),
                     (int)strlen(unknown));
    ck_assert_msg(!decoded.known, "UNKNOWN means: use the real addresses");

    uint8_t header[PROXYHDR_ENCODED_MAX_BYTES];
    struct proxy_addresses nothing = {.known = false};
    size_t length = proxyhdr_encode_v1(&nothing, header, sizeof header);
    ck_assert_msg(length == 15 && memcmp(header, "PROXY UNKNOWN\r\n", 15) == 0,
                  "with no addresses, v1 is PROXY UNKNOWN");
}
END_TEST

START_TEST(test_proxyhdr_v2_round_trips_ipv4_and_ipv6)
{
    struct proxy_addresses cases[2] = {
        {.known = true, .source = ipv4_address("203.0.113.7", 40000),
         .destination = ipv4_address("192.0.2.1", 443)},
        {.known = true, .source = ipv6_address("2001:db8::7", 40000),
         .destination = ipv6_address("2001:db8::1", 443)}};
    size_t lengths[2] = {16 + 12, 16 + 36};
    for (int i = 0; i < 2; i++) {
        uint8_t header[PROXYHDR_ENCODED_MAX_BYTES];
        size_t length = proxyhdr_encode_v2(&cases[i], header, sizeof header);
        ck_assert_uint_eq(length, lengths[i]);
        ck_assert_msg(memcmp(header, "\r\n\r\n\0\r\nQUIT\n", 12) == 0,
                      "a v2 header starts with the 12-byte signature");
        ck_assert_int_eq(header[12], 0x21);
        struct proxy_addresses decoded = {0};
        ck_assert_int_eq(proxyhdr_decode(header, length, &decoded),
                         (int)length);
        ck_assert_msg(decoded.known,
                      "a v2 PROXY command carries known addresses");
        char expected[80], got[80];
        address_format(&cases[i].source, expected, sizeof expected);
        address_format(&decoded.source, got, sizeof got);
        ck_assert_str_eq(got, expected);
    }
}
END_TEST

/* A v2 header for 203.0.113.7:40000 -> 192.0.2.1:443 followed by one TLV
 * (type 0x04, NOOP, 3 bytes), as a balancer might send it. */
static size_t v2_header_with_tlv(uint8_t *out)
{
    struct proxy_addresses addresses = {
        .known = true, .source = ipv4_address("203.0.113.7", 40000),
        .destination = ipv4_address("192.0.2.1", 443)};
    size_t length = proxyhdr_encode_v2(&addresses, out, 108);
    const uint8_t tlv[] = {0x04, 0x00, 0x03, 'a', 'b', 'c'};
    memcpy(out + length, tlv, sizeof tlv);
    length += sizeof tlv;
    out[14] = 0;
    out[15] = (uint8_t)(length - 16);
    return length;
}

START_TEST(test_proxyhdr_v2_skips_tlvs_and_leaves_payload_untouched)
{
    uint8_t data[200];
    size_t header_length = v2_header_with_tlv(data);
    memcpy(data + header_length, "WA payload", 10);
    struct proxy_addresses decoded = {0};
    ck_assert_int_eq(proxyhdr_decode(data, header_length + 10, &decoded),
                     (int)header_length);
    expect_address(&decoded.source, "203.0.113.7:40000");
}
END_TEST

START_TEST(test_proxyhdr_v2_local_and_unspec_mean_real_addresses)
{
    uint8_t local[16] = "\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    struct proxy_addresses decoded = {.known = true};
    ck_assert_int_eq(proxyhdr_decode(local, 16, &decoded), 16);
    ck_assert_msg(!decoded.known, "LOCAL means: use the real addresses");
    uint8_t unspec[16] = "\r\n\r\n\0\r\nQUIT\n\x21\x00\x00\x00";
    decoded.known = true;
    ck_assert_int_eq(proxyhdr_decode(unspec, 16, &decoded), 16);
    ck_assert_msg(!decoded.known, "UNSPEC means: use the real addresses");
}
END_TEST

/* Every proper prefix of a valid header is "not complete yet" (0): this is
 * what the proxy sees when a header arrives split across reads. */
START_TEST(test_proxyhdr_every_split_needs_more_and_the_whole_decodes)
{
    uint8_t v2[200];
    size_t v2_length = v2_header_with_tlv(v2);
    const char *v1 = "PROXY TCP6 2001:db8::7 2001:db8::1 40000 8443\r\n";
    const uint8_t *headers[2] = {v2, (const uint8_t *)v1};
    size_t lengths[2] = {v2_length, strlen(v1)};
    for (int h = 0; h < 2; h++) {
        struct proxy_addresses decoded;
        for (size_t prefix = 0; prefix < lengths[h]; prefix++)
            ck_assert_msg(proxyhdr_decode(headers[h], prefix, &decoded) == 0,
                          "a prefix of %zu bytes asks for more", prefix);
        ck_assert_int_eq(proxyhdr_decode(headers[h], lengths[h], &decoded),
                         (int)lengths[h]);
    }
}
END_TEST

/* The check value every CRC32C implementation is tested with (RFC 3720,
 * and the CRC catalogue): the nine digits "123456789". */
START_TEST(test_crc32c_gives_the_standard_check_value)
{
    ck_assert_uint_eq(crc32c((const uint8_t *)"123456789", 9), 0xE3069283);
    ck_assert_uint_eq(crc32c(NULL, 0), 0);
}
END_TEST

/* Writes into out a v2 header of exactly `total` bytes for
 * 203.0.113.7:40000 -> 192.0.2.1:443, as a balancer with much to say would:
 * a filler TLV (type 0xE0, a custom one) and, if with_checksum, a CRC32C
 * TLV last, holding the right checksum. Returns where the checksum's value
 * starts (0 without one). */
static size_t v2_header_long(uint8_t *out, size_t total, bool with_checksum)
{
    struct proxy_addresses addresses = {
        .known = true, .source = ipv4_address("203.0.113.7", 40000),
        .destination = ipv4_address("192.0.2.1", 443)};
    size_t at = proxyhdr_encode_v2(&addresses, out, PROXYHDR_ENCODED_MAX_BYTES);
    size_t checksum_tlv = with_checksum ? 3 + 4 : 0;
    size_t filler = total - at - 3 - checksum_tlv;
    out[at] = 0xE0;
    out[at + 1] = (uint8_t)(filler >> 8);
    out[at + 2] = (uint8_t)filler;
    memset(out + at + 3, 'x', filler);
    at += 3 + filler;
    size_t value_at = 0;
    if (with_checksum) {
        out[at] = 0x03;
        out[at + 1] = 0;
        out[at + 2] = 4;
        value_at = at + 3;
        memset(out + value_at, 0, 4);
        at += 7;
    }
    out[14] = (uint8_t)((total - 16) >> 8);
    out[15] = (uint8_t)(total - 16);
    if (with_checksum) {
        uint32_t checksum = crc32c(out, total);
        for (int i = 0; i < 4; i++)
            out[value_at + i] = (uint8_t)(checksum >> (24 - 8 * i));
    }
    ck_assert_uint_eq(at, total);
    return value_at;
}

/* Balancers add TLVs: a header of 3,000 bytes, with and without a
 * checksum, decodes whole and leaves the payload behind it alone; so does
 * the longest allowed, and one byte more is refused. */
START_TEST(test_proxyhdr_v2_takes_long_headers_with_valid_tlvs)
{
    static uint8_t data[PROXYHDR_V2_MAX_BYTES + 16];
    size_t totals[] = {3000, 3000, PROXYHDR_V2_MAX_BYTES};
    for (size_t i = 0; i < 3; i++) {
        v2_header_long(data, totals[i], i == 1);
        memcpy(data + totals[i], "WA", 2);
        struct proxy_addresses decoded = {0};
        ck_assert_int_eq(proxyhdr_decode(data, totals[i] + 2, &decoded),
                         (int)totals[i]);
        expect_address(&decoded.source, "203.0.113.7:40000");
        ck_assert_int_eq(proxyhdr_decode(data, totals[i] - 1, &decoded), 0);
    }
    v2_header_long(data, PROXYHDR_V2_MAX_BYTES + 1, false);
    struct proxy_addresses decoded;
    ck_assert_int_eq(proxyhdr_decode(data, PROXYHDR_V2_MAX_BYTES + 1,
                                     &decoded), -1);
}
END_TEST

/* A wrong checksum, a checksum TLV of the wrong size, a TLV that runs past
 * the header's end and a stub too short to be a TLV are all refused. A
 * LOCAL header's body is not read, so its TLVs are not checked. */
START_TEST(test_proxyhdr_v2_refuses_a_wrong_checksum_and_an_overrunning_tlv)
{
    static uint8_t good[3000];
    static uint8_t broken[3000];
    size_t value_at = v2_header_long(good, sizeof good, true);
    struct proxy_addresses decoded;

    memcpy(broken, good, sizeof good);
    broken[100] ^= 1; /* one bit of the filler: the checksum no longer fits */
    ck_assert_int_eq(proxyhdr_decode(broken, sizeof broken, &decoded), -1);
    memcpy(broken, good, sizeof good);
    broken[value_at + 3] ^= 1; /* one bit of the checksum itself */
    ck_assert_int_eq(proxyhdr_decode(broken, sizeof broken, &decoded), -1);

    memcpy(broken, good, sizeof good);
    broken[value_at - 1] = 5; /* a checksum TLV of 5 bytes */
    ck_assert_int_eq(proxyhdr_decode(broken, sizeof broken, &decoded), -1);

    v2_header_long(broken, sizeof broken, false);
    broken[16 + 12 + 2] += 1; /* the filler's length: one past the end */
    ck_assert_int_eq(proxyhdr_decode(broken, sizeof broken, &decoded), -1);
    broken[16 + 12 + 2] -= 3; /* two bytes short: a 2-byte stub is left */
    ck_assert_int_eq(proxyhdr_decode(broken, sizeof broken, &decoded), -1);

    broken[12] = 0x20; /* the same body under LOCAL: skipped whole */
    decoded.known = true;
    ck_assert_int_eq(proxyhdr_decode(broken, sizeof broken, &decoded),
                     (int)sizeof broken);
    ck_assert_msg(!decoded.known, "LOCAL means: use the real addresses");
}
END_TEST

START_TEST(test_proxyhdr_refuses_malformed_and_oversize_headers)
{
    const char *bad_v1[] = {
        "GET / HTTP/1.1\r\n",                          /* no header at all */
        "PROXY BOGUS\r\n",
        "PROXY TCP4 203.0.113.7 192.0.2.1 40000\r\n",   /* a word missing */
        "PROXY TCP4 203.0.113.999 192.0.2.1 40000 443\r\n",
        "PROXY TCP4 2001:db8::7 192.0.2.1 40000 443\r\n", /* wrong family */
        "PROXY TCP4 203.0.113.7 192.0.2.1 70000 443\r\n", /* port > 65535 */
        "PROXY TCP4 203.0.113.7  192.0.2.1 40000 443\r\n", /* two spaces */
        "PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\n",   /* LF without CR */
        "PROXY TCP4 203.0.113.7 192.0.2.1 40000 443 x\r\n",
    };
    struct proxy_addresses decoded;
    for (size_t i = 0; i < sizeof bad_v1 / sizeof bad_v1[0]; i++)
        ck_assert_msg(proxyhdr_decode((const uint8_t *)bad_v1[i],
                                      strlen(bad_v1[i]), &decoded) == -1,
                      "'%s' is malformed", bad_v1[i]);

    /* 108 bytes of v1 without CRLF: longer than the 107 allowed. */
    uint8_t oversize[200];
    memcpy(oversize, "PROXY TCP4 ", 11);
    memset(oversize + 11, '1', sizeof oversize - 11);
    ck_assert_int_eq(proxyhdr_decode(oversize, 108, &decoded), -1);

    uint8_t v2[200];
    size_t length = v2_header_with_tlv(v2);
    uint8_t broken[200];
    memcpy(broken, v2, length);
    broken[12] = 0x11; /* version 1 in the version nibble */
    ck_assert_int_eq(proxyhdr_decode(broken, length, &decoded), -1);
    memcpy(broken, v2, length);
    broken[12] = 0x22; /* command 2 does not exist */
    ck_assert_int_eq(proxyhdr_decode(broken, length, &decoded), -1);
    memcpy(broken, v2, length);
    broken[13] = 0x41; /* no such family */
    ck_assert_int_eq(proxyhdr_decode(broken, length, &decoded), -1);
    memcpy(broken, v2, length);
    broken[15] = 4; /* too short for two IPv4 addresses and ports */
    ck_assert_int_eq(proxyhdr_decode(broken, length, &decoded), -1);
    memcpy(broken, v2, length);
    broken[14] = 0xFF; /* longer than the proxy accepts */
    ck_assert_int_eq(proxyhdr_decode(broken, length, &decoded), -1);
    memcpy(broken, v2, length);
    broken[5] = 'X'; /* a damaged signature */
    ck_assert_int_eq(proxyhdr_decode(broken, length, &decoded), -1);
}
END_TEST

/* On an accept-proxy port, the address the upstream is told is the one the
 * balancer's header carried, not the balancer's own. */
START_TEST(test_accept_proxy_passes_the_incoming_address_upstream)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0/accept-proxy", NULL);
    int client = connect_local(proxy_listener_port(0));
    send_all(client, "PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n", 44);
    expect_echo(client, "hello");
    struct proxy_addresses seen;
    ck_assert_msg(upstream_header_within(upstream, &seen, PROMPTLY_MS),
                  "the upstream receives a PROXY header");
    ck_assert_int_eq(upstream->header_bytes[12], 0x21); /* v2 by default */
    expect_address(&seen.source, "203.0.113.7:40000");
    expect_address(&seen.destination, "192.0.2.1:443");
    close(client);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* UNKNOWN (v1) or LOCAL (v2) from the balancer: the real addresses go up. */
START_TEST(test_incoming_unknown_header_sends_the_real_address)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0/accept-proxy", NULL);
    int client = connect_local(proxy_listener_port(0));
    send_all(client, "PROXY UNKNOWN\r\n", 15);
    expect_echo(client, "hello");
    struct sockaddr_storage mine;
    socklen_t length = sizeof mine;
    getsockname(client, (struct sockaddr *)&mine, &length);
    char expected[80];
    address_format(&mine, expected, sizeof expected);
    struct proxy_addresses seen;
    ck_assert_msg(upstream_header_within(upstream, &seen, PROMPTLY_MS),
                  "the upstream receives a PROXY header");
    expect_address(&seen.source, expected);
    close(client);
    proxy_and_upstream_stop(upstream);
}
END_TEST

START_TEST(test_send_proxy_v1_and_none_are_honoured)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0", "--send-proxy",
                                "v1", NULL);
    int client = connect_local(proxy_listener_port(0));
    expect_echo(client, "hello");
    struct proxy_addresses seen;
    ck_assert_msg(upstream_header_within(upstream, &seen, PROMPTLY_MS),
                  "the upstream receives a PROXY header");
    ck_assert_msg(memcmp(upstream->header_bytes, "PROXY TCP4 127.0.0.1 ", 21)
                      == 0, "--send-proxy v1 sends a v1 line");
    close(client);
    proxy_and_upstream_stop(upstream);

    /* With none, the first bytes upstream are the client's own. */
    upstream = fake_upstream_start(UPSTREAM_ECHO, false);
    proxy_start("--listen", "127.0.0.1:0", "--send-proxy", "none",
                "--upstream", address_text("127.0.0.1:%u", upstream->port),
                NULL);
    client = connect_local(proxy_listener_port(0));
    expect_echo(client, "PROXY-less hello");
    pthread_mutex_lock(&upstream->lock);
    ck_assert_msg(memcmp(upstream->first_payload, "PROXY-less", 10) == 0,
                  "the upstream first gets the client's own bytes");
    pthread_mutex_unlock(&upstream->lock);
    close(client);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* ==== 5. TLS termination ==== */

/* Connects to a TLS listener and returns the handshake, or fails the test. */
static SSL *tls_connect_local(uint16_t port, int *fd_out)
{
    int fd = connect_local(port);
    socket_timeout(fd, SLOWLY_MS);
    SSL *tls = tls_client_start(fd, 0);
    ck_assert_msg(tls != NULL, "a TLS handshake with port %u should work",
                  port);
    *fd_out = fd;
    return tls;
}

/* One whole TLS client: connects to a TLS listener, sends text, checks
 * that the same bytes come back, and closes (expect_echo() for TLS). */
static void expect_tls_echo(uint16_t port, const char *text)
{
    int fd;
    SSL *tls = tls_connect_local(port, &fd);
    char back[256];
    size_t length = strlen(text);
    ck_assert_uint_le(length, sizeof back);
    tls_send_all(tls, text, length);
    ck_assert_uint_eq(tls_receive_exactly(tls, back, length), length);
    ck_assert_mem_eq(back, text, length);
    tls_client_close(tls);
    close(fd);
}

/* The made certificate is what a web server makes for itself: one
 * self-signed certificate for the public name, which verifies against
 * itself, sent alone (no certificate authority beside it), valid from
 * some moment before now rather than from the start. */
START_TEST(test_made_certificate_is_a_web_servers_own)
{
    struct fake_upstream *upstream = proxy_start_before_echo(
        "--listen", "127.0.0.1:0/tls", "--public-host", "proxy.example.org",
        "--ssl-dns", "alt.example.org", "--ssl-ip", "192.0.2.10", NULL);
    int fd;
    SSL *tls = tls_connect_local(proxy_listener_port(0), &fd);
    X509 *leaf = SSL_get1_peer_certificate(tls);
    char subject[128], issuer[128];
    X509_NAME_get_text_by_NID(X509_get_subject_name(leaf), NID_commonName,
                              subject, sizeof subject);
    X509_NAME_get_text_by_NID(X509_get_issuer_name(leaf), NID_commonName,
                              issuer, sizeof issuer);
    ck_assert_str_eq(subject, "proxy.example.org");
    ck_assert_str_eq(issuer, "proxy.example.org");
    ck_assert_int_eq(sk_X509_num(SSL_get_peer_cert_chain(tls)), 1);
    ck_assert_int_eq(X509_check_host(leaf, "alt.example.org", 0, 0, NULL), 1);
    ck_assert_int_eq(X509_check_ip_asc(leaf, "192.0.2.10", 0), 1);
    ck_assert_int_le(X509_cmp_current_time(X509_get0_notBefore(leaf)), 0);

    /* It verifies against itself, as `openssl verify -CAfile` would. */
    X509_STORE *store = X509_STORE_new();
    X509_STORE_add_cert(store, leaf);
    X509_STORE_CTX *verify = X509_STORE_CTX_new();
    X509_STORE_CTX_init(verify, store, leaf, NULL);
    ck_assert_msg(X509_verify_cert(verify) == 1, "verifies against itself: %s",
                  X509_verify_cert_error_string(
                      X509_STORE_CTX_get_error(verify)));
    X509_STORE_CTX_free(verify);
    X509_STORE_free(store);
    X509_free(leaf);

    char path[128];
    struct stat key_status;
    snprintf(path, sizeof path, "%s/key.pem", proxy.cert_dir);
    ck_assert_int_eq(stat(path, &key_status), 0);
    ck_assert_msg((key_status.st_mode & 0777) == 0600,
                  "key.pem is readable by its owner only, mode %o",
                  key_status.st_mode & 0777);
    snprintf(path, sizeof path, "%s/cert.pem", proxy.cert_dir);
    ck_assert_int_eq(access(path, R_OK), 0);

    tls_client_close(tls);
    close(fd);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* The first bytes of a TLS client are judged without a socket: a record
 * header tells how long the hello is; anything else is not TLS. */
START_TEST(test_tls_hello_look_knows_whole_partial_and_not_tls)
{
    int needed = 0;
    const uint8_t hello[] = {0x16, 0x03, 0x01, 0x00, 0x04, 1, 2, 3, 4};
    ck_assert_int_eq(tls_hello_look(hello, 9, &needed), HELLO_WHOLE);
    ck_assert_int_eq(tls_hello_look(hello, 8, &needed), HELLO_NEED_MORE);
    ck_assert_int_eq(needed, 9);
    ck_assert_int_eq(tls_hello_look(hello, 2, &needed), HELLO_NEED_MORE);
    ck_assert_int_eq(needed, 5);
    ck_assert_int_eq(tls_hello_look((const uint8_t *)"GET /", 5, &needed),
                     HELLO_NOT_TLS);
    ck_assert_int_eq(tls_hello_look((const uint8_t *)"\0", 1, &needed),
                     HELLO_NOT_TLS);
    const uint8_t too_long[] = {0x16, 0x03, 0x01, 0x40, 0x01};
    ck_assert_int_eq(tls_hello_look(too_long, 5, &needed), HELLO_NOT_TLS);
}
END_TEST

static int http_get(uint16_t port, const char *path, char *out,
                    size_t out_size); /* section 12 */

/* A certificate with 10 days left: the log warns (the first warning comes
 * at the start, then one a day), and the statistics page says so first. */
START_TEST(test_a_certificate_near_its_end_is_warned_about)
{
    char dir[] = "/tmp/wp_expiring_XXXXXX", command[512];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(command, sizeof command,
             "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
             "-nodes -days 10 -subj /CN=proxy.example.org -keyout %s/key.pem "
             "-out %s/cert.pem > /dev/null 2>&1", dir, dir);
    ck_assert_int_eq(system(command), 0);
    char cert[96], key[96];
    snprintf(cert, sizeof cert, "%s/cert.pem", dir);
    snprintf(key, sizeof key, "%s/key.pem", dir);
    struct stderr_capture capture = stderr_capture_begin();
    struct fake_upstream *upstream = proxy_start_before_echo(
        "--listen", "127.0.0.1:0/tls", "--cert", cert, "--key", key,
        "--log-level", "warn", "--stats", "127.0.0.1:0", NULL);
    bool warned = stderr_capture_shows(&capture, "the certificate expires in",
                                       PROMPTLY_MS);
    char log[4096];
    stderr_capture_end(&capture, log, sizeof log);
    ck_assert_msg(warned, "the log warns of the near end: %s", log);
    static char answer[65536];
    ck_assert_int_eq(http_get(proxy_stats_port(), "/", answer, sizeof answer),
                     200);
    ck_assert_msg(strstr(answer, "The certificate expires in"),
                  "the page says so first: %s", answer);
    proxy_and_upstream_stop(upstream);
    snprintf(command, sizeof command, "rm -rf %s", dir);
    ck_assert_int_eq(system(command), 0);
}
END_TEST

/* Reads the first certificate of a PEM file and returns its common name. */
static void pem_common_name(const char *path, char *out, size_t out_size)
{
    FILE *file = fopen(path, "r");
    ck_assert_ptr_nonnull(file);
    X509 *certificate = PEM_read_X509(file, NULL, NULL, NULL);
    fclose(file);
    ck_assert_ptr_nonnull(certificate);
    X509_NAME_get_text_by_NID(X509_get_subject_name(certificate),
                              NID_commonName, out, (int)out_size);
    X509_free(certificate);
}

/* Makes a certificate and key in dir with certs/generate-certs.sh. */
static void certificate_files_make(const char *dir)
{
    char command[256];
    snprintf(command, sizeof command,
             "sh certs/generate-certs.sh %s > /dev/null 2>&1", dir);
    ck_assert_msg(system(command) == 0, "generate-certs.sh should work");
}

/* A key that is a good key, but not the certificate's, is named as such,
 * not as "not a PEM key". */
START_TEST(test_a_key_of_another_certificate_is_named_as_such)
{
    char first[] = "/tmp/wp_cert_XXXXXX", second[] = "/tmp/wp_cert_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(first));
    ck_assert_ptr_nonnull(mkdtemp(second));
    certificate_files_make(first);
    certificate_files_make(second);
    char cert[96], key[96], command[128];
    snprintf(cert, sizeof cert, "%s/cert.pem", first);
    snprintf(key, sizeof key, "%s/key.pem", second);
    expect_one_line_error("does not belong to the certificate", "--listen",
                          "127.0.0.1:0/tls", "--cert", cert, "--key", key,
                          NULL);
    snprintf(command, sizeof command, "rm -rf %s %s", first, second);
    ck_assert_int_eq(system(command), 0);
}
END_TEST

/* Someone who can write in --cert-dir plants links where the proxy will
 * write its made key: at key.pem and at key.pem.new, to files of theirs.
 * The proxy never writes through a link: the files the links point to are
 * untouched, and key.pem becomes a file of the proxy's own. */
START_TEST(test_made_certificate_never_goes_through_a_planted_link)
{
    char dir[] = "/tmp/wp_links_XXXXXX", victim[96], bait[96], path[160];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(victim, sizeof victim, "%s/victim", dir);
    snprintf(bait, sizeof bait, "%s/bait", dir);
    const char *names[2] = {victim, bait};
    for (int i = 0; i < 2; i++) {
        FILE *file = fopen(names[i], "w");
        fputs("untouched\n", file);
        fclose(file);
    }
    char certs[96];
    snprintf(certs, sizeof certs, "%s/certs", dir);
    ck_assert_int_eq(mkdir(certs, 0700), 0);
    snprintf(path, sizeof path, "%s/key.pem", certs);
    ck_assert_int_eq(symlink(victim, path), 0);
    snprintf(path, sizeof path, "%s/key.pem.new", certs);
    ck_assert_int_eq(symlink(bait, path), 0);

    proxy_start("--listen", "127.0.0.1:0/tls", "--cert-dir", certs, NULL);
    for (int i = 0; i < 2; i++) {
        char content[32] = "";
        FILE *file = fopen(names[i], "r");
        ck_assert_ptr_nonnull(fgets(content, sizeof content, file));
        fclose(file);
        ck_assert_str_eq(content, "untouched\n");
    }
    struct stat key;
    snprintf(path, sizeof path, "%s/key.pem", certs);
    ck_assert_int_eq(lstat(path, &key), 0);
    ck_assert_msg(S_ISREG(key.st_mode) && (key.st_mode & 0777) == 0600,
                  "key.pem is now the proxy's own file, mode 0600");
    proxy_stop();
    char command[128];
    snprintf(command, sizeof command, "rm -rf %s", dir);
    ck_assert_int_eq(system(command), 0);
}
END_TEST

/* A second copy that cannot bind its port (the first has it) leaves the
 * first copy's certificate files alone: they are written only once every
 * port is bound. */
START_TEST(test_a_copy_that_cannot_start_leaves_the_certificate_files_alone)
{
    char dir[] = "/tmp/wp_second_XXXXXX", path[160], command[160];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    uint16_t taken_port;
    int taken = listen_local(&taken_port, 1);
    char out[4096], err[4096];
    int status = binary_run(out, err, sizeof out, "--listen",
                            address_text("127.0.0.1:%u/tls", taken_port),
                            "--cert-dir", dir, "--stats", "off", NULL);
    close(taken);
    ck_assert_int_eq(status, 2);
    snprintf(path, sizeof path, "%s/key.pem", dir);
    ck_assert_msg(access(path, F_OK) != 0,
                  "no key.pem written by a copy that did not start");
    snprintf(command, sizeof command, "rm -rf %s", dir);
    ck_assert_int_eq(system(command), 0);
}
END_TEST

START_TEST(test_given_certificate_is_served_and_reload_keeps_old_on_bad_file)
{
    char dir[] = "/tmp/wp_cert_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    certificate_files_make(dir);
    char cert[96], key[96], expected[128];
    snprintf(cert, sizeof cert, "%s/cert.pem", dir);
    snprintf(key, sizeof key, "%s/key.pem", dir);
    pem_common_name(cert, expected, sizeof expected);

    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0/tls", "--cert", cert,
                                "--key", key, NULL);
    int fd;
    SSL *tls = tls_connect_local(proxy_listener_port(0), &fd);
    char served[128];
    tls_peer_common_name(tls, served, sizeof served);
    ck_assert_str_eq(served, expected);

    /* A broken file, then SIGHUP: the old certificate stays, and the open
     * connection carries on. */
    FILE *file = fopen(cert, "w");
    fputs("not a certificate\n", file);
    fclose(file);
    struct stderr_capture capture = stderr_capture_begin();
    proxy_request_reload();
    bool refused = stderr_capture_shows(&capture, "keeping the old one",
                                        PROMPTLY_MS);
    char log[4096];
    stderr_capture_end(&capture, log, sizeof log);
    ck_assert_msg(refused, "the log says why the reload failed: %s", log);
    tls_send_all(tls, "still here", 10);
    char back[10];
    ck_assert_uint_eq(tls_receive_exactly(tls, back, 10), 10);
    int fd2;
    SSL *tls2 = tls_connect_local(proxy_listener_port(0), &fd2);
    tls_peer_common_name(tls2, served, sizeof served);
    ck_assert_msg(strcmp(served, expected) == 0,
                  "a bad new file keeps the old certificate");

    /* A good new file, then SIGHUP: new handshakes get it. */
    certificate_files_make(dir);
    pem_common_name(cert, expected, sizeof expected);
    proxy_request_reload();
    bool renewed = false;
    for (int i = 0; i < 300 && !renewed; i++) {
        int fd3;
        SSL *tls3 = tls_connect_local(proxy_listener_port(0), &fd3);
        tls_peer_common_name(tls3, served, sizeof served);
        renewed = strcmp(served, expected) == 0;
        tls_client_close(tls3);
        close(fd3);
    }
    ck_assert_msg(renewed, "after SIGHUP new handshakes use the new file");
    tls_send_all(tls, "and still", 9);
    ck_assert_uint_eq(tls_receive_exactly(tls, back, 9), 9);

    tls_client_close(tls2);
    close(fd2);
    tls_client_close(tls);
    close(fd);
    proxy_and_upstream_stop(upstream);
    char command[128];
    snprintf(command, sizeof command, "rm -rf %s", dir);
    ck_assert_int_eq(system(command), 0);
}
END_TEST

/* The alert description the last TLS client read from its server. */
static int alert_received = -1;

static void alert_note(const SSL *tls, int where, int value)
{
    (void)tls;
    if ((where & SSL_CB_READ_ALERT) == SSL_CB_READ_ALERT)
        alert_received = value & 0xff; /* the low byte is its description */
}

/* Tries a handshake with the proxy's listener 0 as a client of at most
 * max_version. Returns the alert the proxy sent, or -1 if none came. */
static int tls_refusal_alert(int max_version)
{
    int fd = connect_local(proxy_listener_port(0));
    socket_timeout(fd, PROMPTLY_MS);
    SSL_CTX *context = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_security_level(context, 0); /* lets it offer TLS 1.0 */
    SSL_CTX_set_min_proto_version(context, 0);
    SSL_CTX_set_max_proto_version(context, max_version);
    SSL_CTX_set_info_callback(context, alert_note);
    SSL *tls = SSL_new(context);
    SSL_set_fd(tls, fd);
    alert_received = -1;
    ck_assert_msg(SSL_connect(tls) != 1, "an old TLS version is refused");
    ERR_clear_error();
    SSL_free(tls);
    SSL_CTX_free(context);
    close(fd);
    return alert_received;
}

START_TEST(test_tls_1_0_and_1_1_are_refused_as_nginx_refuses_them)
{
    proxy_start("--listen", "127.0.0.1:0/tls", "--upstream",
                address_text("127.0.0.1:%u", closed_port()), NULL);
    /* OpenSSL alone would answer protocol_version (70). */
    ck_assert_int_eq(tls_refusal_alert(TLS1_VERSION), SSL_AD_INTERNAL_ERROR);
    ck_assert_int_eq(tls_refusal_alert(TLS1_1_VERSION), SSL_AD_INTERNAL_ERROR);
    ck_assert_msg(counter_reaches(COUNTER_TLS_HANDSHAKE_FAILED, 2, PROMPTLY_MS),
                  "the refused handshakes are counted");
    proxy_stop();
}
END_TEST

/* ==== 6. Upstreams ==== */

START_TEST(test_chat_servers_are_used_in_turn)
{
    struct fake_upstream *first = fake_upstream_start(UPSTREAM_ECHO, true);
    struct fake_upstream *second = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0",
                "--upstream", address_text("127.0.0.1:%u", first->port),
                "--upstream", address_text("127.0.0.1:%u", second->port),
                NULL);
    for (int i = 0; i < 4; i++) {
        int client = connect_local(proxy_listener_port(0));
        expect_echo(client, "hello");
        close(client);
        int expected = i / 2 + 1;
        ck_assert_msg(upstream_connections(i % 2 ? second : first) == expected,
                      "connection %d goes to server %d", i, i % 2 + 1);
    }
    proxy_stop();
    fake_upstream_stop(first);
    fake_upstream_stop(second);
}
END_TEST

START_TEST(test_refused_server_is_skipped_for_the_next)
{
    struct fake_upstream *live = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0",
                "--upstream", address_text("127.0.0.1:%u", closed_port()),
                "--upstream", address_text("127.0.0.1:%u", live->port), NULL);
    for (int i = 0; i < 2; i++) {
        int client = connect_local(proxy_listener_port(0));
        expect_echo(client, "hello");
        close(client);
    }
    ck_assert_msg(proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED) >= 1,
                  "the refused server was tried and counted");
    ck_assert_int_eq(proxy_counter(COUNTER_UPSTREAM_UNREACHABLE), 0);
    proxy_stop();
    fake_upstream_stop(live);
}
END_TEST

/* Waits until the peer ends the connection; returns true for a clean end
 * (FIN), false for a reset or nothing within timeout_ms. */
static bool ends_with_fin_within(int fd, int timeout_ms)
{
    uint8_t sink[256];
    return readable_within(fd, timeout_ms) &&
           recv(fd, sink, sizeof sink, 0) == 0;
}

/* When every server refuses, the client is tried four times in all, as
 * HAProxy's "retries 3" does, about a second apart, and then gets a FIN:
 * its app tries again, or another proxy. */
START_TEST(test_when_no_server_answers_the_client_gets_a_fin_after_the_retries)
{
    proxy_start("--listen", "127.0.0.1:0",
                "--upstream", address_text("127.0.0.1:%u", closed_port()),
                "--upstream", address_text("127.0.0.1:%u", closed_port()),
                NULL);
    long long started = clock_ms();
    int client = connect_local(proxy_listener_port(0));
    send_all(client, "hello", 5);
    ck_assert_msg(ends_with_fin_within(client, PROMPTLY_MS + 3000),
                  "the client gets a FIN after the tries");
    long long took = clock_ms() - started;
    ck_assert_msg(took >= 2500, "three waits of about 1 s came first "
                  "(%lld ms)", took);
    ck_assert_msg(counter_reaches(COUNTER_UPSTREAM_UNREACHABLE, 1, PROMPTLY_MS),
                  "the client is counted as finding no server");
    ck_assert_int_eq(proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED), 4);
    close(client);
    proxy_stop();
}
END_TEST

/* A chat server that restarts: it refuses for a moment, then accepts. A
 * client that arrives meanwhile is served by a later try, not dropped. */
START_TEST(test_a_client_waits_out_a_server_restart)
{
    uint16_t port = closed_port();
    proxy_start("--listen", "127.0.0.1:0", "--send-proxy", "none",
                "--upstream", address_text("127.0.0.1:%u", port), NULL);
    int client = connect_local(proxy_listener_port(0));
    send_all(client, "hello", 5);
    ck_assert_msg(counter_reaches(COUNTER_UPSTREAM_CONNECT_FAILED, 2,
                                  PROMPTLY_MS),
                  "the server refuses twice while it restarts");
    int server = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int on = 1;
    setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    struct sockaddr_in address = {.sin_family = AF_INET,
                                  .sin_port = htons(port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(server, (struct sockaddr *)&address,
                          sizeof address), 0);
    ck_assert_int_eq(listen(server, 4), 0);
    ck_assert_msg(readable_within(server, PROMPTLY_MS),
                  "a later try reaches the server once it is back");
    int upstream = accept(server, NULL, NULL);
    char got[5];
    ck_assert_uint_eq(receive_exactly(upstream, got, 5, PROMPTLY_MS), 5);
    ck_assert_mem_eq(got, "hello", 5);
    send_all(upstream, "hi", 2);
    ck_assert_uint_eq(receive_exactly(client, got, 2, PROMPTLY_MS), 2);
    ck_assert_mem_eq(got, "hi", 2);
    ck_assert_int_eq(proxy_counter(COUNTER_UPSTREAM_UNREACHABLE), 0);
    close(upstream);
    close(client);
    proxy_stop();
    close(server);
}
END_TEST

/* A server that never finishes a connect: its listen queue (backlog 0) is
 * filled first, and then the kernel drops new SYNs, so connect() hangs
 * until --timeout-connect. */
struct silent_server {
    int listen_fd;
    int queued[4];
    uint16_t port;
};

static void silent_server_start(struct silent_server *server)
{
    server->listen_fd = listen_local(&server->port, 0);
    struct sockaddr_in address = {.sin_family = AF_INET,
                                  .sin_port = htons(server->port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    for (int i = 0; i < 4; i++) {
        /* Later connects may hang: do them non-blocking. */
        server->queued[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        connect(server->queued[i], (struct sockaddr *)&address,
                sizeof address);
    }
}

static void silent_server_stop(struct silent_server *server)
{
    for (int i = 0; i < 4; i++)
        close(server->queued[i]);
    close(server->listen_fd);
}

START_TEST(test_connect_timeout_gives_up_on_a_silent_server)
{
    struct silent_server silent;
    silent_server_start(&silent);
    proxy_start("--listen", "127.0.0.1:0", "--timeout-connect", "0.3",
                "--upstream", address_text("127.0.0.1:%u", silent.port), NULL);
    long long started = clock_ms();
    int client = connect_local(proxy_listener_port(0));
    ck_assert_msg(closed_within(client, PROMPTLY_MS),
                  "the client is closed when the connect times out");
    long long took = clock_ms() - started;
    ck_assert_msg(took >= 250, "the proxy waited for the connect (%lld ms)",
                  took);
    ck_assert_msg(counter_reaches(COUNTER_UPSTREAM_UNREACHABLE, 1, PROMPTLY_MS),
                  "the client is counted as finding no server");
    ck_assert_msg(proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED) == 4,
                  "four tries, each timed out (%llu)",
                  proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED));
    close(client);
    proxy_stop();
    silent_server_stop(&silent);
}
END_TEST

/* A connect that starts when a retry's wait is over is timed like any
 * other: refused by the first server, the client waits 1 s, tries the
 * silent second one, which --timeout-connect cuts, and so on, four tries
 * in all (about 2.6 s). A relay thread with nothing else to do must wake
 * up for each of those timeouts by itself. */
START_TEST(test_a_connect_after_a_retry_is_timed_too)
{
    struct silent_server silent;
    silent_server_start(&silent);
    proxy_start("--listen", "127.0.0.1:0", "--timeout-connect", "0.3",
                "--threads", "1",
                "--upstream", address_text("127.0.0.1:%u", closed_port()),
                "--upstream", address_text("127.0.0.1:%u", silent.port), NULL);
    int client = connect_local(proxy_listener_port(0)); /* refused first */
    ck_assert_msg(closed_within(client, 6000),
                  "the client is closed after its four tries");
    ck_assert_int_eq(proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED), 4);
    ck_assert_int_eq(proxy_counter(COUNTER_UPSTREAM_UNREACHABLE), 1);
    close(client);
    proxy_stop();
    silent_server_stop(&silent);
}
END_TEST

/* The relay thread waits for connects in its epoll loop: one that times
 * out goes on to the next server, and the client is served there. */
START_TEST(test_connect_timeout_tries_the_next_server)
{
    struct silent_server silent;
    silent_server_start(&silent);
    struct fake_upstream *live = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0", "--timeout-connect", "0.3",
                "--upstream", address_text("127.0.0.1:%u", silent.port),
                "--upstream", address_text("127.0.0.1:%u", live->port), NULL);
    long long started = clock_ms();
    int client = connect_local(proxy_listener_port(0)); /* to silent first */
    expect_echo(client, "served by the second server");
    long long took = clock_ms() - started;
    ck_assert_msg(took >= 250, "the first server was given its %d ms "
                  "(%lld ms)", 300, took);
    ck_assert_int_eq(proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED), 1);
    ck_assert_int_eq(proxy_counter(COUNTER_UPSTREAM_UNREACHABLE), 0);
    ck_assert_int_eq(proxy_counter(COUNTER_CONNECTIONS_RELAYED), 1);
    close(client);
    proxy_stop();
    fake_upstream_stop(live);
    silent_server_stop(&silent);
}
END_TEST

/* Asks the statistics port for path; returns the HTTP status and puts the
 * whole answer (headers and body) in out. */
static int http_get(uint16_t port, const char *path, char *out,
                    size_t out_size)
{
    int fd = connect_local(port);
    char request[256];
    int length = snprintf(request, sizeof request,
                          "GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n", path);
    send_all(fd, request, (size_t)length);
    size_t got = receive_exactly(fd, out, out_size - 1, PROMPTLY_MS);
    out[got] = '\0';
    close(fd);
    int status = 0;
    sscanf(out, "HTTP/1.1 %d", &status);
    return status;
}

/* Waits until /metrics shows `line` (a whole sample line). */
static bool metrics_show(const char *line, int timeout_ms)
{
    static char answer[65536];
    long long deadline = clock_ms() + timeout_ms;
    while (clock_ms() < deadline) {
        http_get(proxy_stats_port(), "/metrics", answer, sizeof answer);
        if (strstr(answer, line) != NULL)
            return true;
        usleep(10000);
    }
    return false;
}

START_TEST(test_health_checks_take_a_dead_server_out_and_back)
{
    struct fake_upstream *live = fake_upstream_start(UPSTREAM_ECHO, true);
    uint16_t dead = closed_port();
    proxy_start("--listen", "127.0.0.1:0", "--stats", "127.0.0.1:0",
                "--check-interval", "0.05",
                "--upstream", address_text("127.0.0.1:%u", dead),
                "--upstream", address_text("127.0.0.1:%u", live->port), NULL);
    char down[128], up[128];
    snprintf(down, sizeof down, "whatsapp_proxy_upstream_up{upstream="
             "\"127.0.0.1:%u\",pool=\"chat\"} 0\n", dead);
    snprintf(up, sizeof up, "whatsapp_proxy_upstream_up{upstream="
             "\"127.0.0.1:%u\",pool=\"chat\"} 1\n", dead);
    ck_assert_msg(metrics_show(down, PROMPTLY_MS),
                  "three failed checks take the dead server out");

    /* Out of rotation: every client goes to the live one, none fails. */
    unsigned long long failed = proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED);
    for (int i = 0; i < 4; i++) {
        int client = connect_local(proxy_listener_port(0));
        expect_echo(client, "hello");
        close(client);
    }
    ck_assert_int_eq(proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED), failed);

    /* The server comes back: two good checks put it back. */
    int revived = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int on = 1;
    setsockopt(revived, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    struct sockaddr_in address = {.sin_family = AF_INET,
                                  .sin_port = htons(dead),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(revived, (struct sockaddr *)&address,
                          sizeof address), 0);
    ck_assert_int_eq(listen(revived, 64), 0);
    ck_assert_msg(metrics_show(up, 10000), "two good checks put it back");
    proxy_stop();
    close(revived);
    fake_upstream_stop(live);
}
END_TEST

/* A health check of a chat server sends what a client connection would
 * start with: a PROXY header, here v2 LOCAL (a connection of the proxy's
 * own); a chat server that wants a header first sees no malformed
 * connection. */
START_TEST(test_health_checks_send_a_proxy_header_to_chat_servers)
{
    struct fake_upstream *server = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0", "--check-interval", "0.05",
                "--upstream", address_text("127.0.0.1:%u", server->port),
                NULL);
    struct proxy_addresses seen;
    ck_assert_msg(upstream_header_within(server, &seen, PROMPTLY_MS),
                  "a health check reaches the server with a PROXY header");
    ck_assert_msg(proxy_connections_now() == 0 &&
                      proxy_counter(COUNTER_CONNECTIONS_ACCEPTED) == 0,
                  "no client was involved");
    pthread_mutex_lock(&server->lock);
    int length = server->header_length;
    uint8_t command = server->header_bytes[12];
    pthread_mutex_unlock(&server->lock);
    ck_assert_msg(length == 16 && command == 0x20 && !seen.known,
                  "the header is v2 LOCAL (%d bytes, command 0x%02x)",
                  length, command);
    proxy_and_upstream_stop(server);
}
END_TEST

START_TEST(test_when_every_server_is_down_they_are_still_tried)
{
    uint16_t dead = closed_port();
    proxy_start("--listen", "127.0.0.1:0", "--stats", "127.0.0.1:0",
                "--check-interval", "0.05",
                "--upstream", address_text("127.0.0.1:%u", dead), NULL);
    char down[128];
    snprintf(down, sizeof down, "whatsapp_proxy_upstream_up{upstream="
             "\"127.0.0.1:%u\",pool=\"chat\"} 0\n", dead);
    ck_assert_msg(metrics_show(down, PROMPTLY_MS),
                  "the only server, which is dead, is marked down");
    char answer[4096];
    ck_assert_int_eq(http_get(proxy_stats_port(), "/healthz", answer,
                              sizeof answer), 503);
    unsigned long long failed = proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED);
    int client = connect_local(proxy_listener_port(0));
    ck_assert_msg(closed_within(client, PROMPTLY_MS + 3000),
                  "the client is closed when its one server refuses");
    ck_assert_msg(proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED) == failed + 4,
                  "a server that is down is still tried when all are, four "
                  "times as any other");
    close(client);
    proxy_stop();
}
END_TEST

/* The health thread checks the decoy web site too (and so resolves its
 * name again), and says when it is down. */
START_TEST(test_the_decoy_is_health_checked_too)
{
    struct fake_upstream *live = fake_upstream_start(UPSTREAM_ECHO, true);
    uint16_t port = closed_port(), dead_decoy = closed_port();
    static struct running_binary binary;
    binary_start(&binary, 0, "--listen", address_text("127.0.0.1:%u", port),
                 "--upstream", address_text("127.0.0.1:%u", live->port),
                 "--media-upstream",
                 address_text("127.0.0.1:%u", live->port), "--decoy",
                 address_text("127.0.0.1:%u", dead_decoy), "--check-interval",
                 "0.05", "--stats", "off", NULL);
    char expected[96];
    snprintf(expected, sizeof expected, "server 127.0.0.1 port %u is down",
             dead_decoy);
    ck_assert_msg(binary_log_shows(&binary, expected, SLOWLY_MS),
                  "three failed checks of the decoy are logged: %s",
                  binary.log);
    binary_wait(&binary, true);
    fake_upstream_stop(live);
}
END_TEST

/* ==== 7. Listeners ==== */

static bool ipv6_available(void)
{
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 address = {.sin6_family = AF_INET6,
                                   .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    bool available = fd >= 0 && bind(fd, (struct sockaddr *)&address,
                                     sizeof address) == 0;
    if (fd >= 0)
        close(fd);
    return available;
}

/* Without an address, a listener takes IPv4 and IPv6; an IPv4 client is
 * described upstream as IPv4 (not as ::ffff:127.0.0.1). */
START_TEST(test_listener_without_address_takes_ipv4_and_ipv6)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "0", NULL);
    int client = connect_to("127.0.0.1", proxy_listener_port(0));
    expect_echo(client, "over IPv4");
    struct proxy_addresses seen;
    ck_assert_msg(upstream_header_within(upstream, &seen, PROMPTLY_MS),
                  "the upstream receives a PROXY header");
    ck_assert_msg(seen.source.ss_family == AF_INET,
                  "an IPv4 client is sent upstream as TCP4");
    close(client);
    if (ipv6_available()) {
        client = connect_to("::1", proxy_listener_port(0));
        expect_echo(client, "over IPv6");
        close(client);
    }
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* The TCP_NODELAY setting of the connected IPv4 socket in this process
 * (the proxy runs here) whose own port is local_port (0: any) and whose
 * peer's port is peer_port; -1 if there is none. */
static int nodelay_of_socket(uint16_t local_port, uint16_t peer_port)
{
    for (int fd = 0; fd < 4096; fd++) {
        struct sockaddr_in local, peer;
        socklen_t local_length = sizeof local, peer_length = sizeof peer;
        if (getsockname(fd, (struct sockaddr *)&local, &local_length) != 0 ||
            getpeername(fd, (struct sockaddr *)&peer, &peer_length) != 0 ||
            local.sin_family != AF_INET ||
            (local_port != 0 && ntohs(local.sin_port) != local_port) ||
            ntohs(peer.sin_port) != peer_port)
            continue;
        int on = 0;
        socklen_t length = sizeof on;
        getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, &length);
        return on;
    }
    return -1;
}

/* A chat message is small, and Nagle's algorithm would hold a small write
 * back until the one before it has been acknowledged. Both sockets of a
 * connection have it off: the client's, which inherits that from the
 * listening socket, and the upstream's. */
START_TEST(test_small_messages_are_held_back_on_neither_side)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0", NULL);
    int client = connect_local(proxy_listener_port(0));
    expect_echo(client, "both sockets are open now");
    struct sockaddr_in mine;
    socklen_t length = sizeof mine;
    getsockname(client, (struct sockaddr *)&mine, &length);
    ck_assert_msg(nodelay_of_socket(proxy_listener_port(0),
                                    ntohs(mine.sin_port)) == 1,
                  "the proxy's socket to the client has TCP_NODELAY");
    ck_assert_msg(nodelay_of_socket(0, upstream->port) == 1,
                  "the proxy's socket to the upstream has TCP_NODELAY");
    close(client);
    proxy_and_upstream_stop(upstream);
}
END_TEST

START_TEST(test_port_in_use_is_named_with_the_fix)
{
    uint16_t port;
    int taken = listen_local(&port, 1);
    char out[4096], err[4096], listen[32];
    snprintf(listen, sizeof listen, "127.0.0.1:%u", port);
    int status = binary_run(out, err, sizeof out, "--listen", listen,
                            "--stats", "off", NULL);
    ck_assert_int_eq(status, 2);
    char port_text[16];
    snprintf(port_text, sizeof port_text, "port %u", port);
    ck_assert_msg(strstr(err, port_text) != NULL, "names %s: %s", port_text,
                  err);
    ck_assert_msg(strstr(err, "already in use") != NULL &&
                      strstr(err, "--listen") != NULL,
                  "says it is in use and how to choose another: %s", err);
    close(taken);
}
END_TEST

/* As a user other than root, a port below 1024 is refused with the fixes:
 * sudo, setcap, or another port. Runs in a child that gives up root. */
START_TEST(test_privileged_port_without_permission_names_the_fixes)
{
    FILE *file = fopen("/proc/sys/net/ipv4/ip_unprivileged_port_start", "r");
    int first_unprivileged = 1024;
    if (file != NULL) {
        if (fscanf(file, "%d", &first_unprivileged) != 1)
            first_unprivileged = 1024;
        fclose(file);
    }
    if (first_unprivileged <= 1000)
        return; /* this machine lets anyone bind port 1000: nothing to test */

    int report[2];
    ck_assert_int_eq(pipe(report), 0);
    pid_t child = fork();
    if (child == 0) {
        if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0))
            _exit(3);
        struct settings *settings = settings_new();
        /* Servers given as addresses: the default names would be looked
         * up in DNS, which can take seconds without a network. */
        char *argv[] = {"whatsapp_proxy", "--listen", "127.0.0.1:1000",
                        "--stats", "off", "--log-level", "error",
                        "--upstream", "127.0.0.1:5222", "--media-upstream",
                        "127.0.0.1:443"};
        char error[512] = "";
        settings_parse(settings, 11, argv, error, sizeof error);
        int opened = proxy_open(settings, error, sizeof error);
        ssize_t ignored = write(report[1], error, strlen(error) + 1);
        (void)ignored;
        settings_free(settings);
        _exit(opened == 0 ? 4 : 0);
    }
    close(report[1]);
    char error[512] = "";
    receive_exactly(report[0], error, sizeof error - 1, PROMPTLY_MS);
    close(report[0]);
    int status;
    waitpid(child, &status, 0);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "binding port 1000 without root should fail");
    ck_assert_msg(strstr(error, "port 1000") && strstr(error, "run as root") &&
                      strstr(error, "setcap cap_net_bind_service=+ep"),
                  "the message names the port and the fixes: %s", error);
}
END_TEST

/* ==== 8. Admission ==== */

/* A one-thread epoll echo server for many connections at once. */
struct echo_server {
    int listen_fd;
    uint16_t port;
    int stop_pipe[2];
    pthread_t thread;
};

static void *echo_server_run(void *argument)
{
    struct echo_server *server = argument;
    int epoll_fd = epoll_create1(0);
    struct epoll_event event = {.events = EPOLLIN, .data.fd = server->listen_fd};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, server->listen_fd, &event);
    event.data.fd = server->stop_pipe[0];
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, server->stop_pipe[0], &event);
    int open_fds[4096];
    size_t open_count = 0;
    for (;;) {
        struct epoll_event ready[64];
        int count = epoll_wait(epoll_fd, ready, 64, SLOWLY_MS);
        if (count <= 0)
            break;
        for (int i = 0; i < count; i++) {
            int fd = ready[i].data.fd;
            if (fd == server->stop_pipe[0])
                goto out;
            if (fd == server->listen_fd) {
                int client = accept4(fd, NULL, NULL, SOCK_NONBLOCK);
                if (client < 0 || open_count == 4096)
                    continue;
                open_fds[open_count++] = client;
                struct epoll_event added = {.events = EPOLLIN,
                                            .data.fd = client};
                epoll_ctl(epoll_fd, EPOLL_CTL_ADD, client, &added);
                continue;
            }
            char buffer[4096];
            ssize_t got = recv(fd, buffer, sizeof buffer, 0);
            if (got > 0)
                send(fd, buffer, (size_t)got, MSG_NOSIGNAL);
            else if (got == 0)
                epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, NULL);
        }
    }
out:
    for (size_t i = 0; i < open_count; i++)
        close(open_fds[i]);
    close(epoll_fd);
    return NULL;
}

static void echo_server_start(struct echo_server *server)
{
    server->listen_fd = listen_local(&server->port, 4096);
    ck_assert_int_eq(pipe(server->stop_pipe), 0);
    pthread_create(&server->thread, NULL, echo_server_run, server);
}

static void echo_server_stop(struct echo_server *server)
{
    ck_assert_int_eq(write(server->stop_pipe[1], "x", 1), 1);
    pthread_join(server->thread, NULL);
    close(server->listen_fd);
    close(server->stop_pipe[0]);
    close(server->stop_pipe[1]);
}

START_TEST(test_over_maxconn_a_new_client_is_closed_and_others_carry_on)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0", "--maxconn", "2",
                                NULL);
    int first = connect_local(proxy_listener_port(0));
    int second = connect_local(proxy_listener_port(0));
    expect_echo(first, "one");
    expect_echo(second, "two");
    int third = connect_local(proxy_listener_port(0));
    ck_assert_msg(closed_within(third, PROMPTLY_MS),
                  "the third client is closed at once");
    ck_assert_int_eq(proxy_counter(COUNTER_REJECTED_MAXCONN), 1);
    expect_echo(first, "one again");
    expect_echo(second, "two again");
    close(third);
    /* When one leaves, there is room again. */
    close(first);
    ck_assert_msg(connections_become(1, PROMPTLY_MS),
                  "one connection is left open after the other closed");
    int fourth = connect_local(proxy_listener_port(0));
    expect_echo(fourth, "four");
    close(fourth);
    close(second);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* CPU time (user + system) a process has used, in clock ticks. */
static long long process_cpu_ticks(pid_t pid)
{
    char path[64], text[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *file = fopen(path, "r");
    ck_assert_ptr_nonnull(file);
    size_t length = fread(text, 1, sizeof text - 1, file);
    fclose(file);
    text[length] = '\0';
    /* Fields 14 and 15, counted after the ")" that ends the name. */
    const char *rest = strrchr(text, ')');
    long long user = 0, system_ticks = 0;
    ck_assert_int_eq(sscanf(rest + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u "
                            "%*u %*u %lld %lld", &user, &system_ticks), 2);
    return user + system_ticks;
}

/* Out of descriptors: accept() fails with EMFILE. The proxy must not spin
 * on the listener that stays readable, and must serve again once
 * descriptors are free. The binary runs with an open-file limit of 40. */
START_TEST(test_out_of_descriptors_no_busy_loop_and_service_resumes)
{
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    uint16_t port = closed_port(), stats_port = closed_port();
    static struct running_binary binary;
    binary_start(&binary, 40, "--listen", address_text("127.0.0.1:%u", port),
                 "--upstream", address_text("127.0.0.1:%u", echo->port),
                 "--media-upstream", address_text("127.0.0.1:%u", echo->port),
                 "--stats", address_text("127.0.0.1:%u", stats_port),
                 "--grace", "0.1", NULL);
    enum { CLIENTS = 40 };
    int clients[CLIENTS];
    for (int i = 0; i < CLIENTS; i++)
        clients[i] = connect_local(port); /* the kernel completes them all */
    ck_assert_msg(binary_log_shows(&binary, "cannot accept", SLOWLY_MS),
                  "the proxy runs out of descriptors and says so: %s",
                  binary.log);
    /* Clients wait on the statistics port too: the first may take the one
     * descriptor a failed upstream connect gave back, the others find
     * none, and the statistics thread must rest as well. */
    int stats_clients[3];
    for (int i = 0; i < 3; i++)
        stats_clients[i] = connect_local(stats_port);

    long long ticks_before = process_cpu_ticks(binary.pid);
    long long started = clock_ms();
    while (clock_ms() - started < 1000)
        readable_within(binary.log_fd, 100); /* a second of real time */
    long long ticks_used = process_cpu_ticks(binary.pid) - ticks_before;
    long ticks_per_second = sysconf(_SC_CLK_TCK);
    ck_assert_msg(ticks_used < ticks_per_second / 5,
                  "no busy loop: %lld ticks of CPU in 1 s (limit %ld)",
                  ticks_used, ticks_per_second / 5);

    for (int i = 0; i < CLIENTS; i++)
        close(clients[i]);
    for (int i = 0; i < 3; i++)
        close(stats_clients[i]);
    bool served = false;
    for (int i = 0; i < 100 && !served; i++) {
        int client = connect_local(port);
        send_all(client, "back", 4);
        char answer[4];
        served = receive_exactly(client, answer, 4, 200) == 4;
        close(client);
    }
    ck_assert_msg(served, "service resumes when descriptors are free");
    binary_wait(&binary, true);
    fake_upstream_stop(echo);
}
END_TEST

/* A thousand clients connecting in the same instant (all connect() calls
 * made before any answer is read) are all served. */
START_TEST(test_a_thousand_clients_at_once_are_all_served)
{
    enum { CLIENTS = 1000 };
    struct echo_server server;
    echo_server_start(&server);
    proxy_start("--listen", "127.0.0.1:0", "--send-proxy", "none",
                "--upstream", address_text("127.0.0.1:%u", server.port), NULL);
    static int clients[CLIENTS];
    struct sockaddr_in address = {.sin_family = AF_INET,
                                  .sin_port = htons(proxy_listener_port(0)),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    for (int i = 0; i < CLIENTS; i++) {
        clients[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        ck_assert_msg(connect(clients[i], (struct sockaddr *)&address,
                              sizeof address) == 0 || errno == EINPROGRESS,
                      "each non-blocking connect starts");
    }
    int served = 0;
    for (int i = 0; i < CLIENTS; i++) {
        struct pollfd watched = {.fd = clients[i], .events = POLLOUT};
        ck_assert_msg(poll(&watched, 1, SLOWLY_MS) == 1,
                      "each connection completes");
        fcntl(clients[i], F_SETFL, fcntl(clients[i], F_GETFL) & ~O_NONBLOCK);
        send_all(clients[i], "at once", 7);
    }
    for (int i = 0; i < CLIENTS; i++) {
        char answer[7];
        served += receive_exactly(clients[i], answer, 7, SLOWLY_MS) == 7;
        close(clients[i]);
    }
    ck_assert_msg(served == CLIENTS, "all %d served (%d)", CLIENTS, served);
    proxy_stop();
    echo_server_stop(&server);
}
END_TEST

/* Opens `count` connections to port that say nothing, into fds. */
static void silent_clients_open(int *fds, int count, uint16_t port)
{
    for (int i = 0; i < count; i++)
        fds[i] = connect_local(port);
}

/* A client that has not said what it must say first (its PROXY header,
 * its TLS handshake, its first bytes for the decoy) holds no thread and no
 * slot: 2,000 silent clients on a PROXY port and 2,000 on a TLS port with
 * a decoy to choose, all still waiting, hold up no other client of any
 * port. */
START_TEST(test_silent_clients_hold_up_no_other_client)
{
    enum { SILENT = 2000 };
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    struct fake_upstream *site = fake_upstream_start(UPSTREAM_WEB_SITE, false);
    char handshake_seconds[16];
    snprintf(handshake_seconds, sizeof handshake_seconds, "%d",
             60 * time_scale);
    proxy_start("--listen", "127.0.0.1:0/accept-proxy",
                "--listen", "127.0.0.1:0/tls", "--listen", "127.0.0.1:0",
                "--decoy", address_text("127.0.0.1:%u", site->port),
                "--timeout-handshake", handshake_seconds,
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    static int silent[2 * SILENT];
    silent_clients_open(silent, SILENT, proxy_listener_port(0));
    silent_clients_open(silent + SILENT, SILENT, proxy_listener_port(1));
    ck_assert_msg(counter_reaches(COUNTER_CONNECTIONS_ACCEPTED, 2 * SILENT,
                                  SLOWLY_MS),
                  "the %d silent clients are all accepted", 2 * SILENT);

    int behind_balancer = connect_local(proxy_listener_port(0));
    const char header[] = "PROXY UNKNOWN\r\n";
    send_all(behind_balancer, header, strlen(header));
    expect_echo(behind_balancer, "WA served behind a balancer");
    expect_tls_echo(proxy_listener_port(1), "WA served over TLS");
    int plain = connect_local(proxy_listener_port(2));
    expect_echo(plain, "WA served on a plain port");
    ck_assert_msg(proxy_counter(COUNTER_HANDSHAKE_TIMEOUT) == 0 &&
                      proxy_connections_now() >= 2 * SILENT,
                  "the silent clients were all still waiting meanwhile "
                  "(%llu timed out, %u open)",
                  proxy_counter(COUNTER_HANDSHAKE_TIMEOUT),
                  proxy_connections_now());
    close(behind_balancer);
    close(plain);
    for (int i = 0; i < 2 * SILENT; i++)
        close(silent[i]);
    proxy_stop();
    fake_upstream_stop(echo);
    fake_upstream_stop(site);
}
END_TEST

/* On a TLS port behind a balancer, --max-per-ip counts the address of the
 * PROXY header as soon as the header is read: the fifth connection from
 * one address is closed before any TLS work is spent on it. */
START_TEST(test_max_per_ip_is_counted_before_any_tls)
{
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0/tls/accept-proxy",
                "--max-per-ip", "4",
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    const char header[] = "PROXY TCP4 203.0.113.9 192.0.2.1 40000 443\r\n";
    int clients[5];
    for (int i = 0; i < 5; i++) {
        clients[i] = connect_local(proxy_listener_port(0));
        send_all(clients[i], header, strlen(header));
    }
    /* The relay threads may read the five headers in any order: which one
     * is refused is not known, only that exactly one is. */
    ck_assert_msg(counter_reaches(COUNTER_REJECTED_PER_IP, 1, PROMPTLY_MS),
                  "one connection over --max-per-ip is refused");
    int closed = 0;
    for (int i = 0; i < 5; i++)
        closed += closed_within(clients[i], 100);
    ck_assert_msg(closed == 1, "exactly one of the five is closed (%d)",
                  closed);
    ck_assert_msg(proxy_counter(COUNTER_TLS_HANDSHAKE_FAILED) == 0 &&
                      proxy_counter(COUNTER_HANDSHAKE_TIMEOUT) == 0,
                  "closed before any TLS, and the other four wait for "
                  "their handshakes meanwhile");
    for (int i = 0; i < 5; i++)
        close(clients[i]);
    proxy_stop();
    fake_upstream_stop(echo);
}
END_TEST

/* Connects to port on 127.0.0.1 from the loopback address `source`
 * (127.0.0.2, say: the whole 127.0.0.0/8 is this machine's). */
static int connect_local_from(const char *source, uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in from = {.sin_family = AF_INET};
    inet_pton(AF_INET, source, &from.sin_addr);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&from, sizeof from), 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&to, sizeof to), 0);
    return fd;
}

/* A PROXY port takes a header only from a --trusted-proxy source: one
 * from elsewhere, which could forge any address, is closed at once and
 * counted, and never reaches a server; one from a trusted balancer is
 * served. */
START_TEST(test_proxy_ports_take_headers_only_from_trusted_sources)
{
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0/accept-proxy", "--stats",
                "127.0.0.1:0", "--trusted-proxy", "127.0.0.1/32",
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    const char header[] = "PROXY TCP4 203.0.113.9 192.0.2.1 40000 443\r\n";
    int forger = connect_local_from("127.0.0.2", proxy_listener_port(0));
    /* The proxy may close it before these are sent: no matter. */
    send_quietly(forger, header, strlen(header));
    send_quietly(forger, "forged", 6);
    ck_assert_msg(closed_within(forger, PROMPTLY_MS),
                  "a header from an untrusted source is refused");
    ck_assert_int_eq(proxy_counter(COUNTER_REJECTED_UNTRUSTED), 1);
    ck_assert_msg(metrics_show("whatsapp_proxy_rejected_untrusted_total 1\n",
                               PROMPTLY_MS), "/metrics counts it");

    int balancer = connect_local_from("127.0.0.1", proxy_listener_port(0));
    send_all(balancer, header, strlen(header));
    expect_echo(balancer, "from a trusted balancer");
    ck_assert_int_eq(upstream_connections(echo), 1);
    close(forger);
    close(balancer);
    proxy_and_upstream_stop(echo);
}
END_TEST

/* --max-per-ip counts the address the PROXY header gives, not the
 * balancer's: two from one client pass, the third is closed, and another
 * client is not affected. */
START_TEST(test_max_per_ip_holds_with_addresses_from_proxy_headers)
{
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0/accept-proxy", "--max-per-ip", "2",
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    const char *first_client = "PROXY TCP4 203.0.113.7 192.0.2.1 1 443\r\n";
    const char *other_client = "PROXY TCP4 203.0.113.8 192.0.2.1 1 443\r\n";
    int clients[3];
    for (int i = 0; i < 3; i++) {
        clients[i] = connect_local(proxy_listener_port(0));
        send_all(clients[i], first_client, strlen(first_client));
        if (i < 2)
            expect_echo(clients[i], "within the limit");
    }
    ck_assert_msg(closed_within(clients[2], PROMPTLY_MS),
                  "the third connection from 203.0.113.7 is closed");
    ck_assert_int_eq(proxy_counter(COUNTER_REJECTED_PER_IP), 1);
    int other = connect_local(proxy_listener_port(0));
    send_all(other, other_client, strlen(other_client));
    expect_echo(other, "another address is not affected");
    close(clients[0]);
    ck_assert_msg(connections_become(2, PROMPTLY_MS),
                  "two connections are left after the first one closed");
    int again = connect_local(proxy_listener_port(0));
    send_all(again, first_client, strlen(first_client));
    expect_echo(again, "room again after one left");
    close(again);
    close(other);
    close(clients[1]);
    close(clients[2]);
    proxy_stop();
    fake_upstream_stop(echo);
}
END_TEST

/* On a port without PROXY headers the address is known at accept time:
 * --max-per-ip counts it there, before the client can hold a slot. */
START_TEST(test_max_per_ip_holds_on_a_plain_port)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0", "--max-per-ip",
                                "1", NULL);
    int first = connect_local(proxy_listener_port(0));
    expect_echo(first, "the first from 127.0.0.1");
    int second = connect_local(proxy_listener_port(0));
    ck_assert_msg(closed_within(second, PROMPTLY_MS),
                  "the second connection from 127.0.0.1 is closed");
    ck_assert_int_eq(proxy_counter(COUNTER_REJECTED_PER_IP), 1);
    expect_echo(first, "the first carries on");
    close(second);
    close(first);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* ==== 9. Conversation ==== */

START_TEST(test_silent_client_is_dropped_at_the_handshake_timeout)
{
    proxy_start("--listen", "127.0.0.1:0/accept-proxy",
                "--listen", "127.0.0.1:0/tls", "--timeout-handshake", "0.3",
                "--upstream", address_text("127.0.0.1:%u", closed_port()),
                NULL);
    for (size_t i = 0; i < 2; i++) {
        long long started = clock_ms();
        int client = connect_local(proxy_listener_port(i));
        if (i == 0)
            send_all(client, "PROXY TCP4 ", 11); /* a header never ended */
        ck_assert_msg(closed_within(client, PROMPTLY_MS),
                      "a client that never ends its handshake is closed");
        ck_assert_msg(clock_ms() - started >= 250,
                      "not closed before the timeout");
        ck_assert_msg(counter_reaches(COUNTER_HANDSHAKE_TIMEOUT, i + 1,
                                      PROMPTLY_MS),
                      "the handshake timeout is counted");
        close(client);
    }
    proxy_stop();
}
END_TEST

START_TEST(test_malformed_header_closes_only_that_client)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0/accept-proxy", NULL);
    int good = connect_local(proxy_listener_port(0));
    send_all(good, "PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n", 44);
    expect_echo(good, "before");
    int bad = connect_local(proxy_listener_port(0));
    send_all(bad, "PROXY BOGUS\r\nsecret", 19);
    ck_assert_msg(closed_within(bad, PROMPTLY_MS),
                  "the client with a malformed header is closed");
    ck_assert_int_eq(proxy_counter(COUNTER_BAD_PROXY_HEADER), 1);
    ck_assert_msg(upstream_connections(upstream) == 1,
                  "nothing of the bad client reached a server");
    expect_echo(good, "after");
    close(bad);
    close(good);
    proxy_and_upstream_stop(upstream);
}
END_TEST

START_TEST(test_plain_bytes_on_a_tls_port_close_only_that_client)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0/tls", NULL);
    int plain = connect_local(proxy_listener_port(0));
    send_all(plain, "GET / HTTP/1.1\r\n\r\n", 18);
    ck_assert_msg(closed_within(plain, PROMPTLY_MS),
                  "the client sending plain bytes is closed");
    ck_assert_msg(counter_reaches(COUNTER_TLS_HANDSHAKE_FAILED, 1, PROMPTLY_MS),
                  "the failed TLS handshake is counted");
    close(plain);
    int fd;
    SSL *tls = tls_connect_local(proxy_listener_port(0), &fd);
    tls_send_all(tls, "fine", 4);
    char back[4];
    ck_assert_uint_eq(tls_receive_exactly(tls, back, 4), 4);
    ck_assert_int_eq(upstream_connections(upstream), 1);
    tls_client_close(tls);
    close(fd);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* A header that arrives one byte at a time is still read exactly, and the
 * payload right behind it reaches the server intact. */
START_TEST(test_header_split_across_reads_is_read_exactly)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0/accept-proxy", NULL);
    uint8_t header[200];
    size_t length = v2_header_with_tlv(header);
    int client = connect_local(proxy_listener_port(0));
    for (size_t i = 0; i < length; i++) {
        send_all(client, header + i, 1);
        usleep(1000); /* not synchronisation: makes separate segments */
    }
    expect_echo(client, "payload right after");
    struct proxy_addresses seen;
    ck_assert_msg(upstream_header_within(upstream, &seen, PROMPTLY_MS),
                  "the upstream receives the header sent byte by byte");
    expect_address(&seen.source, "203.0.113.7:40000");
    close(client);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* A balancer's long header (3,000 bytes, TLVs and a checksum) is taken
 * and read exactly; the same header with one bit changed closes that
 * client and is counted. */
START_TEST(test_a_long_header_is_taken_and_a_wrong_checksum_refused)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0/accept-proxy", NULL);
    static uint8_t header[3000];
    v2_header_long(header, sizeof header, true);
    int good = connect_local(proxy_listener_port(0));
    send_all(good, header, sizeof header);
    expect_echo(good, "payload right after");
    struct proxy_addresses seen;
    ck_assert_msg(upstream_header_within(upstream, &seen, PROMPTLY_MS),
                  "the upstream receives a PROXY header");
    expect_address(&seen.source, "203.0.113.7:40000");

    header[200] ^= 1;
    int bad = connect_local(proxy_listener_port(0));
    /* The proxy may close while this is still sending: no check here. */
    ssize_t ignored = send(bad, header, sizeof header, MSG_NOSIGNAL);
    ignored = send(bad, "secret", 6, MSG_NOSIGNAL);
    (void)ignored;
    ck_assert_msg(closed_within(bad, PROMPTLY_MS),
                  "the client whose header fails its checksum is closed");
    ck_assert_int_eq(proxy_counter(COUNTER_BAD_PROXY_HEADER), 1);
    ck_assert_int_eq(upstream_connections(upstream), 1);
    expect_echo(good, "still served");
    close(bad);
    close(good);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* Slowloris: a PROXY header, or a TLS ClientHello, sent one byte at a
 * time, is cut at the handshake timeout, while normal clients keep being
 * served. */
START_TEST(test_slowloris_is_cut_at_the_handshake_timeout)
{
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0/accept-proxy",
                "--listen", "127.0.0.1:0/tls", "--timeout-handshake", "0.6",
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    const char *slow_bytes[2] = {"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\r\n",
                                 "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03"};
    for (size_t listener = 0; listener < 2; listener++) {
        int slow = connect_local(proxy_listener_port(listener));
        long long started = clock_ms();
        bool cut = false;
        for (size_t i = 0; i < strlen(slow_bytes[listener]) && !cut; i++) {
            if (send(slow, slow_bytes[listener] + i, 1, MSG_NOSIGNAL) != 1)
                break;
            /* Meanwhile a normal client is served. */
            int normal = connect_local(proxy_listener_port(0));
            send_all(normal, "PROXY UNKNOWN\r\n", 15);
            expect_echo(normal, "served");
            close(normal);
            cut = closed_within(slow, 150);
        }
        if (!cut)
            cut = closed_within(slow, PROMPTLY_MS);
        ck_assert_msg(cut, "the slow client is cut");
        long long took = clock_ms() - started;
        ck_assert_msg(took >= 500 && took < 2000,
                      "cut at the 0.6 s handshake timeout (%lld ms)", took);
        close(slow);
    }
    ck_assert_int_eq(proxy_counter(COUNTER_HANDSHAKE_TIMEOUT), 2);
    proxy_stop();
    fake_upstream_stop(echo);
}
END_TEST

/* ---- Probes and the decoy ---- */

static enum decoy_verdict classify(const char *data, size_t length,
                                   bool strict)
{
    return decoy_classify((const uint8_t *)data, length, strict);
}

START_TEST(test_decoy_http_rule_sends_only_http_and_tls_to_the_decoy)
{
    ck_assert_int_eq(classify("GET / HTTP/1.1\r\n", 16, false), DECOY_PROBE);
    ck_assert_int_eq(classify("OPTIONS * HTTP/1.1", 18, false), DECOY_PROBE);
    ck_assert_int_eq(classify("\x16\x03\x01\x02\x00", 5, false), DECOY_PROBE);
    ck_assert_int_eq(classify("GE", 2, false), DECOY_NEED_MORE);
    ck_assert_int_eq(classify("\x16", 1, false), DECOY_NEED_MORE);
    ck_assert_int_eq(classify("WA\x06\x03", 4, false), DECOY_WHATSAPP);
    ck_assert_int_eq(classify("W", 1, false), DECOY_WHATSAPP);
    ck_assert_int_eq(classify("ED\x00\x01\x00\x00\x04", 7, false),
                     DECOY_WHATSAPP);
    ck_assert_int_eq(classify("SSH-2.0-OpenSSH", 15, false), DECOY_WHATSAPP);
}
END_TEST

START_TEST(test_decoy_strict_rule_wants_the_whatsapp_header)
{
    ck_assert_int_eq(classify("WA\x06\x03", 4, true), DECOY_WHATSAPP);
    ck_assert_int_eq(classify("WA\x05\x02more", 8, true), DECOY_WHATSAPP);
    ck_assert_int_eq(classify("WA", 2, true), DECOY_NEED_MORE);
    const char edge[] = "ED\x00\x01\x00\x00\x04\x08\x01\x02\x03WA\x06\x03";
    for (size_t prefix = 1; prefix < sizeof edge - 1; prefix++)
        ck_assert_msg(classify(edge, prefix, true) == DECOY_NEED_MORE,
                      "a prefix of %zu bytes of a routed header asks for more",
                      prefix);
    ck_assert_int_eq(classify(edge, sizeof edge - 1, true), DECOY_WHATSAPP);
    ck_assert_int_eq(classify("GET / HTTP/1.1", 14, true), DECOY_PROBE);
    ck_assert_int_eq(classify("SSH-2.0", 7, true), DECOY_PROBE);
    ck_assert_int_eq(classify("WB\x06\x03", 4, true), DECOY_PROBE);
    ck_assert_int_eq(classify("ED\x00\x01\xff\xff\xff", 7, true), DECOY_PROBE);
    ck_assert_int_eq(classify("ED\x00\x01\x00\x00\x01\x08XY", 10, true),
                     DECOY_PROBE);
}
END_TEST

/* Sends data through an open client (TLS or plain) and reads the answer
 * until the end or `size` bytes; returns the length read. */
static size_t exchange(int fd, SSL *tls, const void *data, size_t length,
                       char *answer, size_t size)
{
    if (tls != NULL)
        tls_send_all(tls, data, length);
    else
        send_all(fd, data, length);
    size_t got = tls != NULL ? tls_receive_exactly(tls, answer, size - 1)
                             : receive_exactly(fd, answer, size - 1,
                                               PROMPTLY_MS);
    answer[got] = '\0';
    return got;
}

/* A scanner's HTTP request on a TLS port gets the decoy web site's page. */
START_TEST(test_http_probe_on_a_tls_port_gets_the_decoy_page)
{
    struct fake_upstream *whatsapp = fake_upstream_start(UPSTREAM_ECHO, true);
    struct fake_upstream *site = fake_upstream_start(UPSTREAM_WEB_SITE, false);
    proxy_start("--listen", "127.0.0.1:0/tls", "--listen", "127.0.0.1:0",
                "--decoy", address_text("127.0.0.1:%u", site->port),
                "--upstream", address_text("127.0.0.1:%u", whatsapp->port),
                NULL);
    for (size_t listener = 0; listener < 2; listener++) {
        int fd = connect_local(proxy_listener_port(listener));
        socket_timeout(fd, PROMPTLY_MS);
        SSL *tls = listener == 0 ? tls_client_start(fd, 0) : NULL;
        char page[512];
        const char request[] = "GET / HTTP/1.1\r\nHost: example.org\r\n\r\n";
        exchange(fd, tls, request, strlen(request), page, sizeof page);
        ck_assert_msg(strcmp(page, WEB_PAGE) == 0,
                      "the prober gets the web site's page, got: %s", page);
        if (tls != NULL)
            tls_client_close(tls);
        close(fd);
    }
    ck_assert_int_eq(proxy_counter(COUNTER_DECOYED), 2);
    ck_assert_msg(upstream_connections(whatsapp) == 0,
                  "no probe reached WhatsApp's server");
    pthread_mutex_lock(&site->lock);
    ck_assert_msg(memcmp(site->first_payload, "GET / HTTP/1.1", 14) == 0,
                  "the site gets the request as the prober sent it");
    pthread_mutex_unlock(&site->lock);
    proxy_stop();
    fake_upstream_stop(whatsapp);
    fake_upstream_stop(site);
}
END_TEST

/* With a decoy, a client of a TLS port that does not speak TLS reaches
 * the site with its bytes as sent (plain HTTP to an HTTPS port gets the
 * site's own answer); and a client that has not shown what it is when the
 * handshake timeout comes (half a TLS hello, or "GE" on a plain port) goes
 * to the site with what it sent, instead of being cut. In the second
 * round, with --decoy-tls-port, what came before any TLS on the TLS port
 * goes to the site's own TLS port instead, and nothing else does. */
START_TEST(test_undecided_and_non_tls_clients_go_to_the_decoy_as_sent)
{
    struct fake_upstream *whatsapp = fake_upstream_start(UPSTREAM_ECHO, true);
    struct fake_upstream *site = fake_upstream_start(UPSTREAM_WEB_SITE, false);
    struct fake_upstream *site_tls =
        fake_upstream_start(UPSTREAM_WEB_SITE, false);
    static const struct {
        size_t listener;
        const char *bytes;
        size_t length;
    } clients[] = {
        {0, "GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", 37},
        {0, "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11},
        {1, "GE", 2},
    };
    for (int round = 0; round < 2; round++) {
        bool tls_port = round == 1;
        /* In the first round the NULL in place of --decoy-tls-port ends
         * the list of arguments there. */
        proxy_start("--listen", "127.0.0.1:0/tls", "--listen", "127.0.0.1:0",
                    "--decoy", address_text("127.0.0.1:%u", site->port),
                    "--timeout-handshake", "0.5", "--upstream",
                    address_text("127.0.0.1:%u", whatsapp->port),
                    tls_port ? "--decoy-tls-port" : NULL,
                    address_text("%u", site_tls->port), NULL);
        for (size_t i = 0; i < sizeof clients / sizeof clients[0]; i++) {
            int fd = connect_local(proxy_listener_port(clients[i].listener));
            send_all(fd, clients[i].bytes, clients[i].length);
            char page[128] = "";
            size_t got = receive_exactly(fd, page, strlen(WEB_PAGE),
                                         PROMPTLY_MS + 500);
            ck_assert_msg(got == strlen(WEB_PAGE) &&
                              memcmp(page, WEB_PAGE, got) == 0,
                          "client %zu gets the site's page", i);
            struct fake_upstream *reached =
                tls_port && clients[i].listener == 0 ? site_tls : site;
            pthread_mutex_lock(&reached->lock);
            ck_assert_msg(reached->first_payload_length == clients[i].length &&
                              memcmp(reached->first_payload, clients[i].bytes,
                                     clients[i].length) == 0,
                          "round %d: client %zu's bytes reach the %s as sent",
                          round, i, reached == site ? "site" : "TLS port");
            pthread_mutex_unlock(&reached->lock);
            close(fd);
        }
        ck_assert_int_eq(proxy_counter(COUNTER_HANDSHAKE_TIMEOUT), 0);
        if (tls_port) {
            /* A request from inside TLS goes to the plain port. */
            int fd = connect_local(proxy_listener_port(0));
            socket_timeout(fd, PROMPTLY_MS);
            SSL *tls = tls_client_start(fd, 0);
            ck_assert_ptr_nonnull(tls);
            tls_send_all(tls, "GET / HTTP/1.1\r\n\r\n", 18);
            char page[128] = "";
            ck_assert_int_eq(tls_receive_exactly(tls, page, strlen(WEB_PAGE)),
                             strlen(WEB_PAGE));
            tls_client_close(tls);
            close(fd);
        }
        proxy_stop();
    }
    ck_assert_int_eq(upstream_connections(whatsapp), 0);
    ck_assert_int_eq(upstream_connections(site), 3 + 1 + 1);
    ck_assert_int_eq(upstream_connections(site_tls), 2);
    fake_upstream_stop(whatsapp);
    fake_upstream_stop(site);
    fake_upstream_stop(site_tls);
}
END_TEST

/* With --decoy-send-proxy, the decoy learns who is asking: a PROXY header
 * with the visitor's own address comes first. And under the default rule
 * (strict) a probe in lower case goes to the site too. */
START_TEST(test_decoy_send_proxy_tells_the_site_who_is_asking)
{
    struct fake_upstream *whatsapp = fake_upstream_start(UPSTREAM_ECHO, true);
    struct fake_upstream *site = fake_upstream_start(UPSTREAM_WEB_SITE, true);
    proxy_start("--listen", "127.0.0.1:0", "--decoy",
                address_text("127.0.0.1:%u", site->port),
                "--decoy-send-proxy", "v1", "--upstream",
                address_text("127.0.0.1:%u", whatsapp->port), NULL);
    int fd = connect_local(proxy_listener_port(0));
    socket_timeout(fd, PROMPTLY_MS);
    char page[512];
    const char request[] = "get / HTTP/1.1\r\nHost: example.org\r\n\r\n";
    exchange(fd, NULL, request, strlen(request), page, sizeof page);
    ck_assert_msg(strcmp(page, WEB_PAGE) == 0,
                  "a lower-case probe gets the web site's page: %s", page);
    struct proxy_addresses seen;
    ck_assert_msg(upstream_header_within(site, &seen, PROMPTLY_MS),
                  "the site gets a PROXY header");
    struct sockaddr_storage mine;
    socklen_t length = sizeof mine;
    getsockname(fd, (struct sockaddr *)&mine, &length);
    char expected[80];
    address_format(&mine, expected, sizeof expected);
    expect_address(&seen.source, expected);
    pthread_mutex_lock(&site->lock);
    ck_assert_msg(memcmp(site->header_bytes, "PROXY TCP4 ", 11) == 0,
                  "a v1 header, as asked");
    pthread_mutex_unlock(&site->lock);
    ck_assert_int_eq(upstream_connections(whatsapp), 0);
    close(fd);
    proxy_stop();
    fake_upstream_stop(whatsapp);
    fake_upstream_stop(site);
}
END_TEST

/* A client that starts like WhatsApp reaches WhatsApp byte for byte, under
 * both rules, on plain and TLS ports. */
START_TEST(test_whatsapp_like_client_reaches_the_upstream_under_both_rules)
{
    const char *rules[2] = {"http", "strict"};
    const char hello[] = "ED\x00\x01\x00\x00\x04\x08\x01\x02\x03"
                         "WA\x06\x03\x00\x00\x05hello";
    const size_t hello_length = sizeof hello - 1;
    for (int r = 0; r < 2; r++) {
        struct fake_upstream *whatsapp =
            fake_upstream_start(UPSTREAM_ECHO, true);
        struct fake_upstream *site =
            fake_upstream_start(UPSTREAM_WEB_SITE, false);
        proxy_start("--listen", "127.0.0.1:0/tls", "--listen", "127.0.0.1:0",
                    "--decoy", address_text("127.0.0.1:%u", site->port),
                    "--decoy-rule", rules[r], "--upstream",
                    address_text("127.0.0.1:%u", whatsapp->port), NULL);
        for (size_t listener = 0; listener < 2; listener++) {
            int fd = connect_local(proxy_listener_port(listener));
            socket_timeout(fd, PROMPTLY_MS);
            SSL *tls = listener == 0 ? tls_client_start(fd, 0) : NULL;
            char back[64];
            size_t got = exchange(fd, tls, hello, hello_length, back,
                                  hello_length + 1);
            ck_assert_msg(got == hello_length &&
                              memcmp(back, hello, hello_length) == 0,
                          "rule %s: the WhatsApp stream comes back intact",
                          rules[r]);
            if (tls != NULL)
                tls_client_close(tls);
            close(fd);
        }
        pthread_mutex_lock(&whatsapp->lock);
        ck_assert_msg(memcmp(whatsapp->first_payload, hello, 11) == 0,
                      "WhatsApp's server gets the client's bytes unchanged");
        pthread_mutex_unlock(&whatsapp->lock);
        ck_assert_int_eq(upstream_connections(site), 0);
        ck_assert_int_eq(proxy_counter(COUNTER_DECOYED), 0);
        proxy_stop();
        fake_upstream_stop(whatsapp);
        fake_upstream_stop(site);
    }
}
END_TEST

/* --sni: the secret name reaches WhatsApp; any other name, or none, gets
 * the decoy; without a decoy, another name fails the handshake. */
START_TEST(test_wrong_server_name_goes_to_the_decoy_and_right_one_through)
{
    struct fake_upstream *whatsapp = fake_upstream_start(UPSTREAM_ECHO, true);
    struct fake_upstream *site = fake_upstream_start(UPSTREAM_WEB_SITE, false);
    proxy_start("--listen", "127.0.0.1:0/tls", "--sni", "secret.example.org",
                "--decoy", address_text("127.0.0.1:%u", site->port),
                "--upstream", address_text("127.0.0.1:%u", whatsapp->port),
                NULL);
    const char *names[3] = {"SECRET.example.org", "www.example.org", NULL};
    for (int n = 0; n < 3; n++) {
        int fd = connect_local(proxy_listener_port(0));
        socket_timeout(fd, PROMPTLY_MS);
        SSL *tls = tls_client_start_named(fd, 0, names[n]);
        ck_assert_ptr_nonnull(tls);
        char back[512];
        exchange(fd, tls, "WA\x06\x03", 4, back, n == 0 ? 5 : sizeof back);
        if (n == 0)
            ck_assert_msg(memcmp(back, "WA\x06\x03", 4) == 0,
                          "the listed name reaches WhatsApp");
        else
            ck_assert_msg(strcmp(back, WEB_PAGE) == 0,
                          "name %s gets the decoy's page", names[n]);
        tls_client_close(tls);
        close(fd);
    }
    ck_assert_int_eq(proxy_counter(COUNTER_SNI_MATCHED), 1);
    ck_assert_int_eq(proxy_counter(COUNTER_SNI_MISSED), 2);
    ck_assert_int_eq(proxy_counter(COUNTER_DECOYED), 2);
    proxy_stop();

    proxy_start("--listen", "127.0.0.1:0/tls", "--sni", "secret.example.org",
                "--upstream", address_text("127.0.0.1:%u", whatsapp->port),
                NULL);
    int fd = connect_local(proxy_listener_port(0));
    socket_timeout(fd, PROMPTLY_MS);
    ck_assert_msg(tls_client_start_named(fd, 0, "www.example.org") == NULL,
                  "without a decoy another name fails the handshake");
    close(fd);
    proxy_stop();
    fake_upstream_stop(whatsapp);
    fake_upstream_stop(site);
}
END_TEST

/* ==== 10. Relay ==== */

/* The byte at position `index` of the test stream named by seed: a
 * splitmix64 sequence, so any position can be checked without storing the
 * stream. */
static uint8_t stream_byte(uint64_t seed, uint64_t index)
{
    uint64_t z = seed + (index / 8 + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint8_t)(z >> (8 * (index % 8)));
}

/* How a test client reaches a listener: which header to send first, and
 * whether to speak TLS. */
struct listener_kind {
    const char *listen;  /* the --listen value */
    const char *header;  /* sent first: "v1", "v2" or NULL */
    bool tls;
    bool media;
};

START_TEST(test_bytes_arrive_intact_on_every_kind_of_listener)
{
    static const struct listener_kind kinds[] = {
        {"127.0.0.1:0", NULL, false, false},
        {"127.0.0.1:0/tls", NULL, true, false},
        {"127.0.0.1:0/accept-proxy", "v1", false, false},
        {"127.0.0.1:0/accept-proxy", "v2", false, false},
        {"127.0.0.1:0/tls/accept-proxy", "v2", true, false},
        {"127.0.0.1:0/media", NULL, false, true},
        {"127.0.0.1:0/media/accept-proxy", "v1", false, true},
    };
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        const struct listener_kind *kind = &kinds[k];
        struct fake_upstream *upstream =
            fake_upstream_start(UPSTREAM_ECHO, !kind->media);
        const char *server = address_text("127.0.0.1:%u", upstream->port);
        proxy_start("--listen", kind->listen, "--upstream", server,
                    "--media-upstream", server, NULL);
        int fd = connect_local(proxy_listener_port(0));
        socket_timeout(fd, SLOWLY_MS);
        if (kind->header != NULL) {
            struct proxy_addresses addresses = {
                .known = true, .source = ipv4_address("203.0.113.7", 40000),
                .destination = ipv4_address("192.0.2.1", 443)};
            uint8_t header[PROXYHDR_ENCODED_MAX_BYTES];
            size_t length = kind->header[1] == '1'
                ? proxyhdr_encode_v1(&addresses, header, sizeof header)
                : proxyhdr_encode_v2(&addresses, header, sizeof header);
            send_all(fd, header, length);
        }
        SSL *tls = kind->tls ? tls_client_start(fd, 0) : NULL;
        ck_assert_msg(!kind->tls || tls != NULL, "TLS on %s", kind->listen);

        /* 256 KiB in 16 KiB steps, each echoed back and checked. */
        uint8_t out[16384], back[16384];
        for (size_t offset = 0; offset < (256u << 10); offset += sizeof out) {
            for (size_t i = 0; i < sizeof out; i++)
                out[i] = stream_byte(k, offset + i);
            size_t got;
            if (tls != NULL) {
                tls_send_all(tls, out, sizeof out);
                got = tls_receive_exactly(tls, back, sizeof back);
            } else {
                send_all(fd, out, sizeof out);
                got = receive_exactly(fd, back, sizeof back, SLOWLY_MS);
            }
            ck_assert_msg(got == sizeof back && memcmp(out, back, got) == 0,
                          "bytes at %zu come back intact on %s (%s)", offset,
                          kind->listen, kind->header ? kind->header : "");
        }
        if (kind->media) {
            pthread_mutex_lock(&upstream->lock);
            ck_assert_msg(upstream->header_length == 0 &&
                              upstream->first_payload[0] == stream_byte(k, 0),
                          "a media server gets the client's bytes, no header");
            pthread_mutex_unlock(&upstream->lock);
        }
        if (tls != NULL)
            tls_client_close(tls);
        close(fd);
        proxy_stop();
        fake_upstream_stop(upstream);
    }
}
END_TEST

/* One end of a two-way bulk transfer: sends `to_send` bytes of the stream
 * send_seed while it receives and checks `to_receive` bytes of the stream
 * receive_seed. Works on a plain socket or over TLS. */
struct bulk_end {
    int fd;
    SSL *tls;
    uint64_t send_seed, receive_seed;
    size_t to_send, sent;
    size_t to_receive, received;
    size_t first_wrong; /* SIZE_MAX while every byte was right */
    uint64_t checksum;  /* a running sum of the received bytes */
    atomic_size_t progress; /* `received`, for other threads to watch */
};

/* One step of writing: returns false on a broken connection. */
static bool bulk_write_some(struct bulk_end *end)
{
    uint8_t chunk[16384];
    size_t length = end->to_send - end->sent;
    if (length > sizeof chunk)
        length = sizeof chunk;
    for (size_t i = 0; i < length; i++)
        chunk[i] = stream_byte(end->send_seed, end->sent + i);
    if (end->tls != NULL) {
        size_t written = 0;
        if (SSL_write_ex(end->tls, chunk, length, &written) == 1) {
            end->sent += written;
            return true;
        }
        int reason = SSL_get_error(end->tls, 0);
        return reason == SSL_ERROR_WANT_WRITE || reason == SSL_ERROR_WANT_READ;
    }
    ssize_t written = send(end->fd, chunk, length, MSG_NOSIGNAL);
    if (written > 0)
        end->sent += (size_t)written;
    return written > 0 || errno == EAGAIN;
}

/* One step of reading and checking: returns false on a broken connection. */
static bool bulk_read_some(struct bulk_end *end)
{
    uint8_t chunk[65536];
    size_t got = 0;
    if (end->tls != NULL) {
        if (SSL_read_ex(end->tls, chunk, sizeof chunk, &got) != 1) {
            int reason = SSL_get_error(end->tls, 0);
            return reason == SSL_ERROR_WANT_READ ||
                   reason == SSL_ERROR_WANT_WRITE;
        }
    } else {
        ssize_t count = recv(end->fd, chunk, sizeof chunk, 0);
        if (count <= 0)
            return count < 0 && errno == EAGAIN;
        got = (size_t)count;
    }
    for (size_t i = 0; i < got; i++) {
        if (chunk[i] != stream_byte(end->receive_seed, end->received + i) &&
            end->first_wrong == SIZE_MAX)
            end->first_wrong = end->received + i;
        end->checksum += chunk[i];
    }
    end->received += got;
    atomic_store(&end->progress, end->received);
    return true;
}

/* Sends and receives at once, in one thread, until both are done, the
 * connection breaks, or timeout_ms pass. The socket is made non-blocking. */
static void bulk_transfer(struct bulk_end *end, int timeout_ms)
{
    fcntl(end->fd, F_SETFL, fcntl(end->fd, F_GETFL) | O_NONBLOCK);
    long long deadline = clock_ms() + timeout_ms;
    while ((end->sent < end->to_send || end->received < end->to_receive) &&
           clock_ms() < deadline) {
        struct pollfd watched = {.fd = end->fd, .events = POLLIN};
        if (end->sent < end->to_send)
            watched.events |= POLLOUT;
        bool tls_buffered = end->tls != NULL && SSL_has_pending(end->tls);
        if (!tls_buffered && poll(&watched, 1, 100) <= 0)
            continue;
        if ((watched.revents & POLLOUT) && !bulk_write_some(end))
            return;
        if ((tls_buffered || (watched.revents & (POLLIN | POLLHUP))) &&
            end->received < end->to_receive && !bulk_read_some(end))
            return;
    }
}

/* The server end of a bulk transfer: accepts one connection on listen_fd,
 * reads the PROXY header, then transfers. */
struct bulk_server {
    int listen_fd;
    uint16_t port;
    struct bulk_end end;
    pthread_t thread;
};

static void *bulk_server_run(void *argument)
{
    struct bulk_server *server = argument;
    if (!readable_within(server->listen_fd, SLOWLY_MS))
        return NULL;
    server->end.fd = accept(server->listen_fd, NULL, NULL);
    uint8_t header[PROXYHDR_V2_MAX_BYTES];
    size_t have = 0;
    struct proxy_addresses ignored;
    int length = 0;
    while (length == 0 && have < sizeof header &&
           readable_within(server->end.fd, SLOWLY_MS) &&
           recv(server->end.fd, header + have, 1, 0) == 1)
        length = proxyhdr_decode(header, ++have, &ignored);
    if (length > 0)
        bulk_transfer(&server->end, SLOWLY_MS);
    return NULL;
}

static void bulk_server_start(struct bulk_server *server, size_t to_send,
                              size_t to_receive)
{
    server->listen_fd = listen_local(&server->port, 8);
    server->end = (struct bulk_end){.send_seed = 2, .receive_seed = 1,
                                    .to_send = to_send,
                                    .to_receive = to_receive,
                                    .first_wrong = SIZE_MAX};
    atomic_init(&server->end.progress, 0);
    pthread_create(&server->thread, NULL, bulk_server_run, server);
}

static void bulk_server_stop(struct bulk_server *server)
{
    pthread_join(server->thread, NULL);
    close(server->end.fd);
    close(server->listen_fd);
}

/* 64 MiB each way at once through one connection, plain or TLS; every
 * byte is checked in order at both ends. (`make valgrind`, under which
 * everything runs 20 times slower, sets TEST_BULK_MIB to less.) */
static void transfer_64_mib_each_way(bool tls)
{
    const char *mib = getenv("TEST_BULK_MIB");
    const size_t size = (size_t)(mib ? atoi(mib) : 64) << 20;
    struct bulk_server server;
    bulk_server_start(&server, size, size);
    proxy_start("--listen", tls ? "127.0.0.1:0/tls" : "127.0.0.1:0",
                "--upstream", address_text("127.0.0.1:%u", server.port), NULL);
    struct bulk_end client = {.send_seed = 1, .receive_seed = 2,
                              .to_send = size, .to_receive = size,
                              .first_wrong = SIZE_MAX};
    if (tls) {
        client.tls = tls_connect_local(proxy_listener_port(0), &client.fd);
        SSL_set_mode(client.tls, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                     SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    } else {
        client.fd = connect_local(proxy_listener_port(0));
    }
    bulk_transfer(&client, SLOWLY_MS);
    bulk_server_stop(&server);

    ck_assert_msg(client.received == size && server.end.received == size,
                  "%zu bytes should arrive each way: client got %zu, server "
                  "%zu", size, client.received, server.end.received);
    ck_assert_msg(client.first_wrong == SIZE_MAX &&
                      server.end.first_wrong == SIZE_MAX,
                  "every byte should arrive intact and in order");
    ck_assert_msg(client.checksum != 0 && server.end.checksum != 0,
                  "the checksums cover real data");
    if (client.tls != NULL)
        tls_client_close(client.tls);
    close(client.fd);
    proxy_stop();
}

START_TEST(test_64_mib_each_way_at_once_arrive_intact_plain)
{
    transfer_64_mib_each_way(false);
}
END_TEST

START_TEST(test_64_mib_each_way_at_once_arrive_intact_over_tls)
{
    transfer_64_mib_each_way(true);
}
END_TEST

/* Ends a test client's sending half: TLS close_notify first, then FIN. */
static void client_end_sending(int fd, SSL *tls)
{
    if (tls != NULL)
        SSL_shutdown(tls);
    shutdown(fd, SHUT_WR);
}

/* Reads until the end (EOF, or TLS close_notify); returns the bytes read. */
static size_t client_read_to_end(int fd, SSL *tls, char *out, size_t size)
{
    size_t got = 0;
    for (;;) {
        size_t count = 0;
        if (tls != NULL) {
            if (SSL_read_ex(tls, out + got, size - got, &count) != 1)
                return got;
        } else {
            if (!readable_within(fd, PROMPTLY_MS))
                return got;
            ssize_t read_count = recv(fd, out + got, size - got, 0);
            if (read_count <= 0)
                return got;
            count = (size_t)read_count;
        }
        got += count;
    }
}

/* The client ends its sending and still receives the server's answer. */
static void client_half_close(bool use_tls)
{
    struct fake_upstream *upstream =
        fake_upstream_start(UPSTREAM_REPLY_AT_EOF, true);
    proxy_start("--listen", use_tls ? "127.0.0.1:0/tls" : "127.0.0.1:0",
                "--upstream", address_text("127.0.0.1:%u", upstream->port),
                NULL);
    int fd = connect_local(proxy_listener_port(0));
    socket_timeout(fd, PROMPTLY_MS);
    SSL *tls = use_tls ? tls_client_start(fd, 0) : NULL;
    if (tls != NULL)
        tls_send_all(tls, "question", 8);
    else
        send_all(fd, "question", 8);
    client_end_sending(fd, tls);
    char answer[64];
    size_t got = client_read_to_end(fd, tls, answer, sizeof answer);
    ck_assert_msg(got == 5 && memcmp(answer, "reply", 5) == 0,
                  "after its half-close the client still gets the reply");
    if (tls != NULL)
        tls_client_close(tls);
    close(fd);
    proxy_and_upstream_stop(upstream);
}

/* The server ends its sending; the client reads to the end and then still
 * sends bytes that reach the server. */
static void server_half_close(bool use_tls)
{
    struct fake_upstream *upstream =
        fake_upstream_start(UPSTREAM_HALF_CLOSE, true);
    proxy_start("--listen", use_tls ? "127.0.0.1:0/tls" : "127.0.0.1:0",
                "--upstream", address_text("127.0.0.1:%u", upstream->port),
                NULL);
    int fd = connect_local(proxy_listener_port(0));
    socket_timeout(fd, PROMPTLY_MS);
    SSL *tls = use_tls ? tls_client_start(fd, 0) : NULL;
    char first[64];
    size_t got = client_read_to_end(fd, tls, first, sizeof first);
    ck_assert_msg(got == 13 && memcmp(first, "from upstream", 13) == 0,
                  "the client reads the server's bytes, then the end");
    if (tls != NULL)
        tls_send_all(tls, "late bytes", 10);
    else
        send_all(fd, "late bytes", 10);
    long long deadline = clock_ms() + PROMPTLY_MS;
    size_t arrived = 0;
    while (arrived < 10 && clock_ms() < deadline) {
        pthread_mutex_lock(&upstream->lock);
        arrived = upstream->received_after_eof;
        pthread_mutex_unlock(&upstream->lock);
        usleep(1000);
    }
    ck_assert_msg(arrived == 10, "bytes sent after the server's half-close "
                  "still reach it (%zu of 10)", arrived);
    if (tls != NULL)
        tls_client_close(tls);
    close(fd);
    proxy_and_upstream_stop(upstream);
}

START_TEST(test_client_half_close_still_gets_the_reply)
{
    client_half_close(false);
}
END_TEST

START_TEST(test_client_half_close_still_gets_the_reply_over_tls)
{
    client_half_close(true);
}
END_TEST

START_TEST(test_server_half_close_still_gets_the_client_bytes)
{
    server_half_close(false);
}
END_TEST

START_TEST(test_server_half_close_still_gets_the_client_bytes_over_tls)
{
    server_half_close(true);
}
END_TEST

/* ---- No byte lost: half-closes, pauses and resets ---- */

/* The --timeout-fin of the tests below: short, so that a pause of three
 * times it is short too, but long enough that the server of the test
 * (slow under valgrind, which TEST_TIME_SCALE says) is never silent for
 * that long while it sends. */
#define FIN_MS (200 * time_scale)

static const char *fin_seconds(void)
{
    static char text[16];
    snprintf(text, sizeof text, "%.3f", FIN_MS / 1000.0);
    return text;
}

/* A server for the tests below. It accepts one connection and reads our
 * PROXY header; then it sends `to_send` bytes of stream 2 and its FIN,
 * rests `pause_ms` without reading (the pause is the scenario, not a
 * wait for something), and reads to the end, checking stream 1. Its
 * receive buffer is kept small, so that the proxy cannot hide a slow
 * server behind the kernel's buffers. */
struct scripted_server {
    int listen_fd;
    uint16_t port;
    size_t to_send;
    int pause_ms;
    atomic_size_t received;   /* bytes of stream 1 read so far */
    size_t first_wrong;       /* SIZE_MAX while every byte was right */
    int end_error;            /* 0 for a FIN, else the errno that ended it */
    pthread_t thread;
};

static void *scripted_server_run(void *argument)
{
    struct scripted_server *server = argument;
    if (!readable_within(server->listen_fd, SLOWLY_MS))
        return NULL;
    int fd = accept(server->listen_fd, NULL, NULL);
    socket_timeout(fd, SLOWLY_MS);
    uint8_t header[PROXYHDR_V2_MAX_BYTES];
    size_t have = 0;
    struct proxy_addresses ignored;
    int length = 0;
    while (length == 0 && have < sizeof header &&
           recv(fd, header + have, 1, 0) == 1)
        length = proxyhdr_decode(header, ++have, &ignored);

    static uint8_t chunk[65536];
    for (size_t sent = 0; length > 0 && sent < server->to_send;) {
        size_t step = server->to_send - sent;
        step = step < sizeof chunk ? step : sizeof chunk;
        for (size_t i = 0; i < step; i++)
            chunk[i] = stream_byte(2, sent + i);
        if (!send_quietly(fd, chunk, step))
            break;
        sent += step;
    }
    shutdown(fd, SHUT_WR);
    usleep((useconds_t)server->pause_ms * 1000);

    size_t received = 0;
    for (;;) {
        uint8_t in[65536];
        ssize_t count = recv(fd, in, sizeof in, 0);
        if (count <= 0) {
            server->end_error = count == 0 ? 0 : errno;
            break;
        }
        for (ssize_t i = 0; i < count; i++)
            if (in[i] != stream_byte(1, received + (size_t)i) &&
                server->first_wrong == SIZE_MAX)
                server->first_wrong = received + (size_t)i;
        received += (size_t)count;
        atomic_store(&server->received, received);
    }
    close(fd);
    return NULL;
}

static void scripted_server_start(struct scripted_server *server,
                                  size_t to_send, int pause_ms)
{
    *server = (struct scripted_server){.to_send = to_send,
                                       .pause_ms = pause_ms,
                                       .first_wrong = SIZE_MAX,
                                       .end_error = -1};
    server->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int small = 64 * 1024; /* inherited by the accepted connection */
    setsockopt(server->listen_fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    struct sockaddr_in address = {.sin_family = AF_INET,
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(server->listen_fd, (struct sockaddr *)&address,
                          sizeof address), 0);
    ck_assert_int_eq(listen(server->listen_fd, 4), 0);
    socklen_t length = sizeof address;
    getsockname(server->listen_fd, (struct sockaddr *)&address, &length);
    server->port = ntohs(address.sin_port);
    pthread_create(&server->thread, NULL, scripted_server_run, server);
}

static void scripted_server_stop(struct scripted_server *server)
{
    pthread_join(server->thread, NULL);
    close(server->listen_fd);
}

/* Reads up to `limit` bytes of stream 2 (until the end if there are
 * fewer), checking each; returns how many arrived in order. */
static size_t client_read_stream(int fd, SSL *tls, size_t offset,
                                 size_t limit)
{
    size_t got = 0;
    while (got < limit) {
        uint8_t in[65536];
        size_t want = limit - got < sizeof in ? limit - got : sizeof in;
        size_t count = 0;
        if (tls != NULL) {
            if (SSL_read_ex(tls, in, want, &count) != 1)
                break;
        } else {
            ssize_t read_count = recv(fd, in, want, 0);
            if (read_count <= 0)
                break;
            count = (size_t)read_count;
        }
        /* One check per read, not per byte: each ck_assert records where
         * the test is, which costs a write of its own. */
        size_t first_wrong = count;
        for (size_t i = 0; i < count && first_wrong == count; i++)
            if (in[i] != stream_byte(2, offset + got + i))
                first_wrong = i;
        ck_assert_msg(first_wrong == count, "byte %zu arrives as sent",
                      offset + got + first_wrong);
        got += count;
    }
    return got;
}

/* The client half-closes; the server sends 16 MiB and its FIN; the client
 * reads 1 MiB, stops reading for three times --timeout-fin, then reads on.
 * 16 MiB is more than the kernel's buffers on the way can hold, so bytes
 * wait in the proxy during the pause. A reader that is only slow must get
 * every byte: --timeout-fin bounds silence, not a slow reader. */
static void slow_reader_after_half_close(bool use_tls)
{
    const size_t size = 16u << 20;
    struct scripted_server server;
    scripted_server_start(&server, size, 0);
    proxy_start("--listen", use_tls ? "127.0.0.1:0/tls" : "127.0.0.1:0",
                "--timeout-fin", fin_seconds(),
                "--upstream", address_text("127.0.0.1:%u", server.port), NULL);
    int fd = connect_local(proxy_listener_port(0));
    socket_timeout(fd, SLOWLY_MS);
    SSL *tls = use_tls ? tls_client_start(fd, 0) : NULL;
    ck_assert_msg(!use_tls || tls != NULL, "the TLS handshake works");
    client_end_sending(fd, tls);
    size_t got = client_read_stream(fd, tls, 0, 1u << 20);
    usleep(3 * FIN_MS * 1000); /* the reader's pause: 3 x --timeout-fin */
    got += client_read_stream(fd, tls, got, size);
    ck_assert_msg(got == size, "a slow reader gets all %zu bytes after its "
                  "half-close (got %zu)", size, got);
    ck_assert_int_eq(proxy_counter(COUNTER_FIN_TIMEOUT), 0);
    if (tls != NULL)
        tls_client_close(tls);
    close(fd);
    scripted_server_stop(&server);
    proxy_stop();
}

START_TEST(test_a_slow_reader_gets_every_byte_after_its_half_close)
{
    slow_reader_after_half_close(false);
}
END_TEST

START_TEST(test_a_slow_reader_gets_every_byte_after_its_half_close_over_tls)
{
    slow_reader_after_half_close(true);
}
END_TEST

/* The server half-closes at once and rests three times --timeout-fin
 * before it reads; meanwhile the client, having read the server's end,
 * uploads 8 MiB and closes. The proxy then holds a socket that the client
 * has hung up on with megabytes still unread in it: every one of them
 * must reach the server, then the FIN. */
START_TEST(test_an_upload_after_the_server_half_closed_arrives_whole)
{
    const size_t size = 8u << 20;
    struct scripted_server server;
    scripted_server_start(&server, 0, 3 * FIN_MS);
    proxy_start("--listen", "127.0.0.1:0", "--timeout-fin", fin_seconds(),
                "--upstream", address_text("127.0.0.1:%u", server.port), NULL);
    int fd = connect_local(proxy_listener_port(0));
    socket_timeout(fd, SLOWLY_MS);
    uint8_t end;
    ck_assert_msg(recv(fd, &end, 1, 0) == 0, "the server's FIN arrives");
    static uint8_t chunk[65536];
    for (size_t sent = 0; sent < size; sent += sizeof chunk) {
        for (size_t i = 0; i < sizeof chunk; i++)
            chunk[i] = stream_byte(1, sent + i);
        send_all(fd, chunk, sizeof chunk);
    }
    close(fd);
    scripted_server_stop(&server);
    ck_assert_msg(atomic_load(&server.received) == size &&
                      server.first_wrong == SIZE_MAX,
                  "all %zu bytes reach the server intact (%zu)", size,
                  atomic_load(&server.received));
    ck_assert_msg(server.end_error == 0, "then a FIN (%s)",
                  strerror(server.end_error));
    proxy_stop();
}
END_TEST

/* A client that aborts (RST) is passed on as an abort: the server reads a
 * reset, not a clean end, and can tell the two apart as it could without
 * the proxy. */
START_TEST(test_a_client_reset_reaches_the_server_as_a_reset)
{
    struct scripted_server server;
    scripted_server_start(&server, 0, 0);
    proxy_start("--listen", "127.0.0.1:0",
                "--upstream", address_text("127.0.0.1:%u", server.port), NULL);
    int fd = connect_local(proxy_listener_port(0));
    uint8_t first[3] = {stream_byte(1, 0), stream_byte(1, 1),
                        stream_byte(1, 2)};
    send_all(fd, first, sizeof first);
    long long deadline = clock_ms() + PROMPTLY_MS;
    while (atomic_load(&server.received) < 3 && clock_ms() < deadline)
        usleep(1000);
    ck_assert_uint_eq(atomic_load(&server.received), 3);
    struct linger abort_now = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_now, sizeof abort_now);
    close(fd); /* RST */
    scripted_server_stop(&server);
    ck_assert_msg(server.end_error == ECONNRESET,
                  "the server reads a reset (%s)",
                  server.end_error == 0 ? "a FIN" : strerror(server.end_error));
    proxy_stop();
}
END_TEST

/* Reads from a TLS client until the connection ends; returns true if it
 * ended with the server's close_notify (a TLS end that cannot be forged by
 * cutting the TCP connection), false for a bare FIN or a reset. */
static bool tls_ends_with_close_notify(SSL *tls)
{
    uint8_t sink[4096];
    size_t count;
    while (SSL_read_ex(tls, sink, sizeof sink, &count) == 1)
        ;
    return (SSL_get_shutdown(tls) & SSL_RECEIVED_SHUTDOWN) != 0;
}

/* When the server resets, and when the connection is idle too long, a TLS
 * client is told with close_notify and then a FIN. */
START_TEST(test_a_tls_client_gets_close_notify_on_a_reset_and_a_timeout)
{
    struct fake_upstream *resetting =
        fake_upstream_start(UPSTREAM_RESET, true);
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0/tls", "--timeout-idle", "0.3",
                "--upstream", address_text("127.0.0.1:%u", resetting->port),
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    int fd;
    SSL *tls = tls_connect_local(proxy_listener_port(0), &fd);
    tls_send_all(tls, "reset me", 8);
    ck_assert_msg(tls_ends_with_close_notify(tls),
                  "the server's reset ends the TLS client with close_notify");
    tls_client_close(tls);
    close(fd);

    tls = tls_connect_local(proxy_listener_port(0), &fd);
    char back[5];
    tls_send_all(tls, "hello", 5);
    ck_assert_uint_eq(tls_receive_exactly(tls, back, 5), 5);
    ck_assert_msg(tls_ends_with_close_notify(tls),
                  "the idle timeout ends the TLS client with close_notify");
    ck_assert_int_eq(proxy_counter(COUNTER_IDLE_TIMEOUT), 1);
    tls_client_close(tls);
    close(fd);
    proxy_stop();
    fake_upstream_stop(resetting);
    fake_upstream_stop(echo);
}
END_TEST

/* Waits until the peer's TCP has acknowledged every byte sent on fd: they
 * are in its socket then. */
static bool all_sent_arrives_within(int fd, int timeout_ms)
{
    long long deadline = clock_ms() + timeout_ms;
    for (;;) {
        struct tcp_info info;
        socklen_t length = sizeof info;
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) == 0 &&
            info.tcpi_unacked == 0 && info.tcpi_notsent_bytes == 0)
            return true;
        if (clock_ms() > deadline)
            return false;
        usleep(1000);
    }
}

/* A TLS client's close_notify ends its flow, but bytes may follow it in
 * the socket (TLS says to ignore them). When the pair is done, they are
 * dropped before close(): otherwise the kernel would end the connection
 * with a reset, not with the FIN the client is owed. */
START_TEST(test_bytes_after_a_close_notify_do_not_turn_the_end_into_a_reset)
{
    uint16_t server_port;
    int listening = listen_local(&server_port, 1);
    proxy_start("--listen", "127.0.0.1:0/tls", "--send-proxy", "none",
                "--upstream", address_text("127.0.0.1:%u", server_port), NULL);
    int fd;
    SSL *tls = tls_connect_local(proxy_listener_port(0), &fd);
    tls_send_all(tls, "hello", 5);
    ck_assert(readable_within(listening, PROMPTLY_MS));
    int server = accept(listening, NULL, NULL);
    char got[5];
    ck_assert_uint_eq(receive_exactly(server, got, 5, PROMPTLY_MS), 5);

    SSL_shutdown(tls); /* close_notify: the proxy passes the end on */
    ck_assert_msg(ends_with_fin_within(server, PROMPTLY_MS),
                  "the server gets the client's end as a FIN");
    static const uint8_t after[16 * 1024];
    send_all(fd, after, sizeof after); /* nobody reads these any more */
    ck_assert(all_sent_arrives_within(fd, PROMPTLY_MS));
    close(server); /* the server's end: now the pair is done */
    ck_assert_msg(connections_become(0, PROMPTLY_MS), "the pair ends");
    int error = 0;
    socklen_t length = sizeof error;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
    ck_assert_msg(error == 0, "the client gets a FIN, not a reset (%s)",
                  strerror(error));
    tls_client_close(tls);
    close(fd);
    close(listening);
    proxy_stop();
}
END_TEST

START_TEST(test_idle_connection_is_closed_after_idle_timeout)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0", "--timeout-idle",
                                "0.3", NULL);
    int client = connect_local(proxy_listener_port(0));
    expect_echo(client, "hello");
    long long last_byte = clock_ms();
    ck_assert_msg(closed_within(client, PROMPTLY_MS),
                  "the idle client is closed");
    ck_assert_msg(clock_ms() - last_byte >= 250, "not closed before 0.3 s");
    ck_assert_int_eq(proxy_counter(COUNTER_IDLE_TIMEOUT), 1);
    close(client);
    proxy_and_upstream_stop(upstream);
}
END_TEST

START_TEST(test_half_closed_connection_is_closed_after_fin_timeout)
{
    struct fake_upstream *upstream = fake_upstream_start(UPSTREAM_HOLD, true);
    proxy_start("--listen", "127.0.0.1:0", "--timeout-fin", "0.3",
                "--upstream", address_text("127.0.0.1:%u", upstream->port),
                NULL);
    int client = connect_local(proxy_listener_port(0));
    send_all(client, "bye", 3);
    ck_assert_msg(counter_reaches(COUNTER_CONNECTIONS_RELAYED, 1, PROMPTLY_MS),
                  "the client is relayed to the server");
    shutdown(client, SHUT_WR);
    long long half_closed = clock_ms();
    ck_assert_msg(closed_within(client, PROMPTLY_MS),
                  "the half-closed connection is closed");
    ck_assert_msg(clock_ms() - half_closed >= 250, "not closed before 0.3 s");
    ck_assert_int_eq(proxy_counter(COUNTER_FIN_TIMEOUT), 1);
    close(client);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* Two thousand clients open at the same time, each with its own message:
 * every one gets exactly its own bytes back. */
START_TEST(test_two_thousand_connections_at_once_all_echo)
{
    enum { CLIENTS = 2000 };
    struct echo_server server;
    echo_server_start(&server);
    proxy_start("--listen", "127.0.0.1:0", "--send-proxy", "none",
                "--upstream", address_text("127.0.0.1:%u", server.port), NULL);

    static int clients[CLIENTS];
    for (int i = 0; i < CLIENTS; i++) {
        clients[i] = connect_local(proxy_listener_port(0));
        char message[32];
        int length = snprintf(message, sizeof message, "client %05d", i);
        send_all(clients[i], message, (size_t)length);
    }
    ck_assert_msg(connections_become(CLIENTS, SLOWLY_MS),
                  "all %d clients are connected at once (%u)", CLIENTS,
                  proxy_connections_now());
    for (int i = 0; i < CLIENTS; i++) {
        char expected[32], back[32];
        int length = snprintf(expected, sizeof expected, "client %05d", i);
        ck_assert_msg(receive_exactly(clients[i], back, (size_t)length,
                                      SLOWLY_MS) == (size_t)length &&
                          memcmp(back, expected, (size_t)length) == 0,
                      "client %d gets its own bytes back", i);
    }
    for (int i = 0; i < CLIENTS; i++)
        close(clients[i]);
    ck_assert_msg(connections_become(0, SLOWLY_MS),
                  "every connection ends once its client closed");
    proxy_stop();
    echo_server_stop(&server);
}
END_TEST

/* Fills fd with bytes until the peer stops taking them (its buffers are
 * full) or `limit` bytes are sent. Returns the bytes sent. */
static size_t send_until_stalled(int fd, size_t limit)
{
    static uint8_t chunk[65536];
    size_t sent = 0;
    while (sent < limit) {
        struct pollfd watched = {.fd = fd, .events = POLLOUT};
        if (poll(&watched, 1, 200) != 1)
            break; /* 200 ms without room: stalled */
        ssize_t count = send(fd, chunk, sizeof chunk,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
        if (count <= 0)
            break;
        sent += (size_t)count;
    }
    return sent;
}

START_TEST(test_upstream_reset_mid_transfer_closes_only_that_client)
{
    struct fake_upstream *resetting =
        fake_upstream_start(UPSTREAM_RESET, true);
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0",
                "--upstream", address_text("127.0.0.1:%u", resetting->port),
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    int victim = connect_local(proxy_listener_port(0)); /* to `resetting` */
    ck_assert_msg(upstream_connections_become(resetting, 1),
                  "the first client goes to the resetting server");
    int other = connect_local(proxy_listener_port(0));  /* to `echo` */
    expect_echo(other, "before");
    send_all(victim, "some bytes", 10);
    ck_assert_msg(closed_within(victim, PROMPTLY_MS),
                  "the client of the reset server is closed");
    ck_assert_msg(counter_reaches(COUNTER_RELAY_ERROR, 1, PROMPTLY_MS),
                  "the reset is counted as a relay error");
    expect_echo(other, "after");
    close(victim);
    close(other);
    ck_assert_msg(connections_become(0, PROMPTLY_MS),
                  "no connection is left open");
    proxy_stop();
    fake_upstream_stop(resetting);
    fake_upstream_stop(echo);
}
END_TEST

/* A server that accepts and never reads: its client stalls once the
 * buffers are full, and nobody else notices. */
START_TEST(test_server_that_never_reads_stalls_only_its_client)
{
    struct fake_upstream *deaf = fake_upstream_start(UPSTREAM_HOLD, true);
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0",
                "--upstream", address_text("127.0.0.1:%u", deaf->port),
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    int stalled = connect_local(proxy_listener_port(0)); /* to `deaf` */
    ck_assert_msg(upstream_connections_become(deaf, 1),
                  "the first client goes to the server that never reads");
    int other = connect_local(proxy_listener_port(0));   /* to `echo` */
    size_t sent = send_until_stalled(stalled, 256u << 20);
    ck_assert_msg(sent < (256u << 20),
                  "the stalled client cannot send without end (%zu)", sent);
    for (int i = 0; i < 20; i++)
        expect_echo(other, "the others still flow");
    close(stalled);
    close(other);
    proxy_stop();
    fake_upstream_stop(deaf);
    fake_upstream_stop(echo);
}
END_TEST

/* A relay thread waits for upstream connects in its epoll loop: with one
 * relay thread, a client whose server never answers the connect waits,
 * and a client of another port of the same thread is relayed meanwhile. */
START_TEST(test_a_hanging_connect_holds_up_no_other_client)
{
    struct silent_server silent;
    silent_server_start(&silent);
    struct fake_upstream *media = fake_upstream_start(UPSTREAM_ECHO, false);
    char connect_seconds[16];
    snprintf(connect_seconds, sizeof connect_seconds, "%d", 10 * time_scale);
    proxy_start("--threads", "1", "--timeout-connect", connect_seconds,
                "--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0/media",
                "--upstream", address_text("127.0.0.1:%u", silent.port),
                "--media-upstream", address_text("127.0.0.1:%u", media->port),
                NULL);
    int hanging = connect_local(proxy_listener_port(0));
    ck_assert_msg(counter_reaches(COUNTER_CONNECTIONS_ACCEPTED, 1,
                                  PROMPTLY_MS),
                  "the client of the silent server is taken in");
    int other = connect_local(proxy_listener_port(1));
    for (int i = 0; i < 5; i++)
        expect_echo(other, "not held up");
    ck_assert_msg(proxy_counter(COUNTER_UPSTREAM_CONNECT_FAILED) == 0 &&
                      proxy_counter(COUNTER_CONNECTIONS_RELAYED) == 1,
                  "the other connect is still under way meanwhile");
    close(hanging);
    close(other);
    proxy_stop();
    fake_upstream_stop(media);
    silent_server_stop(&silent);
}
END_TEST

/* Our PROXY header and the bytes the client has sent already leave in one
 * send(), so the server receives them in one TCP segment. On a PROXY port
 * the client's payload is in its socket (behind the header it sent) before
 * the upstream connect starts. */
START_TEST(test_header_and_first_bytes_reach_the_server_in_one_segment)
{
    uint16_t server_port;
    int server = listen_local(&server_port, 4);
    proxy_start("--listen", "127.0.0.1:0/accept-proxy",
                "--upstream", address_text("127.0.0.1:%u", server_port), NULL);
    int client = connect_local(proxy_listener_port(0));
    const char *sent = "PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\nhello";
    send_all(client, sent, strlen(sent));
    ck_assert_msg(readable_within(server, PROMPTLY_MS),
                  "the proxy connects to the server");
    int upstream = accept(server, NULL, NULL);

    uint8_t received[PROXYHDR_ENCODED_MAX_BYTES + 5];
    size_t header_length = 16 + 12; /* v2, two IPv4 addresses and ports */
    ck_assert_uint_eq(receive_exactly(upstream, received, header_length + 5,
                                      PROMPTLY_MS),
                      header_length + 5);
    struct proxy_addresses seen;
    ck_assert_int_eq(proxyhdr_decode(received, header_length, &seen),
                     (int)header_length);
    expect_address(&seen.source, "203.0.113.7:40000");
    ck_assert_mem_eq(received + header_length, "hello", 5);
    struct tcp_info info;
    socklen_t info_length = sizeof info;
    ck_assert_int_eq(getsockopt(upstream, IPPROTO_TCP, TCP_INFO, &info,
                                &info_length), 0);
    ck_assert_msg(info.tcpi_data_segs_in == 1,
                  "header and payload came in %u segments",
                  info.tcpi_data_segs_in);
    close(upstream);
    close(client);
    proxy_stop();
    close(server);
}
END_TEST

/* A relay thread does TLS handshakes in its epoll loop, one step at a
 * time: with one relay thread, a client that stops halfway through its
 * ClientHello waits, and other TLS clients of the same thread are served
 * meanwhile. */
START_TEST(test_a_stalled_tls_handshake_holds_up_no_other_client)
{
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    char handshake_seconds[16];
    snprintf(handshake_seconds, sizeof handshake_seconds, "%d",
             10 * time_scale);
    proxy_start("--threads", "1", "--timeout-handshake", handshake_seconds,
                "--listen", "127.0.0.1:0/tls",
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    /* A TLS record header announcing 512 bytes, and only 5 of them. */
    int stalled = connect_local(proxy_listener_port(0));
    send_all(stalled, "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03", 10);
    ck_assert_msg(counter_reaches(COUNTER_CONNECTIONS_ACCEPTED, 1,
                                  PROMPTLY_MS),
                  "the stalled client is taken in");
    for (int i = 0; i < 3; i++)
        expect_tls_echo(proxy_listener_port(0), "not held up");
    ck_assert_msg(!closed_within(stalled, 10) &&
                      proxy_counter(COUNTER_HANDSHAKE_TIMEOUT) == 0 &&
                      proxy_counter(COUNTER_TLS_HANDSHAKE_FAILED) == 0,
                  "the stalled handshake is still waiting meanwhile");
    close(stalled);
    proxy_stop();
    fake_upstream_stop(echo);
}
END_TEST

/* A TLS client whose bytes go through memory, so that the test decides
 * when each of its flights leaves: SSL_connect() writes into its write BIO,
 * where memory_tls_written() takes the bytes from, and bytes from the
 * server are put into its read BIO. */
static SSL *memory_tls_client(void)
{
    SSL_CTX *context = SSL_CTX_new(TLS_client_method());
    SSL *tls = SSL_new(context);
    SSL_CTX_free(context);
    SSL_set_bio(tls, BIO_new(BIO_s_mem()), BIO_new(BIO_s_mem()));
    return tls;
}

/* Takes up to size bytes that the memory client has written so far into
 * out; returns the count. */
static size_t memory_tls_written(SSL *tls, uint8_t *out, size_t size)
{
    int count = BIO_read(SSL_get_wbio(tls), out, (int)size);
    return count > 0 ? (size_t)count : 0;
}

/* Handshakes under way are stepped before new ones ("Fairness"): with one
 * relay thread, a client whose last flight arrives behind many new
 * clients' hellos is finished before most of them are answered. Stepped in
 * the order they arrived, it would wait behind all of them. */
START_TEST(test_a_handshake_under_way_goes_before_new_ones)
{
    enum { NEW_CLIENTS = 40 };
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--threads", "1", "--listen", "127.0.0.1:0/tls",
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    uint16_t port = proxy_listener_port(0);

    /* The client under way: hello sent, the server's flight read, its own
     * last flight (Finished) made but held back. */
    int late_fd = connect_local(port);
    SSL *late = memory_tls_client();
    uint8_t bytes[16384];
    int done = SSL_connect(late);
    for (int tries = 0; done != 1 && tries < 100; tries++) {
        send_all(late_fd, bytes, memory_tls_written(late, bytes, sizeof bytes));
        ck_assert_msg(readable_within(late_fd, PROMPTLY_MS),
                      "the server's flight should come");
        ssize_t count = recv(late_fd, bytes, sizeof bytes, 0);
        ck_assert_int_gt(count, 0);
        BIO_write(SSL_get_rbio(late), bytes, (int)count);
        done = SSL_connect(late);
    }
    ck_assert_msg(done == 1, "the client should be ready to send Finished");

    /* Many new clients, each hello sent but for its last byte: the proxy
     * waits for a whole hello, so none is answered yet. */
    int fds[NEW_CLIENTS];
    uint8_t last_bytes[NEW_CLIENTS];
    for (int i = 0; i < NEW_CLIENTS; i++) {
        fds[i] = connect_local(port);
        SSL *hello = memory_tls_client();
        SSL_connect(hello);
        size_t length = memory_tls_written(hello, bytes, sizeof bytes);
        ck_assert_uint_gt(length, 1);
        send_all(fds[i], bytes, length - 1);
        last_bytes[i] = bytes[length - 1];
        SSL_free(hello);
    }
    ck_assert_msg(counter_reaches(COUNTER_CONNECTIONS_ACCEPTED,
                                  NEW_CLIENTS + 1, PROMPTLY_MS),
                  "every client is taken in");
    for (int i = 0; i < NEW_CLIENTS; i++)
        send_all(fds[i], &last_bytes[i], 1);
    /* The late client's Finished, behind all the hellos. */
    send_all(late_fd, bytes, memory_tls_written(late, bytes, sizeof bytes));

    /* The server's answer to Finished (its session tickets) marks when the
     * late client was finished; count the hellos answered by then. */
    ck_assert_msg(readable_within(late_fd, PROMPTLY_MS),
                  "the late client's handshake should finish");
    int answered = 0;
    for (int i = 0; i < NEW_CLIENTS; i++)
        answered += readable_within(fds[i], 0);
    ck_assert_msg(answered <= NEW_CLIENTS * 3 / 4,
                  "%d of %d new clients were answered before the one under "
                  "way was finished", answered, NEW_CLIENTS);

    for (int i = 0; i < NEW_CLIENTS; i++)
        close(fds[i]);
    SSL_free(late);
    close(late_fd);
    proxy_stop();
    fake_upstream_stop(echo);
}
END_TEST

/* A client that stops reading (or has vanished: on loopback we cannot cut
 * the wire, but to the proxy both look the same, bytes that nobody takes)
 * is closed at the idle timeout; the others flow on. */
START_TEST(test_client_that_stops_reading_is_closed_at_idle_timeout)
{
    struct fake_upstream *echo = fake_upstream_start(UPSTREAM_ECHO, true);
    proxy_start("--listen", "127.0.0.1:0", "--timeout-idle", "0.5",
                "--upstream", address_text("127.0.0.1:%u", echo->port), NULL);
    int gone = connect_local(proxy_listener_port(0));
    /* The echo comes back to a client that never reads: buffers fill. */
    send_until_stalled(gone, 256u << 20);
    int other = connect_local(proxy_listener_port(0));
    for (int i = 0; i < 5; i++)
        expect_echo(other, "still flowing");
    ck_assert_msg(counter_reaches(COUNTER_IDLE_TIMEOUT, 1, PROMPTLY_MS),
                  "the stuck connection is closed at the idle timeout");
    close(gone);
    close(other);
    proxy_stop();
    fake_upstream_stop(echo);
}
END_TEST

/* ==== 11. Check summary ==== */

START_TEST(test_share_link_has_the_fields_the_app_reads)
{
    char link[256];
    share_link_format("proxy.example.org", 443, 587, true, link, sizeof link);
    ck_assert_str_eq(link, "https://wa.me/proxy?host=proxy.example.org"
                           "&chatPort=443&mediaPort=587&chatTLS=true");
    share_link_format("p.example.org", 5222, 7777, false, link, sizeof link);
    ck_assert_str_eq(link, "https://wa.me/proxy?host=p.example.org"
                           "&chatPort=5222&mediaPort=7777&chatTLS=false");
}
END_TEST

START_TEST(test_check_prints_what_to_tell_users_and_exits_zero)
{
    char out[16384], err[16384];
    uint16_t chat = closed_port(), media = closed_port();
    int status = binary_run(out, err, sizeof out, "--check", "--listen",
                            address_text("127.0.0.1:%u/tls", chat),
                            "--listen",
                            address_text("127.0.0.1:%u/media", media),
                            "--upstream", "127.0.0.1:5222",
                            "--media-upstream", "127.0.0.1:443",
                            "--public-host", "proxy.example.org", NULL);
    ck_assert_msg(status == 0, "--check with good settings exits 0: %s%s",
                  out, err);
    char link[160];
    share_link_format("proxy.example.org", chat, media, true, link,
                      sizeof link);
    ck_assert_msg(strstr(out, link), "--check prints the share link: %s", out);
    ck_assert_msg(strstr(out, "valid for: ") &&
                      strstr(out, "proxy.example.org") &&
                      strstr(out, "expires: "),
                  "--check names the certificate's names and expiry: %s",
                  out);
    ck_assert_msg(strstr(out, "WhatsApp does not publish it"),
                  "--check says the link's format is unofficial: %s", out);
}
END_TEST

/* Each thing that would stop a start, or leave users without media, is a
 * PROBLEM, and "Ready." comes only without one: a port in use, a
 * --public-host that is a URL, a certificate that does not cover it. */
START_TEST(test_check_names_each_problem_and_is_ready_only_when_it_works)
{
    char out[16384], err[16384];
    uint16_t media = closed_port();
    uint16_t taken_port;
    int taken = listen_local(&taken_port, 1);
    int status = binary_run(out, err, sizeof out, "--check", "--listen",
                            address_text("127.0.0.1:%u", taken_port),
                            "--listen",
                            address_text("127.0.0.1:%u/media", media),
                            "--upstream", "127.0.0.1:5222",
                            "--media-upstream", "127.0.0.1:443", NULL);
    close(taken);
    ck_assert_int_eq(status, 1);
    char expected[96];
    snprintf(expected, sizeof expected, "PROBLEM: cannot listen on port %u: "
             "it is already in use", taken_port);
    ck_assert_msg(strstr(out, expected), "a port in use is a PROBLEM: %s",
                  out);
    ck_assert_msg(strstr(out, "Ready.") == NULL, "not ready: %s", out);

    uint16_t chat = closed_port();
    status = binary_run(out, err, sizeof out, "--check", "--listen",
                        address_text("127.0.0.1:%u", chat), "--listen",
                        address_text("127.0.0.1:%u/media", media),
                        "--upstream", "127.0.0.1:5222", "--media-upstream",
                        "127.0.0.1:443", "--public-host",
                        "https://proxy.example.org/", NULL);
    ck_assert_int_eq(status, 1);
    ck_assert_msg(strstr(out, "PROBLEM: --public-host") &&
                      strstr(out, "wa.me") == NULL,
                  "a URL as --public-host is a PROBLEM, not a link: %s", out);

    char dir[] = "/tmp/wp_check_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    certificate_files_make(dir); /* for a random name, not ours */
    char cert[96], key[96];
    snprintf(cert, sizeof cert, "%s/cert.pem", dir);
    snprintf(key, sizeof key, "%s/key.pem", dir);
    status = binary_run(out, err, sizeof out, "--check", "--listen",
                        address_text("127.0.0.1:%u/tls", chat), "--listen",
                        address_text("127.0.0.1:%u/media", media),
                        "--upstream", "127.0.0.1:5222", "--media-upstream",
                        "127.0.0.1:443", "--public-host", "proxy.example.org",
                        "--cert", cert, "--key", key, NULL);
    ck_assert_int_eq(status, 1);
    ck_assert_msg(strstr(out, "PROBLEM: it is not valid for "
                              "proxy.example.org"),
                  "a certificate for another name is a PROBLEM: %s", out);

    status = binary_run(out, err, sizeof out, "--check", "--listen",
                        address_text("127.0.0.1:%u", chat), "--listen",
                        address_text("127.0.0.1:%u/media", media),
                        "--upstream", "127.0.0.1:5222", "--media-upstream",
                        "127.0.0.1:443", "--public-host", "2001:db8::1",
                        NULL);
    ck_assert_int_eq(status, 0);
    ck_assert_msg(strstr(out, "host=[2001:db8::1]&"),
                  "an IPv6 address is bracketed in the link: %s", out);
    char command[128];
    snprintf(command, sizeof command, "rm -rf %s", dir);
    ck_assert_int_eq(system(command), 0);
}
END_TEST

START_TEST(test_check_exits_one_when_a_server_does_not_resolve)
{
    char out[16384], err[16384];
    int status = binary_run(out, err, sizeof out, "--check", "--upstream",
                            "nonexistent.invalid:5222", "--media-upstream",
                            "127.0.0.1:443", "--listen", "127.0.0.1:5222",
                            NULL);
    ck_assert_int_eq(status, 1);
    ck_assert_msg(strstr(out, "nonexistent.invalid") && strstr(out, "PROBLEM"),
                  "--check names the server that does not resolve: %s", out);
}
END_TEST

/* A server that no listener uses is not checked: with only a chat port,
 * a media server that does not resolve is not named (the missing media
 * port is the PROBLEM); the health checks of chat servers send a header,
 * and --check says which. */
START_TEST(test_check_ignores_a_server_no_listener_uses)
{
    char out[16384], err[16384];
    int status = binary_run(out, err, sizeof out, "--check", "--upstream",
                            "127.0.0.1:5222", "--media-upstream",
                            "nonexistent.invalid:443", "--listen",
                            "127.0.0.1:5222", NULL);
    ck_assert_msg(status == 1 && strstr(out, "PROBLEM: no media port"),
                  "no media port is a PROBLEM of its own: %s", out);
    ck_assert_msg(strstr(out, "nonexistent.invalid") == NULL &&
                      strstr(out, "Media server") == NULL,
                  "--check does not list the unused media server: %s", out);
    ck_assert_msg(strstr(out, "health checks send PROXY v2 LOCAL") != NULL,
                  "--check says what the health checks send: %s", out);
}
END_TEST

/* ==== 12. Statistics ==== */

static int parse_request(const char *text, char *path)
{
    return stats_request_parse((const uint8_t *)text, strlen(text), path, 64);
}

START_TEST(test_stats_request_parse_knows_complete_bad_and_partial)
{
    char path[64];
    ck_assert_int_eq(parse_request("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                                   path), STATS_REQUEST_GET);
    ck_assert_str_eq(path, "/metrics");
    ck_assert_int_eq(parse_request("HEAD /?refresh=1 HTTP/1.0\r\n\r\n", path),
                     STATS_REQUEST_HEAD);
    ck_assert_str_eq(path, "/");
    ck_assert_int_eq(parse_request("GET / HTTP/1.1\r\nHost:", path),
                     STATS_REQUEST_INCOMPLETE);
    ck_assert_int_eq(parse_request("POST / HTTP/1.1\r\n\r\n", path),
                     STATS_REQUEST_METHOD_NOT_ALLOWED);
    const char *bad[] = {"GET\r\n\r\n", "GET / SPDY/3\r\n\r\n",
                         "GET metrics HTTP/1.1\r\n\r\n",
                         "GET /a\x01 HTTP/1.1\r\n\r\n", "\r\n\r\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(parse_request(bad[i], path) == STATS_REQUEST_BAD,
                      "request %zu is refused", i);
    static char endless[4096];
    memset(endless, 'a', sizeof endless - 1);
    ck_assert_int_eq(parse_request(endless, path), STATS_REQUEST_BAD);
}
END_TEST

/* True if name is a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*). */
static bool metric_name_valid(const char *name, size_t length)
{
    if (length == 0)
        return false;
    for (size_t i = 0; i < length; i++) {
        char c = name[i];
        bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                      c == '_' || c == ':';
        if (!letter && !(i > 0 && c >= '0' && c <= '9'))
            return false;
    }
    return true;
}

/* Checks one sample line "name{a="b",c="d"} 12" strictly; returns the name
 * length, or 0 if the line is malformed. */
static size_t metric_sample_check(const char *line)
{
    size_t name_length = strcspn(line, "{ ");
    if (!metric_name_valid(line, name_length))
        return 0;
    const char *p = line + name_length;
    if (*p == '{') {
        p++;
        while (*p != '}') {
            size_t label = strcspn(p, "=");
            if (!metric_name_valid(p, label) || p[label + 1] != '"')
                return 0;
            p += label + 2;
            while (*p != '"' && *p != '\0' && *p != '\n')
                p++;
            if (*p != '"')
                return 0;
            p++;
            if (*p == ',')
                p++;
            else if (*p != '}')
                return 0;
        }
        p++;
    }
    if (*p != ' ')
        return 0;
    char *end;
    strtod(p + 1, &end);
    return end != p + 1 && *end == '\0' ? name_length : 0;
}

/* Parses the whole /metrics answer strictly: every sample belongs to a
 * metric announced by HELP and TYPE lines, names start with whatsapp_proxy_
 * and counters end with _total. */
START_TEST(test_metrics_are_strict_prometheus_text)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0/accept-proxy",
                                "--stats", "127.0.0.1:0", NULL);
    int client = connect_local(proxy_listener_port(0));
    send_all(client, "PROXY BOGUS\r\n", 13);
    ck_assert_msg(closed_within(client, PROMPTLY_MS),
                  "the client with a bogus header is closed");
    close(client);

    static char answer[65536];
    ck_assert_int_eq(http_get(proxy_stats_port(), "/metrics", answer,
                              sizeof answer), 200);
    char *body = strstr(answer, "\r\n\r\n");
    ck_assert_ptr_nonnull(body);
    body += 4;
    char help_name[128] = "", type_name[128] = "", type[32] = "";
    int samples = 0;
    for (char *line = strtok(body, "\n"); line; line = strtok(NULL, "\n")) {
        if (strncmp(line, "# HELP ", 7) == 0) {
            ck_assert_int_eq(sscanf(line, "# HELP %127s", help_name), 1);
            ck_assert_msg(strlen(line) > 8 + strlen(help_name),
                          "HELP has a text: %s", line);
            continue;
        }
        if (strncmp(line, "# TYPE ", 7) == 0) {
            ck_assert_int_eq(sscanf(line, "# TYPE %127s %31s", type_name,
                                    type), 2);
            ck_assert_str_eq(type_name, help_name);
            ck_assert_msg(strcmp(type, "counter") == 0 ||
                              strcmp(type, "gauge") == 0, "type %s", type);
            size_t length = strlen(type_name);
            bool total = length > 6 &&
                         strcmp(type_name + length - 6, "_total") == 0;
            ck_assert_msg(total == (strcmp(type, "counter") == 0),
                          "counters and only counters end in _total: %s",
                          type_name);
            continue;
        }
        size_t name_length = metric_sample_check(line);
        ck_assert_msg(name_length > 0, "a well-formed sample: '%s'", line);
        ck_assert_msg(strncmp(line, "whatsapp_proxy_", 15) == 0 &&
                          name_length == strlen(type_name) &&
                          strncmp(line, type_name, name_length) == 0,
                      "the sample follows its own HELP and TYPE: %s", line);
        samples++;
    }
    ck_assert_int_gt(samples, 20);
    ck_assert_int_eq(http_get(proxy_stats_port(), "/metrics", answer,
                              sizeof answer), 200);
    ck_assert_msg(strstr(answer, "\nwhatsapp_proxy_bad_proxy_header_total 1\n"),
                  "the bad header is counted");
    char listener[128];
    snprintf(listener, sizeof listener, "whatsapp_proxy_listener_connections"
             "_total{listener=\"127.0.0.1:%u/accept-proxy\"} 1\n",
             proxy_listener_port(0));
    ck_assert_msg(strstr(answer, listener), "per listener: %s", listener);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* The page says first whether all is well; then the share link and the
 * certificate's expiry; problems only once they happen, each with what to
 * do; byte counts in units people read. */
START_TEST(test_stats_page_healthz_and_not_found)
{
    uint16_t chat = closed_port(), media = closed_port();
    struct fake_upstream *upstream = proxy_start_before_echo(
        "--listen", address_text("127.0.0.1:%u/tls", chat),
        "--listen", address_text("127.0.0.1:%u/media", media),
        "--public-host", "proxy.example.org", "--stats", "127.0.0.1:0", NULL);
    static char answer[65536];
    ck_assert_int_eq(http_get(proxy_stats_port(), "/", answer, sizeof answer),
                     200);
    ck_assert_msg(strstr(answer, "http-equiv=\"refresh\"") &&
                      strstr(answer, "All is well.") &&
                      strstr(answer, "Listeners") && strstr(answer, "Servers"),
                  "the page refreshes itself and shows every part: %s",
                  answer);
    char link[160];
    snprintf(link, sizeof link, "https://wa.me/proxy?host=proxy.example.org"
             "&amp;chatPort=%u&amp;mediaPort=%u", chat, media);
    ck_assert_msg(strstr(answer, link) && strstr(answer, "Certificate "
                                                         "expires"),
                  "the page shows the share link and the expiry: %s", answer);
    ck_assert_msg(strstr(answer, "Since the start") == NULL &&
                      strstr(answer, "0 bytes to WhatsApp"),
                  "no problem table before a problem; bytes in words: %s",
                  answer);
    int plain = connect_local(proxy_listener_port(0));
    send_all(plain, "GET / HTTP/1.1\r\n\r\n", 18);
    ck_assert_msg(counter_reaches(COUNTER_TLS_HANDSHAKE_FAILED, 1,
                                  PROMPTLY_MS), "a failed handshake");
    close(plain);
    ck_assert_int_eq(http_get(proxy_stats_port(), "/", answer, sizeof answer),
                     200);
    ck_assert_msg(strstr(answer, "visitors whose TLS handshake failed") &&
                      strstr(answer, "if users cannot connect, run --check"),
                  "a problem that happened is shown with what to do: %s",
                  answer);
    ck_assert_int_eq(http_get(proxy_stats_port(), "/metrics", answer,
                              sizeof answer), 200);
    ck_assert_msg(strstr(answer, "\nwhatsapp_proxy_certificate_expiry_"
                                 "timestamp_seconds "),
                  "/metrics has the certificate's expiry: %s", answer);
    ck_assert_int_eq(http_get(proxy_stats_port(), "/healthz", answer,
                              sizeof answer), 200);
    ck_assert_int_eq(http_get(proxy_stats_port(), "/nothing", answer,
                              sizeof answer), 404);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* A statistics client that sends nothing blocks neither other statistics
 * clients nor the relay. */
START_TEST(test_slow_stats_client_blocks_nobody)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0", "--stats",
                                "127.0.0.1:0", NULL);
    int silent = connect_local(proxy_stats_port());
    send_all(silent, "GET / HT", 8);
    static char answer[65536];
    long long started = clock_ms();
    ck_assert_int_eq(http_get(proxy_stats_port(), "/healthz", answer,
                              sizeof answer), 200);
    int client = connect_local(proxy_listener_port(0));
    expect_echo(client, "relay is not blocked");
    ck_assert_msg(clock_ms() - started < 1000,
                  "served without waiting for the silent client");
    close(client);
    close(silent);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* Silent statistics clients, as many as there are slots (16) and renewed
 * between requests, never keep a monitor's /healthz out: the one that
 * waited longest for a request gives its slot to the newcomer. */
START_TEST(test_silent_stats_clients_never_keep_healthz_out)
{
    struct fake_upstream *upstream =
        proxy_start_before_echo("--listen", "127.0.0.1:0", "--stats",
                                "127.0.0.1:0", NULL);
    int silent[16];
    for (int i = 0; i < 16; i++)
        silent[i] = connect_local(proxy_stats_port());
    static char answer[4096];
    for (int request = 0; request < 20; request++) {
        ck_assert_msg(http_get(proxy_stats_port(), "/healthz", answer,
                               sizeof answer) == 200,
                      "request %d of 20 is answered", request + 1);
        for (int i = 0; i < 4; i++) { /* four silent ones renewed */
            int renewed = (request * 4 + i) % 16;
            close(silent[renewed]);
            silent[renewed] = connect_local(proxy_stats_port());
        }
    }
    for (int i = 0; i < 16; i++)
        close(silent[i]);
    proxy_and_upstream_stop(upstream);
}
END_TEST

/* ==== 13. Starting and stopping ==== */

/* Sends the first MiB of client's stream and waits until the server has
 * received some of it: from then on the transfer is surely "in flight"
 * (a connection still waiting in the listen queue would be refused by a
 * stop, like any new one). */
static void bulk_first_mib(struct bulk_end *client, struct bulk_server *server)
{
    fcntl(client->fd, F_SETFL, fcntl(client->fd, F_GETFL) | O_NONBLOCK);
    while (client->sent < (1u << 20)) {
        struct pollfd watched = {.fd = client->fd, .events = POLLOUT};
        ck_assert_msg(poll(&watched, 1, SLOWLY_MS) == 1,
                      "the socket takes more bytes in time");
        ck_assert_msg(bulk_write_some(client),
                      "the connection stays open while the first MiB goes");
    }
    long long deadline = clock_ms() + SLOWLY_MS;
    while (atomic_load(&server->end.progress) == 0 && clock_ms() < deadline)
        usleep(1000);
    ck_assert_msg(atomic_load(&server->end.progress) > 0,
                  "the transfer has started");
}

/* A stop (what SIGTERM does) in the middle of a transfer: the listener is
 * closed at once, but the transfer finishes to the last byte. */
START_TEST(test_stop_lets_a_transfer_in_flight_finish)
{
    const size_t size = 32u << 20;
    struct bulk_server server;
    bulk_server_start(&server, 0, size);
    proxy_start("--listen", "127.0.0.1:0", "--grace", "20", "--upstream",
                address_text("127.0.0.1:%u", server.port), NULL);
    uint16_t port = proxy_listener_port(0);
    struct bulk_end client = {.send_seed = 1, .to_send = size,
                              .first_wrong = SIZE_MAX};
    client.fd = connect_local(port);
    bulk_first_mib(&client, &server);
    proxy_request_stop();
    bool refused = false;
    for (int i = 0; i < 3000 && !refused; i++) {
        int probe = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in address = {.sin_family = AF_INET,
                                      .sin_port = htons(port),
                                      .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        refused = connect(probe, (struct sockaddr *)&address,
                          sizeof address) < 0 && errno == ECONNREFUSED;
        close(probe);
        if (!refused)
            usleep(1000);
    }
    ck_assert_msg(refused, "after a stop new clients are refused");
    bulk_transfer(&client, SLOWLY_MS);
    close(client.fd);
    bulk_server_stop(&server);
    ck_assert_msg(server.end.received == size &&
                      server.end.first_wrong == SIZE_MAX,
                  "every byte arrived after the stop (%zu of %zu)",
                  server.end.received, size);
    proxy_join();
}
END_TEST

START_TEST(test_connections_left_after_the_grace_period_are_closed)
{
    struct fake_upstream *upstream = fake_upstream_start(UPSTREAM_HOLD, true);
    proxy_start("--listen", "127.0.0.1:0", "--grace", "0.3", "--upstream",
                address_text("127.0.0.1:%u", upstream->port), NULL);
    int client = connect_local(proxy_listener_port(0));
    ck_assert_msg(counter_reaches(COUNTER_CONNECTIONS_RELAYED, 1, PROMPTLY_MS),
                  "the client is relayed to the server");
    long long started = clock_ms();
    proxy_stop();
    long long took = clock_ms() - started;
    ck_assert_msg(took >= 250 && took < 2000,
                  "the stop waited for the grace period, then ended (%lld ms)",
                  took);
    ck_assert_msg(closed_within(client, PROMPTLY_MS),
                  "the connection left after the grace period is closed");
    close(client);
    fake_upstream_stop(upstream);
}
END_TEST

/* SIGTERM to the real binary during a transfer: it still finishes, and the
 * program exits 0. */
START_TEST(test_sigterm_to_the_binary_finishes_the_transfer_and_exits_zero)
{
    const size_t size = 16u << 20;
    struct bulk_server server;
    bulk_server_start(&server, 0, size);
    uint16_t port = closed_port();
    static struct running_binary binary;
    binary_start(&binary, 0, "--listen", address_text("127.0.0.1:%u", port),
                 "--upstream", address_text("127.0.0.1:%u", server.port),
                 "--media-upstream",
                 address_text("127.0.0.1:%u", server.port), "--stats", "off",
                 "--grace", "20", NULL);
    struct bulk_end client = {.fd = connect_local(port), .send_seed = 1,
                              .to_send = size, .first_wrong = SIZE_MAX};
    bulk_first_mib(&client, &server);
    kill(binary.pid, SIGTERM);
    bulk_transfer(&client, SLOWLY_MS);
    close(client.fd);
    bulk_server_stop(&server);
    int status = binary_wait(&binary, false);
    ck_assert_msg(server.end.received == size,
                  "all %zu bytes arrived (%zu); its log: %s", size,
                  server.end.received, binary.log);
    ck_assert_msg(status == 0, "the program exits 0 after SIGTERM (%d)",
                  status);
}
END_TEST

/* The start-up log tells the volunteer what to share and when the
 * certificate runs out. */
START_TEST(test_start_up_log_shows_the_share_link_and_the_certificate)
{
    uint16_t chat = closed_port(), media = closed_port();
    static struct running_binary binary;
    binary_start(&binary, 0, "--listen", address_text("127.0.0.1:%u/tls", chat),
                 "--listen", address_text("127.0.0.1:%u/media", media),
                 "--public-host", "proxy.example.org", "--stats", "off", NULL);
    char link[160];
    share_link_format("proxy.example.org", chat, media, true, link,
                      sizeof link);
    ck_assert_msg(binary_log_shows(&binary, link, PROMPTLY_MS),
                  "the log shows the share link: %s", binary.log);
    ck_assert_msg(strstr(binary.log, "certificate for ") &&
                      strstr(binary.log, "proxy.example.org; expires "),
                  "the log names the certificate and its expiry: %s",
                  binary.log);
    ck_assert_int_eq(binary_wait(&binary, true), 0);
}
END_TEST

/* With --user, the proxy gives up root for good after binding. */
START_TEST(test_user_flag_drops_root_for_good)
{
    if (geteuid() != 0)
        return; /* only root can switch users */
    pid_t child = fork();
    if (child == 0) {
        struct settings *settings = settings_new();
        char *argv[] = {"whatsapp_proxy", "--listen", "127.0.0.1:0",
                        "--stats", "off", "--log-level", "error", "--user",
                        "nobody"};
        char error[512];
        if (settings_parse(settings, 9, argv, error, sizeof error) != PARSE_RUN
            || proxy_open(settings, error, sizeof error) != 0)
            _exit(3);
        int verdict = getuid() == 0 || geteuid() == 0 || getgid() == 0 ? 4
                      : setuid(0) == 0                                 ? 5
                                                                       : 0;
        proxy_request_stop();
        proxy_run(); /* returns at once and frees, so valgrind sees no leak */
        settings_free(settings);
        _exit(verdict);
    }
    int status;
    waitpid(child, &status, 0);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "--user nobody leaves no way back to root (status %d)",
                  WEXITSTATUS(status));
}
END_TEST

/* ==== The suite: one test case per section, in the file's order ==== */

/* After each test, even a failed one: stop the proxy if the test could not
 * (with CK_FORK=no a failed test jumps out, and the next would meet it). */
static void proxy_stop_if_running(void)
{
    proxy_stop();
}

static TCase *section(const char *name, int timeout_seconds)
{
    TCase *test_case = tcase_create(name);
    tcase_set_timeout(test_case, timeout_seconds * time_scale);
    tcase_add_checked_fixture(test_case, NULL, proxy_stop_if_running);
    return test_case;
}

static Suite *proxy_suite(void)
{
    Suite *suite = suite_create("whatsapp_proxy");
    TCase *t;

    t = section("Settings and limits", 30);
    tcase_add_test(t, test_defaults_are_the_reference_ones);
    suite_add_tcase(suite, t);

    t = section("Logging and errors", 30);
    tcase_add_test(t, test_client_addresses_stay_out_of_logs_by_default);
    tcase_add_test(t, test_log_clients_writes_client_addresses);
    suite_add_tcase(suite, t);

    t = section("Command line", 30);
    tcase_add_test(t, test_listener_spec_accepts_every_documented_form);
    tcase_add_test(t, test_listener_spec_refuses_bad_ones_with_a_reason);
    tcase_add_test(t, test_host_port_parse_takes_names_and_bracketed_ipv6);
    tcase_add_test(t, test_seconds_parse_takes_decimals_and_refuses_nonsense);
    tcase_add_test(t, test_settings_parse_names_the_flag_that_is_wrong);
    tcase_add_test(t, test_settings_parse_refuses_what_cannot_work);
    tcase_add_test(t, test_trusted_proxy_takes_ranges_and_refuses_nonsense);
    tcase_add_test(t, test_help_lists_every_flag_and_exits_zero);
    tcase_add_test(t, test_binary_refuses_bad_input_with_one_line_and_status_2);
    suite_add_tcase(suite, t);

    t = section("PROXY protocol", 30);
    tcase_add_test(t, test_proxyhdr_v1_tcp4_round_trips);
    tcase_add_test(t, test_proxyhdr_v1_tcp6_and_unknown_decode);
    tcase_add_test(t, test_proxyhdr_v2_round_trips_ipv4_and_ipv6);
    tcase_add_test(t, test_proxyhdr_v2_skips_tlvs_and_leaves_payload_untouched);
    tcase_add_test(t, test_proxyhdr_v2_local_and_unspec_mean_real_addresses);
    tcase_add_test(t, test_proxyhdr_every_split_needs_more_and_the_whole_decodes);
    tcase_add_test(t, test_crc32c_gives_the_standard_check_value);
    tcase_add_test(t, test_proxyhdr_v2_takes_long_headers_with_valid_tlvs);
    tcase_add_test(t,
        test_proxyhdr_v2_refuses_a_wrong_checksum_and_an_overrunning_tlv);
    tcase_add_test(t, test_proxyhdr_refuses_malformed_and_oversize_headers);
    tcase_add_test(t, test_accept_proxy_passes_the_incoming_address_upstream);
    tcase_add_test(t, test_incoming_unknown_header_sends_the_real_address);
    tcase_add_test(t, test_send_proxy_v1_and_none_are_honoured);
    suite_add_tcase(suite, t);

    t = section("TLS termination", 60);
    tcase_add_test(t, test_made_certificate_is_a_web_servers_own);
    tcase_add_test(t, test_tls_hello_look_knows_whole_partial_and_not_tls);
    tcase_add_test(t, test_given_certificate_is_served_and_reload_keeps_old_on_bad_file);
    tcase_add_test(t, test_a_key_of_another_certificate_is_named_as_such);
    tcase_add_test(t, test_made_certificate_never_goes_through_a_planted_link);
    tcase_add_test(t,
        test_a_copy_that_cannot_start_leaves_the_certificate_files_alone);
    tcase_add_test(t, test_a_certificate_near_its_end_is_warned_about);
    tcase_add_test(t, test_tls_1_0_and_1_1_are_refused_as_nginx_refuses_them);
    suite_add_tcase(suite, t);

    t = section("Upstreams", 60);
    tcase_add_test(t, test_chat_servers_are_used_in_turn);
    tcase_add_test(t, test_refused_server_is_skipped_for_the_next);
    tcase_add_test(t, test_when_no_server_answers_the_client_gets_a_fin_after_the_retries);
    tcase_add_test(t, test_a_client_waits_out_a_server_restart);
    tcase_add_test(t, test_connect_timeout_gives_up_on_a_silent_server);
    tcase_add_test(t, test_connect_timeout_tries_the_next_server);
    tcase_add_test(t, test_a_connect_after_a_retry_is_timed_too);
    tcase_add_test(t, test_health_checks_take_a_dead_server_out_and_back);
    tcase_add_test(t, test_health_checks_send_a_proxy_header_to_chat_servers);
    tcase_add_test(t, test_when_every_server_is_down_they_are_still_tried);
    tcase_add_test(t, test_the_decoy_is_health_checked_too);
    suite_add_tcase(suite, t);

    t = section("Listeners", 30);
    tcase_add_test(t, test_listener_without_address_takes_ipv4_and_ipv6);
    tcase_add_test(t, test_small_messages_are_held_back_on_neither_side);
    tcase_add_test(t, test_port_in_use_is_named_with_the_fix);
    tcase_add_test(t, test_privileged_port_without_permission_names_the_fixes);
    suite_add_tcase(suite, t);

    t = section("Admission", 30);
    tcase_add_test(t, test_over_maxconn_a_new_client_is_closed_and_others_carry_on);
    tcase_add_test(t, test_out_of_descriptors_no_busy_loop_and_service_resumes);
    tcase_add_test(t, test_a_thousand_clients_at_once_are_all_served);
    tcase_add_test(t, test_silent_clients_hold_up_no_other_client);
    tcase_add_test(t, test_max_per_ip_is_counted_before_any_tls);
    tcase_add_test(t, test_max_per_ip_holds_with_addresses_from_proxy_headers);
    tcase_add_test(t, test_proxy_ports_take_headers_only_from_trusted_sources);
    tcase_add_test(t, test_max_per_ip_holds_on_a_plain_port);
    suite_add_tcase(suite, t);

    t = section("Conversation", 30);
    tcase_add_test(t, test_silent_client_is_dropped_at_the_handshake_timeout);
    tcase_add_test(t, test_malformed_header_closes_only_that_client);
    tcase_add_test(t, test_plain_bytes_on_a_tls_port_close_only_that_client);
    tcase_add_test(t, test_header_split_across_reads_is_read_exactly);
    tcase_add_test(t, test_a_long_header_is_taken_and_a_wrong_checksum_refused);
    tcase_add_test(t, test_slowloris_is_cut_at_the_handshake_timeout);
    tcase_add_test(t, test_decoy_http_rule_sends_only_http_and_tls_to_the_decoy);
    tcase_add_test(t, test_decoy_strict_rule_wants_the_whatsapp_header);
    tcase_add_test(t, test_http_probe_on_a_tls_port_gets_the_decoy_page);
    tcase_add_test(t, test_decoy_send_proxy_tells_the_site_who_is_asking);
    tcase_add_test(t, test_undecided_and_non_tls_clients_go_to_the_decoy_as_sent);
    tcase_add_test(t, test_whatsapp_like_client_reaches_the_upstream_under_both_rules);
    tcase_add_test(t, test_wrong_server_name_goes_to_the_decoy_and_right_one_through);
    suite_add_tcase(suite, t);

    t = section("Relay", 120);
    tcase_add_test(t, test_bytes_arrive_intact_on_every_kind_of_listener);
    tcase_add_test(t, test_64_mib_each_way_at_once_arrive_intact_plain);
    tcase_add_test(t, test_64_mib_each_way_at_once_arrive_intact_over_tls);
    tcase_add_test(t, test_client_half_close_still_gets_the_reply);
    tcase_add_test(t, test_client_half_close_still_gets_the_reply_over_tls);
    tcase_add_test(t, test_server_half_close_still_gets_the_client_bytes);
    tcase_add_test(t, test_server_half_close_still_gets_the_client_bytes_over_tls);
    tcase_add_test(t, test_a_slow_reader_gets_every_byte_after_its_half_close);
    tcase_add_test(t, test_a_slow_reader_gets_every_byte_after_its_half_close_over_tls);
    tcase_add_test(t, test_an_upload_after_the_server_half_closed_arrives_whole);
    tcase_add_test(t, test_a_client_reset_reaches_the_server_as_a_reset);
    tcase_add_test(t, test_a_tls_client_gets_close_notify_on_a_reset_and_a_timeout);
    tcase_add_test(t, test_bytes_after_a_close_notify_do_not_turn_the_end_into_a_reset);
    tcase_add_test(t, test_idle_connection_is_closed_after_idle_timeout);
    tcase_add_test(t, test_half_closed_connection_is_closed_after_fin_timeout);
    tcase_add_test(t, test_two_thousand_connections_at_once_all_echo);
    tcase_add_test(t, test_upstream_reset_mid_transfer_closes_only_that_client);
    tcase_add_test(t, test_server_that_never_reads_stalls_only_its_client);
    tcase_add_test(t, test_a_hanging_connect_holds_up_no_other_client);
    tcase_add_test(t, test_a_stalled_tls_handshake_holds_up_no_other_client);
    tcase_add_test(t, test_a_handshake_under_way_goes_before_new_ones);
    tcase_add_test(t, test_header_and_first_bytes_reach_the_server_in_one_segment);
    tcase_add_test(t, test_client_that_stops_reading_is_closed_at_idle_timeout);
    suite_add_tcase(suite, t);

    t = section("Check summary", 30);
    tcase_add_test(t, test_share_link_has_the_fields_the_app_reads);
    tcase_add_test(t, test_check_prints_what_to_tell_users_and_exits_zero);
    tcase_add_test(t,
        test_check_names_each_problem_and_is_ready_only_when_it_works);
    tcase_add_test(t, test_check_exits_one_when_a_server_does_not_resolve);
    tcase_add_test(t, test_check_ignores_a_server_no_listener_uses);
    suite_add_tcase(suite, t);

    t = section("Statistics", 30);
    tcase_add_test(t, test_stats_request_parse_knows_complete_bad_and_partial);
    tcase_add_test(t, test_metrics_are_strict_prometheus_text);
    tcase_add_test(t, test_stats_page_healthz_and_not_found);
    tcase_add_test(t, test_slow_stats_client_blocks_nobody);
    tcase_add_test(t, test_silent_stats_clients_never_keep_healthz_out);
    suite_add_tcase(suite, t);

    t = section("Starting and stopping", 60);
    tcase_add_test(t, test_stop_lets_a_transfer_in_flight_finish);
    tcase_add_test(t, test_connections_left_after_the_grace_period_are_closed);
    tcase_add_test(t, test_sigterm_to_the_binary_finishes_the_transfer_and_exits_zero);
    tcase_add_test(t, test_start_up_log_shows_the_share_link_and_the_certificate);
    tcase_add_test(t, test_user_flag_drops_root_for_good);
    suite_add_tcase(suite, t);
    return suite;
}

int main(void)
{
    /* Client, proxy and server share this process: four descriptors per
     * relayed connection. Take every descriptor the system allows. */
    struct rlimit limit;
    getrlimit(RLIMIT_NOFILE, &limit);
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
    signal(SIGPIPE, SIG_IGN);
    /* Some tests keep the default servers (g.whatsapp.net, ...), which a
     * test machine without DNS cannot resolve: let each lookup give up
     * after one second instead of glibc's 5 s times 2 tries. */
    setenv("RES_OPTIONS", "timeout:1 attempts:1", 1);
    const char *scale = getenv("TEST_TIME_SCALE");
    if (scale != NULL && atoi(scale) > 0)
        time_scale = atoi(scale);

    SRunner *runner = srunner_create(proxy_suite());
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
