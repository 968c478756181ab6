#!/usr/bin/env python3
"""lookalike.py - does whatsapp_proxy look like a web server to a scanner?

A censor finds proxies by scanning: it connects to open ports, says things
a web server would answer, and blocks whatever answers differently. With
--decoy, whatsapp_proxy hands everything that is not WhatsApp to a real
web site, so the answers should be that site's. This program asks nginx
itself (the site reached directly over TLS) and whatsapp_proxy (the same
site as its decoy) the same questions with the same client, and compares
the answers. Standard library only (Python 3.9 or newer), plus the
openssl command. tests/lookalike.sh starts nginx and the proxies and runs

    lookalike.py run COUNTS_FILE nginx=PORT proxy=PORT told=PORT
                 chat=PORT decoy_log=FILE

    nginx     nginx over TLS with nginx's own defaults, TLS 1.3 on (see
              TLS_1_3_NOTE): the web site
    proxy     whatsapp_proxy's TLS port, --decoy at the plain-HTTP twin
              of that site, --decoy-tls-port at its TLS listener
    told      a second whatsapp_proxy, --decoy-send-proxy v1, its decoy
              the same site behind a PROXY-protocol listener
    chat      the fake chat server both proxies relay WhatsApp to: this
              program listens there and records what arrives
    decoy_log the decoy's access log ($remote_addr $proxy_protocol_addr
              "$request" $status)

Each comparison prints one line, "ok - ..." or "not ok - ...", with both
answers; "#" lines add details. A difference is allowed only where it is
listed in LISTED_DIFFERENCES with its reason, and a listed one is checked
as listed: if it changes, the test says so. "passed=N failed=N" goes to
COUNTS_FILE.
"""

import ctypes
import ctypes.util
import os
import random
import re
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True   # no __pycache__ left in tests/
from peer_tool import (Report, read_proxy_header,  # noqa: E402
                       start_watchdog, wait_listening)

HOST = "proxy.example.org"   # the certificate's name, and the Host header
PROBE_WAIT_S = 3             # how long a probe waits for an answer
SILENCE_WAIT_S = 8           # how long a silent client waits to be closed
STARTUP_S = 10               # the longest wait for a port to listen
RUN_LIMIT_S = 120            # the whole run, or it stops itself
OPENSSL_LIMIT_S = 10         # the longest one openssl command may take
VISITOR = "127.0.0.2"        # a second loopback address: see part (5)

# ---- 1. The bytes the clients send ---------------------------------------


def first_flight(context):
    """A real TLS ClientHello, as Python's ssl writes it: the record a
    handshake starts with. Made once, sent the same to both servers."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


HELLO = first_flight(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))


def request(line, *headers, body=b""):
    """An HTTP request: its line, a Host header, more headers, a body."""
    head = [line, "Host: " + HOST] + list(headers)
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# The 17 probes: what a scanner says once the TLS handshake is done. Each
# goes to nginx directly and through whatsapp_proxy, inside TLS. The answer
# compared is the first line of what comes back (or that nothing came), and
# how the connection ended within PROBE_WAIT_S. Through the proxy, the fake
# chat server must get nothing (a probe there is a "leak": the scanner
# would meet a WhatsApp server, not a web site), but for "WA 6 3".
# The fourth field: nginx 1.22.1's answer on Debian 12 (OpenSSL 3.0), as
# measured when this test was written; the live nginx is what counts.
PROBES = [
    ("GET / HTTP/1.1", request("GET / HTTP/1.1"),
     "a web page", "HTTP/1.1 200 OK, then open"),
    ("HEAD / HTTP/1.1", request("HEAD / HTTP/1.1"),
     "a web page's headers", "HTTP/1.1 200 OK, then open"),
    ("POST / with a body",
     request("POST / HTTP/1.1", "Content-Type: application/x-www-form-"
             "urlencoded", "Content-Length: 11", body=b"hello=world"),
     "a form sent", "HTTP/1.1 405 Not Allowed, then open"),
    ("OPTIONS * HTTP/1.1", request("OPTIONS * HTTP/1.1"),
     "what the server can do", "HTTP/1.1 400 Bad Request, then "
     "close_notify+FIN"),
    ("get / HTTP/1.1 (lower case)", request("get / HTTP/1.1"),
     "a method in lower case", "HTTP/1.1 400 Bad Request, then "
     "close_notify+FIN"),
    ("FOO / HTTP/1.1", request("FOO / HTTP/1.1"),
     "a method nobody knows", "HTTP/1.1 405 Not Allowed, then open"),
    ("PROPFIND / HTTP/1.1", request("PROPFIND / HTTP/1.1", "Depth: 1"),
     "WebDAV", "HTTP/1.1 405 Not Allowed, then open"),
    ("CRLF, then GET / HTTP/1.1", b"\r\n" + request("GET / HTTP/1.1"),
     "an empty line first (allowed by RFC 9112)", "HTTP/1.1 200 OK, "
     "then open"),
    ("GET / HTTP/1.0", b"GET / HTTP/1.0\r\n\r\n",
     "the oldest request, no Host", "HTTP/1.1 200 OK, then "
     "close_notify+FIN"),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
     "HTTP/2 without ALPN", "HTTP/1.1 400 Bad Request, then "
     "close_notify+FIN"),
    ("SSH banner", b"SSH-2.0-OpenSSH_9.2\r\n",
     "an SSH client", "HTTP/1.1 400 Bad Request, then close_notify+FIN"),
    ("64 random bytes", random.Random(443).randbytes(64),
     "noise (seeded: the same bytes every run)",
     "HTTP/1.1 400 Bad Request, then close_notify+FIN"),
    ("TLS ClientHello inside TLS", HELLO,
     "TLS again, inside TLS", "HTTP/1.1 400 Bad Request, then "
     "close_notify+FIN"),
    ("a NUL byte", b"\x00",
     "one zero byte", "HTTP/1.1 400 Bad Request, then close_notify+FIN"),
    ("16 KiB header", request("GET / HTTP/1.1", "X-Padding: " + "a" * 16384),
     "a header longer than nginx's 8 KiB buffers",
     'HTTP/1.1 400 Bad Request (page: "400 Request Header Or Cookie Too '
     'Large"), then close_notify+FIN'),
    ("empty connection", None,
     "the handshake, then close_notify and FIN, no byte",
     "nothing, then FIN"),
    ("WA 6 3", b"WA\x06\x03",
     "WhatsApp's connection header: 'W' 'A' and two version bytes, as "
     "public reimplementations write it (inherent, see MUST_REACH_CHAT)",
     "HTTP/1.1 400 Bad Request, then close_notify+FIN"),
]

# ---- 2. Connections and what comes back ----------------------------------


def client_context(alpn=None):
    """The one TLS client of this test, as a scanner has it: no server name
    (a scanner knows an address), no certificate check."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def connect(port, source="127.0.0.1", timeout=PROBE_WAIT_S + 2):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def me(sock):
    return "%s:%d" % sock.getsockname()[:2]


