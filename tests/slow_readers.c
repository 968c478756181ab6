/*
 * slow_readers.c - the two ends of tests/slow_readers.sh: a fast server
 * that stands in for WhatsApp's chat servers and sends as fast as it can,
 * and clients that read a few KiB from it through a proxy, then stop
 * reading and keep their connections open (slow readers that stalled).
 *
 * What it is for: a proxy between a fast sender and a slow reader must
 * not hold a megabyte for that reader, or a few hundred such connections
 * (an attacker's, or phones in a tunnel) exhaust its memory. The script
 * measures how much each stalled client costs the proxy's process, for
 * whatsapp_proxy and for HAProxy, plain and TLS.
 *
 *   slow_readers server PORT MAX_SECONDS
 *       Listens on 127.0.0.1:PORT. Each connection: read the PROXY header
 *       (v1 or v2; a connection whose first byte starts neither gets no
 *       header skipped), then send bytes as fast as the socket takes them
 *       (non-blocking, epoll), until the peer closes; anything the peer
 *       sends is read and thrown away. Byte i of each connection's stream
 *       is i % 251, so a client can check what it got. Every 200 ms it
 *       prints one line
 *           status conns=N sent=BYTES idle_ms=MS
 *       (connections open, bytes sent in all, milliseconds since a send
 *       last moved a byte): idle_ms of a second or more means the sending
 *       has stalled on every connection. Ends on SIGTERM, or after
 *       MAX_SECONDS whatever happens.
 *
 *       Its send buffer per connection is fixed at SERVER_SNDBUF (64 KiB),
 *       so that what piles up in the kernel is the proxy's, not ours.
 *
 *   slow_readers clients PORT COUNT BYTES plain|tls AT_ONCE TIMEOUT_S HOLD_S
 *       Opens COUNT connections to 127.0.0.1:PORT (with TLS: a handshake
 *       each, no certificate check), reads BYTES from each and checks
 *       them against the pattern, then stops reading that connection and
 *       leaves it open. At most AT_ONCE connections are in their opening
 *       steps (connect, handshake, first BYTES) at a time: COUNT opens all
 *       at once, as an attacker would; a small AT_ONCE makes clients
 *       arrive one after another, as phones do. When every connection
 *       has its BYTES or has failed, or after TIMEOUT_S, it prints
 *           READY ok=N failed=N bad=N ms=MS
 *       (bad: connections whose bytes did not match the pattern) and
 *       keeps the connections open, unread, until SIGTERM or for HOLD_S
 *       seconds, then exits. Exit status 0 if every connection got its
 *       bytes intact. With COUNT 1, BYTES 1048576 and HOLD_S 0 it is a
 *       fresh client that checks the proxy still serves.
 *
 *       Each client announces a maximum segment size of CLIENT_MSS (1400
 *       bytes, TCP_MAXSEG before connect), as a phone on the Internet
 *       does. Left at loopback's 64 KiB segments, the kernel would size
 *       the proxy's send buffer toward each client at about 4 MiB: 300
 *       clients then push the machine's TCP memory (tcp_mem) to its limit,
 *       where the kernel drops packets and how much the proxy itself holds
 *       swings from run to run (seen with one binary: 34 KiB per plain
 *       client in one run, 131 KiB in another).
 *
 * Build: cc -O2 -std=c11 -Wall -Wextra -pthread -o slow_readers
 *        slow_readers.c -lssl -lcrypto  (slow_readers.sh does it).
 * Linux only (epoll, accept4), like whatsapp_proxy.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define PATTERN_PERIOD 251      /* byte i of a stream is i % 251 */
#define SEND_CHUNK 65536        /* bytes per send() call */
#define TURN_BYTES (256 * 1024) /* one connection's share per ready event */
#define HEADER_MAX 1024         /* longer PROXY headers are refused */
#define V2_FIXED 16             /* PROXY v2 signature + version + family + length */
#define V1_MAX 107              /* PROXY v1 line limit, CRLF included */
#define STATUS_EVERY_MS 200     /* how often the server prints its status */
#define EVENTS 256              /* epoll events taken per call */
#define SERVER_SNDBUF 65536     /* the server's send buffer per connection */
#define CLIENT_MSS 1400         /* the segment size a client announces */

