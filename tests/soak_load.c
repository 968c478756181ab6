/*
 * soak_load.c - the two ends of tests/soak.sh: an echo server that stands
 * in for WhatsApp's chat servers, and a load generator that keeps thousands
 * of connections busy through whatsapp_proxy and checks every byte.
 *
 *   soak_load echo PORT THREADS
 *       Listens on 127.0.0.1:PORT. Each connection: read the PROXY header
 *       (v1 or v2; exactly the header, not one byte more), then echo every
 *       byte back until the client closes. It counts how each connection
 *       ended: with the client's FIN (read returns 0), with a reset
 *       (ECONNRESET, or EPIPE on a write), with another error, or closed
 *       here for a malformed header. On SIGTERM it prints its counters
 *       ("echo key=value ...") and exits.
 *
 *   soak_load load PORT CONNECTIONS SECONDS THREADS SEED
 *       Keeps CONNECTIONS connections to 127.0.0.1:PORT open for SECONDS.
 *       On each connection, exchanges one after another: send N bytes
 *       (N random, 1 byte to 256 KiB, spread evenly over the powers of two
 *       so small and large exchanges are both common) while reading the
 *       echo, and compare it byte for byte with what was sent. After a
 *       random number of exchanges (1 to 32) the connection ends, and a
 *       new connection takes its place. The traffic is made of what phones
 *       really do, not only of polite exchanges:
 *         - pauses: 1 exchange in 8 stops reading its echo at a random
 *           point, for 0.2 to 2.5 s (a phone busy elsewhere, or in a
 *           tunnel), then reads on; every byte must still come;
 *         - how a connection ends, drawn when it opens:
 *           11 in 16 half-close after the echo of their last exchange has
 *           fully come back, then wait for the proxy's FIN;
 *           4 in 16 half-close right after *sending* their last exchange,
 *           read the rest of its echo, then the FIN: a half-close must
 *           not cut the answer short. Half of them pause 0.2 to 2.5 s
 *           after the half-close, often longer than the proxy's 1 s
 *           --timeout-fin, which must time a silence, never a reader;
 *           1 in 16 abort in the middle of their last exchange: a reset
 *           (SO_LINGER 0, then close), a phone that vanished. That
 *           exchange's bytes are counted apart (aborted_bytes_*), never as
 *           lost, so that bytes_sent = bytes_received stays an exact check
 *           of everything else.
 *         - big echoes: in each load thread, the first 4 connections
 *           that half-close before their echo is back make their last
 *           exchange 16 MiB and pause a full 2.5 s at the half-close. Why:
 *           on loopback the kernel gives each socket up to 4 MiB of send
 *           buffer, so a 256 KiB echo always fits in the sockets around
 *           the proxy, and a proxy that wrongly closed the pair at its
 *           --timeout-fin would still deliver it all. 16 MiB cannot fit,
 *           and the proxy must keep the pair while it waits. A relay with
 *           that mistake, tried here, lost bytes on 8 big echoes out of
 *           8; with 256 KiB echoes, on 2 pauses out of 34.
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
#define PAUSE_ONE_IN 8          /* 1 exchange in 8 pauses its reading */
#define PAUSE_MIN_MS 200        /* a pause lasts 0.2 s ... */
#define PAUSE_MAX_MS 2500       /* ... to 2.5 s: past the proxy's 1 s --timeout-fin */
#define ENDING_DRAW 16          /* how a connection ends, drawn 1 in 16: */
#define ENDING_ABORTS 1         /*   1 in 16 abort with a reset */
#define ENDING_EARLY 4          /*   4 in 16 half-close before their echo is back */
#define EARLY_PAUSE_ONE_IN 2    /* of those, 1 in 2 pause after the half-close */
#define EARLY_RECEIVE_BUFFER 16384 /* SO_RCVBUF of those (see load_connect) */
#define BIG_ECHOES 4            /* per load thread: the first 4 of those pause */
#define BIG_ECHO_BYTES (16 * 1024 * 1024) /* with a 16 MiB echo to come */
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
    /* How connections ended, seen from here: each one counts once. */
    atomic_long ended_fin;      /* the client's FIN: read returned 0 */
    atomic_long ended_reset;    /* ECONNRESET on a read or write, or EPIPE */
    atomic_long ended_error;    /* any other error */
    atomic_long ended_here;     /* we closed it: a malformed header */
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

/* Counts how a connection ended after a failed read or write. A reset
 * shows as ECONNRESET; a write after the reset has been reported once
 * says EPIPE instead. Anything else is an error we did not expect. */
