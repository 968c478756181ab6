/*
 * soak_load.c - the two ends of tests/soak.sh: an echo server that stands
 * in for WhatsApp's chat servers, and a load generator that keeps thousands
 * of connections busy through whatsapp_proxy and checks every byte.
 *
 *   soak_load echo PORT THREADS
 *       Listens on 127.0.0.1:PORT. Each connection: read the PROXY header
 *       (v1 or v2; exactly the header, not one byte more), then echo every
 *       byte back until the client closes. On SIGTERM it prints its counters
 *       ("echo key=value ...") and exits.
 *
 *   soak_load load PORT CONNECTIONS SECONDS THREADS SEED
 *       Keeps CONNECTIONS connections to 127.0.0.1:PORT open for SECONDS.
 *       On each connection, exchanges one after another: send N bytes
 *       (N random, 1 byte to 256 KiB, spread evenly over the powers of two
 *       so small and large exchanges are both common) while reading the
 *       echo, and compare it byte for byte with what was sent. After a
 *       random number of exchanges (1 to 32) the connection half-closes,
 *       waits for the proxy's FIN, and a new connection takes its place.
 *       At SECONDS no new exchange starts; the ones in flight get up to
 *       DRAIN_SECONDS to finish. Prints "load key=value ..." and exits 0
 *       if no byte was lost or corrupted and no connection failed.
 *
 * Why the payload needs no memory: byte i of an exchange is a pure function
 * of (exchange seed, i), so the sender makes bytes on demand and the
 * receiver makes the same bytes again to compare. 2,000 connections with
 * 256 KiB in flight each would otherwise need 512 MiB of copies.
 *
 * Build: cc -O2 -pthread -o soak_load soak_load.c  (soak.sh does it).
 * Linux only (epoll, SO_REUSEPORT), like whatsapp_proxy.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EXCHANGE_BYTES (256 * 1024) /* the largest exchange: 256 KiB */
#define MAX_EXCHANGES 32        /* a connection makes 1..32 exchanges */
#define IO_CHUNK 65536          /* bytes per read() or write() call */
#define ECHO_BUFFER 16384       /* echo buffer per connection: 2,000 x 16 KiB */
#define DRAIN_SECONDS 30        /* bound on finishing exchanges after SECONDS */
#define STALL_SECONDS 30        /* an exchange without progress this long fails */
#define V1_MAX 107              /* PROXY v1 line limit, CRLF included */
#define V2_FIXED 16             /* PROXY v2 signature + version + family + length */