class Raw:
    """Bytes as they are: a client that does not speak TLS."""

    def __init__(self, sock):
        self.sock = sock

    def take(self, data):
        return data

    def end(self, closed):
        """How the connection ended as seen from here; closed: a FIN came."""
        return "FIN" if closed else "open"


class Tls(Raw):
    """A TLS client whose bytes pass through two memory buffers, so that
    it can see what a server does at the TCP level too: a close_notify
    (TLS's goodbye) apart from the FIN that follows it, and an alert."""

    def __init__(self, sock, alpn=None):
        super().__init__(sock)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context(alpn).wrap_bio(self.incoming, self.outgoing)
        self.close_notify = False
        self.alert = ""
        while True:
            try:
                self.tls.do_handshake()
                self.flush()
                return
            except ssl.SSLWantReadError:
                self.flush()
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("FIN during the handshake")
                self.incoming.write(data)

    def flush(self):
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def send(self, data):
        self.tls.write(data)
        self.flush()

    def say_goodbye(self):
        """close_notify, then a TCP half-close: "I am done sending"."""
        try:
            self.tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        self.flush()
        self.sock.shutdown(socket.SHUT_WR)

    def take(self, data):
        """Decrypts what came; notes a close_notify or an alert."""
        if self.close_notify or self.alert:
            return b""
        self.incoming.write(data)
        plain = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return plain
            except ssl.SSLZeroReturnError:
                self.close_notify = True
                return plain
            except ssl.SSLError as problem:
                self.alert = alert_name(problem)
                return plain
            if not chunk:
                self.close_notify = True
                return plain
            plain += chunk

    def end(self, closed):
        tcp = "FIN" if closed else "open"
        if self.close_notify:
            return "close_notify+FIN" if closed else "close_notify, still open"
        if self.alert:
            return "%s, then %s" % (self.alert, tcp)
        return tcp


def listen(stream, seconds):
    """What comes back within seconds: (bytes, how it ended). The end is
    "open" (nothing ended it), "FIN", "close_notify+FIN" or "RST"."""
    received = b""
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return received, stream.end(closed=False)
        stream.sock.settimeout(remaining)
        try:
            data = stream.sock.recv(65536)
        except socket.timeout:
            return received, stream.end(closed=False)
        except ConnectionResetError:
            return received, "RST"
        if not data:
            return received, stream.end(closed=True)
        received += stream.take(data)


def first_line(data):
    """The first line of an answer, readable: an HTTP status line as it is,
    other bytes as Python writes them."""
    line = data.split(b"\r\n", 1)[0][:80]
    try:
        text = line.decode("ascii")
        if text.isprintable():
            return text
    except UnicodeDecodeError:
        pass
    return repr(line)


def describe(received, end, seconds):
    """An answer in words: "HTTP/1.1 400 Bad Request, then FIN",
    "nothing in 3 s", "nothing, then close_notify+FIN". An HTML page's
    title is added when it says more than the status line: nginx's page
    for plain HTTP on a TLS port is a 400 like many others, but says why
    in its title, and so in what a scanner records."""
    if received:
        status = first_line(received)
        title = re.search(rb"<title>(.*?)</title>", received, re.DOTALL)
        if title:
            text = title.group(1).decode("latin-1")
            if not status.endswith(" " + text):
                status += ' (page: "%s")' % text
        return "%s, then %s" % (status, end)
    if end == "open":
        return "nothing in %d s" % seconds
    return "nothing, then " + end


