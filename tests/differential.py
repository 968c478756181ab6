#!/usr/bin/env python3
"""differential.py - the same scripted conversations through HAProxy,
configured like the official proxy, and through whatsapp_proxy, side by
side; what each client and each upstream saw is recorded and compared.
Standard library only (Python 3.9 or newer). tests/differential.sh starts
the proxies and runs this:

    differential.py run COUNTS_FILE whatsapp_proxy=PORTS haproxy=PORTS

PORTS is six ports, comma-separated, for one proxy: its plain front, its
TLS front, its front whose upstream is dead (nothing listens there), its
front whose upstream starts late, its recording upstream, and that late
upstream's port. This program listens on the recording upstreams first,
so that HAProxy's health check at start finds one, then waits for the
fronts, then plays each scenario through both proxies at once.

A conversation begins with one line from the client, "SCENARIO name\n",
which tells the recording upstream which script to follow. The upstream
records, per connection: the source address in the PROXY v2 header (it
must be the client's own), the bytes received and their hash, the bytes
sent, and how the connection ended from where it stands. The client
records the bytes received and their hash, how it saw the end, and the
time from its connect to that end. Where a connection is half-closed and
silent, a late write (probe()) tells whether the proxy has closed it.

Ends are named the same on both sides:
    FIN                   a read returned 0: the peer ended its sending
    RST                   ECONNRESET or EPIPE: the connection was reset
    close_notify+FIN      TLS: a close_notify alert, then the TCP FIN
    FIN, no close_notify  TLS: the FIN came without a close_notify
    timeout               nothing came in time (IO_TIMEOUT_S, or the
                          scenario's own wait)
    FIN too early         a FIN before the script was done
    reset by itself, closed by itself
                          this end chose to end (the scenario's script)

Output: one "ok - ..." or "not ok - ..." line per comparison, "# ..."
lines with what was seen, and "passed=N failed=N" in COUNTS_FILE.
"""

import hashlib
import random
import select
import socket
import ssl
import struct
import sys
import threading
import time

sys.dont_write_bytecode = True   # no __pycache__ left in tests/
from peer_tool import (Report, read_line, read_proxy_header,  # noqa: E402
                       start_watchdog, wait_listening)

MIB = 1 << 20
IO_TIMEOUT_S = 15        # every socket operation here gives up after this
STARTUP_S = 10           # the longest wait for a front to listen
RECORD_WAIT_S = 10       # the longest wait for an upstream to finish a record
RUN_LIMIT_S = 150        # the whole run, or it stops itself
SIDES = ("whatsapp_proxy", "haproxy")
LATE_START_S = 2.5       # see the scenario "late-upstream"
TIME_TOLERANCE_S = 0.6   # how far two timings may differ: less than the
                         # 1 s between the events timed here
PROBE_AFTER_S = 2        # see probe()
SILENT_CLIENT_WAIT_S = 7 # see the scenario "tls-silent-client"

# The bytes that scenarios send: the same on both sides, so that hashes
# can be compared. One random MiB, repeated.
BLOCK = random.Random(1).randbytes(MIB)


