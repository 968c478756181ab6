/*
 * loadgen.c - the load generator and the fake upstream of whatsapp_proxy's
 * benchmark (bench/run.sh runs it; bench/README.md explains the numbers).
 *
 * One program, two roles:
 *
 *   upstream   the "WhatsApp server" at the end of the path. It skips the
 *              PROXY header a proxy sends first (v1 or v2, when present),
 *              then reads one mode byte and serves the connection in that
 *              mode until the client closes:
 *                 'E'  echo every byte back
 *                 'S'  sink: read and throw away (upload test)
 *                 'G'  generate: send bytes as fast as possible (download)
 *              It is epoll based (one loop per thread, level-triggered), so
 *              two threads hold tens of thousands of connections.
 *              With --tls --cert F --key F it terminates TLS instead (the
 *              same certificate the proxies serve) and serves the same
 *              three modes on the decrypted bytes, one blocking thread per
 *              connection: the "TLS direct" reference of the TLS bulk rows,
 *              the client's TLS straight to a TLS server, with no proxy.
 *
 *   clients    the "WhatsApp apps". Each mode measures one thing and prints
 *              one line starting with RESULT (key=value pairs) for run.sh:
 *                 bulk      N connections move bytes one way for S seconds
 *                 rate      C clients loop: connect, [TLS handshake], 64-byte
 *                           echo, close; connections per second, p50, p99.
 *                           With --handshake-only no echo: connect, TLS
 *                           handshake, close (the handshake flood that
 *                           run.sh runs beside an rtt client)
 *                 rtt       64-byte echoes on one established connection
 *                 idle      open connections in steps, each sends one small
 *                           message and then stays idle (memory test)
 *                 maxconn   open connections one by one until one fails or
 *                           the cap is reached; how many are held at once
 *
 *   client --connect 127.0.0.1:P [--tls] --(mode options) ...
 *
 * The clients use plain blocking sockets, one thread per connection (bulk,
 * rate): the code reads as the protocol does. Every socket has a send and a
 * receive timeout (--timeout, 5 s), so no call waits forever, and every loop
 * ends by time or by count.
 *
 * TLS: the client does not verify the certificate (neither does WhatsApp's
 * app for a proxy's self-signed one) and never resumes a session, so every
 * connection of the rate test pays a full handshake, as a new phone would.
 */

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/ssl.h>

/* ==== 1. Options and small helpers ==== */

/* Bytes per read or write in the bulk modes and in the upstream: large
 * enough that system calls are not the bottleneck of the measurement. */
#define CHUNK_BYTES (64 * 1024)
/* The message of the rate and rtt modes (the "64-byte echo"). */
#define ECHO_BYTES 64
/* The message each idle connection sends once. */
#define IDLE_MESSAGE_BYTES 16
/* Latency samples kept per run; more are counted but not stored. */
#define SAMPLES_MAX (4 * 1000 * 1000)
/* Threads that open connections in parallel in the idle mode. */
#define IDLE_OPEN_THREADS 4
/* The idle mode waits at most this long for run.sh's next signal. */
#define IDLE_WAIT_SECONDS 300
/* Upper bound on connections in the idle and maxconn modes. */
#define CONNECTIONS_MAX 100000

/* The mode bytes understood by the upstream (see the opening comment). */
#define MODE_ECHO 'E'
#define MODE_SINK 'S'
#define MODE_GENERATE 'G'

struct options {
    struct sockaddr_storage address; /* --connect or --listen */
    socklen_t address_length;
    bool tls;                /* --tls: TLS client */
    unsigned connections;    /* --conns (bulk) */
    unsigned clients;        /* --clients (rate) */
    bool handshake_only;     /* --handshake-only (rate): no echo */
    bool upload;             /* --direction up (true) or down (false) */
    double seconds;          /* --seconds: measuring time */
    double warmup_seconds;   /* --warmup: not measured, before it */
    double timeout_seconds;  /* --timeout: per socket call */
    unsigned threads;        /* --threads (upstream) */
    unsigned steps[16];      /* --steps (idle): connection counts */
    unsigned step_count;
    unsigned cap;            /* --cap (maxconn) */
    const char *cert_file;   /* --cert (TLS upstream): PEM chain */
    const char *key_file;    /* --key (TLS upstream): PEM private key */
};

static struct options options = {
    .connections = 1,
    .clients = 8,
    .seconds = 2,
    .warmup_seconds = 0.25,
    .timeout_seconds = 5,
    .threads = 2,
    .cap = 27500,
};

/* Set by the main thread when the measuring time is over. */
static atomic_bool stop_now;

/* The TLS context (client, or server for the TLS upstream), made once
 * before any thread starts. */
static SSL_CTX *tls_context;

static void die(const char *format, ...) __attribute__((format(printf, 1, 2)));

/* Prints "loadgen: message" and exits with status 1. */
static void die(const char *format, ...)
{
    va_list arguments;
    va_start(arguments, format);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, format, arguments);
    fputc('\n', stderr);
    va_end(arguments);
    exit(1);
}

/* Monotonic time in nanoseconds. */
static uint64_t now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

static void sleep_seconds(double seconds)
{
    struct timespec pause = {.tv_sec = (time_t)seconds};
    pause.tv_nsec = (long)((seconds - (double)pause.tv_sec) * 1e9);
    while (nanosleep(&pause, &pause) != 0 && errno == EINTR)
        continue;
}

/* Parses "IPv4:PORT" or "[IPv6]:PORT" (numeric only: this is loopback
 * benchmarking) into options.address. Exits on a bad address. */