static const uint8_t V2_SIGNATURE[12] = {
    '\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};

/* Aborts: a test helper that cannot allocate or set up has nothing to test. */
static void die(const char *what)
{
    perror(what);
    exit(2);
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        die("fcntl");
}

/* ==== 1. Random numbers and payload bytes ==== */

/* splitmix64: a well-mixed 64-bit value from any 64-bit input. */
static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* A per-thread generator (xorshift64*): *state must not be 0. */
static uint64_t next_random(uint64_t *state)
{
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return *state * 0x2545f4914f6cdd1dULL;
}

/* Writes bytes [offset, offset + length) of the exchange with this seed. */
static void payload_make(uint64_t seed, size_t offset, uint8_t *out,
                         size_t length)
{
    size_t i = 0;
    while (i < length) {
        size_t position = offset + i;
        uint64_t word = mix64(seed ^ (position >> 3) * 0x100000001b3ULL);
        for (unsigned b = position & 7; b < 8 && i < length; b++, i++)
            out[i] = (uint8_t)(word >> (b * 8));
    }
}

/* 1 byte to 256 KiB: a power-of-two band chosen evenly, then a size in it. */
static size_t exchange_size(uint64_t *rng)
{
    if (next_random(rng) % 64 == 0)
        return MAX_EXCHANGE_BYTES;                    /* the limit itself */
    unsigned band = next_random(rng) % 18;            /* 2^0 .. 2^17 */
    size_t low = (size_t)1 << band;
    return low + next_random(rng) % low;              /* low .. 2*low - 1 */
}

/* ==== 2. Echo server ==== */

enum echo_state { ECHO_HEADER, ECHO_RELAY };

struct echo_conn {
    int fd;
    enum echo_state state;
    size_t have;                /* bytes in buffer */
    size_t sent;                /* of those, already echoed */
    uint8_t buffer[ECHO_BUFFER];
};

static struct {
    atomic_long connections;    /* accepted */
    atomic_long header_v1, header_v2, header_local;
    atomic_long header_missing; /* data without a PROXY header */
    atomic_long header_bad;     /* a malformed header */
    atomic_long empty;          /* closed before any byte: health checks */
    atomic_long bytes;          /* echoed */
    atomic_long resets;         /* read or write errors */
} echo_counters;

static int echo_port;
static volatile sig_atomic_t echo_stop;

static void on_stop(int signal_number)
{
    (void)signal_number;
    echo_stop = 1;
}

/* Looks for a complete PROXY header at the start of c->buffer. Returns its
 * length (0: none at all), -1 if more bytes are needed, -2 if malformed.
 * Counts the header kind. */
static long echo_header_length(struct echo_conn *c)
{
    if (c->buffer[0] == '\r') {
        size_t compare = c->have < 12 ? c->have : 12;
        if (memcmp(c->buffer, V2_SIGNATURE, compare) != 0)
            return -2;
        if (c->have < V2_FIXED)
            return -1;
        size_t total = V2_FIXED + ((size_t)c->buffer[14] << 8 | c->buffer[15]);
        if ((c->buffer[12] & 0xf0) != 0x20 || total > ECHO_BUFFER)
            return -2;
        if (c->have < total)
            return -1;
        if (c->buffer[12] == 0x20)
            atomic_fetch_add(&echo_counters.header_local, 1);
        else
            atomic_fetch_add(&echo_counters.header_v2, 1);
        return (long)total;
    }
    if (c->buffer[0] == 'P' && c->have < 6 &&
        memcmp(c->buffer, "PROXY ", c->have) == 0)
        return -1;
    if (c->have >= 6 && memcmp(c->buffer, "PROXY ", 6) == 0) {
        for (size_t i = 1; i < c->have && i < V1_MAX; i++)
            if (c->buffer[i - 1] == '\r' && c->buffer[i] == '\n') {
                atomic_fetch_add(&echo_counters.header_v1, 1);
                return (long)i + 1;
            }
        return c->have >= V1_MAX ? -2 : -1;
    }
    atomic_fetch_add(&echo_counters.header_missing, 1);
    return 0;
}

static void echo_close(int epoll_fd, struct echo_conn *c)
{
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

/* Moves bytes for one ready connection; closes it when done. Level
 * triggered: while unsent bytes wait we watch EPOLLOUT, else EPOLLIN. */
static void echo_step(int epoll_fd, struct echo_conn *c)
{
    for (;;) {
        if (c->sent < c->have) {                        /* flush first */
            ssize_t n = send(c->fd, c->buffer + c->sent, c->have - c->sent,
                             MSG_NOSIGNAL);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
                epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &e);
                return;
            }
            if (n < 0) {
                atomic_fetch_add(&echo_counters.resets, 1);
                echo_close(epoll_fd, c);
                return;
            }
            c->sent += (size_t)n;
            atomic_fetch_add(&echo_counters.bytes, n);
            if (c->sent < c->have)
                continue;
            c->sent = c->have = 0;
            struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &e);
        }
        ssize_t n = recv(c->fd, c->buffer + c->have, ECHO_BUFFER - c->have, 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n <= 0) {
            if (n < 0)
                atomic_fetch_add(&echo_counters.resets, 1);
            else if (c->state == ECHO_HEADER && c->have == 0)
                atomic_fetch_add(&echo_counters.empty, 1);
            else if (c->state == ECHO_HEADER)
                atomic_fetch_add(&echo_counters.header_bad, 1);
            echo_close(epoll_fd, c);
            return;
        }
        c->have += (size_t)n;
        if (c->state == ECHO_HEADER) {
            long length = echo_header_length(c);
            if (length == -1)
                continue;
            if (length == -2) {
                atomic_fetch_add(&echo_counters.header_bad, 1);
                echo_close(epoll_fd, c);
                return;
            }
            c->state = ECHO_RELAY;
            c->sent = (size_t)length;          /* the header is not echoed */
        }
    }
}

