#!/usr/bin/env python3
"""peer_tool.py - the small programs that tests/peers.sh needs around
whatsapp_proxy and HAProxy, and the pieces that differential.py and
lookalike.py share (they import them from here): listening(),
wait_listening(), read_proxy_header(), read_line(), Report and
start_watchdog(). Standard library only (Python 3.7 or newer).

    peer_tool.py ports N             print N free TCP ports on 127.0.0.1
    peer_tool.py wait-listen PORT S  wait up to S seconds until something
                                     listens on 127.0.0.1:PORT (read from
                                     /proc/net/tcp: no connection is made)
    peer_tool.py upstream PORT NAME  a fake chat server (runs until killed)
    peer_tool.py client HOST PORT [--tls] [--hold S] [--tries N]
                                     one conversation with the fake server

The fake chat server reads the PROXY header that whatsapp_proxy sends
(v1, v2, or none), exactly as a receiver must: not one byte more. It then
answers the client with one line saying what the header carried,

    SEEN name=NAME ver=v2 src=127.0.0.1:41234 dst=127.0.0.1:24001

and echoes every byte after that. If the client's first bytes are an HTTP
request (curl), it answers one HTTP response whose body is that line.

The client sends a random line, reads the SEEN line and the echo, and prints

    self=127.0.0.1:41234 name=NAME ver=v2 src=... dst=... echo=ok tries=1

where self is its own address, the one the header must carry. peers.sh
compares the two. Exit status: 0 if the echo came back intact, 1 if not.
"""

import os
import random
import socket
import ssl
import struct
import sys
import threading
import time

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107                 # the v1 line's limit, CRLF included
IO_TIMEOUT_S = 10            # no wait in this file is unbounded
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"OPTIONS ")


# ---- free ports and listening sockets ----------------------------------

def free_ports(count):
    """Returns count distinct ports that are free on 127.0.0.1, chosen at
    random in 20000-32000: below the kernel's ephemeral range (32768 and
    up), so no outgoing connection of the test can take one meanwhile."""
    ports = []
    rng = random.Random()
    for _ in range(2000):
        if len(ports) == count:
            break
        port = rng.randrange(20000, 32000)
        if port in ports:
            continue
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind(("127.0.0.1", port))
            ports.append(port)
        except OSError:
            pass
        finally:
            probe.close()
    if len(ports) != count:
        sys.exit("peer_tool: could not find %d free ports" % count)
    return ports


def listening(port):
    """True if a socket listens on 127.0.0.1:port or 0.0.0.0:port."""
    wanted = {"0100007F:%04X" % port, "00000000:%04X" % port}
    try:
        with open("/proc/net/tcp") as table:
            next(table)
            for row in table:
                fields = row.split()
                if fields[1] in wanted and fields[3] == "0A":  # 0A: LISTEN
                    return True
    except OSError:
        pass
    return False


def wait_listening(ports, seconds):
    """Waits until every port in ports listens, seconds at most in all (one
    deadline for the lot, not one each). True if they all do in time."""
    deadline = time.monotonic() + seconds
    for port in ports:
        while not listening(port):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
    return True


def wait_listen(port, seconds):
    """The wait-listen command: its exit status, 0 if port listens in time."""
    return 0 if wait_listening([port], seconds) else 1


# ---- the PROXY header, as a receiver reads it ---------------------------