static void echo_count_error(int error)
{
    if (error == ECONNRESET || error == EPIPE)
        atomic_fetch_add(&echo_counters.ended_reset, 1);
    else
        atomic_fetch_add(&echo_counters.ended_error, 1);
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
                echo_count_error(errno);
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
            if (n < 0) {
                echo_count_error(errno);
            } else {
                /* The FIN comes after every byte of the client's, and we
                 * only read once all we had was echoed: nothing is left. */
                atomic_fetch_add(&echo_counters.ended_fin, 1);
                if (c->state == ECHO_HEADER && c->have == 0)
                    atomic_fetch_add(&echo_counters.empty, 1);
                else if (c->state == ECHO_HEADER)
                    atomic_fetch_add(&echo_counters.header_bad, 1);
            }
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
                atomic_fetch_add(&echo_counters.ended_here, 1);
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
           "header_missing=%ld header_bad=%ld empty=%ld bytes=%ld "
           "ended_fin=%ld ended_reset=%ld ended_error=%ld ended_here=%ld\n",
           atomic_load(&echo_counters.connections),
           atomic_load(&echo_counters.header_v2),
           atomic_load(&echo_counters.header_v1),
           atomic_load(&echo_counters.header_local),
           atomic_load(&echo_counters.header_missing),
           atomic_load(&echo_counters.header_bad),
           atomic_load(&echo_counters.empty),
           atomic_load(&echo_counters.bytes),
           atomic_load(&echo_counters.ended_fin),
           atomic_load(&echo_counters.ended_reset),
           atomic_load(&echo_counters.ended_error),
           atomic_load(&echo_counters.ended_here));
    fflush(stdout);
    _exit(0); /* the echo threads never end by themselves */
}

/* ==== 3. Load generator ==== */

enum load_state {
    LOAD_CONNECTING,  /* non-blocking connect() in progress */
    LOAD_EXCHANGING,  /* sending and reading back one exchange */
    LOAD_CLOSING,     /* write side shut, echo all in; waiting for the FIN */
};

/* How a connection ends, drawn when it opens (see the top of the file). */
enum load_ending {
    ENDS_AFTER_ECHO,  /* half-close once the last echo is all back */
    ENDS_BEFORE_ECHO, /* half-close right after sending the last exchange */
    ENDS_ABORTED,     /* reset in the middle of the last exchange */
};

#define NO_PAUSE SIZE_MAX       /* pause_at of an exchange that does not pause */

struct load_conn {
    int fd;
    enum load_state state;
    enum load_ending ending;
    int exchanges_left;         /* before this connection ends */
    uint32_t watched;           /* what epoll watches on fd; 0: not in epoll */
    bool last;                  /* the current exchange is the last one */
    bool write_shut;            /* shutdown(SHUT_WR) done: our FIN is sent */
    uint64_t seed;              /* of the current exchange */
    size_t size, sent, received;
    size_t pause_at;            /* pause once this much echo is in, or NO_PAUSE */
    bool pause_after_shut;      /* ... and not before the half-close */
    size_t abort_at;            /* reset once this much echo is in, or 0 */
    bool big_echo;              /* this exchange: 16 MiB, paused 2.5 s */
    bool paused;                /* not reading until paused_until_ms */
    long long paused_until_ms;
    int paused_index;           /* its place in load_thread.paused */
    long long progress_ms;      /* last time a byte moved (or a pause ended) */
};

struct load_totals {
    long connections, exchanges;
    long bytes_sent, bytes_received; /* of exchanges that were not aborted */
    long bytes_lost;            /* sent but never echoed */
    long bytes_corrupted;       /* echoed but different, or extra */
    long connect_failures, resets, early_closes, stalls;
    long pauses;                /* reads paused mid-echo, before a half-close */
    long pauses_after_half_close; /* reads paused after our half-close */
    long pause_ms;              /* the length of all those pauses */
    long half_closes_mid_echo;  /* half-closed with the last echo on its way */
    long big_echo_pauses;       /* of those, paused 2.5 s with 16 MiB to come */
    long aborts;                /* connections we ended with a reset */
    long aborted_bytes_sent;    /* the bytes of their last exchange: not */
    long aborted_bytes_received; /* counted in bytes_sent/bytes_received */
};

struct load_thread {
    pthread_t thread;
    int connections;            /* to keep open */
    int open;                   /* open now */
    struct load_conn **pending; /* closed, to reconnect after this batch */
    int pending_count;
    struct load_conn **paused;  /* pausing now, in no particular order */
    int paused_count;
    int big_echoes_left;        /* BIG_ECHOES at the start */
    uint64_t rng;
    struct load_totals totals;
    uint8_t sent_copy[IO_CHUNK], received[IO_CHUNK];
};