static const unsigned char V2_SIGNATURE[12] = {
    '\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};

/* Bytes 0 .. SEND_CHUNK + PATTERN_PERIOD of the pattern: the stream from
 * offset o is pattern + o % PATTERN_PERIOD, for up to SEND_CHUNK bytes. */
static unsigned char pattern[SEND_CHUNK + PATTERN_PERIOD];

static volatile sig_atomic_t stop_now;

static void on_stop(int signal_number)
{
    (void)signal_number;
    stop_now = 1;
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void *xcalloc(size_t count, size_t size)
{
    void *p = calloc(count, size);
    if (p == NULL)
        die("calloc");
    return p;
}

static struct sockaddr_in loopback(int port)
{
    struct sockaddr_in address = {.sin_family = AF_INET,
                                  .sin_port = htons((uint16_t)port)};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return address;
}

static int parse_number(const char *text, long low, long high)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || end == text || value < low ||
        value > high) {
        fprintf(stderr, "slow_readers: '%s' is not a number from %ld to %ld\n",
                text, low, high);
        exit(2);
    }
    return (int)value;
}

/* ---- The fast server ---------------------------------------------------- */

struct server_conn {
    int fd;
    bool sending;                     /* the header is behind us */
    size_t have;                      /* header bytes read so far */
    unsigned long long offset;        /* stream bytes sent so far */
    unsigned char header[HEADER_MAX];
};

static int server_open;               /* connections open */
static long long server_sent;         /* bytes sent on all of them */
static long long server_progress_ms;  /* when a send last moved a byte */

static void server_close(int epoll_fd, struct server_conn *c)
{
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
    server_open--;
}

/* Looks for a complete PROXY header at the start of c->header. Returns its
 * length (0: the stream has none), -1 if more bytes are needed, -2 if it
 * is malformed. */
static long header_length(const struct server_conn *c)
{
    if (c->header[0] == '\r') {
        size_t compare = c->have < 12 ? c->have : 12;
        if (memcmp(c->header, V2_SIGNATURE, compare) != 0)
            return -2;
        if (c->have < V2_FIXED)
            return -1;
        size_t total = V2_FIXED + ((size_t)c->header[14] << 8 | c->header[15]);
        if (total > HEADER_MAX)
            return -2;
        return c->have < total ? -1 : (long)total;
    }
    if (c->header[0] == 'P') {
        for (size_t i = 1; i < c->have && i < V1_MAX; i++)
            if (c->header[i - 1] == '\r' && c->header[i] == '\n')
                return (long)i + 1;
        return c->have >= V1_MAX ? -2 : -1;
    }
    return 0;
}

/* Reads (the header, or bytes to throw away). Returns false if c closed. */
static bool server_read(int epoll_fd, struct server_conn *c)
{
    for (int turns = 0; turns < 64; turns++) {
        unsigned char junk[4096];
        unsigned char *into = c->sending ? junk : c->header + c->have;
        size_t room = c->sending ? sizeof junk : HEADER_MAX - c->have;
        ssize_t n = recv(c->fd, into, room, 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return true;
        if (n <= 0) {                  /* the peer closed, or a reset */
            server_close(epoll_fd, c);
            return false;
        }
        if (c->sending)
            continue;
        c->have += (size_t)n;
        long length = header_length(c);
        if (length == -1 && c->have < HEADER_MAX)
            continue;
        if (length < 0) {
            server_close(epoll_fd, c);
            return false;
        }
        /* Bytes after the header are the client's data: thrown away. */
        c->sending = true;
        struct epoll_event e = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &e);
    }
    return true;
}

/* Sends until the socket takes no more, or this connection has had its
 * share of the turn. Returns false if c closed. */
