/*
 * fuzz_command_line.c - libFuzzer target for the command line (section 3):
 * settings_parse(), listener_spec_parse(), host_port_parse() and
 * seconds_parse().
 *
 * Flags come from the operator, not from strangers, but they arrive through
 * systemd options files, scripts and copy-and-paste from chat messages, and
 * a parser that writes past a fixed field (host names, paths, --listen
 * addresses) is a bug whoever types the text. Each input is used twice:
 *
 *   1. as argv: the input is split at NUL bytes, the way /proc/PID/cmdline
 *      stores a command line ("--listen\0" "443/tls\0"), after the program
 *      name, and given to settings_parse() on fresh default settings;
 *   2. as one C string (up to its first NUL) given to each small parser.
 *
 * Every string is a heap block of exactly its size, so AddressSanitizer
 * reports a read of even one byte past its end. Besides "no crash, no
 * sanitizer report", the target checks the contracts in whatsapp_proxy.h:
 * a failure writes a terminated, non-empty message into error; a success
 * gives a terminated host or address, no /tls on a media port, a port other
 * than 0 to dial, and a duration of at least 1 ms.
 *
 * Run it: make -C fuzz run-command_line (see fuzz/README.md).
 */

#include "../whatsapp_proxy.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* main() in whatsapp_proxy.c gives settings_parse() this much room. */
#define ERROR_BYTES 512
/* The host field of an upstream in whatsapp_proxy.c (HOST_NAME_BYTES). */
#define HOST_BYTES 256

/* Stops the fuzzer with one line naming the broken promise. libFuzzer sees
 * the abort() as a crash and saves the input that caused it. */
static void expect(bool holds, const char *promise)
{
    if (holds)
        return;
    fprintf(stderr, "fuzz_command_line: broken promise: %s\n", promise);
    abort();
}

/* Returns a heap block of size bytes with no NUL in it, so that a message
 * the parser forgot to terminate shows. The caller frees it. */
static char *unterminated_buffer(size_t size)
{
    char *buffer = malloc(size);
    expect(buffer != NULL, "memory for a buffer");
    memset(buffer, '#', size);
    return buffer;
}

/* Returns text[0..length) as a new C string in a block of exactly
 * length + 1 bytes. The caller frees it. */
static char *string_copy(const uint8_t *text, size_t length)
{
    char *copy = malloc(length + 1);
    expect(copy != NULL, "memory for a string");
    memcpy(copy, text, length);
    copy[length] = '\0';
    return copy;
}

/* Checks that a parser which failed wrote one terminated, non-empty
 * message into error (error_size bytes). */
static void expect_message(const char *error, size_t error_size,
                           const char *promise)
{
    expect(memchr(error, '\0', error_size) != NULL && error[0] != '\0',
           promise);
}

/* Part 1: the input as argv, given to settings_parse(). */
static void fuzz_settings_parse(const uint8_t *data, size_t size)
{
    /* One argument ends at each NUL; a last one without a NUL counts too. */
    size_t argument_count = 0;
    for (size_t i = 0; i < size; i++)
        if (data[i] == '\0' || i + 1 == size)
            argument_count++;

    char **argv = calloc(argument_count + 2, sizeof *argv);
    expect(argv != NULL, "memory for argv");
    int argc = 0;
    argv[argc++] = string_copy((const uint8_t *)"whatsapp_proxy", 14);
    size_t start = 0;
    for (size_t i = 0; i < size; i++) {
        if (data[i] == '\0' || i + 1 == size) {
            size_t end = data[i] == '\0' ? i : i + 1;
            argv[argc++] = string_copy(data + start, end - start);
            start = i + 1;
        }
    }
    argv[argc] = NULL; /* as in a real argv */

    struct settings *settings = settings_new();
    char *error = unterminated_buffer(ERROR_BYTES);
    enum parse_result result =
        settings_parse(settings, argc, argv, error, ERROR_BYTES);
    expect(result == PARSE_RUN || result == PARSE_EXIT_OK ||
           result == PARSE_ERROR, "settings_parse returns a parse_result");
    if (result == PARSE_ERROR)
        expect_message(error, ERROR_BYTES,
                       "settings_parse: PARSE_ERROR comes with a message");

    free(error);
    settings_free(settings);
    for (int i = 0; i < argc; i++)
        free(argv[i]);
    free(argv);
}

/* Part 2: the input up to its first NUL, given to each small parser. */
static void fuzz_small_parsers(const uint8_t *data, size_t size)
{
    const uint8_t *nul = memchr(data, '\0', size);
    char *text = string_copy(data, nul ? (size_t)(nul - data) : size);
    char *error = unterminated_buffer(ERROR_BYTES);

    struct listener_spec spec;
    if (listener_spec_parse(text, &spec, error, ERROR_BYTES) == 0) {
        expect(memchr(spec.address, '\0', sizeof spec.address) != NULL,
               "listener_spec_parse: the address is terminated");
        expect(!(spec.tls && spec.media),
               "listener_spec_parse: a media port is never /tls");
    } else {
        expect_message(error, ERROR_BYTES,
                       "listener_spec_parse: -1 comes with a message");
    }

    char *host = unterminated_buffer(HOST_BYTES);
    uint16_t port;
    memset(error, '#', ERROR_BYTES);
    if (host_port_parse(text, host, HOST_BYTES, &port, error,
                        ERROR_BYTES) == 0) {
        expect(memchr(host, '\0', HOST_BYTES) != NULL && host[0] != '\0',
               "host_port_parse: the host is terminated and not empty");
        expect(port != 0, "host_port_parse: port 0 is never accepted");
    } else {
        expect_message(error, ERROR_BYTES,
                       "host_port_parse: -1 comes with a message");
    }

    int milliseconds;
    memset(error, '#', ERROR_BYTES);
    if (seconds_parse(text, "--grace", &milliseconds, error,
                      ERROR_BYTES) == 0)
        expect(milliseconds >= 1, "seconds_parse: at least 1 ms");
    else
        expect_message(error, ERROR_BYTES,
                       "seconds_parse: -1 comes with a message");

    free(host);
    free(error);
    free(text);
}

/* Called by libFuzzer once, before the first input. --help and --version
 * print to stdout; sending stdout to /dev/null keeps the fuzzer's output
 * readable (libFuzzer itself writes to stderr). */
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    int null_fd = open("/dev/null", O_WRONLY);
    if (null_fd < 0 || dup2(null_fd, STDOUT_FILENO) < 0) {
        perror("fuzz_command_line: cannot send stdout to /dev/null");
        exit(1);
    }
    close(null_fd);
    return 0;
}

/* Called by libFuzzer once per input. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_settings_parse(data, size);
    fuzz_small_parsers(data, size);
    return 0;
}