def payload(size):
    return (BLOCK * (size // MIB + 1))[:size]


# ---- what one end of a connection saw -----------------------------------

class Seen:
    """What one end (a client or an upstream) saw of one connection."""

    def __init__(self):
        self.received = 0
        self.digest = hashlib.sha256()
        self.sent = 0
        self.end = "?"
        self.src = "-"           # upstream: the PROXY header's source
        self.me = "-"            # client: its own address
        self.name = "?"          # upstream: the scenario
        self.probe = "-"         # see probe()
        self.seconds = 0.0
        self.done = threading.Event()

    def take(self, data):
        self.received += len(data)
        self.digest.update(data)
        return data

    def hash(self):
        return self.digest.hexdigest()[:12]


def end_of(problem):
    """Names an exception that ended a connection, as the table above."""
    if isinstance(problem, (ConnectionResetError, BrokenPipeError)):
        return "RST"
    if isinstance(problem, socket.timeout):
        return "timeout"
    if isinstance(problem, ssl.SSLError):
        return "TLS error: %s" % (problem.reason or problem)
    if isinstance(problem, EOFError):
        return "FIN too early"
    return "error: %s" % (problem.strerror or problem)


def abort(sock):
    """Closes sock with a reset: a zero linger time makes close() send RST."""
    no_linger = struct.pack("ii", 1, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, no_linger)
    sock.close()


def probe(sock):
    """Has the proxy closed its end of this half-closed connection? A
    read cannot tell (the FIN came already), a write can: sends 5 bytes,
    and a closed end answers with a reset, which poll() reports as an
    error or a hang-up (bounded by 1 s). Returns "reset" or "taken"."""
    try:
        sock.sendall(b"LATE\n")
        watch = select.poll()
        watch.register(sock, select.POLLERR | select.POLLHUP)
        return "reset" if watch.poll(1000) else "taken"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"


# ---- the recording upstream ---------------------------------------------

# What the upstream does in each scenario, once it has read the PROXY
# header and the SCENARIO line. Each one reads and sends through read()
# and send(), which count; an exception ends the connection (end_of()).

def read(conn, seen, size=65536):
    return seen.take(conn.recv(size))


def read_to_end(conn, seen):
    while read(conn, seen):
        pass
    seen.end = "FIN"


def send(conn, seen, data):
    view = memoryview(data)
    while view:
        count = conn.send(view[:65536])
        seen.sent += count
        view = view[count:]


def upstream_echo(conn, seen):
    """Sends back every byte, until the client's FIN."""
    while True:
        data = read(conn, seen)
        if not data:
            seen.end = "FIN"
            return
        send(conn, seen, data)


def upstream_answer_after_half_close(conn, seen):
    """Waits for the client's FIN, then sends 16 MiB and its own FIN."""
    read_to_end(conn, seen)
    send(conn, seen, payload(16 * MIB))
    conn.shutdown(socket.SHUT_WR)


def upstream_answer_then_half_close(conn, seen):
    """Sends 16 MiB and its FIN at once, then reads to the client's FIN."""
    send(conn, seen, payload(16 * MIB))
    conn.shutdown(socket.SHUT_WR)
    read_to_end(conn, seen)


def upstream_half_close_first(conn, seen):
    """Ends its sending at once, reads nothing for 0.6 s (less than the
    fin timeout), then reads everything to the client's FIN."""
    conn.shutdown(socket.SHUT_WR)
    time.sleep(0.6)
    read_to_end(conn, seen)


def upstream_ack_then_read(conn, seen):
    """Reads 1 MiB, says so ("GOT\\n"), then reads to the end."""
    while seen.received < MIB:
        if not read(conn, seen, MIB - seen.received):
            seen.end = "FIN too early"
            return
    send(conn, seen, b"GOT\n")
    read_to_end(conn, seen)


def upstream_download_watching(conn, seen):
    """Sends 16 MiB, and reads meanwhile: the client's end shows at once,
    as a FIN (a read returns 0) or a reset, even while sending is blocked."""
    data = memoryview(payload(16 * MIB))
    watch = select.poll()
    watch.register(conn, select.POLLIN | select.POLLOUT)
    while data:
        events = watch.poll(IO_TIMEOUT_S * 1000)
        if not events:
            raise socket.timeout()
        if events[0][1] & (select.POLLIN | select.POLLERR | select.POLLHUP):
            if not read(conn, seen):
                seen.end = "FIN"
                return
        elif events[0][1] & select.POLLOUT:
            count = conn.send(data[:65536], socket.MSG_DONTWAIT)
            seen.sent += count
            data = data[count:]
    read_to_end(conn, seen)


def upstream_reset_after_answer(conn, seen):
    """Sends 64 KiB, waits for the client to say it has them all, then
    resets the connection."""
    send(conn, seen, payload(64 * 1024))
    while seen.received < 4:
        if not read(conn, seen, 4 - seen.received):
            seen.end = "FIN too early"
            return
    abort(conn)
    seen.end = "reset by itself"


def upstream_silent_then_probe(conn, seen):
    """After the client's FIN: silent for PROBE_AFTER_S, then probes."""
    read_to_end(conn, seen)
    time.sleep(PROBE_AFTER_S)
    seen.probe = probe(conn)


def upstream_half_close_then_wait(conn, seen):
    """Half-closes at once, then waits for the end."""
    conn.shutdown(socket.SHUT_WR)
    read_to_end(conn, seen)


class Recorder:
    """A recording upstream on one port. Every connection is kept, under
    the name of its scenario (from its SCENARIO line), or "health check"
    (HAProxy's checks: a PROXY v2 LOCAL header, then a close), or "?" when
    it ended before it could say which scenario it belongs to."""

    def __init__(self, port):
        self.connections = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.listener.settimeout(0.2)   # so that stop() is seen soon
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            seen = Seen()
            with self.lock:
                self.connections.append(seen)
            threading.Thread(target=self.serve, args=(conn, seen),
                             daemon=True).start()
        self.listener.close()

    def stop(self):
        self.stopped.set()

    def serve(self, conn, seen):
        conn.settimeout(IO_TIMEOUT_S)
        start = time.monotonic()
        try:
            version, seen.src, _, _ = read_proxy_header(conn)
            if version == "v2-local":
                seen.name = "health check"
            elif version != "v2":
                seen.end = "no PROXY v2 header: %s" % version
            else:
                seen.name = read_line(conn).split(" ")[-1]
                UPSTREAM_SCRIPTS[seen.name](conn, seen)
        except (OSError, EOFError, KeyError) as problem:
            seen.end = end_of(problem)
        finally:
            conn.close()
            seen.seconds = time.monotonic() - start
            seen.done.set()

    def named(self, name):
        """The connections of scenario name, once every connection has
        ended (each scenario waits for its own; bounded)."""
        deadline = time.monotonic() + RECORD_WAIT_S
        with self.lock:
            everything = list(self.connections)
        for seen in everything:
            seen.done.wait(max(0.0, deadline - time.monotonic()))
        return [seen for seen in everything if seen.name == name]


# ---- the client ---------------------------------------------------------

class Plain:
    """A TCP client connection: send, receive, half-close."""

    def __init__(self, sock):
        self.sock = sock
        self.ended = "?"

    def sendall(self, data):
        self.sock.sendall(data)

    def recv(self, size):
        data = self.sock.recv(size)
        if not data:
            self.ended = "FIN"
        return data

    def half_close(self):
        self.sock.shutdown(socket.SHUT_WR)


class Tls(Plain):
    """A TLS client connection. OpenSSL runs over two memory buffers and
    this class moves the bytes between them and the socket itself: then
    it can send its close_notify (a TLS half-close) and go on reading,
    which Python's ssl sockets cannot do. The certificate is not checked
    (a made, self-signed one, as WhatsApp clients accept)."""

    def __init__(self, sock):
        super().__init__(sock)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing)
        self.step(self.tls.do_handshake)

    def step(self, operation, *args):
        """Runs one TLS operation, feeding it from the socket until it can
        finish, and sends what it wrote."""
        while True:
            try:
                result = operation(*args)
                self.sock.sendall(self.outgoing.read())
                return result
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()

    def sendall(self, data):
        self.step(self.tls.write, data)

    def recv(self, size):
        try:
            data = self.step(self.tls.read, size)
        except ssl.SSLZeroReturnError:        # close_notify, after our own
            data = b""
        except ssl.SSLEOFError:               # a FIN without close_notify
            self.ended = "FIN, no close_notify"
            return b""
        if not data:                          # the peer's close_notify:
            self.ended = "close_notify+" + self.after_close_notify()
        return data

    def after_close_notify(self):
        """What comes on the socket after a close_notify (within 2 s)."""
        self.sock.settimeout(2)
        try:
            return "FIN" if not self.sock.recv(1) else "more bytes"
        except ConnectionResetError:
            return "RST"
        except socket.timeout:
            return "nothing"

    def half_close(self):
        # unwrap() sends close_notify, then would wait for the peer's:
        # that wait is where it stops (nothing to read yet).
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.sock.sendall(self.outgoing.read())


def client_read_to_end(stream, seen):
    while seen.take(stream.recv(65536)):
        pass
    seen.end = stream.ended


def client_read_upto(stream, seen, total):
    while seen.received < total:
        if not seen.take(stream.recv(min(65536, total - seen.received))):
            seen.end = stream.ended
            return


# What the client does in each scenario, after its SCENARIO line.

def client_exchange(stream, seen):
    """Sends 100 kB, reads them back, closes."""
    message = payload(100000)
    stream.sendall(message)
    client_read_upto(stream, seen, len(message))
    if seen.received == len(message):
        seen.end = "closed by itself"


def client_half_close_then_pause(stream, seen):
    """Half-closes, reads 1 MiB, pauses 2.5 s (longer than the fin
    timeout), then reads the rest to the end."""
    stream.half_close()
    client_read_upto(stream, seen, MIB)
    time.sleep(2.5)
    client_read_to_end(stream, seen)


def client_pause_then_close(stream, seen):
    """Reads 1 MiB, pauses 2.5 s, reads the rest to the end, closes."""
    client_read_upto(stream, seen, MIB)
    time.sleep(2.5)
    client_read_to_end(stream, seen)


def client_upload_after_fin(stream, seen):
    """Waits for the upstream's half-close, then uploads 8 MiB, closes."""
    client_read_to_end(stream, seen)
    stream.sendall(payload(8 * MIB))


def client_reset_mid_upload(stream, seen):
    """Sends 1 MiB, waits for the upstream's word that it has them, sends
    1 MiB more and resets at once, with bytes still on their way."""
    stream.sendall(payload(MIB))
    client_read_upto(stream, seen, 4)
    stream.sendall(payload(MIB))
    abort(stream.sock)
    seen.end = "reset by itself"


def client_reset_mid_download(stream, seen):
    """Reads 64 KiB of a 16 MiB download, then resets."""
    client_read_upto(stream, seen, 64 * 1024)
    abort(stream.sock)
    seen.end = "reset by itself"


def client_ack_then_read(stream, seen):
    """Reads 64 KiB, says so, then reads to the end (the upstream resets)."""
    client_read_upto(stream, seen, 64 * 1024)
    stream.sendall(b"GOT\n")
    client_read_to_end(stream, seen)


def client_wait_for_end(stream, seen):
    client_read_to_end(stream, seen)


def client_half_close_then_wait(stream, seen):
    """Half-closes, then waits for the end."""
    stream.half_close()
    client_read_to_end(stream, seen)


def client_say_nothing(stream, seen):
    """Connects to the TLS front and sends nothing, not even a TLS hello;
    waits (up to SILENT_CLIENT_WAIT_S) for the end."""
    stream.sock.settimeout(SILENT_CLIENT_WAIT_S)
    client_read_to_end(stream, seen)


def client_silent_then_probe(stream, seen):
    """Gets the upstream's half-close, is silent for PROBE_AFTER_S, then
    probes."""
    client_read_to_end(stream, seen)
    time.sleep(PROBE_AFTER_S)
    seen.probe = probe(stream.sock)


# ---- the scenarios ------------------------------------------------------

class Scenario:
    """One scripted conversation: the front it goes to ("plain", "tls",
    "dead": nothing listens behind it, "late": its upstream listens only
    LATE_START_S after the connect), what the client and the upstream do,
    and what whatsapp_proxy must show (promises: field -> value)."""

    def __init__(self, name, front, client, upstream, promises,
                 small_buffer=False, timed=False, varies=(), silent=False):
        self.name = name
        self.front = front
        self.client = client
        self.upstream = upstream          # None: no upstream takes it
        self.promises = promises
        self.small_buffer = small_buffer  # a 16 KiB receive buffer, so that
                                          # unread bytes wait in the proxy
        self.timed = timed                # compare client.seconds too
        self.varies = varies              # fields that vary from run to run
        self.silent = silent              # no TLS hello, no SCENARIO line


OWN = "the client's own"
# How much of a reset connection's bytes get through depends on timing.
RESET_VARIES = ("upstream.received", "upstream.hash", "upstream.sent")

# The same seven conversations on the plain front and on the TLS front (where
# a TCP FIN reads "close_notify+FIN": the TLS way to end, then TCP's).
SCENARIOS = []
for front, prefix, fin in (("plain", "", "FIN"),
                           ("tls", "tls-", "close_notify+FIN")):
    SCENARIOS += [
        # 100 kB there and back, then the client closes.
        Scenario(prefix + "exchange", front, client_exchange, upstream_echo,
                 {"client.received": 100000, "upstream.received": 100000,
                  "upstream.end": "FIN", "upstream.src": OWN}),
        # The client half-closes, the answer is 16 MiB, the client pauses
        # 2.5 s in the middle: the fin timeout times a silence, not a
        # slow reader, so every byte arrives, then the end.
        Scenario(prefix + "half-close-pause", front,
                 client_half_close_then_pause,
                 upstream_answer_after_half_close,
                 {"client.received": 16 * MIB, "client.end": fin,
                  "upstream.sent": 16 * MIB, "upstream.end": "FIN"},
                 small_buffer=True),
        # The mirror: the upstream sends 16 MiB and its FIN at once; the
        # client, silent all along, pauses 2.5 s in the middle of them.
        Scenario(prefix + "answer-fin-pause", front,
                 client_pause_then_close, upstream_answer_then_half_close,
                 {"client.received": 16 * MIB, "client.end": fin,
                  "upstream.sent": 16 * MIB, "upstream.end": "FIN"},
                 small_buffer=True),
        # The upstream half-closes at once and reads nothing for 0.6 s;
        # the client uploads 8 MiB after the FIN: all of it arrives.
        Scenario(prefix + "upstream-half-close", front,
                 client_upload_after_fin, upstream_half_close_first,
                 {"client.end": fin, "upstream.received": 8 * MIB,
                  "upstream.end": "FIN"}),
        # The client resets while uploading, or while downloading.
        Scenario(prefix + "client-reset-upload", front,
                 client_reset_mid_upload, upstream_ack_then_read,
                 {"upstream.end": "RST"}, varies=RESET_VARIES),
        Scenario(prefix + "client-reset-download", front,
                 client_reset_mid_download, upstream_download_watching,
                 {"upstream.end": "RST"}, varies=RESET_VARIES,
                 small_buffer=True),
        # The upstream resets after an answer the client has read.
        Scenario(prefix + "upstream-reset", front, client_ack_then_read,
                 upstream_reset_after_answer,
                 {"client.received": 64 * 1024, "client.end": fin,
                  "upstream.end": "reset by itself"}),
    ]
SCENARIOS += [
    # A half-closed connection that falls silent ends after the fin
    # timeout (1 s): the client gets its end, and the upstream's late write
    # 2 s after the FIN finds the proxy's end closed. Then the mirror.
    Scenario("half-closed-silence", "plain", client_half_close_then_wait,
             upstream_silent_then_probe,
             {"client.end": "FIN", "client.seconds": 1.0,
              "upstream.probe": "reset"}, timed=True),
    Scenario("upstream-half-closed-silence", "plain", client_silent_then_probe,
             upstream_half_close_then_wait,
             {"upstream.end": "FIN", "upstream.seconds": 1.0,
              "client.probe": "reset"}, timed=True),
    # A client that connects to the TLS front and says nothing: both keep
    # it longer than it waits (whatsapp_proxy's --timeout-handshake is 60 s,
    # HAProxy's timeout client 200 s).
    Scenario("tls-silent-client", "tls", client_say_nothing, None,
             {"client.end": "timeout", "upstream.connections": 0},
             timed=True, silent=True),
    # Nothing listens at the upstream: four tries, 1 s apart, then the end.
    Scenario("dead-upstream", "dead", client_wait_for_end, None,
             {"client.end": "FIN", "client.seconds": 3.0,
              "upstream.connections": 0}, timed=True),
    # The upstream listens only from 2.5 s on: the last try gets through.
    Scenario("late-upstream", "late", client_exchange, upstream_echo,
             {"client.received": 100000, "client.seconds": 3.0,
              "upstream.end": "FIN"}, timed=True),
]
UPSTREAM_SCRIPTS = {s.name: s.upstream for s in SCENARIOS if s.upstream}

# Differences on purpose: (scenario, field, whatsapp_proxy's value,
# HAProxy's value, why). Each one is checked as listed: if it disappears,
# or the values change, the test says so. A tuple of values: HAProxy's
# result depends on timing, and any of them is HAProxy's way.
DELIBERATE = [
    ("client-reset-upload", "upstream.end", "RST", ("FIN", "RST"),
     "a client's reset is passed on as a reset, always, so that the server "
     "can tell a phone that vanished from one that said goodbye; HAProxy "
     "does so only when it meets the reset as an error reading from the "
     "client; when it notices it otherwise (writing to the client, or as "
     "the end of the client's stream) the server gets a FIN, or a reset if "
     "HAProxy closes with the server's bytes unread: timing decides"),
    ("client-reset-download", "upstream.end", "RST", ("FIN", "RST"),
     "the same rule; HAProxy is writing to the client here"),
    ("tls-client-reset-upload", "upstream.end", "RST", ("FIN", "RST"),
     "the same rule, on TLS"),
    ("tls-client-reset-download", "upstream.end", "RST", ("FIN", "RST"),
     "the same rule, on TLS"),
]


# ---- running a scenario through one proxy --------------------------------

def run_client(scenario, port):
    seen = Seen()
    start = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(IO_TIMEOUT_S)
        if scenario.small_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", port))
        seen.me = "%s:%d" % sock.getsockname()[:2]
        if scenario.silent:
            stream = Plain(sock)
        else:
            stream = Tls(sock) if scenario.front == "tls" else Plain(sock)
            stream.sendall(b"SCENARIO %s\n" % scenario.name.encode())
        scenario.client(stream, seen)
    except (OSError, ssl.SSLError, EOFError) as problem:
        seen.end = end_of(problem)
    finally:
        sock.close()
        seen.seconds = time.monotonic() - start
    return seen


def play(scenario, ports, recorder):
    """Plays scenario through one proxy. Returns what was seen, by field."""
    late = []
    if scenario.front == "late":
        # Nothing listens on the late upstream until LATE_START_S after the
        # client's connect: the proxy's first tries are refused (at about
        # 0, 1 and 2 s), its fourth and last try (at about 3 s) is taken.
        timer = threading.Timer(
            LATE_START_S, lambda: late.append(Recorder(ports["late_up"])))
        timer.start()
    client = run_client(scenario, ports[scenario.front])
    if scenario.front == "late":
        timer.join(LATE_START_S + 1)
        recorder = late[0] if late else None
    records = recorder.named(scenario.name) if recorder else []
    for extra in late:
        extra.stop()
    fields = {"client.received": client.received,
              "client.hash": client.hash(),
              "client.end": client.end,
              "upstream.connections": len(records)}
    if scenario.timed:
        fields["client.seconds"] = round(client.seconds, 1)
    if client.probe != "-":
        fields["client.probe"] = client.probe
    if records:
        up = records[0]
        if scenario.timed:
            fields["upstream.seconds"] = round(up.seconds, 1)
        if up.probe != "-":
            fields["upstream.probe"] = up.probe
        fields.update({
            "upstream.src": OWN if up.src == client.me else up.src,
            "upstream.received": up.received,
            "upstream.hash": up.hash(),
            "upstream.sent": up.sent,
            "upstream.end": up.end})
    return fields


# ---- comparing ----------------------------------------------------------

# Report (one line and one count per check): see peer_tool.py.


def same(field, a, b):
    """Equal; for times, within TIME_TOLERANCE_S of each other."""
    if field.endswith(".seconds") and a != "-" and b != "-":
        return abs(a - b) <= TIME_TOLERANCE_S
    return a == b


def matches(field, value, listed):
    """value is the listed one, or one of a listed tuple."""
    choices = listed if isinstance(listed, tuple) else (listed,)
    return any(same(field, value, choice) for choice in choices)


def compare(report, scenario, ours, theirs):
    """One check per field, then one per promise."""
    name = scenario.name
    for field in sorted(set(ours) | set(theirs)):
        if field in scenario.varies:
            continue
        a, b = ours.get(field, "-"), theirs.get(field, "-")
        listed = [d for d in DELIBERATE if d[:2] == (name, field)]
        if listed:
            _, _, want_a, want_b, why = listed[0]
            as_listed = matches(field, a, want_a) and matches(field, b, want_b)
            if isinstance(want_b, tuple):
                want_b = " or ".join(want_b) + " (this run: %s)" % b
            report.check(as_listed, "%s: %s: deliberate difference: "
                         "whatsapp_proxy %s, HAProxy %s: %s%s" % (
                             name, field, want_a, want_b, why,
                             "" if as_listed else
                             " (NOW SEEN: %s, %s)" % (a, b)))
        elif same(field, a, b):
            report.check(True, "%s: %s: the same through both (%s)"
                         % (name, field, a))
        else:
            report.check(False, "%s: %s: whatsapp_proxy %s, HAProxy %s"
                         % (name, field, a, b))
    for field, want in scenario.promises.items():
        got = ours.get(field, "-")
        kept = same(field, got, want)
        report.check(kept, "%s: through whatsapp_proxy, %s is %s%s" % (
            name, field, want, "" if kept else " (got %s)" % got))


def show(side, fields):
    print("#   %-15s %s" % (side, " ".join(
        "%s=%s" % (k, str(v).replace(" ", "_"))
        for k, v in sorted(fields.items()))), flush=True)


def run(counts_file, port_lists):
    keys = ("plain", "tls", "dead", "late", "up", "late_up")
    ports = {side: dict(zip(keys, map(int, port_lists[side].split(","))))
             for side in SIDES}
    recorders = {side: Recorder(ports[side]["up"]) for side in SIDES}
    wait_listening([ports[side][key] for side in SIDES
                    for key in ("plain", "tls", "dead", "late")], STARTUP_S)
    report = Report()
    for scenario in SCENARIOS:
        # Both proxies at once, each in a thread of its own.
        results = {}
        threads = [threading.Thread(
            target=lambda side=side: results.__setitem__(
                side, play(scenario, ports[side], recorders[side])))
            for side in SIDES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(IO_TIMEOUT_S * 3)
        print("# %s" % scenario.name, flush=True)
        if len(results) != len(SIDES):
            report.check(False, "%s: finished through both" % scenario.name)
            continue
        for side in SIDES:
            show(side, results[side])
        compare(report, scenario,
                results["whatsapp_proxy"], results["haproxy"])
    # Every connection an upstream got belongs to a scenario, or is a check.
    for side in SIDES:
        connections = recorders[side].named("?")
        checks = recorders[side].named("health check")
        print("# %s: %d health checks reached the upstream"
              % (side, len(checks)))
        report.check(not connections,
                     "%s: every upstream connection said its scenario%s" % (
                         side, "".join(" (one ended: %s)" % seen.end
                                       for seen in connections)))
    report.save(counts_file)
    return 0


def main(argv):
    if len(argv) == 5 and argv[1] == "run":
        port_lists = dict(arg.split("=", 1) for arg in argv[3:])
        start_watchdog(RUN_LIMIT_S)   # whatever hangs, the process ends
        return run(argv[2], port_lists)
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
