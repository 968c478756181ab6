/*
 * demo_upstream.c - a stand-in for WhatsApp's servers, for workshops.
 *
 * A workshop room may have no internet, and even with one, WhatsApp's
 * servers speak a protocol we cannot type by hand. This small server takes
 * their place: for every connection it prints the PROXY header that
 * whatsapp_proxy sent (or says there was none, as on media ports), then
 * sends back every byte it receives. So a student can see, on one screen,
 * what the proxy tells the server about each client.
 *
 *     make demo      starts this on 127.0.0.1:9000 and the proxy in front
 *
 * It reads the header with proxyhdr_decode() from whatsapp_proxy.c: the
 * same decoder the proxy uses on its accept-proxy ports. Read with
 * tutorial.md, Part 1 ("The offline demo").
 */

#include "../whatsapp_proxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Writes "203.0.113.7 port 40000" for an address into out. */
static void demo_address_text(const struct sockaddr_storage *address,
                              char *out, size_t out_size)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (address->ss_family == AF_INET) {
        const struct sockaddr_in *ipv4 = (const struct sockaddr_in *)address;
        inet_ntop(AF_INET, &ipv4->sin_addr, ip, sizeof ip);
        port = ntohs(ipv4->sin_port);
    } else if (address->ss_family == AF_INET6) {
        const struct sockaddr_in6 *ipv6 = (const struct sockaddr_in6 *)address;
        inet_ntop(AF_INET6, &ipv6->sin6_addr, ip, sizeof ip);
        port = ntohs(ipv6->sin6_port);
    }
    snprintf(out, out_size, "%s port %u", ip, port);
}

/* Looks at the first bytes of a new connection (without taking them), and
 * if they are a PROXY header, takes exactly the header and prints it.
 * SHORTCUT: assumes the header arrives in one piece, which is true on
 * loopback; whatsapp_proxy.c's pair_read_header() shows how to do it right. */
static void demo_print_header(int fd, unsigned connection)
{
    unsigned char first[PROXYHDR_V2_MAX_BYTES];
    ssize_t seen = recv(fd, first, sizeof first, MSG_PEEK);
    struct proxy_addresses addresses;
    int length = seen > 0 ? proxyhdr_decode(first, (size_t)seen, &addresses)
                          : -1;
    if (length <= 0) {
        printf("demo upstream: connection %u: no PROXY header "
               "(a media port, or --send-proxy none)\n", connection);
        return;
    }
    if (recv(fd, first, (size_t)length, 0) != length)
        return;
    const char *version = first[0] == 'P' ? "v1" : "v2";
    if (!addresses.known) {
        printf("demo upstream: connection %u: PROXY %s header without "
               "addresses (LOCAL or UNKNOWN)\n", connection, version);
        return;
    }
    char client[80], dialled[80];
    demo_address_text(&addresses.source, client, sizeof client);
    demo_address_text(&addresses.destination, dialled, sizeof dialled);
    printf("demo upstream: connection %u: PROXY %s header: client %s, "
           "which dialled %s\n", connection, version, client, dialled);
}

struct demo_connection {
    int fd;
    unsigned number;
};

/* Prints the header, then echoes until the client closes. A connection
 * that closes before sending anything is the proxy's health check. */
static void *demo_serve(void *argument)
{
    struct demo_connection *connection = argument;
    unsigned char buffer[16384];
    unsigned long long echoed = 0;
    if (recv(connection->fd, buffer, 1, MSG_PEEK) == 0) {
        printf("demo upstream: connection %u: a health check (connect, "
               "then close)\n", connection->number);
        close(connection->fd);
        free(connection);
        return NULL;
    }
    demo_print_header(connection->fd, connection->number);
    for (;;) {
        ssize_t got = recv(connection->fd, buffer, sizeof buffer, 0);
        if (got <= 0 || send(connection->fd, buffer, (size_t)got,
                             MSG_NOSIGNAL) != got)
            break;
        echoed += (unsigned long long)got;
    }
    printf("demo upstream: connection %u: closed after echoing %llu bytes\n",
           connection->number, echoed);
    close(connection->fd);
    free(connection);
    return NULL;
}

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 9000;
    setvbuf(stdout, NULL, _IOLBF, 0); /* one line at a time, even in a pipe */
    signal(SIGPIPE, SIG_IGN);

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int on = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    struct sockaddr_in address = {.sin_family = AF_INET,
                                  .sin_port = htons((uint16_t)port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(listener, (struct sockaddr *)&address, sizeof address) < 0 ||
        listen(listener, 64) < 0) {
        fprintf(stderr, "demo upstream: cannot listen on 127.0.0.1 port %d: "
                "%s\n", port, strerror(errno));
        return 1;
    }
    printf("demo upstream: listening on 127.0.0.1 port %d\n", port);

    for (unsigned number = 1;; number++) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0)
            continue;
        struct demo_connection *connection = malloc(sizeof *connection);
        *connection = (struct demo_connection){fd, number};
        pthread_t thread;
        pthread_create(&thread, NULL, demo_serve, connection);
        pthread_detach(thread);
    }
}