static void address_parse(const char *text)
{
    char host[64];
    const char *colon = strrchr(text, ':');
    if (colon == NULL || colon == text)
        die("'%s': expected ADDRESS:PORT", text);
    size_t host_length = (size_t)(colon - text);
    if (text[0] == '[' && host_length >= 2 && text[host_length - 1] == ']') {
        text++;
        host_length -= 2;
    }
    if (host_length >= sizeof host)
        die("'%s': address too long", text);
    memcpy(host, text, host_length);
    host[host_length] = '\0';

    struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV,
                             .ai_socktype = SOCK_STREAM};
    struct addrinfo *found = NULL;
    if (getaddrinfo(host, colon + 1, &hints, &found) != 0)
        die("'%s': not a numeric ADDRESS:PORT", text);
    memcpy(&options.address, found->ai_addr, found->ai_addrlen);
    options.address_length = found->ai_addrlen;
    freeaddrinfo(found);
}

/* Raises the soft open-file limit to the hard one: the idle and maxconn
 * modes and the upstream hold one descriptor per connection. */
static void descriptor_limit_raise(void)
{
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

/* A growing array of latencies in nanoseconds, one per thread. */
struct samples {
    uint64_t *values;
    size_t count;
    size_t capacity;
};

/* Appends one latency; silently drops it beyond SAMPLES_MAX. */
static void samples_add(struct samples *samples, uint64_t value)
{
    if (samples->count == samples->capacity) {
        if (samples->capacity >= SAMPLES_MAX)
            return;
        samples->capacity = samples->capacity ? samples->capacity * 2 : 4096;
        samples->values = realloc(samples->values,
                                  samples->capacity * sizeof *samples->values);
        if (samples->values == NULL)
            die("out of memory for latency samples");
    }
    samples->values[samples->count++] = value;
}

/* Appends every sample of from to into (from is left unchanged). */
static void samples_merge(struct samples *into, const struct samples *from)
{
    for (size_t i = 0; i < from->count; i++)
        samples_add(into, from->values[i]);
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The given percentile (0..100) in microseconds, nearest rank; sorts the
 * samples. 0 when there are none. */
static double samples_percentile_us(struct samples *samples, double percentile)
{
    if (samples->count == 0)
        return 0;
    qsort(samples->values, samples->count, sizeof *samples->values,
          compare_u64);
    size_t rank = (size_t)(percentile / 100.0 * (double)samples->count);
    if (rank >= samples->count)
        rank = samples->count - 1;
    return (double)samples->values[rank] / 1000.0;
}

/* ==== 2. Client connections (plain or TLS) ==== */

/* One client connection. fd is -1 and tls NULL when closed. */
struct client {
    int fd;
    SSL *tls;
};

/* Makes the client TLS context (see the opening comment). */
static void tls_context_make(void)
{
    tls_context = SSL_CTX_new(TLS_client_method());
    if (tls_context == NULL)
        die("cannot make a TLS context");
    SSL_CTX_set_min_proto_version(tls_context, TLS1_2_VERSION);
    SSL_CTX_set_verify(tls_context, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(tls_context, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(tls_context, SSL_OP_NO_TICKET);
    /* Idle connections keep no 16 KiB buffers in this process. */
    SSL_CTX_set_mode(tls_context, SSL_MODE_RELEASE_BUFFERS);
}

/* Connects to options.address (and does the TLS handshake with --tls).
 * Returns NULL on success, or a short reason (static text) on failure, in
 * which case client is closed. */
static const char *client_open(struct client *client)
{
    client->tls = NULL;
    client->fd = socket(options.address.ss_family, SOCK_STREAM | SOCK_CLOEXEC,
                        0);
    if (client->fd < 0)
        return errno == EMFILE ? "client descriptor limit (EMFILE)"
                               : "socket() failed";
    /* Linux applies SO_SNDTIMEO to connect() as well. */
    struct timeval timeout = {
        .tv_sec = (time_t)options.timeout_seconds,
        .tv_usec = (suseconds_t)((options.timeout_seconds -
                                  (double)(time_t)options.timeout_seconds) *
                                 1e6)};
    setsockopt(client->fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(client->fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    int one = 1;
    setsockopt(client->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    const char *failure = NULL;
    if (connect(client->fd, (struct sockaddr *)&options.address,
                options.address_length) != 0) {
        failure = errno == ECONNREFUSED ? "connection refused"
                  : errno == EAGAIN || errno == EINPROGRESS
                      ? "connect timed out"
                      : "connect failed";
    } else if (options.tls) {
        client->tls = SSL_new(tls_context);
        if (client->tls == NULL || SSL_set_fd(client->tls, client->fd) != 1 ||
            SSL_connect(client->tls) != 1)
            failure = "TLS handshake failed";
        ERR_clear_error();
    }
    if (failure != NULL) {
        SSL_free(client->tls);
        close(client->fd);
        client->tls = NULL;
        client->fd = -1;
    }
    return failure;
}

/* Writes all length bytes. Returns false on error or timeout. */
static bool client_write_all(struct client *client, const uint8_t *data,
                             size_t length)
{
    while (length > 0) {
        size_t sent = 0;
        if (client->tls != NULL) {
            if (SSL_write_ex(client->tls, data, length, &sent) != 1) {
                ERR_clear_error();
                return false;
            }
        } else {
            ssize_t count = send(client->fd, data, length, MSG_NOSIGNAL);
            if (count <= 0)
                return false;
            sent = (size_t)count;
        }
        data += sent;
        length -= sent;
    }
    return true;
}

/* Reads up to capacity bytes. Returns the count, or 0 on end, error or
 * timeout. */
static size_t client_read_some(struct client *client, uint8_t *buffer,
                               size_t capacity)
{
    if (client->tls != NULL) {
        size_t got = 0;
        if (SSL_read_ex(client->tls, buffer, capacity, &got) != 1) {
            ERR_clear_error();
            return 0;
        }
        return got;
    }
    ssize_t count = recv(client->fd, buffer, capacity, 0);
    return count > 0 ? (size_t)count : 0;
}

/* Reads exactly length bytes. Returns false on end, error or timeout. */
static bool client_read_exact(struct client *client, uint8_t *buffer,
                              size_t length)
{
    while (length > 0) {
        size_t got = client_read_some(client, buffer, length);
        if (got == 0)
            return false;
        buffer += got;
        length -= got;
    }
    return true;
}

/* Sends the mode byte 'E' and a message of length bytes, and reads the
 * echo back. Returns false if it did not come back whole. */
static bool client_echo(struct client *client, size_t length, bool mode_byte)
{
    uint8_t message[1 + ECHO_BYTES];
    uint8_t reply[ECHO_BYTES];
    if (length > ECHO_BYTES)
        length = ECHO_BYTES;
    message[0] = MODE_ECHO;
    memset(message + 1, 'm', length);
    const uint8_t *send_from = mode_byte ? message : message + 1;
    return client_write_all(client, send_from, length + (mode_byte ? 1 : 0)) &&
           client_read_exact(client, reply, length) &&
           memcmp(reply, message + 1, length) == 0;
}

/* Closes client (no TLS close_notify: the peer sees a plain TCP end, as
 * when a phone drops off the network). */
static void client_close(struct client *client)
{
    SSL_free(client->tls);
    if (client->fd >= 0)
        close(client->fd);
    client->tls = NULL;
    client->fd = -1;
}

/* Closes client with a TCP reset instead of a FIN (SO_LINGER 0), so that
 * no TIME_WAIT socket is left behind for 60 s. The memory test uses it: a
 * few thousand TIME_WAIT sockets still being freed would disturb the next
 * reading of MemAvailable. */
static void client_abort(struct client *client)
{
    struct linger reset = {.l_onoff = 1, .l_linger = 0};
    if (client->fd >= 0)
        setsockopt(client->fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
    client_close(client);
}

/* ==== 3. Client mode: bulk throughput ==== */

/* One bulk connection and its byte counter. */
struct bulk_worker {
    pthread_t thread;
    struct client client;
    _Atomic unsigned long long bytes; /* moved so far */
};

/* Moves bytes one way until stop_now: writes (upload) or reads (download). */
static void *bulk_worker_run(void *argument)
{
    struct bulk_worker *worker = argument;
    static const uint8_t zeros[CHUNK_BYTES];
    uint8_t *buffer = malloc(CHUNK_BYTES);
    if (buffer == NULL)
        die("out of memory");
    while (!atomic_load(&stop_now)) {
        size_t moved = 0;
        if (options.upload)
            moved = client_write_all(&worker->client, zeros, CHUNK_BYTES)
                        ? CHUNK_BYTES
                        : 0;
        else
            moved = client_read_some(&worker->client, buffer, CHUNK_BYTES);
        if (moved == 0)
            break; /* error or timeout: the run shows fewer bytes */
        atomic_fetch_add_explicit(&worker->bytes, moved, memory_order_relaxed);
    }
    free(buffer);
    return NULL;
}

/* Sum of the byte counters of all workers. */
static unsigned long long bulk_total(struct bulk_worker *workers, unsigned n)
{
    unsigned long long total = 0;
    for (unsigned i = 0; i < n; i++)
        total += atomic_load_explicit(&workers[i].bytes, memory_order_relaxed);
    return total;
}

/* Opens --conns connections, asks the upstream to sink (up) or generate
 * (down), and measures the bytes moved per second after a warm-up, summed
 * over the connections. Prints RESULT mbytes_per_s=... */
static int mode_bulk(void)
{
    unsigned n = options.connections;
    struct bulk_worker *workers = calloc(n, sizeof *workers);
    if (workers == NULL)
        die("out of memory");
    for (unsigned i = 0; i < n; i++) {
        const char *failure = client_open(&workers[i].client);
        if (failure != NULL)
            die("bulk: connection %u: %s", i + 1, failure);
        uint8_t mode = options.upload ? MODE_SINK : MODE_GENERATE;
        if (!client_write_all(&workers[i].client, &mode, 1))
            die("bulk: cannot send the mode byte");
    }
    for (unsigned i = 0; i < n; i++)
        pthread_create(&workers[i].thread, NULL, bulk_worker_run, &workers[i]);

    sleep_seconds(options.warmup_seconds);
    unsigned long long bytes_before = bulk_total(workers, n);
    uint64_t start = now_ns();
    sleep_seconds(options.seconds);
    unsigned long long bytes_after = bulk_total(workers, n);
    uint64_t end = now_ns();
    atomic_store(&stop_now, true);

    for (unsigned i = 0; i < n; i++)
        pthread_join(workers[i].thread, NULL);
    /* What was negotiated, so a reader can check that every target got
     * the same (version/cipher/group of the first connection). */
    char negotiated[128] = "plain";
    if (workers[0].client.tls != NULL) {
        char group[32] = "?";
        int nid = SSL_get_negotiated_group(workers[0].client.tls);
        if (nid > 0 && OBJ_nid2sn(nid) != NULL)
            snprintf(group, sizeof group, "%s", OBJ_nid2sn(nid));
        snprintf(negotiated, sizeof negotiated, "%s/%s/%s",
                 SSL_get_version(workers[0].client.tls),
                 SSL_get_cipher_name(workers[0].client.tls), group);
    }
    for (unsigned i = 0; i < n; i++)
        client_close(&workers[i].client);
    double elapsed = (double)(end - start) / 1e9;
    printf("RESULT mbytes_per_s=%.1f bytes=%llu seconds=%.3f tls=%s\n",
           (double)(bytes_after - bytes_before) / elapsed / 1e6,
           bytes_after - bytes_before, elapsed, negotiated);
    free(workers);
    return 0;
}

/* ==== 4. Client mode: connection rate ==== */

/* One looping client of the rate test. */
struct rate_worker {
    pthread_t thread;
    struct samples latencies;          /* one per completed connection */
    _Atomic unsigned long long done;   /* completed connections */
    _Atomic unsigned long long errors; /* failed ones */
};

/* Loops until stop_now: connect, [TLS handshake], 64-byte echo, close
 * (with --handshake-only: connect, [TLS handshake], close); records the
 * time of each whole loop. */
static void *rate_worker_run(void *argument)
{
    struct rate_worker *worker = argument;
    while (!atomic_load(&stop_now)) {
        uint64_t start = now_ns();
        struct client client;
        bool ok = client_open(&client) == NULL &&
                  (options.handshake_only ||
                   client_echo(&client, ECHO_BYTES, true));
        client_close(&client);
        if (!ok) {
            atomic_fetch_add(&worker->errors, 1);
            sleep_seconds(0.001); /* do not spin on a refusing server */
            continue;
        }
        samples_add(&worker->latencies, now_ns() - start);
        atomic_fetch_add_explicit(&worker->done, 1, memory_order_relaxed);
    }
    return NULL;
}

/* Runs --clients looping clients; prints connections per second (counted
 * after the warm-up) and p50/p99 of the whole loop. */
static int mode_rate(void)
{
    unsigned n = options.clients;
    struct rate_worker *workers = calloc(n, sizeof *workers);
    if (workers == NULL)
        die("out of memory");
    for (unsigned i = 0; i < n; i++)
        pthread_create(&workers[i].thread, NULL, rate_worker_run, &workers[i]);

    sleep_seconds(options.warmup_seconds);
    unsigned long long done_before = 0;
    for (unsigned i = 0; i < n; i++)
        done_before += atomic_load(&workers[i].done);
    uint64_t start = now_ns();
    sleep_seconds(options.seconds);
    unsigned long long done_after = 0;
    for (unsigned i = 0; i < n; i++)
        done_after += atomic_load(&workers[i].done);
    uint64_t end = now_ns();
    atomic_store(&stop_now, true);

    struct samples all = {0};
    unsigned long long errors = 0;
    for (unsigned i = 0; i < n; i++) {
        pthread_join(workers[i].thread, NULL);
        samples_merge(&all, &workers[i].latencies);
        errors += atomic_load(&workers[i].errors);
        free(workers[i].latencies.values);
    }
    double elapsed = (double)(end - start) / 1e9;
    double p50 = samples_percentile_us(&all, 50);
    double p99 = samples_percentile_us(&all, 99);
    printf("RESULT conn_per_s=%.0f p50_us=%.1f p99_us=%.1f errors=%llu\n",
           (double)(done_after - done_before) / elapsed, p50, p99, errors);
    free(all.values);
    free(workers);
    return 0;
}

/* ==== 5. Client mode: round trip ==== */

/* On one connection, sends 64 bytes and waits for their echo, again and
 * again for --seconds (after --warmup); prints p50 and p99. */
static int mode_rtt(void)
{
    struct client client;
    const char *failure = client_open(&client);
    if (failure != NULL)
        die("rtt: %s", failure);
    uint8_t mode = MODE_ECHO;
    if (!client_write_all(&client, &mode, 1))
        die("rtt: cannot send the mode byte");

    struct samples latencies = {0};
    uint64_t warm_until = now_ns() + (uint64_t)(options.warmup_seconds * 1e9);
    uint64_t end = warm_until + (uint64_t)(options.seconds * 1e9);
    for (unsigned long i = 0; i < SAMPLES_MAX; i++) {
        uint64_t start = now_ns();
        if (start >= end)
            break;
        if (!client_echo(&client, ECHO_BYTES, false))
            die("rtt: the echo did not come back");
        if (start >= warm_until)
            samples_add(&latencies, now_ns() - start);
    }
    client_close(&client);
    size_t count = latencies.count;
    double p50 = samples_percentile_us(&latencies, 50);
    double p99 = samples_percentile_us(&latencies, 99);
    printf("RESULT p50_us=%.1f p99_us=%.1f round_trips=%zu\n", p50, p99, count);
    free(latencies.values);
    return 0;
}

/* ==== 6. Client mode: idle connections (memory) ==== */

/*
 * run.sh reads the memory of the proxy and of the machine at each step:
 *
 *   loadgen prints "READY 0 ok=0" and waits for SIGUSR1;
 *   opens connections up to the first --steps count, each sending one
 *   16-byte message and reading its echo, prints "READY 1000 ok=1000",
 *   waits for SIGUSR1; and so on. SIGTERM (or IDLE_WAIT_SECONDS without a
 *   signal) resets every connection (client_abort) and exits.
 */

static struct client *idle_clients;     /* CONNECTIONS_MAX of them */
static atomic_uint idle_ok;             /* connections that echoed */

/* The range of idle_clients one opening thread fills. */
struct idle_range {
    pthread_t thread;
    unsigned first;
    unsigned end;
    unsigned stride;
};

/* Opens idle_clients[first], [first+stride], ... below end. */
static void *idle_open_run(void *argument)
{
    struct idle_range *range = argument;
    for (unsigned i = range->first; i < range->end; i += range->stride) {
        struct client *client = &idle_clients[i];
        if (client_open(client) != NULL)
            continue;
        if (client_echo(client, IDLE_MESSAGE_BYTES, true))
            atomic_fetch_add(&idle_ok, 1);
        else
            client_close(client);
    }
    return NULL;
}

/* Waits for SIGUSR1 (returns true) or SIGTERM/SIGINT/timeout (false). The
 * signals are blocked in every thread, so only this call receives them. */
static bool idle_wait_for_next(const sigset_t *signals)
{
    struct timespec timeout = {.tv_sec = IDLE_WAIT_SECONDS};
    int received = sigtimedwait(signals, NULL, &timeout);
    return received == SIGUSR1;
}

static int mode_idle(void)
{
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGUSR1);
    sigaddset(&signals, SIGTERM);
    sigaddset(&signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &signals, NULL);

    idle_clients = calloc(CONNECTIONS_MAX, sizeof *idle_clients);
    if (idle_clients == NULL)
        die("out of memory");
    for (unsigned i = 0; i < CONNECTIONS_MAX; i++)
        idle_clients[i].fd = -1;

    unsigned opened = 0;
    printf("READY 0 ok=0\n");
    fflush(stdout);
    for (unsigned step = 0; step < options.step_count; step++) {
        if (!idle_wait_for_next(&signals))
            break;
        unsigned target = options.steps[step];
        if (target > CONNECTIONS_MAX)
            target = CONNECTIONS_MAX;
        struct idle_range ranges[IDLE_OPEN_THREADS];
        for (unsigned t = 0; t < IDLE_OPEN_THREADS; t++) {
            ranges[t] = (struct idle_range){.first = opened + t,
                                            .end = target,
                                            .stride = IDLE_OPEN_THREADS};
            pthread_create(&ranges[t].thread, NULL, idle_open_run, &ranges[t]);
        }
        for (unsigned t = 0; t < IDLE_OPEN_THREADS; t++)
            pthread_join(ranges[t].thread, NULL);
        opened = target > opened ? target : opened;
        printf("READY %u ok=%u\n", target, atomic_load(&idle_ok));
        fflush(stdout);
    }
    if (options.step_count > 0)
        idle_wait_for_next(&signals); /* hold the last step until told */
    for (unsigned i = 0; i < opened; i++)
        client_abort(&idle_clients[i]);
    free(idle_clients);
    return 0;
}

/* ==== 7. Client mode: most connections held ==== */

/* Opens connections one at a time, each proving with a 16-byte echo that it
 * reaches the upstream, until one fails or --cap is reached. Then checks
 * that every one is still relayed (one more echo each) and prints how many
 * were held at once and why the opening stopped. */
static int mode_maxconn(void)
{
    unsigned cap = options.cap < CONNECTIONS_MAX ? options.cap
                                                 : CONNECTIONS_MAX;
    struct client *clients = calloc(cap, sizeof *clients);
    if (clients == NULL)
        die("out of memory");
    const char *stopped = "reached the cap";
    unsigned opened = 0;
    while (opened < cap) {
        struct client *client = &clients[opened];
        const char *failure = client_open(client);
        if (failure == NULL && !client_echo(client, IDLE_MESSAGE_BYTES, true)) {
            failure = "no echo (closed or not served by the proxy)";
            client_close(client);
        }
        if (failure != NULL) {
            stopped = failure;
            break;
        }
        opened++;
    }
    unsigned held = 0;
    for (unsigned i = 0; i < opened; i++)
        held += client_echo(&clients[i], IDLE_MESSAGE_BYTES, false);
    printf("RESULT held=%u opened=%u cap=%u stopped=\"%s\"\n", held, opened,
           cap, stopped);
    for (unsigned i = 0; i < opened; i++)
        client_abort(&clients[i]);
    free(clients);
    return 0;
}

/* ==== 8. Upstream: the fake WhatsApp server ==== */

/*
 * Each upstream thread has its own listening socket on the same port
 * (SO_REUSEPORT: the kernel spreads new connections over them) and its own
 * epoll loop. A connection goes through these phases:
 *
 *   PHASE_START   collect bytes until the PROXY header (if any) and the mode
 *                 byte are in; bytes after them are payload
 *   PHASE_ECHO    write back what is read; if the client does not take it,
 *                 keep the rest and stop reading until it is gone
 *   PHASE_SINK    read and drop
 *   PHASE_GENERATE  write CHUNK_BYTES whenever the socket is writable
 *
 * A PROXY header is recognised by its first byte: 'P' ("PROXY ", v1) or
 * '\r' (the v2 signature). Mode bytes are letters, so a direct client (no
 * header) and a proxy (header) can use the same upstream.
 */

/* Longest PROXY v1 line (HAProxy's doc/proxy-protocol.txt). */
#define PROXY_V1_MAX_BYTES 107
/* A v2 header with small TLVs; HAProxy and whatsapp_proxy send far less. */
#define START_BUFFER_BYTES 512

enum upstream_phase {
    PHASE_START,
    PHASE_ECHO,
    PHASE_SINK,
    PHASE_GENERATE
};

struct upstream_conn {
    int fd;
    enum upstream_phase phase;
    uint8_t start[START_BUFFER_BYTES]; /* PHASE_START: bytes so far */
    size_t start_length;
    uint8_t *pending;                  /* PHASE_ECHO: bytes not yet sent */
    size_t pending_offset;
    size_t pending_length;
};

struct upstream_thread {
    pthread_t thread;
    int listen_fd;
    int epoll_fd;
    int reserve_fd; /* a spare descriptor, given up to refuse at EMFILE */
    uint8_t *buffer;
};

/* Length of the PROXY header at the front of data: 0 if there is none, -1
 * if more bytes are needed, -2 if it is malformed. */
static int proxy_header_length(const uint8_t *data, size_t length)
{
    static const uint8_t v2_signature[12] = "\r\n\r\n\0\r\nQUIT\n";
    if (length == 0)
        return -1;
    if (data[0] == 'P') {
        for (size_t i = 1; i < length && i < PROXY_V1_MAX_BYTES; i++)
            if (data[i - 1] == '\r' && data[i] == '\n')
                return (int)i + 1;
        return length >= PROXY_V1_MAX_BYTES ? -2 : -1;
    }
    if (data[0] == '\r') {
        if (length < 16)
            return -1;
        if (memcmp(data, v2_signature, sizeof v2_signature) != 0)
            return -2;
        size_t total = 16 + (((size_t)data[14] << 8) | data[15]);
        if (total > START_BUFFER_BYTES)
            return -2;
        return length >= total ? (int)total : -1;
    }
    return 0;
}

/* Tells epoll what conn waits for. */
static void upstream_watch(struct upstream_thread *thread,
                           struct upstream_conn *conn, uint32_t events)
{
    struct epoll_event event = {.events = events, .data.ptr = conn};
    epoll_ctl(thread->epoll_fd, EPOLL_CTL_MOD, conn->fd, &event);
}

static void upstream_close(struct upstream_conn *conn)
{
    close(conn->fd); /* also leaves the epoll set */
    free(conn->pending);
    free(conn);
}

/* Echoes data[0..length) back on conn; what the socket does not take is
 * kept, and conn then waits for writability only. Returns false if the
 * connection broke. */
static bool upstream_echo(struct upstream_thread *thread,
                          struct upstream_conn *conn, const uint8_t *data,
                          size_t length)
{
    ssize_t sent = send(conn->fd, data, length, MSG_NOSIGNAL);
    if (sent < 0 && errno != EAGAIN)
        return false;
    size_t done = sent > 0 ? (size_t)sent : 0;
    if (done < length) {
        conn->pending = malloc(length - done);
        if (conn->pending == NULL)
            return false;
        memcpy(conn->pending, data + done, length - done);
        conn->pending_offset = 0;
        conn->pending_length = length - done;
        upstream_watch(thread, conn, EPOLLOUT);
    }
    return true;
}

/* Handles the first bytes of a connection. Returns false to close it. */
static bool upstream_on_start(struct upstream_thread *thread,
                              struct upstream_conn *conn)
{
    ssize_t got = recv(conn->fd, conn->start + conn->start_length,
                       sizeof conn->start - conn->start_length, 0);
    if (got == 0 || (got < 0 && errno != EAGAIN))
        return false; /* also the health checks, which connect and close */
    if (got < 0)
        return true;
    conn->start_length += (size_t)got;

    int header = proxy_header_length(conn->start, conn->start_length);
    if (header == -2)
        return false;
    if (header == -1 || (size_t)header >= conn->start_length)
        return true; /* wait for the rest of the header, or the mode byte */

    uint8_t mode = conn->start[header];
    const uint8_t *payload = conn->start + header + 1;
    size_t payload_length = conn->start_length - (size_t)header - 1;
    switch (mode) {
    case MODE_ECHO:
        conn->phase = PHASE_ECHO;
        return payload_length == 0 ||
               upstream_echo(thread, conn, payload, payload_length);
    case MODE_SINK:
        conn->phase = PHASE_SINK;
        return true;
    case MODE_GENERATE:
        conn->phase = PHASE_GENERATE;
        upstream_watch(thread, conn, EPOLLIN | EPOLLOUT);
        return true;
    default:
        return false;
    }
}

/* Serves one epoll event of conn. Returns false to close it. */
static bool upstream_on_event(struct upstream_thread *thread,
                              struct upstream_conn *conn, uint32_t events)
{
    if (events & EPOLLERR)
        return false;
    switch (conn->phase) {
    case PHASE_START:
        return upstream_on_start(thread, conn);

    case PHASE_ECHO:
        if (conn->pending != NULL) {
            ssize_t sent = send(conn->fd, conn->pending + conn->pending_offset,
                                conn->pending_length, MSG_NOSIGNAL);
            if (sent < 0)
                return errno == EAGAIN;
            conn->pending_offset += (size_t)sent;
            conn->pending_length -= (size_t)sent;
            if (conn->pending_length == 0) {
                free(conn->pending);
                conn->pending = NULL;
                upstream_watch(thread, conn, EPOLLIN);
            }
            return true;
        }
        for (;;) {
            ssize_t got = recv(conn->fd, thread->buffer, CHUNK_BYTES, 0);
            if (got == 0 || (got < 0 && errno != EAGAIN))
                return false;
            if (got < 0)
                return true;
            if (!upstream_echo(thread, conn, thread->buffer, (size_t)got))
                return false;
            if (conn->pending != NULL || got < CHUNK_BYTES)
                return true;
        }

    case PHASE_SINK:
        for (int i = 0; i < 16; i++) {
            ssize_t got = recv(conn->fd, thread->buffer, CHUNK_BYTES, 0);
            if (got == 0 || (got < 0 && errno != EAGAIN))
                return false;
            if (got < CHUNK_BYTES)
                return true;
        }
        return true;

    case PHASE_GENERATE:
        if (events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP)) {
            ssize_t got = recv(conn->fd, thread->buffer, CHUNK_BYTES, 0);
            if (got == 0 || (got < 0 && errno != EAGAIN))
                return false;
        }
        if (events & EPOLLOUT) {
            for (int i = 0; i < 16; i++) {
                ssize_t sent = send(conn->fd, thread->buffer, CHUNK_BYTES,
                                    MSG_NOSIGNAL);
                if (sent < 0)
                    return errno == EAGAIN;
                if (sent < CHUNK_BYTES)
                    return true;
            }
        }
        return true;
    }
    return false;
}

/* Accepts waiting connections (at most 64 per call). At the descriptor
 * limit it gives up its reserve descriptor for a moment to accept and
 * close the newcomer, so the listener does not wake the loop forever. */
static void upstream_accept(struct upstream_thread *thread)
{
    for (int i = 0; i < 64; i++) {
        int fd = accept4(thread->listen_fd, NULL, NULL,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0 && errno == EMFILE && thread->reserve_fd >= 0) {
            close(thread->reserve_fd);
            fd = accept4(thread->listen_fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd >= 0)
                close(fd);
            thread->reserve_fd = dup(0);
            continue;
        }
        if (fd < 0)
            return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct upstream_conn *conn = calloc(1, sizeof *conn);
        if (conn == NULL) {
            close(fd);
            return;
        }
        conn->fd = fd;
        conn->phase = PHASE_START;
        struct epoll_event event = {.events = EPOLLIN, .data.ptr = conn};
        epoll_ctl(thread->epoll_fd, EPOLL_CTL_ADD, fd, &event);
    }
}

/* The loop of one upstream thread. It runs until the process is stopped
 * (run.sh sends SIGTERM to its PID). */
static void *upstream_thread_run(void *argument)
{
    struct upstream_thread *thread = argument;
    struct epoll_event events[128];
    for (;;) {
        int ready = epoll_wait(thread->epoll_fd, events, 128, -1);
        for (int i = 0; i < ready; i++) {
            struct upstream_conn *conn = events[i].data.ptr;
            if (conn == NULL)
                upstream_accept(thread);
            else if (!upstream_on_event(thread, conn, events[i].events))
                upstream_close(conn);
        }
    }
    return NULL;
}

/* Makes a non-blocking listening socket on options.address that shares
 * the port with the other threads' sockets. */
static int upstream_listen(void)
{
    int fd = socket(options.address.ss_family,
                    SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
        bind(fd, (struct sockaddr *)&options.address,
             options.address_length) != 0 ||
        listen(fd, 4096) != 0)
        die("upstream: cannot listen: %s", strerror(errno));
    return fd;
}

/* Starts --threads upstream threads, prints LISTENING, and waits. */
static int mode_upstream(void)
{
    unsigned n = options.threads;
    struct upstream_thread *threads = calloc(n, sizeof *threads);
    if (threads == NULL)
        die("out of memory");
    for (unsigned i = 0; i < n; i++) {
        struct upstream_thread *thread = &threads[i];
        thread->listen_fd = upstream_listen();
        thread->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        thread->reserve_fd = dup(0);
        thread->buffer = calloc(1, CHUNK_BYTES);
        if (thread->epoll_fd < 0 || thread->buffer == NULL)
            die("upstream: cannot start a thread");
        struct epoll_event event = {.events = EPOLLIN, .data.ptr = NULL};
        epoll_ctl(thread->epoll_fd, EPOLL_CTL_ADD, thread->listen_fd, &event);
    }
    for (unsigned i = 0; i < n; i++)
        pthread_create(&threads[i].thread, NULL, upstream_thread_run,
                       &threads[i]);
    printf("LISTENING\n");
    fflush(stdout);
    for (unsigned i = 0; i < n; i++)
        pthread_join(threads[i].thread, NULL);
    return 0;
}

/* ==== 8b. TLS upstream: the reference for the TLS rows ==== */

/*
 * `loadgen upstream --tls`: the same three modes as above behind a TLS
 * server, so that "direct" in a TLS row is what this machine does with
 * the client's TLS and no proxy: the same certificate (ECDSA P-256), the
 * same negotiation (TLS 1.3, X25519, TLS_AES_256_GCM_SHA384) and the same
 * 64 KiB writes as the proxies' TLS side. It serves only the direct
 * client, so it is simple rather than scalable: one blocking thread per
 * connection (a bulk test has at most 8). A PROXY header in front of the
 * mode byte is still skipped, inside the TLS stream.
 */

/* Makes the server TLS context from --cert and --key. */
static void tls_server_context_make(void)
{
    if (options.cert_file == NULL || options.key_file == NULL)
        die("upstream --tls needs --cert FILE and --key FILE");
    tls_context = SSL_CTX_new(TLS_server_method());
    if (tls_context == NULL ||
        SSL_CTX_use_certificate_chain_file(tls_context, options.cert_file) != 1 ||
        SSL_CTX_use_PrivateKey_file(tls_context, options.key_file,
                                    SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(tls_context) != 1)
        die("upstream: cannot load %s and %s", options.cert_file,
            options.key_file);
    SSL_CTX_set_min_proto_version(tls_context, TLS1_2_VERSION);
}

/* Writes all length bytes on tls. Returns false when the connection broke
 * (for the generator: the client has gone). */
static bool tls_write_all(SSL *tls, const uint8_t *data, size_t length)
{
    while (length > 0) {
        size_t sent = 0;
        if (SSL_write_ex(tls, data, length, &sent) != 1)
            return false;
        data += sent;
        length -= sent;
    }
    return true;
}

/* Serves one TLS connection (the descriptor is the argument) until the
 * client ends it or it breaks. */
static void *tls_upstream_conn_run(void *argument)
{
    int fd = (int)(intptr_t)argument;
    SSL *tls = SSL_new(tls_context);
    uint8_t *buffer = malloc(CHUNK_BYTES);
    uint8_t start[START_BUFFER_BYTES];
    size_t start_length = 0, got = 0;
    int header = -1;
    if (tls == NULL || buffer == NULL || SSL_set_fd(tls, fd) != 1 ||
        SSL_accept(tls) != 1)
        goto done;
    /* The PROXY header (if any) and the mode byte, as in PHASE_START. */
    while (header < 0 || (size_t)header >= start_length) {
        if (start_length == sizeof start ||
            SSL_read_ex(tls, start + start_length,
                        sizeof start - start_length, &got) != 1)
            goto done;
        start_length += got;
        header = proxy_header_length(start, start_length);
        if (header == -2)
            goto done;
    }
    const uint8_t *payload = start + header + 1;
    size_t payload_length = start_length - (size_t)header - 1;
    switch (start[header]) {
    case MODE_ECHO:
        if (!tls_write_all(tls, payload, payload_length))
            break;
        while (SSL_read_ex(tls, buffer, CHUNK_BYTES, &got) == 1 &&
               tls_write_all(tls, buffer, got))
            continue;
        break;
    case MODE_SINK:
        while (SSL_read_ex(tls, buffer, CHUNK_BYTES, &got) == 1)
            continue;
        break;
    case MODE_GENERATE:
        memset(buffer, 0, CHUNK_BYTES);
        while (tls_write_all(tls, buffer, CHUNK_BYTES))
            continue;
        break;
    }
done:
    ERR_clear_error();
    SSL_free(tls);
    close(fd);
    free(buffer);
    return NULL;
}

/* Accepts TLS connections for ever, one detached thread each. */
static int mode_upstream_tls(void)
{
    int listen_fd = upstream_listen();
    int flags = 0; /* blocking accept: the listener was made non-blocking */
    ioctl(listen_fd, FIONBIO, &flags);
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    printf("LISTENING\n");
    fflush(stdout);
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE)
                sleep_seconds(0.01);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pthread_t thread;
        if (pthread_create(&thread, &attributes, tls_upstream_conn_run,
                           (void *)(intptr_t)fd) != 0)
            close(fd);
    }
    return 0; /* not reached: run.sh stops it by PID */
}

/* ==== 9. Command line and main ==== */

static void usage(void)
{
    fputs(
        "usage: loadgen upstream --listen ADDR:PORT [--threads N]\n"
        "       loadgen upstream --listen ADDR:PORT --tls --cert F --key F\n"
        "       loadgen MODE --connect ADDR:PORT [--tls] [options]\n"
        "modes and their options:\n"
        "  bulk     --conns N --direction up|down --seconds S [--warmup S]\n"
        "  rate     --clients C --seconds S [--warmup S] [--handshake-only]\n"
        "  rtt      --seconds S [--warmup S]\n"
        "  idle     --steps N1,N2,... (SIGUSR1: next step; SIGTERM: end)\n"
        "  maxconn  --cap N\n"
        "common: --timeout S (per socket call, default 5)\n",
        stderr);
    exit(2);
}

/* Parses a positive number or exits naming the flag. */
static double number_parse(const char *text, const char *flag)
{
    char *end = NULL;
    double value = strtod(text, &end);
    if (end == text || *end != '\0' || value <= 0)
        die("%s: '%s' is not a positive number", flag, text);
    return value;
}

/* Parses "1000,5000" into options.steps. */
static void steps_parse(const char *text)
{
    options.step_count = 0;
    while (*text != '\0' && options.step_count < 16) {
        char *end = NULL;
        unsigned long value = strtoul(text, &end, 10);
        if (end == text || value == 0 || value > CONNECTIONS_MAX)
            die("--steps: '%s' is not a list of counts", text);
        options.steps[options.step_count++] = (unsigned)value;
        text = *end == ',' ? end + 1 : end;
        if (*end != ',' && *end != '\0')
            die("--steps: unexpected '%c'", *end);
    }
}

static void options_parse(int argc, char **argv)
{
    static const struct option flags[] = {
        {"connect", required_argument, NULL, 'c'},
        {"listen", required_argument, NULL, 'l'},
        {"tls", no_argument, NULL, 't'},
        {"conns", required_argument, NULL, 'n'},
        {"clients", required_argument, NULL, 'C'},
        {"direction", required_argument, NULL, 'd'},
        {"seconds", required_argument, NULL, 's'},
        {"warmup", required_argument, NULL, 'w'},
        {"timeout", required_argument, NULL, 'T'},
        {"threads", required_argument, NULL, 'j'},
        {"steps", required_argument, NULL, 'S'},
        {"cap", required_argument, NULL, 'm'},
        {"cert", required_argument, NULL, 'k'},
        {"key", required_argument, NULL, 'K'},
        {"handshake-only", no_argument, NULL, 'H'},
        {NULL, 0, NULL, 0},
    };
    bool have_address = false;
    int flag;
    while ((flag = getopt_long(argc, argv, "", flags, NULL)) != -1) {
        switch (flag) {
        case 'c':
        case 'l':
            address_parse(optarg);
            have_address = true;
            break;
        case 't':
            options.tls = true;
            break;
        case 'n':
            options.connections = (unsigned)number_parse(optarg, "--conns");
            break;
        case 'C':
            options.clients = (unsigned)number_parse(optarg, "--clients");
            break;
        case 'd':
            if (strcmp(optarg, "up") != 0 && strcmp(optarg, "down") != 0)
                die("--direction: 'up' or 'down', not '%s'", optarg);
            options.upload = strcmp(optarg, "up") == 0;
            break;
        case 's':
            options.seconds = number_parse(optarg, "--seconds");
            break;
        case 'w':
            options.warmup_seconds = number_parse(optarg, "--warmup");
            break;
        case 'T':
            options.timeout_seconds = number_parse(optarg, "--timeout");
            break;
        case 'j':
            options.threads = (unsigned)number_parse(optarg, "--threads");
            break;
        case 'S':
            steps_parse(optarg);
            break;
        case 'm':
            options.cap = (unsigned)number_parse(optarg, "--cap");
            break;
        case 'k':
            options.cert_file = optarg;
            break;
        case 'K':
            options.key_file = optarg;
            break;
        case 'H':
            options.handshake_only = true;
            break;
        default:
            usage();
        }
    }
    if (!have_address || optind != argc)
        usage();
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    const char *mode = argv[1];
    options_parse(argc - 1, argv + 1);
    descriptor_limit_raise();
    signal(SIGPIPE, SIG_IGN);
    bool upstream = strcmp(mode, "upstream") == 0;
    if (options.tls && upstream)
        tls_server_context_make();
    else if (options.tls)
        tls_context_make();

    if (upstream)
        return options.tls ? mode_upstream_tls() : mode_upstream();
    if (strcmp(mode, "bulk") == 0)
        return mode_bulk();
    if (strcmp(mode, "rate") == 0)
        return mode_rate();
    if (strcmp(mode, "rtt") == 0)
        return mode_rtt();
    if (strcmp(mode, "idle") == 0)
        return mode_idle();
    if (strcmp(mode, "maxconn") == 0)
        return mode_maxconn();
    usage();
    return 2;
}