static bool server_send(int epoll_fd, struct server_conn *c)
{
    size_t this_turn = 0;
    while (this_turn < TURN_BYTES) {
        ssize_t n = send(c->fd, pattern + c->offset % PATTERN_PERIOD,
                         SEND_CHUNK, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return true;
        if (n <= 0) {
            server_close(epoll_fd, c);
            return false;
        }
        c->offset += (unsigned long long)n;
        this_turn += (size_t)n;
        server_sent += n;
        server_progress_ms = now_ms();
    }
    return true;
}

static int run_server(int port, int max_seconds)
{
    int listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = loopback(port);
    if (listen_fd < 0 ||
        bind(listen_fd, (struct sockaddr *)&address, sizeof address) < 0 ||
        listen(listen_fd, 4096) < 0)
        die("server: bind/listen");
    int epoll_fd = epoll_create1(0);
    if (epoll_fd < 0)
        die("epoll_create1");
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listen_fd, &e);

    long long started = now_ms();
    long long deadline = started + (long long)max_seconds * 1000;
    long long next_status = started;
    server_progress_ms = started;
    printf("LISTENING port=%d\n", port);
    fflush(stdout);

    struct epoll_event events[EVENTS];
    while (!stop_now && now_ms() < deadline) {
        int ready = epoll_wait(epoll_fd, events, EVENTS, STATUS_EVERY_MS / 2);
        if (ready < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < ready; i++) {
            struct server_conn *c = events[i].data.ptr;
            if (c == NULL) {            /* the listening socket */
                for (int k = 0; k < 256; k++) {
                    int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0)
                        break;
                    int size = SERVER_SNDBUF;
                    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
                    struct server_conn *fresh = xcalloc(1, sizeof *fresh);
                    fresh->fd = fd;
                    struct epoll_event add = {.events = EPOLLIN,
                                              .data.ptr = fresh};
                    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &add);
                    server_open++;
                }
                continue;
            }
            uint32_t got = events[i].events;
            /* A hang-up or error shows on the read that follows. */
            if ((got & (EPOLLIN | EPOLLHUP | EPOLLERR)) &&
                !server_read(epoll_fd, c))
                continue;
            if ((got & EPOLLOUT) && c->sending)
                server_send(epoll_fd, c);
        }
        long long now = now_ms();
        if (now >= next_status) {
            printf("status conns=%d sent=%lld idle_ms=%lld\n", server_open,
                   server_sent, now - server_progress_ms);
            fflush(stdout);
            next_status = now + STATUS_EVERY_MS;
        }
    }
    printf("server conns=%d sent=%lld seconds=%lld\n", server_open,
           server_sent, (now_ms() - started) / 1000);
    return 0;
}

/* ---- The slow clients ---------------------------------------------------- */

enum client_state { CONNECTING, HANDSHAKING, READING, STALLED, FAILED };

struct client {
    int fd;
    SSL *tls;
    enum client_state state;
    size_t got;                       /* stream bytes read (and checked) */
    bool bad;                         /* a byte did not match the pattern */
};

static int clients_ok, clients_failed, clients_bad;

/* Watches c for what it needs next (EPOLLIN or EPOLLOUT). */
static void client_watch(int epoll_fd, struct client *c, uint32_t events)
{
    struct epoll_event e = {.events = events, .data.ptr = c};
    epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &e);
}

/* A client that is done with: reached its bytes (kept open, no longer
 * watched), or failed (closed). */
static void client_finish(int epoll_fd, struct client *c, bool ok)
{
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
    if (ok) {
        c->state = STALLED;
        clients_ok++;
        if (c->bad)
            clients_bad++;
        return;
    }
    c->state = FAILED;
    clients_failed++;
    if (c->tls != NULL) {
        SSL_free(c->tls);
        c->tls = NULL;
    }
    close(c->fd);
    c->fd = -1;
}

/* Moves c along as far as it goes now. */
static void client_step(int epoll_fd, struct client *c, size_t want)
{
    if (c->state == CONNECTING) {
        int error = 0;
        socklen_t length = sizeof error;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &length);
        if (error != 0) {
            client_finish(epoll_fd, c, false);
            return;
        }
        c->state = c->tls != NULL ? HANDSHAKING : READING;
    }
    if (c->state == HANDSHAKING) {
        int r = SSL_do_handshake(c->tls);
        if (r != 1) {
            int why = SSL_get_error(c->tls, r);
            if (why == SSL_ERROR_WANT_READ)
                client_watch(epoll_fd, c, EPOLLIN);
            else if (why == SSL_ERROR_WANT_WRITE)
                client_watch(epoll_fd, c, EPOLLOUT);
            else
                client_finish(epoll_fd, c, false);
            return;
        }
        c->state = READING;
    }
    while (c->state == READING) {
        unsigned char buffer[16384];
        size_t room = want - c->got < sizeof buffer ? want - c->got
                                                    : sizeof buffer;
        long n;
        if (c->tls != NULL) {
            int r = SSL_read(c->tls, buffer, (int)room);
            if (r <= 0) {
                int why = SSL_get_error(c->tls, r);
                if (why == SSL_ERROR_WANT_READ)
                    client_watch(epoll_fd, c, EPOLLIN);
                else if (why == SSL_ERROR_WANT_WRITE)
                    client_watch(epoll_fd, c, EPOLLOUT);
                else
                    client_finish(epoll_fd, c, false);
                return;
            }
            n = r;
        } else {
            n = recv(c->fd, buffer, room, 0);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                client_watch(epoll_fd, c, EPOLLIN);
                return;
            }
            if (n <= 0) {
                client_finish(epoll_fd, c, false);
                return;
            }
        }
        for (long i = 0; i < n; i++)
            if (buffer[i] != (unsigned char)((c->got + (size_t)i) % PATTERN_PERIOD))
                c->bad = true;
        c->got += (size_t)n;
        if (c->got >= want)
            client_finish(epoll_fd, c, true);  /* stop reading, stay open */
    }
}