static int load_port;
static long long load_end_ms;   /* no new exchange after this */
static long long load_drain_ms; /* everything still open fails after this */

/* Asks epoll to watch on c exactly what it waits for now, and calls
 * epoll_ctl() only when that changes. A pause takes EPOLLIN away: a level-
 * triggered EPOLLIN left on would wake us for bytes we refuse to read, over
 * and over. With nothing left to watch, the socket leaves epoll altogether
 * (an empty mask would still report EPOLLHUP, again and again, once the
 * proxy's FIN is in while we pause after our own). */
static void load_watch(int epoll_fd, struct load_conn *c)
{
    uint32_t wanted;
    if (c->state == LOAD_CONNECTING) {
        wanted = EPOLLOUT;
    } else {
        wanted = c->paused ? 0 : EPOLLIN;
        if (c->state == LOAD_EXCHANGING && c->sent < c->size)
            wanted |= EPOLLOUT;    /* a pause stops reading, not sending */
    }
    if (wanted == c->watched)
        return;
    struct epoll_event e = {.events = wanted, .data.ptr = c};
    if (c->watched == 0)
        epoll_ctl(epoll_fd, EPOLL_CTL_ADD, c->fd, &e);
    else if (wanted == 0)
        epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
    else
        epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &e);
    c->watched = wanted;
}

/* Starts a non-blocking connect of c to the proxy, and draws how it will
 * end. */
static bool load_connect(int epoll_fd, struct load_thread *t,
                         struct load_conn *c)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) {
        t->totals.connect_failures++;
        return false;
    }
    unsigned draw = (unsigned)(next_random(&t->rng) % ENDING_DRAW);
    c->ending = draw < ENDING_ABORTS                  ? ENDS_ABORTED
                : draw < ENDING_ABORTS + ENDING_EARLY ? ENDS_BEFORE_ECHO
                                                      : ENDS_AFTER_ECHO;
    if (c->ending == ENDS_BEFORE_ECHO) {
        /* A small receive buffer, set before connect() so that the window
         * offered is small from the start. Left to the kernel, this
         * socket's buffer would grow to several MiB, and the echo we leave
         * unread while we pause after our half-close would wait here
         * instead of on the proxy's side, where it tests the proxy. */
        int bytes = EARLY_RECEIVE_BUFFER;
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
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
    c->watched = 0;
    c->write_shut = false;
    c->paused = false;
    c->progress_ms = now_ms();
    load_watch(epoll_fd, c);
    t->totals.connections++;
    t->open++;
    return true;
}

/* Draws the next exchange of c: its bytes, whether it pauses and where,
 * and, if it is the last of an aborting connection, where it aborts. */
static void load_begin_exchange(int epoll_fd, struct load_thread *t,
                                struct load_conn *c)
{
    c->state = LOAD_EXCHANGING;
    c->seed = next_random(&t->rng);
    c->size = exchange_size(&t->rng);
    c->sent = c->received = 0;
    c->last = c->exchanges_left <= 1 || now_ms() >= load_end_ms;
    c->pause_at = NO_PAUSE;
    c->pause_after_shut = false;
    c->abort_at = 0;
    c->big_echo = false;
    /* The big echoes: see the top of the file. Their pause begins at
     * the half-close and lasts PAUSE_MAX_MS. */
    if (c->last && c->ending == ENDS_BEFORE_ECHO && t->big_echoes_left > 0) {
        t->big_echoes_left--;
        c->big_echo = true;
        c->size = BIG_ECHO_BYTES;
        c->pause_at = 0;
        c->pause_after_shut = true;
        load_watch(epoll_fd, c);
        return;
    }
    /* A pause point anywhere in the echo, from before its first byte to
     * just before its last: the reader stops with the echo under way. */
    if (c->last && c->ending == ENDS_BEFORE_ECHO &&
        next_random(&t->rng) % EARLY_PAUSE_ONE_IN == 0) {
        c->pause_at = next_random(&t->rng) % c->size;
        c->pause_after_shut = true;
    } else if (next_random(&t->rng) % PAUSE_ONE_IN == 0) {
        c->pause_at = next_random(&t->rng) % c->size;
    }
    /* The abort comes once 1 to all bytes of the echo are in: the proxy
     * has surely connected its upstream by then, and bytes are usually
     * still on their way both ways. */
    if (c->last && c->ending == ENDS_ABORTED)
        c->abort_at = 1 + next_random(&t->rng) % c->size;
    load_watch(epoll_fd, c);
}

