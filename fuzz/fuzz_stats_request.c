/*
 * fuzz_stats_request.c - libFuzzer target for stats_request_parse()
 * (section 12).
 *
 * The statistics server listens on loopback by default, but an operator may
 * open it to a network (--stats 0.0.0.0:8199), and then anyone can send it
 * bytes. stats_request_parse() reads them as an HTTP request. Besides "no
 * crash, no sanitizer report", this target checks that:
 *
 *   1. the result is one of the five values of enum stats_request;
 *   2. on GET or HEAD the path is NUL-terminated inside its buffer, starts
 *      with '/', and holds only printable ASCII without '?' (the answer is
 *      chosen by comparing this path, and the HTML page may show it).
 *
 * The path buffer is a heap block of exactly path_size bytes, so that
 * AddressSanitizer reports a write of even one byte past it. Each input is
 * parsed twice: with the 256 bytes the proxy uses, and with a small size
 * taken from the input's length, so that paths that only just fit (or
 * only just do not) get tried too.
 *
 * Run it: make -C fuzz run-stats_request (see fuzz/README.md).
 */

#include "../whatsapp_proxy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The path buffer of stats_client_serve() in whatsapp_proxy.c. */
#define PROXY_PATH_BYTES 256

/* Stops the fuzzer with one line naming the broken promise. libFuzzer sees
 * the abort() as a crash and saves the input that caused it. */
static void expect(bool holds, const char *promise)
{
    if (holds)
        return;
    fprintf(stderr, "fuzz_stats_request: broken promise: %s\n", promise);
    abort();
}

/* Parses data into a fresh path buffer of path_size bytes and checks the
 * promises above. */
static void parse_and_check(const uint8_t *data, size_t size,
                            size_t path_size)
{
    char *path = malloc(path_size);
    expect(path != NULL, "memory for the path");
    /* Not a NUL anywhere: a path left unterminated would show. */
    memset(path, '#', path_size);

    int result = stats_request_parse(data, size, path, path_size);
    expect(result >= STATS_REQUEST_METHOD_NOT_ALLOWED &&
           result <= STATS_REQUEST_HEAD,
           "1: the result is a value of enum stats_request");

    if (result == STATS_REQUEST_GET || result == STATS_REQUEST_HEAD) {
        const char *end = memchr(path, '\0', path_size);
        expect(end != NULL, "2: the path is NUL-terminated in its buffer");
        expect(path[0] == '/', "2: the path starts with '/'");
        for (const char *p = path; p < end; p++)
            expect(*p > ' ' && *p < 0x7F && *p != '?',
                   "2: the path is printable ASCII without '?'");
    }
    free(path);
}

/* Called by libFuzzer once per input. data is a heap copy of exactly size
 * bytes, so AddressSanitizer reports any read past its end. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    parse_and_check(data, size, PROXY_PATH_BYTES);
    parse_and_check(data, size, 1 + size % 16);
    return 0;
}