static void *echo_thread(void *unused)
{
    (void)unused;
    int listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* One listening socket per thread; the kernel spreads the clients. */
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET,
                                  .sin_port = htons((uint16_t)echo_port)};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listen_fd, (struct sockaddr *)&address, sizeof address) < 0 ||
        listen(listen_fd, 4096) < 0)
        die("echo: bind/listen");
    set_nonblocking(listen_fd);
    int epoll_fd = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listen_fd, &e);

    struct epoll_event events[256];
    for (;;) {
        int ready = epoll_wait(epoll_fd, events, 256, 1000);
        for (int i = 0; i < ready; i++) {
            if (events[i].data.ptr != NULL) {
                echo_step(epoll_fd, events[i].data.ptr);
                continue;
            }
            int fd;
            while ((fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                struct echo_conn *c = calloc(1, sizeof *c);
                if (c == NULL)
                    die("calloc");
                c->fd = fd;
                atomic_fetch_add(&echo_counters.connections, 1);
                struct epoll_event ce = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ce);
            }
        }
    }
    return NULL;
}

static int echo_main(int port, int threads)
{
    echo_port = port;
    signal(SIGTERM, on_stop);
    signal(SIGINT, on_stop);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < threads; i++) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, echo_thread, NULL) != 0)
            die("pthread_create");
        pthread_detach(thread);
    }
    while (!echo_stop)
        usleep(100 * 1000);
    printf("echo connections=%ld header_v2=%ld header_v1=%ld header_local=%ld "
           "header_missing=%ld header_bad=%ld empty=%ld bytes=%ld resets=%ld\n",
           atomic_load(&echo_counters.connections),
           atomic_load(&echo_counters.header_v2),
           atomic_load(&echo_counters.header_v1),
           atomic_load(&echo_counters.header_local),
           atomic_load(&echo_counters.header_missing),
           atomic_load(&echo_counters.header_bad),
           atomic_load(&echo_counters.empty),
           atomic_load(&echo_counters.bytes),
           atomic_load(&echo_counters.resets));
    fflush(stdout);
    _exit(0); /* the echo threads never end by themselves */
}

/* ==== 3. Load generator ==== */

enum load_state {
    LOAD_CONNECTING,  /* non-blocking connect() in progress */
    LOAD_EXCHANGING,  /* sending and reading back one exchange */
    LOAD_CLOSING,     /* write side shut; waiting for the proxy's FIN */
};

struct load_conn {
    int fd;
    enum load_state state;
    int exchanges_left;         /* before this connection closes */
    uint64_t seed;              /* of the current exchange */
    size_t size, sent, received;
    long long progress_ms;      /* last time a byte moved */
};

struct load_totals {
    long connections, exchanges, bytes_sent, bytes_received;
    long bytes_lost;            /* sent but never echoed */
    long bytes_corrupted;       /* echoed but different, or extra */
    long connect_failures, resets, early_closes, stalls;
};

struct load_thread {
    pthread_t thread;
    int connections;            /* to keep open */
    int open;                   /* open now */
    struct load_conn **pending; /* closed, to reconnect after this batch */
    int pending_count;
    uint64_t rng;
    struct load_totals totals;
    uint8_t sent_copy[IO_CHUNK], received[IO_CHUNK];
};

static int load_port;
static long long load_end_ms;   /* no new exchange after this */
static long long load_drain_ms; /* everything still open fails after this */

/* Starts a non-blocking connect of c to the proxy. */
static bool load_connect(int epoll_fd, struct load_thread *t,
                         struct load_conn *c)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) {
        t->totals.connect_failures++;
        return false;
    }
    struct sockaddr_in address = {.sin_family = AF_INET,
                                  .sin_port = htons((uint16_t)load_port)};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->fd, (struct sockaddr *)&address, sizeof address) < 0 &&
        errno != EINPROGRESS) {
        t->totals.connect_failures++;
        close(c->fd);
        c->fd = -1;
        return false;
    }
    c->state = LOAD_CONNECTING;
    c->exchanges_left = 1 + (int)(next_random(&t->rng) % MAX_EXCHANGES);
    c->progress_ms = now_ms();
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, c->fd, &e);
    t->totals.connections++;
    t->open++;
    return true;
}