/* Takes c off the list of pausing connections (swapping the list's last
 * one into its place). Does not change what epoll watches. */
static void load_unpause(struct load_thread *t, struct load_conn *c)
{
    struct load_conn *moved = t->paused[--t->paused_count];
    t->paused[c->paused_index] = moved;
    moved->paused_index = c->paused_index;
    c->paused = false;
}

/* Stops reading c for PAUSE_MIN_MS to PAUSE_MAX_MS; the thread's loop
 * ends the pause (see load_thread_run()). The echo piles up in the
 * sockets and in the proxy, which must keep every byte for us. */
static void load_pause(int epoll_fd, struct load_thread *t,
                       struct load_conn *c)
{
    long length = c->big_echo
                      ? PAUSE_MAX_MS
                      : PAUSE_MIN_MS + (long)(next_random(&t->rng) %
                                              (PAUSE_MAX_MS - PAUSE_MIN_MS + 1));
    c->pause_at = NO_PAUSE;                 /* one pause per exchange */
    c->paused = true;
    c->paused_until_ms = now_ms() + length;
    c->paused_index = t->paused_count;
    t->paused[t->paused_count++] = c;
    if (c->write_shut)
        t->totals.pauses_after_half_close++;
    else
        t->totals.pauses++;
    t->totals.big_echo_pauses += c->big_echo;
    t->totals.pause_ms += length;
    load_watch(epoll_fd, c);
}

/* Whether c's pause is due now: its point in the echo reached (and the
 * echo not complete), and for a pause that waits for the half-close, the
 * half-close done. */
static bool load_pause_due(const struct load_conn *c)
{
    return c->state == LOAD_EXCHANGING && c->pause_at != NO_PAUSE &&
           c->received >= c->pause_at && c->received < c->size &&
           (c->write_shut || !c->pause_after_shut);
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
    if (c->paused)
        load_unpause(t, c);
    if (c->watched != 0)
        epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
    c->watched = 0;
    close(c->fd);
    c->fd = -1;
    t->open--;
    if (now_ms() < load_end_ms)
        t->pending[t->pending_count++] = c;
}

/* Ends c with a reset in the middle of its exchange, as a phone that
 * vanishes: a zero linger time makes close() send RST instead of FIN, and
 * drop whatever is still unread or unsent. Not a failure, and its bytes
 * in flight are not lost: they were counted apart from the start. The
 * proxy should pass the reset on (the echo server counts ended_reset). */
static void load_abort(int epoll_fd, struct load_thread *t,
                       struct load_conn *c)
{
    struct linger reset_now = {.l_onoff = 1, .l_linger = 0};
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &reset_now, sizeof reset_now);
    t->totals.aborts++;
    load_finish(epoll_fd, t, c, false);
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
    bool aborting = c->abort_at > 0;    /* its bytes are counted apart */
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
            if (aborting)
                t->totals.aborted_bytes_sent += n;
            else
                t->totals.bytes_sent += n;
            c->progress_ms = now_ms();
        }
        if (c->sent == c->size) {               /* only reading now */
            if (c->last && c->ending == ENDS_BEFORE_ECHO) {
                /* Half-close at once, the echo still on its way: the
                 * proxy passes our FIN on to the echo server, and must
                 * still bring us every byte of the echo before its own. */
                shutdown(c->fd, SHUT_WR);
                c->write_shut = true;
                t->totals.half_closes_mid_echo++;
                if (load_pause_due(c)) {
                    load_pause(epoll_fd, t, c);
                    return;
                }
            }
            load_watch(epoll_fd, c);
        }
    }
    /* A pausing connection reads nothing, even for an event that was
     * already in this batch when the pause began. */
    if (c->paused || !(events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
        return;
    if (load_pause_due(c)) {
        load_pause(epoll_fd, t, c);
        return;
    }
    /* Read no further than a pause point or an abort point ahead, so
     * that the pause or the abort comes exactly there, with the rest of
     * the echo still on its way (a 64 KiB read would often take it all). */
    size_t want = IO_CHUNK;
    if (c->state == LOAD_EXCHANGING && c->pause_at != NO_PAUSE &&
        (c->write_shut || !c->pause_after_shut) && c->pause_at > c->received &&
        c->pause_at - c->received < want)
        want = c->pause_at - c->received;
    if (aborting && c->abort_at > c->received &&
        c->abort_at - c->received < want)
        want = c->abort_at - c->received;
    ssize_t n = recv(c->fd, t->received, want, 0);
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
        if (aborting)
            t->totals.aborted_bytes_received += (long)compare;
        else
            t->totals.bytes_received += (long)compare;
    }
    t->totals.bytes_corrupted += (long)((size_t)n - compare); /* extra bytes */
    if (aborting && c->received >= c->abort_at) {
        load_abort(epoll_fd, t, c);
        return;
    }
    if (load_pause_due(c)) {
        load_pause(epoll_fd, t, c);
        return;
    }
    if (c->state == LOAD_EXCHANGING && c->received == c->size) {
        t->totals.exchanges++;
        if (!c->last && now_ms() < load_end_ms) {
            c->exchanges_left--;
            load_begin_exchange(epoll_fd, t, c);
        } else {
            c->state = LOAD_CLOSING;                /* half-close, await FIN */
            if (!c->write_shut) {
                shutdown(c->fd, SHUT_WR);
                c->write_shut = true;
            }
            load_watch(epoll_fd, c);
        }
    }
}

