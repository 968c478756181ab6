/*
 * fuzz_proxyhdr.c - libFuzzer target for proxyhdr_decode() (section 4).
 *
 * On an accept-proxy listener the first bytes of a connection are read as a
 * PROXY header. Without a load balancer in front, anyone on the Internet can
 * send them, so proxyhdr_decode() is the first code that meets a stranger's
 * bytes. It must survive any input. Besides "no crash, no sanitizer report",
 * this target checks the promises of whatsapp_proxy.h:
 *
 *   1. the result is -1, 0, or a header length no longer than the input;
 *   2. a header of n bytes decodes the same from exactly those n bytes (the
 *      decoder never looks past the header: those bytes are the client's);
 *   3. every shorter beginning of that header gives 0, "read more" (the
 *      proxy decodes whatever has arrived so far, so a -1 there would drop
 *      a good client whose header came in two pieces);
 *   4. the addresses, written again with proxyhdr_encode_v1() and
 *      proxyhdr_encode_v2(), decode back to the same addresses.
 *
 * Run it: make -C fuzz run-proxyhdr (see fuzz/README.md).
 */

#include "../whatsapp_proxy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Stops the fuzzer with one line naming the broken promise. libFuzzer sees
 * the abort() as a crash and saves the input that caused it. */
static void expect(bool holds, const char *promise)
{
    if (holds)
        return;
    fprintf(stderr, "fuzz_proxyhdr: broken promise: %s\n", promise);
    abort();
}

/* True when both say the same: both unknown, or the same two addresses.
 * The decoder clears a whole sockaddr_storage before filling it, so
 * comparing the bytes is exact. */
static bool same_addresses(const struct proxy_addresses *a,
                           const struct proxy_addresses *b)
{
    if (a->known != b->known)
        return false;
    if (!a->known)
        return true;
    return memcmp(&a->source, &b->source, sizeof a->source) == 0 &&
           memcmp(&a->destination, &b->destination,
                  sizeof a->destination) == 0;
}

/* Encodes addresses with encode (v1 or v2), decodes the result and checks
 * that the same addresses come back (promise 4). */
static void expect_round_trip(const struct proxy_addresses *addresses,
                              size_t (*encode)(const struct proxy_addresses *,
                                               uint8_t *, size_t),
                              const char *promise)
{
    uint8_t encoded[PROXYHDR_ENCODED_MAX_BYTES];
    size_t length = encode(addresses, encoded, sizeof encoded);
    struct proxy_addresses again = {0};
    expect(proxyhdr_decode(encoded, length, &again) == (int)length, promise);
    expect(same_addresses(addresses, &again), promise);
}

/* Called by libFuzzer once per input. data is a heap copy of exactly size
 * bytes, so AddressSanitizer reports any read past its end. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* Zeroed: proxyhdr_encode_v2() reads the family even when !known. */
    struct proxy_addresses decoded = {0};
    int length = proxyhdr_decode(data, size, &decoded);
    expect(length >= -1 && (length <= 0 || (size_t)length <= size),
           "1: the result is -1, 0 or at most the input's length");
    if (length <= 0)
        return 0;
    expect(length <= PROXYHDR_V2_MAX_BYTES,
           "1: no header is longer than PROXYHDR_V2_MAX_BYTES");

    /* Promise 2, on a heap block of exactly the header, so that a read of
     * even one byte past the header's end is reported. */
    uint8_t *header = malloc((size_t)length);
    expect(header != NULL, "memory for a copy of the header");
    memcpy(header, data, (size_t)length);
    struct proxy_addresses alone = {0};
    expect(proxyhdr_decode(header, (size_t)length, &alone) == length,
           "2: the header alone decodes to the same length");
    expect(same_addresses(&decoded, &alone),
           "2: the header alone decodes to the same addresses");

    /* Promise 3: every beginning of the header is a valid beginning. */
    for (size_t have = 0; have < (size_t)length; have++) {
        struct proxy_addresses ignored = {0};
        expect(proxyhdr_decode(header, have, &ignored) == 0,
               "3: a beginning of a good header asks for more bytes");
    }
    free(header);

    /* Promise 4. UNKNOWN and LOCAL come back as unknown from both. */
    expect_round_trip(&decoded, proxyhdr_encode_v1,
                      "4: encode_v1 then decode gives the same addresses");
    expect_round_trip(&decoded, proxyhdr_encode_v2,
                      "4: encode_v2 then decode gives the same addresses");
    return 0;
}