static void load_begin_exchange(int epoll_fd, struct load_thread *t,
                                struct load_conn *c)
{
    c->state = LOAD_EXCHANGING;
    c->seed = next_random(&t->rng);
    c->size = exchange_size(&t->rng);
    c->sent = c->received = 0;
    struct epoll_event e = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &e);
}

/* Ends c's connection; counts what an unfinished exchange lost. Unless the
 * run is over, c goes on the pending list, to reconnect once the current
 * batch of events is done (an event later in the batch may still name c,
 * and must not be taken for news about the new connection). */
static void load_finish(int epoll_fd, struct load_thread *t,
                        struct load_conn *c, bool failed)
{
    if (failed && c->state == LOAD_EXCHANGING)
        t->totals.bytes_lost += (long)(c->sent - c->received);
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    t->open--;
    if (now_ms() < load_end_ms)
        t->pending[t->pending_count++] = c;
}

/* One exchange step on a ready connection. */
static void load_step(int epoll_fd, struct load_thread *t, struct load_conn *c,
                      uint32_t events)
{
    if (c->state == LOAD_CONNECTING) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        int error = 0;
        socklen_t length = sizeof error;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &length);
        if (error != 0) {
            t->totals.connect_failures++;
            load_finish(epoll_fd, t, c, true);
            return;
        }
        load_begin_exchange(epoll_fd, t, c);
        return;
    }
    if ((events & EPOLLOUT) && c->state == LOAD_EXCHANGING &&
        c->sent < c->size) {
        size_t chunk = c->size - c->sent;
        if (chunk > IO_CHUNK)
            chunk = IO_CHUNK;
        payload_make(c->seed, c->sent, t->sent_copy, chunk);
        ssize_t n = send(c->fd, t->sent_copy, chunk, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            t->totals.resets++;
            load_finish(epoll_fd, t, c, true);
            return;
        }
        if (n > 0) {
            c->sent += (size_t)n;
            t->totals.bytes_sent += n;
            c->progress_ms = now_ms();
        }
        if (c->sent == c->size) {                   /* only reading now */
            struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &e);
        }
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
        return;
    ssize_t n = recv(c->fd, t->received, IO_CHUNK, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return;
    if (n < 0) {
        t->totals.resets++;
        load_finish(epoll_fd, t, c, true);
        return;
    }
    if (n == 0) {
        if (c->state == LOAD_CLOSING) {             /* the clean end */
            load_finish(epoll_fd, t, c, false);
        } else {
            t->totals.early_closes++;
            load_finish(epoll_fd, t, c, true);
        }
        return;
    }
    c->progress_ms = now_ms();
    size_t expected = c->state == LOAD_EXCHANGING ? c->size - c->received : 0;
    size_t compare = (size_t)n < expected ? (size_t)n : expected;
    if (compare > 0) {
        payload_make(c->seed, c->received, t->sent_copy, compare);
        if (memcmp(t->sent_copy, t->received, compare) != 0)
            for (size_t i = 0; i < compare; i++)
                t->totals.bytes_corrupted += t->sent_copy[i] != t->received[i];
        c->received += compare;
        t->totals.bytes_received += (long)compare;
    }
    t->totals.bytes_corrupted += (long)((size_t)n - compare); /* extra bytes */
    if (c->state == LOAD_EXCHANGING && c->received == c->size) {
        t->totals.exchanges++;
        if (--c->exchanges_left > 0 && now_ms() < load_end_ms) {
            load_begin_exchange(epoll_fd, t, c);
        } else {
            c->state = LOAD_CLOSING;                /* half-close, await FIN */
            shutdown(c->fd, SHUT_WR);
        }
    }
}