def recv_exact(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError("closed after %d of %d bytes" % (len(data), count))
        data += chunk
    return data


def read_proxy_header(sock):
    """Reads a PROXY header, and only the header, from sock. Returns
    (version, src, dst, leftover): version is "v1", "v2", "none" or "bad";
    src and dst are "ip:port" or "-"; leftover is payload already read
    (only when there was no header). Raises EOFError if the peer closed
    before sending anything (a health check's connect)."""
    first = sock.recv(1, socket.MSG_PEEK)
    if not first:
        raise EOFError("closed before any byte")
    if first == b"\r":                                   # v2 starts with CR
        fixed = recv_exact(sock, 16)
        if fixed[:12] != V2_SIGNATURE:
            return "bad", "-", "-", b""
        command, family = fixed[12], fixed[13]
        length = struct.unpack("!H", fixed[14:16])[0]
        body = recv_exact(sock, length)
        if command == 0x20:
            return "v2-local", "-", "-", b""
        if command != 0x21:
            return "bad", "-", "-", b""
        if family == 0x11 and length >= 12:
            src = socket.inet_ntop(socket.AF_INET, body[0:4])
            dst = socket.inet_ntop(socket.AF_INET, body[4:8])
            sport, dport = struct.unpack("!HH", body[8:12])
        elif family == 0x21 and length >= 36:
            src = socket.inet_ntop(socket.AF_INET6, body[0:16])
            dst = socket.inet_ntop(socket.AF_INET6, body[16:32])
            sport, dport = struct.unpack("!HH", body[32:36])
        else:
            return "v2-unspec", "-", "-", b""
        return "v2", "%s:%d" % (src, sport), "%s:%d" % (dst, dport), b""
    if first == b"P":                                    # maybe "PROXY "
        peek = sock.recv(6, socket.MSG_PEEK)
        if peek == b"PROXY ":
            line = b""
            while not line.endswith(b"\r\n"):             # byte by byte: never
                if len(line) >= V1_MAX:                    # read past the CRLF
                    return "bad", "-", "-", b""
                line += recv_exact(sock, 1)
            words = line[:-2].decode("ascii", "replace").split(" ")
            if len(words) == 6 and words[1] in ("TCP4", "TCP6"):
                return ("v1", "%s:%s" % (words[2], words[4]),
                        "%s:%s" % (words[3], words[5]), b"")
            if len(words) >= 2 and words[1] == "UNKNOWN":
                return "v1-unknown", "-", "-", b""
            return "bad", "-", "-", b""
    return "none", "-", "-", b""


# ---- reporting, for differential.py and lookalike.py ---------------------

class Report:
    """Counts the checks of a run and prints one line for each, "ok - ..."
    or "not ok - ...", as the shell scripts do (lib.sh's ok and not_ok).
    save() writes the counts, "passed=N failed=N", to the file that the
    calling script reads back (lib.sh's add_counts), so that one summary
    line covers the shell's checks and these."""

    def __init__(self):
        self.passed = self.failed = 0

    def check(self, good, text):
        if good:
            self.passed += 1
        else:
            self.failed += 1
        print(("ok - " if good else "not ok - ") + text, flush=True)

    def save(self, counts_file):
        with open(counts_file, "w") as counts:
            counts.write("passed=%d failed=%d\n" % (self.passed, self.failed))


def start_watchdog(limit_s):
    """The run's own limit: whatever hangs (a socket, a thread, a peer that
    never answers), after limit_s seconds the process prints a failed check
    and ends at once. No counts file is written then, which the calling
    script reports as a run that did not finish."""
    watchdog = threading.Timer(limit_s, lambda: (
        print("not ok - the run took over %d s" % limit_s, flush=True),
        os._exit(1)))
    watchdog.daemon = True
    watchdog.start()


# ---- the fake chat server ----------------------------------------------

def serve_one(conn, name):
    conn.settimeout(IO_TIMEOUT_S * 6)
    try:
        version, src, dst, _ = read_proxy_header(conn)
        seen = "SEEN name=%s ver=%s src=%s dst=%s" % (name, version, src, dst)
        print(seen, flush=True)                          # the server's log
        if version == "bad":
            return
        data = conn.recv(65536)
        if not data:
            return
        if data.startswith(HTTP_METHODS):
            while b"\r\n\r\n" not in data and len(data) < 65536:
                more = conn.recv(65536)
                if not more:
                    break
                data += more
            body = (seen + "\n").encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
            return
        conn.sendall((seen + "\n").encode())
        while data:                                      # then a plain echo
            conn.sendall(data)
            data = conn.recv(65536)
    except (OSError, EOFError):
        pass
    finally:
        conn.close()


def upstream(port, name):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(512)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve_one, args=(conn, name),
                         daemon=True).start()


# ---- the client ---------------------------------------------------------

def read_line(sock):
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError("closed after %r" % line)
        line += chunk
    return line.decode("ascii", "replace").rstrip("\n")


def exchange(sock):
    """Sends one random line and checks that it comes back byte for byte."""
    message = ("hello %016x\n" % random.getrandbits(64)).encode()
    sock.sendall(message)
    return recv_exact(sock, len(message)) == message


def converse(host, port, use_tls, hold_s):
    """One conversation. Returns (self, seen line, echo result)."""
    sock = socket.create_connection((host, port), timeout=IO_TIMEOUT_S)
    try:
        me = "%s:%d" % sock.getsockname()[:2]
        if use_tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False      # a made, self-signed chain,
            context.verify_mode = ssl.CERT_NONE  # as WhatsApp clients accept
            sock = context.wrap_socket(sock)
        message = ("hello %016x\n" % random.getrandbits(64)).encode()
        sock.sendall(message)
        seen = read_line(sock)
        echo = recv_exact(sock, len(message)) == message
        if hold_s > 0:
            # Say where we landed now, then hold the connection open and
            # use it once more: peers.sh stops that instance meanwhile.
            print("first self=%s %s" % (me, seen[5:]), flush=True)
            time.sleep(hold_s)
            echo = echo and exchange(sock)
        return me, seen, echo
    finally:
        sock.close()


def client(host, port, use_tls, hold_s, tries):
    error = ""
    for attempt in range(1, tries + 1):
        try:
            me, seen, echo = converse(host, port, use_tls, hold_s)
            if not seen.startswith("SEEN "):
                raise EOFError("no SEEN line: %r" % seen)
            print("self=%s %s echo=%s tries=%d"
                  % (me, seen[5:], "ok" if echo else "BAD", attempt))
            return 0 if echo else 1
        except (OSError, EOFError, ssl.SSLError) as problem:
            error = str(problem) or type(problem).__name__
            time.sleep(0.2)
    print("self=- failed after %d tries: %s" % (tries, error))
    return 1


def main(argv):
    if len(argv) >= 3 and argv[1] == "ports":
        print(" ".join(str(p) for p in free_ports(int(argv[2]))))
        return 0
    if len(argv) == 4 and argv[1] == "wait-listen":
        return wait_listen(int(argv[2]), float(argv[3]))
    if len(argv) == 4 and argv[1] == "upstream":
        upstream(int(argv[2]), argv[3])
        return 0
    if len(argv) >= 4 and argv[1] == "client":
        options = argv[4:]
        use_tls = "--tls" in options
        hold_s = float(options[options.index("--hold") + 1]) \
            if "--hold" in options else 0.0
        tries = int(options[options.index("--tries") + 1]) \
            if "--tries" in options else 1
        return client(argv[2], int(argv[3]), use_tls, hold_s, tries)
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