/* Starts one client: a non-blocking connect, and its SSL object. */
static void client_open(int epoll_fd, struct client *c, SSL_CTX *context,
                        const struct sockaddr_in *address)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) {
        c->state = FAILED;
        clients_failed++;
        return;
    }
    int one = 1;
    int mss = CLIENT_MSS;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(c->fd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof mss);
    if (context != NULL) {
        c->tls = SSL_new(context);
        if (c->tls == NULL)
            die("SSL_new");
        SSL_set_fd(c->tls, c->fd);
        SSL_set_connect_state(c->tls);
    }
    c->state = CONNECTING;
    if (connect(c->fd, (const struct sockaddr *)address, sizeof *address) < 0 &&
        errno != EINPROGRESS) {
        client_finish(epoll_fd, c, false);
        return;
    }
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, c->fd, &e);
}

static int run_clients(int port, int count, size_t want, bool use_tls,
                       int at_once, int timeout_s, int hold_s)
{
    SSL_CTX *context = NULL;
    if (use_tls) {
        context = SSL_CTX_new(TLS_client_method());
        if (context == NULL)
            die("SSL_CTX_new");
        SSL_CTX_set_verify(context, SSL_VERIFY_NONE, NULL);
    }
    int epoll_fd = epoll_create1(0);
    if (epoll_fd < 0)
        die("epoll_create1");
    struct client *clients = xcalloc((size_t)count, sizeof *clients);
    struct sockaddr_in address = loopback(port);
    long long started = now_ms();
    long long deadline = started + (long long)timeout_s * 1000;
    int opened = 0;
    struct epoll_event events[EVENTS];
    while (!stop_now && clients_ok + clients_failed < count &&
           now_ms() < deadline) {
        /* Keep AT_ONCE clients in their opening steps (connect,
         * handshake, first bytes): a new one starts as one stalls. */
        while (opened < count &&
               opened - clients_ok - clients_failed < at_once)
            client_open(epoll_fd, &clients[opened++], context, &address);
        int ready = epoll_wait(epoll_fd, events, EVENTS, 100);
        if (ready < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < ready; i++) {
            struct client *c = events[i].data.ptr;
            if (c->state != STALLED && c->state != FAILED)
                client_step(epoll_fd, c, want);
        }
    }
    int unfinished = count - clients_ok - clients_failed;
    printf("READY ok=%d failed=%d bad=%d ms=%lld\n", clients_ok,
           clients_failed + unfinished, clients_bad, now_ms() - started);
    fflush(stdout);

    /* Hold the connections, unread, until told to stop (bounded). */
    for (long tick = 0; !stop_now && tick < (long)hold_s * 10; tick++) {
        struct timespec pause = {.tv_sec = 0, .tv_nsec = 100 * 1000000L};
        nanosleep(&pause, NULL);
    }
    for (int i = 0; i < opened; i++) {
        if (clients[i].tls != NULL)
            SSL_free(clients[i].tls);
        if (clients[i].fd >= 0)
            close(clients[i].fd);
    }
    free(clients);
    SSL_CTX_free(context);
    return clients_ok == count && clients_bad == 0 ? 0 : 1;
}

/* ---- main ----------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr,
            "usage: slow_readers server PORT MAX_SECONDS\n"
            "       slow_readers clients PORT COUNT BYTES plain|tls AT_ONCE TIMEOUT_S HOLD_S\n");
    exit(2);
}

int main(int argc, char **argv)
{
    for (size_t i = 0; i < sizeof pattern; i++)
        pattern[i] = (unsigned char)(i % PATTERN_PERIOD);
    struct sigaction action = {.sa_handler = on_stop};
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (argc == 4 && strcmp(argv[1], "server") == 0)
        return run_server(parse_number(argv[2], 1, 65535),
                          parse_number(argv[3], 1, 86400));
    if (argc == 9 && strcmp(argv[1], "clients") == 0) {
        bool use_tls = strcmp(argv[5], "tls") == 0;
        if (!use_tls && strcmp(argv[5], "plain") != 0)
            usage();
        return run_clients(parse_number(argv[2], 1, 65535),
                           parse_number(argv[3], 1, 100000),
                           (size_t)parse_number(argv[4], 1, 1 << 30), use_tls,
                           parse_number(argv[6], 1, 100000),
                           parse_number(argv[7], 1, 3600),
                           parse_number(argv[8], 0, 86400));
    }
    usage();
    return 2;
}