static void *load_thread_run(void *argument)
{
    struct load_thread *t = argument;
    struct load_conn *conns = calloc((size_t)t->connections, sizeof *conns);
    t->pending = calloc((size_t)t->connections, sizeof *t->pending);
    int epoll_fd = epoll_create1(0);
    if (conns == NULL || t->pending == NULL || epoll_fd < 0)
        die("load: setup");
    for (int i = 0; i < t->connections; i++)
        conns[i].fd = -1;
    for (int i = 0; i < t->connections; i++)
        load_connect(epoll_fd, t, &conns[i]);

    struct epoll_event events[256];
    long long last_stall_check_ms = now_ms();
    for (;;) {
        long long now = now_ms();
        if (t->open == 0 && now >= load_end_ms)
            break;
        if (now >= load_drain_ms) {                 /* bounded: give up */
            for (int i = 0; i < t->connections; i++)
                if (conns[i].fd >= 0) {
                    t->totals.stalls++;
                    load_finish(epoll_fd, t, &conns[i], true);
                }
            break;
        }
        int ready = epoll_wait(epoll_fd, events, 256, 100);
        for (int i = 0; i < ready; i++) {
            struct load_conn *c = events[i].data.ptr;
            if (c->fd >= 0)
                load_step(epoll_fd, t, c, events[i].events);
        }
        while (t->pending_count > 0 && now_ms() < load_end_ms)
            load_connect(epoll_fd, t, t->pending[--t->pending_count]);
        t->pending_count = 0;
        if (now - last_stall_check_ms >= 1000) {    /* no progress: failed */
            last_stall_check_ms = now;
            for (int i = 0; i < t->connections; i++)
                if (conns[i].fd >= 0 &&
                    now - conns[i].progress_ms > STALL_SECONDS * 1000LL) {
                    t->totals.stalls++;
                    load_finish(epoll_fd, t, &conns[i], true);
                }
        }
    }
    close(epoll_fd);
    free(t->pending);
    free(conns);
    return NULL;
}

static int load_main(int port, int connections, int seconds, int threads,
                     uint64_t seed)
{
    load_port = port;
    signal(SIGPIPE, SIG_IGN);
    long long start_ms = now_ms();
    load_end_ms = start_ms + seconds * 1000LL;
    load_drain_ms = load_end_ms + DRAIN_SECONDS * 1000LL;
    struct load_thread *workers = calloc((size_t)threads, sizeof *workers);
    if (workers == NULL)
        die("calloc");
    for (int i = 0; i < threads; i++) {
        workers[i].connections = connections / threads +
                                 (i < connections % threads);
        workers[i].rng = mix64(seed + (uint64_t)i) | 1;
        if (pthread_create(&workers[i].thread, NULL, load_thread_run,
                           &workers[i]) != 0)
            die("pthread_create");
    }
    struct load_totals sum = {0};
    for (int i = 0; i < threads; i++) {
        pthread_join(workers[i].thread, NULL);
        struct load_totals *w = &workers[i].totals;
        sum.connections += w->connections;
        sum.exchanges += w->exchanges;
        sum.bytes_sent += w->bytes_sent;
        sum.bytes_received += w->bytes_received;
        sum.bytes_lost += w->bytes_lost;
        sum.bytes_corrupted += w->bytes_corrupted;
        sum.connect_failures += w->connect_failures;
        sum.resets += w->resets;
        sum.early_closes += w->early_closes;
        sum.stalls += w->stalls;
    }
    double elapsed_s = (now_ms() - start_ms) / 1000.0;
    printf("load seconds=%.1f connections=%ld exchanges=%ld bytes_sent=%ld "
           "bytes_received=%ld bytes_lost=%ld bytes_corrupted=%ld "
           "connect_failures=%ld resets=%ld early_closes=%ld stalls=%ld "
           "mib_per_s=%.1f\n",
           elapsed_s, sum.connections, sum.exchanges, sum.bytes_sent,
           sum.bytes_received, sum.bytes_lost, sum.bytes_corrupted,
           sum.connect_failures, sum.resets, sum.early_closes, sum.stalls,
           (sum.bytes_sent + sum.bytes_received) / elapsed_s / 1048576.0);
    free(workers);
    bool clean = sum.exchanges > 0 && sum.bytes_lost == 0 &&
                 sum.bytes_corrupted == 0 && sum.connect_failures == 0 &&
                 sum.resets == 0 && sum.early_closes == 0 && sum.stalls == 0;
    return clean ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "echo") == 0)
        return echo_main(atoi(argv[2]), atoi(argv[3]));
    if (argc == 7 && strcmp(argv[1], "load") == 0)
        return load_main(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]),
                         atoi(argv[5]), strtoull(argv[6], NULL, 10));
    fprintf(stderr, "usage: soak_load echo PORT THREADS\n"
                    "       soak_load load PORT CONNECTIONS SECONDS THREADS SEED\n");
    return 2;
}