static void *load_thread_run(void *argument)
{
    struct load_thread *t = argument;
    struct load_conn *conns = calloc((size_t)t->connections, sizeof *conns);
    t->pending = calloc((size_t)t->connections, sizeof *t->pending);
    t->paused = calloc((size_t)t->connections, sizeof *t->paused);
    int epoll_fd = epoll_create1(0);
    if (conns == NULL || t->pending == NULL || t->paused == NULL ||
        epoll_fd < 0)
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
        /* At most 100 ms asleep: that is how late a pause may end. */
        int ready = epoll_wait(epoll_fd, events, 256, 100);
        for (int i = 0; i < ready; i++) {
            struct load_conn *c = events[i].data.ptr;
            if (c->fd >= 0)
                load_step(epoll_fd, t, c, events[i].events);
        }
        while (t->pending_count > 0 && now_ms() < load_end_ms)
            load_connect(epoll_fd, t, t->pending[--t->pending_count]);
        t->pending_count = 0;
        /* Pauses that are over: watch the socket again. Bytes that came
         * in meanwhile wake the next epoll_wait() at once. Each turn takes
         * one off the list or moves on, so the walk is bounded. */
        long long after = now_ms();
        for (int i = 0; i < t->paused_count;) {
            struct load_conn *c = t->paused[i];
            if (after < c->paused_until_ms) {
                i++;
                continue;
            }
            load_unpause(t, c);
            c->progress_ms = after;     /* the pause is not a stall */
            load_watch(epoll_fd, c);
        }
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
    free(t->paused);
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
        workers[i].big_echoes_left = BIG_ECHOES;
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
        sum.pauses += w->pauses;
        sum.pauses_after_half_close += w->pauses_after_half_close;
        sum.pause_ms += w->pause_ms;
        sum.half_closes_mid_echo += w->half_closes_mid_echo;
        sum.big_echo_pauses += w->big_echo_pauses;
        sum.aborts += w->aborts;
        sum.aborted_bytes_sent += w->aborted_bytes_sent;
        sum.aborted_bytes_received += w->aborted_bytes_received;
    }
    double elapsed_s = (now_ms() - start_ms) / 1000.0;
    printf("load seconds=%.1f connections=%ld exchanges=%ld bytes_sent=%ld "
           "bytes_received=%ld bytes_lost=%ld bytes_corrupted=%ld "
           "connect_failures=%ld resets=%ld early_closes=%ld stalls=%ld "
           "pauses=%ld pauses_after_half_close=%ld pause_s=%.1f "
           "half_closes_mid_echo=%ld big_echo_pauses=%ld aborts=%ld "
           "aborted_bytes_sent=%ld "
           "aborted_bytes_received=%ld mib_per_s=%.1f\n",
           elapsed_s, sum.connections, sum.exchanges, sum.bytes_sent,
           sum.bytes_received, sum.bytes_lost, sum.bytes_corrupted,
           sum.connect_failures, sum.resets, sum.early_closes, sum.stalls,
           sum.pauses, sum.pauses_after_half_close, sum.pause_ms / 1000.0,
           sum.half_closes_mid_echo, sum.big_echo_pauses, sum.aborts,
           sum.aborted_bytes_sent,
           sum.aborted_bytes_received,
           (sum.bytes_sent + sum.bytes_received + sum.aborted_bytes_sent +
            sum.aborted_bytes_received) / elapsed_s / 1048576.0);
    free(workers);
    bool clean = sum.exchanges > 0 && sum.bytes_lost == 0 &&
                 sum.bytes_corrupted == 0 && sum.connect_failures == 0 &&
                 sum.resets == 0 && sum.early_closes == 0 && sum.stalls == 0 &&
                 sum.bytes_sent == sum.bytes_received;
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