def alert_name(problem):
    """An SSLError's reason in TLS's words: "alert no_application_protocol"
    for TLSV1_ALERT_NO_APPLICATION_PROTOCOL."""
    reason = getattr(problem, "reason", None) or ""
    match = re.match(r"(?:TLSV1|SSLV3|TLSV13)_ALERT_(\w+)", reason)
    if match:
        return "alert " + match.group(1).lower()
    # Codes this Python does not name: the text, "tlsv1 alert no
    # application protocol (_ssl.c:1006)".
    match = re.search(r"alert ([a-z ]+?) \(", str(problem))
    if match:
        return "alert " + match.group(1).replace(" ", "_")
    return "TLS error " + (reason or str(problem)).lower()


class Answer:
    """What one server answered to one question: the text compared, more
    detail shown on a "#" line, and the addresses our clients had (for the
    fake chat server's records)."""

    def __init__(self, text, detail="", clients=()):
        self.text = text
        self.detail = detail
        self.clients = list(clients)


def failed(problem):
    """An answer for a question that could not be asked (the server is
    not there, say)."""
    if isinstance(problem, ssl.SSLError):
        return Answer("handshake refused: " + alert_name(problem))
    if isinstance(problem, ConnectionRefusedError):
        return Answer("connection refused (is it running?)")
    if isinstance(problem, ConnectionResetError):
        return Answer("RST")
    if isinstance(problem, socket.timeout):
        return Answer("no answer (timeout)")
    if isinstance(problem, EOFError):
        return Answer("FIN: " + str(problem))
    return Answer("error: %s" % (getattr(problem, "strerror", None)
                                 or problem))


# ---- 3. The questions ------------------------------------------------------

# Each function asks one server (port) one question and returns an Answer.


def ask_alpn(port, offer):
    """The application protocol (ALPN) the server picks from the offer."""
    sock = connect(port)
    try:
        stream = Tls(sock, alpn=offer)
        chosen = stream.tls.selected_alpn_protocol()
        return Answer(chosen or "none", clients=[me(sock)])
    except (OSError, EOFError, ssl.SSLError) as problem:
        return failed(problem)
    finally:
        sock.close()


def openssl(arguments, stdin_seconds=0.0):
    """Runs openssl s_client with arguments; its stdin stays open for
    stdin_seconds, then closes (s_client then ends the connection).
    Returns what it printed, stdout and stderr together."""
    command = ["openssl", "s_client"] + arguments
    process = subprocess.Popen(command, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    if stdin_seconds:
        time.sleep(stdin_seconds)
    try:
        output, _ = process.communicate(b"", timeout=OPENSSL_LIMIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output.decode("utf-8", "replace")


def handshake_refusal(output):
    """The alert that ended a failed s_client handshake, in TLS's words."""
    match = re.search(r"alert ([a-z ]+?):", output)
    if match:
        return "alert " + match.group(1).replace(" ", "_")
    return "no handshake"


def ask_suite(port, version, offer):
    """The cipher suite the server chooses when the client offers these,
    in this order of preference (version: "tls1_2" or "tls1_3")."""
    option = "-cipher" if version == "tls1_2" else "-ciphersuites"
    output = openssl(["-connect", "127.0.0.1:%d" % port, "-" + version,
                      option, ":".join(offer)])
    match = re.search(r"Cipher is (\S+)", output)
    if not match or match.group(1) == "(NONE)":
        return Answer("handshake refused: " + handshake_refusal(output))
    return Answer(match.group(1))


def ask_version(port, arguments):
    """The protocol version the handshake ends with, or the refusal."""
    output = openssl(["-connect", "127.0.0.1:%d" % port] + arguments)
    match = re.search(r"New, (\S+), Cipher is (\S+)", output)
    if not match or match.group(2) == "(NONE)":
        return Answer("handshake refused: " + handshake_refusal(output))
    return Answer(match.group(1), match.group(2))


def ask_ticket_hint(port):
    """TLS 1.2: the lifetime the server gives its session ticket."""
    output = openssl(["-connect", "127.0.0.1:%d" % port, "-tls1_2"])
    match = re.search(r"ticket lifetime hint: (\d+)", output)
    return Answer("%s s" % match.group(1) if match else "no ticket")


def ask_resumption(port):
    """TLS 1.2: does the ticket of one connection resume the next?"""
    with tempfile.NamedTemporaryFile(suffix=".pem") as session:
        first = openssl(["-connect", "127.0.0.1:%d" % port, "-tls1_2",
                         "-sess_out", session.name])
        if "ticket lifetime hint" not in first:
            return Answer("no ticket to resume with")
        second = openssl(["-connect", "127.0.0.1:%d" % port, "-tls1_2",
                          "-sess_in", session.name])
    match = re.search(r"^(New|Reused), ", second, re.MULTILINE)
    return Answer(match.group(1) if match else "no handshake")


def ask_tls13_tickets(port):
    """TLS 1.3: how many tickets come after the handshake, and their
    lifetime (s_client stays one second to read them)."""
    output = openssl(["-connect", "127.0.0.1:%d" % port, "-tls1_3"],
                     stdin_seconds=1)
    if "Cipher is (NONE)" in output:
        return Answer("handshake refused: " + handshake_refusal(output))
    hints = re.findall(r"ticket lifetime hint: (\d+)", output)
    return Answer("%d tickets, lifetime %s s" % (
        len(hints), "/".join(sorted(set(hints))) or "-"))


def ask_renegotiation_s_client(port):
    """TLS 1.2, s_client's "R" command: a client-initiated renegotiation.
    Answer: the alert the server sends (from -msg), and whether s_client
    is still connected PROBE_WAIT_S later. OpenSSL's client gives up by
    itself when it gets the no_renegotiation warning, so this shows the
    server's alert, not who closes: ask_renegotiation_raw() shows that."""
    process = subprocess.Popen(
        ["openssl", "s_client", "-connect", "127.0.0.1:%d" % port,
         "-tls1_2", "-msg"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(
        line.decode("utf-8", "replace") for line in process.stdout))
    reader.start()
    deadline = time.monotonic() + OPENSSL_LIMIT_S
    while (not any("Verify return code" in line for line in lines)
           and process.poll() is None and time.monotonic() < deadline):
        time.sleep(0.05)                    # the handshake is done
    try:
        process.stdin.write(b"R\n")
        process.stdin.flush()
    except OSError:
        pass
    try:
        process.wait(PROBE_WAIT_S)
        ended = "s_client ended"
    except subprocess.TimeoutExpired:
        ended = "s_client still connected at %d s" % PROBE_WAIT_S
        process.kill()
        process.wait()
    reader.join(5)
    after = "".join(lines).split("RENEGOTIATING", 1)
    alerts = re.findall(r"<<< TLS 1.2, Alert \[length \d+\], (\w+ \w+)",
                        after[1]) if len(after) == 2 else []
    return Answer("%s; %s" % (
        "the server's alert: " + ", ".join(alerts) if alerts
        else "no alert from the server", ended))


class Libssl:
    """The few libssl calls a client needs to start a renegotiation and
    then NOT read the answer, which no command-line client does: OpenSSL's
    own clients give up at the server's no_renegotiation warning, and
    their goodbye would hide whether the server closes by itself."""

    def __init__(self):
        lib = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
        pointer, number = ctypes.c_void_p, ctypes.c_int
        lib.TLS_client_method.restype = pointer
        lib.SSL_CTX_new.restype = pointer
        lib.SSL_CTX_new.argtypes = [pointer]
        lib.SSL_CTX_ctrl.argtypes = [pointer, number, ctypes.c_long, pointer]
        lib.SSL_CTX_free.argtypes = [pointer]
        lib.SSL_new.restype = pointer
        lib.SSL_new.argtypes = [pointer]
        lib.SSL_free.argtypes = [pointer]
        for name in ("SSL_connect", "SSL_renegotiate", "SSL_do_handshake"):
            getattr(lib, name).argtypes = [pointer]
        lib.SSL_set_fd.argtypes = [pointer, number]
        lib.SSL_set_rfd.argtypes = [pointer, number]
        self.lib = lib


SET_MAX_PROTO_VERSION = 124   # SSL_CTRL_SET_MAX_PROTO_VERSION
TLS1_2_VERSION = 0x0303


def ask_renegotiation_raw(port):
    """TLS 1.2: the client asks to renegotiate (a new ClientHello inside
    the connection) and then only watches the socket: what comes back
    (a record of type 21 is an alert), and does the server close within
    PROBE_WAIT_S?"""
    lib = Libssl().lib
    context = lib.SSL_CTX_new(lib.TLS_client_method())
    lib.SSL_CTX_ctrl(context, SET_MAX_PROTO_VERSION, TLS1_2_VERSION, None)
    tls = lib.SSL_new(context)
    sock = connect(port)
    quiet, unused = socket.socketpair()
    try:
        # libssl reads and writes the socket itself, and expects it to
        # block: bounded by the kernel's own timeouts instead of Python's.
        sock.settimeout(None)
        limit = struct.pack("ll", PROBE_WAIT_S, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        lib.SSL_set_fd(tls, sock.fileno())
        if lib.SSL_connect(tls) != 1:
            return Answer("handshake failed")
        # From now on OpenSSL reads from an empty socket pair: it writes
        # its ClientHello to the server and finds nothing to read.
        quiet.setblocking(False)
        lib.SSL_set_rfd(tls, quiet.fileno())
        lib.SSL_renegotiate(tls)
        lib.SSL_do_handshake(tls)
        records, end = [], "open at %d s" % PROBE_WAIT_S
        deadline = time.monotonic() + PROBE_WAIT_S
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                end = "RST"
                break
            if not data:
                end = "FIN"
                break
            records.append({21: "an alert", 22: "a handshake record",
                            23: "data"}.get(data[0], "bytes"))
        return Answer("%s, then %s" % (
            " and ".join(records) or "nothing", end), clients=[me(sock)])
    except OSError as problem:
        return failed(problem)
    finally:
        lib.SSL_free(tls)
        lib.SSL_CTX_free(context)
        sock.close()
        quiet.close()
        unused.close()


def ask_plain(port, data):
    """Bytes that are not TLS, sent to the TLS port."""
    sock = None
    try:
        sock = connect(port)
        sock.sendall(data)
        received, end = listen(Raw(sock), PROBE_WAIT_S)
        return Answer(describe(received, end, PROBE_WAIT_S),
                      "%d bytes back" % len(received), [me(sock)])
    except OSError as problem:
        return failed(problem)
    finally:
        if sock:
            sock.close()


def ask_silence(port, kind):
    """A client that stops: after "nothing" at all, "half a ClientHello",
    "GE" (plain HTTP cut short), or "a TLS handshake" (a whole one).
    Is the connection still open SILENCE_WAIT_S after the connect?"""
    sock = None
    start = time.monotonic()
    try:
        sock = connect(port, timeout=SILENCE_WAIT_S + 2)
        stream = Raw(sock)
        if kind == "half a ClientHello":
            sock.sendall(HELLO[:len(HELLO) // 2])
        elif kind == "GE":
            sock.sendall(b"GE")
        elif kind == "a TLS handshake":
            stream = Tls(sock)
        received, end = listen(stream,
                               SILENCE_WAIT_S - (time.monotonic() - start))
        if end == "open" and not received:
            return Answer("open at %d s" % SILENCE_WAIT_S, clients=[me(sock)])
        return Answer("at %.0f s: %s" % (
            time.monotonic() - start, describe(received, end, 0)),
            clients=[me(sock)])
    except (OSError, EOFError, ssl.SSLError) as problem:
        return failed(problem)
    finally:
        if sock:
            sock.close()


def ask_probe(port, data):
    """One probe inside TLS (None: the empty connection)."""
    sock = None
    try:
        sock = connect(port)
        stream = Tls(sock)
        if data is None:
            stream.say_goodbye()
        else:
            stream.send(data)
        received, end = listen(stream, PROBE_WAIT_S)
        return Answer(describe(received, end, PROBE_WAIT_S),
                      "%d bytes back" % len(received), [me(sock)])
    except (OSError, EOFError, ssl.SSLError) as problem:
        return failed(problem)
    finally:
        if sock:
            sock.close()


def ask_page(port, path, source):
    """GET path over TLS from the address source: the status line."""
    sock = None
    try:
        sock = connect(port, source=source)
        stream = Tls(sock)
        stream.send(request("GET %s HTTP/1.1" % path, "Connection: close"))
        received, end = listen(stream, PROBE_WAIT_S)
        return Answer(first_line(received) if received else "nothing, "
                      "then " + end, clients=[me(sock)])
    except (OSError, EOFError, ssl.SSLError) as problem:
        return failed(problem)
    finally:
        if sock:
            sock.close()


# ---- 4. The fake chat server ----------------------------------------------


class ChatServer:
    """Where both proxies send WhatsApp's clients. It reads the PROXY v2
    header (whatsapp_proxy's default), which names the client's own
    address, then records every byte, and says nothing. A record from one
    of our probes is a leak: that scanner would have met WhatsApp."""

    def __init__(self, port):
        self.records = {}          # client address -> bytes received so far
        self.others = []           # (header version, bytes) without an address
        self.lock = threading.Lock()
        self.open = 0
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.open += 1
            threading.Thread(target=self.serve, args=(conn,),
                             daemon=True).start()

    def serve(self, conn):
        """Records as the bytes come, so that a connection still open at
        the end is seen too."""
        conn.settimeout(RUN_LIMIT_S)
        data, version = bytearray(), "none"
        try:
            version, source, _, _ = read_proxy_header(conn)
            if version == "v2":
                with self.lock:
                    self.records[source] = data
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                with self.lock:
                    data += chunk
        except (OSError, EOFError):
            pass
        finally:
            conn.close()
            with self.lock:
                if version != "v2" and data:
                    self.others.append((version, bytes(data)))
                self.open -= 1

    def settle(self, seconds=3):
        """Waits (bounded) until every connection it got has ended."""
        deadline = time.monotonic() + seconds
        while self.open and time.monotonic() < deadline:
            time.sleep(0.05)

    def got(self, clients):
        """What it recorded from these client addresses (None: nothing,
        not even a connection)."""
        with self.lock:
            found = [bytes(self.records[c]) for c in clients
                     if c in self.records]
        return b"".join(found) if found else None


# ---- 5. The comparisons -----------------------------------------------------

TLS_1_2_OFFER = ["ECDHE-ECDSA-CHACHA20-POLY1305",
                 "ECDHE-ECDSA-AES128-GCM-SHA256",
                 "ECDHE-ECDSA-AES256-GCM-SHA384"]
TLS_1_2_OFFER_AES128 = ["ECDHE-ECDSA-AES128-GCM-SHA256",
                        "ECDHE-ECDSA-CHACHA20-POLY1305",
                        "ECDHE-ECDSA-AES256-GCM-SHA384"]
TLS_1_3_OFFER = ["TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256",
                 "TLS_AES_256_GCM_SHA384"]
TLS_1_3_OFFER_AES128 = ["TLS_AES_128_GCM_SHA256",
                        "TLS_CHACHA20_POLY1305_SHA256",
                        "TLS_AES_256_GCM_SHA384"]

TLS_1_3_NOTE = (
    "nginx 1.22's own default is ssl_protocols TLSv1 TLSv1.1 TLSv1.2: no "
    "TLS 1.3. Debian's packaged nginx.conf (and nginx 1.23.4 to 1.27.2 "
    "by default) list TLSv1 TLSv1.1 TLSv1.2 TLSv1.3; the nginx here has "
    "that line, and nginx's defaults for everything else. TLS 1.0 and 1.1 "
    "are on in it, but OpenSSL 3's security level leaves them no cipher "
    "suite: it refuses them with internal_error, and so does "
    "whatsapp_proxy, whose minimum is TLS 1.2 (nginx 1.27.3 and later "
    "leave them off and answer protocol_version)")


class Comparison:
    """One question, asked of nginx (reference) and
    of whatsapp_proxy (through: "proxy" or "told"). nginx_1_22 is nginx
    1.22.1's answer on Debian 12 when this test was written."""

    def __init__(self, section, name, ask, reference="nginx",
                 through="proxy", nginx_1_22=None, probe=None,
                 openssl=False):
        self.section = section
        self.name = name
        self.ask = ask
        self.reference = reference
        self.through = through
        self.nginx_1_22 = nginx_1_22
        self.probe = probe            # the probe's bytes, for the leak check
        self.openssl = openssl        # asked with the openssl command
        self.answers = {}


def comparisons():
    rows = []

    def add(section, name, ask, **options):
        rows.append(Comparison(section, name, ask, **options))

    def by_openssl(section, name, ask, **options):
        """add(), for a question asked with the openssl command."""
        add(section, name, ask, openssl=True, **options)

    section = "(1) TLS"
    for offer, answer in ((["h2", "http/1.1"], "http/1.1"),
                          (["http/1.1"], "http/1.1"),
                          (["h2"], "handshake refused: alert "
                                   "no_application_protocol"),
                          (None, "none")):
        add(section, "ALPN, the client offers %s" % (
            ",".join(offer) if offer else "nothing"),
            lambda port, offer=offer: ask_alpn(port, offer),
            nginx_1_22=answer)
    # (version, what the client offers, in its order, nginx's choice)
    for version, offer, offered, answer in (
            ("1.2", TLS_1_2_OFFER, "CHACHA20, AES128-GCM, AES256-GCM",
             "ECDHE-ECDSA-CHACHA20-POLY1305"),
            ("1.2", TLS_1_2_OFFER_AES128, "AES128-GCM, CHACHA20, AES256-GCM",
             "ECDHE-ECDSA-AES128-GCM-SHA256"),
            ("1.3", TLS_1_3_OFFER, "CHACHA20, AES128-GCM, AES256-GCM",
             "TLS_CHACHA20_POLY1305_SHA256"),
            ("1.3", TLS_1_3_OFFER_AES128, "AES128-GCM, CHACHA20, AES256-GCM",
             "TLS_AES_128_GCM_SHA256")):
        by_openssl(section, "TLS %s suite, the client offers %s"
                   % (version, offered),
                   lambda port, version=version, offer=offer: ask_suite(
                       port, "tls" + version.replace(".", "_"), offer),
                   nginx_1_22=answer)
    by_openssl(section, "the version a default client gets",
               lambda port: ask_version(port, []), nginx_1_22="TLSv1.3")
    for version in ("1", "1_1"):
        by_openssl(section, "a TLS %s client" % version.replace("_", "."),
                   lambda port, version=version: ask_version(
                       port, ["-tls" + version, "-cipher",
                              "DEFAULT@SECLEVEL=0"]),
                   nginx_1_22="handshake refused: alert internal_error")
    by_openssl(section, "TLS 1.2 session ticket lifetime hint",
               ask_ticket_hint, nginx_1_22="300 s")
    by_openssl(section, "TLS 1.2 resumption with that ticket",
               ask_resumption, nginx_1_22="Reused")
    by_openssl(section, "TLS 1.3 session tickets", ask_tls13_tickets,
               nginx_1_22="2 tickets, lifetime 300 s")
    by_openssl(section, "TLS 1.2 renegotiation asked by the client "
               "(s_client R)", ask_renegotiation_s_client,
               nginx_1_22="the server's alert: warning no_renegotiation; "
                          "s_client ended")
    add(section, "TLS 1.2 renegotiation asked by the client, "
        "then only watching", ask_renegotiation_raw,
        nginx_1_22="an alert, then open at 3 s")

    section = "(2) not TLS on the TLS port"
    add(section, "plain HTTP: GET / HTTP/1.1",
        lambda port: ask_plain(port, request("GET / HTTP/1.1")),
        nginx_1_22='HTTP/1.1 400 Bad Request (page: "400 The plain HTTP '
                   'request was sent to HTTPS port"), then FIN')
    add(section, "a NUL byte", lambda port: ask_plain(port, b"\x00"),
        nginx_1_22="HTTP/1.1 400 Bad Request, then FIN")

    section = "(3) silent and partial clients"
    for kind in ("nothing", "half a ClientHello", "GE",
                 "a TLS handshake"):
        add(section, "%s, then silence: still open at %d s?" % (
            kind, SILENCE_WAIT_S),
            lambda port, kind=kind: ask_silence(port, kind),
            nginx_1_22="open at %d s" % SILENCE_WAIT_S)

    section = "(4) the 17 probes, inside TLS"
    for name, data, _, answer in PROBES:
        add(section, name, lambda port, data=data: ask_probe(port, data),
            nginx_1_22=answer, probe=data if data is not None else b"")

    section = "(5) the decoy told who is asking (--decoy-send-proxy v1)"
    add(section, "GET / from %s" % VISITOR,
        lambda port: ask_page(port, "/?visitor=%d" % os.getpid(), VISITOR),
        through="told", nginx_1_22="HTTP/1.1 200 OK")
    add(section, "GET /local-only from %s" % VISITOR,
        lambda port: ask_page(port, "/local-only", VISITOR),
        through="told", nginx_1_22="HTTP/1.1 403 Forbidden")
    add(section, "GET /local-only from 127.0.0.1",
        lambda port: ask_page(port, "/local-only", "127.0.0.1"),
        through="told", nginx_1_22="HTTP/1.1 200 OK")
    add(section, "GET /local-only from %s, without --decoy-send-proxy"
        % VISITOR, lambda port: ask_page(port, "/local-only", VISITOR),
        nginx_1_22="HTTP/1.1 403 Forbidden")
    return rows


ANY = object()   # a listed difference where whatsapp_proxy's answer is free

# The differences that stay, with their reasons: comparison name ->
# (nginx's answer, whatsapp_proxy's answer or ANY, why).
LISTED_DIFFERENCES = {
    "ALPN, the client offers h2": (
        "handshake refused: alert no_application_protocol", "none",
        "a WhatsApp client must never fail the handshake over ALPN, and "
        "what it offers there is not public, so whatsapp_proxy goes on "
        "without ALPN when it has no protocol in common with the client; "
        "nginx (since 1.21.4) refuses such a client"),
    "empty connection": (
        "nothing, then FIN", ANY,
        "inherent: a client that says nothing cannot be told from a "
        "WhatsApp client that has not spoken yet, so the proxy cannot ask "
        "the decoy what to answer"),
    "WA 6 3": (
        "HTTP/1.1 400 Bad Request, then close_notify+FIN", "nothing in 3 s",
        "inherent: these are a WhatsApp client's first bytes, so the proxy "
        "relays them to the chat server (here a silent one), where nginx "
        "refuses a request line it cannot read"),
    "GET /local-only from %s, without --decoy-send-proxy" % VISITOR: (
        "HTTP/1.1 403 Forbidden", "HTTP/1.1 200 OK",
        "without --decoy-send-proxy the decoy sees every visitor as the "
        "proxy's own address, 127.0.0.1, and serves a page meant for "
        "local clients to anyone: the reason --decoy-send-proxy exists"),
}

# Probes whose bytes must reach the chat server, with why.
MUST_REACH_CHAT = {
    "WA 6 3": "inherent: a WhatsApp client's own first bytes, which must "
              "reach WhatsApp",
}


# ---- 6. Running and reporting ---------------------------------------------

# Report (one line and one count per check): see peer_tool.py.


def run_comparison(row, ports):
    """Asks both servers at once, each in a thread of its own."""
    sides = {"nginx": ports[row.reference],
             "whatsapp_proxy": ports[row.through]}

    def ask(side, port):
        try:
            row.answers[side] = row.ask(port)
        except Exception as problem:        # a bug here is a failed check
            row.answers[side] = Answer("test error: %r" % problem)

    threads = [threading.Thread(target=ask, args=item, daemon=True)
               for item in sides.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SILENCE_WAIT_S + OPENSSL_LIMIT_S + 5)


def report_comparison(report, row):
    ours = row.answers.get("whatsapp_proxy", Answer("no answer (test hung)"))
    theirs = row.answers.get("nginx", Answer("no answer (test hung)"))
    label = "%s: %s" % (row.section.split(" ", 1)[0], row.name)
    if ours.detail != theirs.detail:
        for side, answer in (("nginx", theirs), ("whatsapp_proxy", ours)):
            print("#   %-15s %s" % (side, answer.detail or "-"))
    if row.nginx_1_22 is not None and theirs.text != row.nginx_1_22:
        print("#   note: this nginx answers '%s'; nginx 1.22.1 on Debian 12 "
              "answered '%s'" % (theirs.text, row.nginx_1_22))
    listed = LISTED_DIFFERENCES.get(row.name)
    if listed:
        want_nginx, want_ours, why = listed
        as_listed = theirs.text == want_nginx and (
            want_ours is ANY or ours.text == want_ours)
        report.check(as_listed, "%s: listed difference: nginx '%s', "
                     "whatsapp_proxy '%s': %s%s" % (
                         label, want_nginx,
                         ours.text if want_ours is ANY else want_ours, why,
                         "" if as_listed else " (NOW SEEN: nginx '%s', "
                         "whatsapp_proxy '%s')" % (theirs.text, ours.text)))
    elif ours.text == theirs.text:
        report.check(True, "%s: the same from both: '%s'" % (label, ours.text))
    else:
        report.check(False, "%s: nginx '%s', whatsapp_proxy '%s'" % (
            label, theirs.text, ours.text))


def report_leak(report, row, chat):
    """A probe through the proxy: did the chat server get its bytes?"""
    ours = row.answers.get("whatsapp_proxy")
    got = chat.got(ours.clients) if ours else None
    label = "(4): %s" % row.name
    why = MUST_REACH_CHAT.get(row.name)
    if why:
        good = got == row.probe
        report.check(good, "%s: the chat server gets exactly %r: %s%s" % (
            label, row.probe, why, "" if good else " (got %s)" % (
                "no connection" if got is None else repr(got[:40]))))
    else:
        report.check(got is None, "%s: the chat server gets nothing%s" % (
            label, "" if got is None else " (LEAK: it got %s)" % (
                "an empty connection" if not got else "%d bytes, %r" % (
                    len(got), got[:40]))))


def report_access_log(report, path):
    """The decoy's access log names the visitor: nginx writes
    $remote_addr (after real_ip, from the PROXY header) and
    $proxy_protocol_addr."""
    wanted = "/?visitor=%d " % os.getpid()
    line = ""
    deadline = time.monotonic() + 3
    while not line and time.monotonic() < deadline:
        try:
            with open(path) as log:
                line = next((l.strip() for l in log if wanted in l), "")
        except OSError:
            pass
        if not line:
            time.sleep(0.1)
    print("#   decoy access log: %s" % (line or "(no line for the request)"))
    seen = " ".join(line.split(" ")[:2])
    report.check(seen == "%s %s" % (VISITOR, VISITOR),
                 "(5): the decoy's access log shows the visitor %s as "
                 "$remote_addr and $proxy_protocol_addr (seen: '%s')"
                 % (VISITOR, seen))


def run(counts_file, options):
    ports = {key: int(options[key])
             for key in ("nginx", "proxy", "told", "chat")}
    chat = ChatServer(ports["chat"])
    wait_listening([ports[key] for key in ("nginx", "proxy")],
                   STARTUP_S)
    rows = comparisons()

    def one_by_one(batch):
        for row in batch:
            run_comparison(row, ports)

    # Everything at once, but for the openssl commands: those run one
    # after the other in a thread of their own, so that a busy machine
    # does not slow a handshake past a timeout. The slowest question (the
    # silent clients, 8 s) sets the time.
    threads = [threading.Thread(target=one_by_one, args=(
        [row for row in rows if row.openssl],), daemon=True)]
    threads += [threading.Thread(target=run_comparison, args=(row, ports),
                                 daemon=True)
                for row in rows if not row.openssl]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + RUN_LIMIT_S - 20
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    chat.settle()
    report = Report()
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            print("# %s" % section)
            if section.startswith("(1)"):
                print("#   %s" % TLS_1_3_NOTE)
        report_comparison(report, row)
        if row.probe is not None:
            report_leak(report, row, chat)
    report_access_log(report, options["decoy_log"])
    # Every connection the chat server got came from a probe named above:
    # one from elsewhere (a TLS question, a silent client) is a leak too.
    known = set()
    for row in rows:
        if row.probe is not None and "whatsapp_proxy" in row.answers:
            known.update(row.answers["whatsapp_proxy"].clients)
    with chat.lock:
        strays = {source: data for source, data in chat.records.items()
                  if source not in known}
        others = list(chat.others)
    for row in rows:
        answer = row.answers.get("whatsapp_proxy")
        for client in (answer.clients if answer else []):
            if client in strays:
                print("#   %s reached the chat server: %r" % (
                    row.name, bytes(strays[client][:40])))
    report.check(not strays and not others,
                 "the chat server got nothing but the probes' connections"
                 "%s" % ("" if not strays and not others else
                         " (also %d from other clients, e.g. openssl "
                         "s_client's, and %d without a PROXY header)"
                         % (len(strays), len(others))))
    report.save(counts_file)
    return 0


def main(argv):
    if len(argv) >= 3 and argv[1] == "run":
        options = dict(arg.split("=", 1) for arg in argv[3:])
        start_watchdog(RUN_LIMIT_S)   # whatever hangs, the process ends
        return run(argv[2], options)
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
