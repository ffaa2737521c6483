#!/usr/bin/env python3
"""The abuse table of docs/security.md, measured against the release binaries on loopback.

    cargo build --release -p recommendations -p marketplace -p loadgen
    python3 bench/abuse.py               # every row, about 8 minutes; prints a Markdown table
    python3 bench/abuse.py ROW [ROW...]  # only the rows named (names below), in table order

Each row starts fresh services with their shipped defaults (RUST_LOG=info, text logs), sends
one kind of abuse from this process (plain sockets, and Python's ssl for mutual TLS), and reads
the server's resident memory and open files from /proc, its log from a file, and its metrics
from the admin port. Memory "after" is RSS at the first second at which at least three quarters
of what the burst took are given back (give or take 1 MiB), or after 60 s if that never happens. Every loop here is bounded in count and
time; only loopback addresses are used; every process started here is stopped by its PID.

Environment:
    BIN_DIR   the folder holding the marketplace, recommendations and loadgen binaries
              (default: target/release under the repository root)
    PKI_DIR   an existing development PKI (ca.pem, server.pem/.key, client.pem/.key) to use
              instead of making a new one. Otherwise a new one is made: with `cargo run -p
              bookstore-certs` when BIN_DIR is not set, else with BIN_DIR/bookstore-certs if it
              is there, else with certs/openssl-dev-pki.sh (no cargo).

Rows (name: attack):
"""

import asyncio
import multiprocessing
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN_DIR") or os.path.join(ROOT, "target", "release")
LOOPBACK = "127.0.0.1"


def free_port():
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


# Every service started and not yet stopped, so that a row that fails stops its own (by PID).
RUNNING = []


class Service:
    def __init__(self, name, env, certs):
        self.name = name
        self.port, self.admin = free_port(), free_port()
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
        full = {
            "PATH": os.environ.get("PATH", ""),
            "LISTEN_ADDR": f"{LOOPBACK}:{self.port}",
            "ADMIN_ADDR": f"{LOOPBACK}:{self.admin}",
            "CERTS_DIR": certs,
            **env,
        }
        self.proc = subprocess.Popen(
            [os.path.join(BIN, name)], env=full, stdout=subprocess.DEVNULL, stderr=self.log
        )
        self.stopped = False
        RUNNING.append(self)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.get("/readyz") == 200:
                return
            time.sleep(0.05)
        raise SystemExit(f"{name} never became ready; see {self.log.name}")

    def get(self, path, port=None, timeout=2.0):
        """Status of GET path on the admin port (or `port`), or None."""
        try:
            with socket.create_connection((LOOPBACK, port or self.admin), timeout=timeout) as s:
                s.settimeout(timeout)
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                head = s.recv(64).decode(errors="replace")
                return int(head.split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def metric(self, *parts):
        try:
            with socket.create_connection((LOOPBACK, self.admin), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return None
        for line in data.decode(errors="replace").splitlines():
            if not line.startswith("#") and all(p in line for p in parts):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    @property
    def pid(self):
        return self.proc.pid

    def rss(self):
        return rss_kib(self.pid)

    def log_lines(self, needle=""):
        with open(self.log.name, errors="replace") as f:
            return [l for l in f if needle in l]

    def log_bytes(self):
        return os.path.getsize(self.log.name)

    def stop(self):
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log.name)
        if self in RUNNING:
            RUNNING.remove(self)


def settle(service, idle, peak):
    """Seconds until three quarters of peak - idle are given back (None: not within 60 s), and
    the RSS then."""
    started = time.time()
    while time.time() - started < 60:
        now = service.rss()
        if now <= idle + (peak - idle) / 4 + 1024:
            return round(time.time() - started), now
        time.sleep(1)
    return None, service.rss()


def mib(kib):
    return f"{kib / 1024:.1f}"


async def open_many(port, n, first=b""):
    """n connections (those the kernel accepts), each having sent `first`."""
    conns = []
    for _ in range(n):
        try:
            r, w = await asyncio.open_connection(LOOPBACK, port)
            if first:
                w.write(first)
            conns.append((r, w))
        except OSError:
            break
    return conns


async def closed_within(conns, seconds):
    """How many of conns the server closed within `seconds`."""

    async def one(r):
        try:
            while await r.read(4096):
                pass
            return True
        except OSError:
            return True

    results = await asyncio.gather(
        *(asyncio.wait_for(one(r), seconds) for r, _ in conns), return_exceptions=True
    )
    return sum(1 for x in results if x is True)


def close_all(conns):
    for _, w in conns:
        w.close()


class Sampler(threading.Thread):
    """Peak RSS and open files of `pid`, read from /proc every `every` seconds on a thread of
    its own (the event loop may be busy), until stop()."""

    def __init__(self, pid, every):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss, self.peak_fds = rss_kib(pid), fds(pid)
        self.done = threading.Event()
        self.start()

    def run(self):
        while not self.done.wait(self.every):
            try:
                self.peak_rss = max(self.peak_rss, rss_kib(self.pid))
                self.peak_fds = max(self.peak_fds, fds(self.pid))
            except OSError:
                return

    def stop(self):
        self.done.set()
        self.join()
        return self


# HTTP/2, as raw frames.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x9
ACK, END_STREAM, END_HEADERS = 0x1, 0x1, 0x4
CANCEL = 0x8
# HPACK: :method GET, :path /, :scheme http (static table), :authority "x" (literal, indexed).
GET_ROOT = bytes([0x82, 0x84, 0x86, 0x41, 0x01]) + b"x"


def frame(kind, flags, stream, payload=b""):
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
            + payload)


def unfinished_block(frames):
    """A header block of `frames` (a HEADERS frame on stream 1, then CONTINUATIONs, none ending
    the block) of the given payload lengths: one literal header, name "x", whose value runs to
    the end of the block, so that the HPACK decoder must hold every byte until the block ends."""
    total = sum(frames)
    # 0x00 (literal, new name), name length 1, "x", then the value's length as an HPACK integer
    # with a 7-bit prefix (0x7f and continuation bytes), then the value.
    value = total - 3 - 1
    while True:
        rest, extra = value - 127, []
        while rest >= 128:
            extra.append(0x80 | rest % 128)
            rest //= 128
        extra.append(rest)
        if 3 + 1 + len(extra) + value == total:
            break
        value = total - 3 - 1 - len(extra)
    payload = bytes([0x00, 0x01, ord("x"), 0x7F, *extra]) + b"a" * value
    block, at = b"", 0
    for i, length in enumerate(frames):
        block += frame(HEADERS if i == 0 else CONTINUATION, 0, 1, payload[at:at + length])
        at += length
    return block


async def http1_status(port, path="/", timeout=2.0):
    """Status of GET path on a fresh HTTP/1.1 connection to `port`, or None."""
    w = None
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), timeout)
        w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(r.readline(), timeout)
        return int(line.split()[1])
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        return None
    finally:
        if w is not None:
            w.close()


ROWS = []


def row(attack, limit, outcome):
    ROWS.append((attack, limit, outcome))
    print(f"| {attack} | {limit} | {outcome} |", flush=True)


def marketplace_env(backend):
    return {"RECOMMENDATIONS_HOST": LOOPBACK, "RECOMMENDATIONS_PORT": str(backend.port),
            "RECOMMENDATIONS_TLS_NAME": "localhost"}


async def row_header_timeout(certs, backend):
    """`GET / HTTP/1.1\\r\\nHost: x\\r\\n`, then nothing"""
    env = marketplace_env(backend)
    m = Service("marketplace", env, certs)
    (conn,) = await open_many(m.port, 1, b"GET / HTTP/1.1\r\nHost: x\r\n")
    t0 = time.time()
    await closed_within([conn], 30)
    row("`GET / HTTP/1.1\\r\\nHost: x\\r\\n`, then nothing", "`HEADER_READ_TIMEOUT_SECS` 10",
        f"closed by the server after {time.time() - t0:.1f} s")
    m.stop()


async def row_long_header(certs, backend):
    """300 connections each sending an unfinished 390 KB header"""
    env = marketplace_env(backend)
    m = Service("marketplace", env, certs)
    idle = m.rss()
    pad = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (390 * 1024)
    conns = await open_many(m.port, 300)
    peak = idle

    async def push(w):
        try:
            w.write(pad)
            await asyncio.wait_for(w.drain(), 5)
        except (OSError, asyncio.TimeoutError):
            pass

    await asyncio.gather(*(push(w) for _, w in conns))
    peak = max(peak, m.rss())
    closed = await closed_within(conns, 10)
    peak = max(peak, m.rss())
    close_all(conns)
    secs, after = settle(m, idle, peak)
    row("300 connections each sending an unfinished 390 KB header",
        "`MAX_HEAD_BYTES` 24 KiB",
        f"{closed} of 300 closed by the server (431, or a reset mid-write); RSS {mib(idle)} → {mib(peak)} MiB, "
        f"{mib(after)} MiB {secs if secs is not None else '>60'} s later")
    m.stop()


async def row_slowloris(certs, backend):
    """5,000 slowloris connections (a header line every 5 s)"""
    env = marketplace_env(backend)
    m = Service("marketplace", env, certs)
    idle = m.rss()
    conns = await open_many(m.port, 5000, b"GET / HTTP/1.1\r\n")
    refused_at_once = m.metric("bookstore_connections_refused_total", 'listener="http"',
                               'reason="max_connections"')
    t0 = time.time()
    peak = m.rss()

    async def drip(r, w):
        for n in range(6):  # one header line every 5 s, at most 30 s
            await asyncio.sleep(5)
            try:
                w.write(f"X-Slow-{n}: a\r\n".encode())
                await w.drain()
            except OSError:
                return True
            if r.at_eof():
                return True
        return False

    gone = await asyncio.gather(*(drip(r, w) for r, w in conns))
    peak = max(peak, m.rss())
    close_all(conns)
    secs, after = settle(m, idle, peak)
    row("5,000 slowloris connections (a header line every 5 s)",
        "`MAX_CONNECTIONS` 2048, `HEADER_READ_TIMEOUT_SECS` 10",
        f"{refused_at_once:.0f} closed on arrival (cap), the rest by the header timeout: "
        f"{sum(gone)} of {len(conns)} closed within {time.time() - t0:.0f} s; RSS {mib(idle)} → {mib(peak)} MiB, "
        f"{mib(after)} MiB {secs if secs is not None else '>60'} s later")
    m.stop()


async def row_idle_http(certs, backend):
    """15,000 idle TCP connections to :5000"""
    env = marketplace_env(backend)
    m = Service("marketplace", env, certs)
    idle = m.rss()
    conns = await open_many(m.port, 15000)
    await asyncio.sleep(1)
    t0 = time.time()
    ready = m.get("/readyz")
    ready_ms = (time.time() - t0) * 1000
    page = m.get("/", port=m.port)
    open_fds, peak = fds(m.pid), m.rss()
    refused = m.metric("bookstore_connections_refused_total", 'listener="http"',
                       'reason="max_connections"')
    close_all(conns)
    warns = len(m.log_lines("WARN"))
    row(f"{len(conns):,} idle TCP connections to :5000",
        "`MAX_CONNECTIONS` 2048 (`ADMIN_MAX_CONNECTIONS` 64 apart)",
        f"{refused:.0f} closed on arrival; the process holds {open_fds} files; `/readyz` "
        f"{ready} in {ready_ms:.0f} ms; a new page {page or 'refused'} (at the cap); RSS {mib(idle)} → "
        f"{mib(peak)} MiB; {warns} WARN lines")
    m.stop()


async def row_worst_heads(certs, backend):
    """2,048 connections each holding a 23 KB unfinished head (the worst the caps allow)"""
    # The worst these limits allow: every connection slot holding a full head buffer.
    env = marketplace_env(backend)
    m = Service("marketplace", env, certs)
    idle = m.rss()
    conns = await open_many(m.port, 2048, b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 23000)
    await asyncio.sleep(2)
    peak = m.rss()
    close_all(conns)
    secs, after = settle(m, idle, peak)
    row("2,048 connections each holding a 23 KB unfinished head (the worst the caps allow)",
        "all of the above",
        f"RSS {mib(idle)} → {mib(peak)} MiB, {mib(after)} MiB "
        f"{secs if secs is not None else '>60'} s later")
    m.stop()


async def row_sigterm(certs, backend):
    """one unfinished-header connection, then SIGTERM"""
    env = marketplace_env(backend)
    m = Service("marketplace", {**env, "SHUTDOWN_GRACE_SECS": "30"}, certs)
    conns = await open_many(m.port, 1, b"GET / HTTP/1.1\r\nHost: x\r\n")
    await asyncio.sleep(0.2)
    t0 = time.time()
    m.proc.send_signal(signal.SIGTERM)
    m.proc.wait(40)
    row("one unfinished-header connection, then SIGTERM", "shutdown closes idle connections",
        f"exit {m.proc.returncode} after {(time.time() - t0) * 1000:.0f} ms (grace 30 s)")
    close_all(conns)
    m.stop()


async def zero_window_attacker(port, keep_alive_trick, lifetime):
    """One h2c connection: window 0, 128 `GET /` streams, never a WINDOW_UPDATE; with the trick,
    one more stream opened and at once reset every 2 s. The server's SETTINGS and PINGs are
    acknowledged (as any HTTP/2 client does); every other frame is read and dropped. Returns
    (seconds from its 128 requests until the server closed it, or None if it outlived
    `lifetime`; streams opened and reset; answers whose HEADERS came; DATA bytes that came)."""
    r, w = await asyncio.open_connection(LOOPBACK, port)
    zero_window = (0x4).to_bytes(2, "big") + (0).to_bytes(4, "big")
    requests = b"".join(frame(HEADERS, END_STREAM | END_HEADERS, 2 * i + 1, GET_ROOT)
                        for i in range(128))
    w.write(PREFACE + frame(SETTINGS, 0, 0, zero_window) + requests)
    await w.drain()
    sent = time.time()
    seen = {"answers": 0, "data": 0}

    async def read():
        buf = b""
        try:
            while data := await r.read(65536):
                buf += data
                while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                    length = int.from_bytes(buf[:3], "big")
                    kind, flags, payload = buf[3], buf[4], buf[9:9 + length]
                    buf = buf[9 + length:]
                    if kind == SETTINGS and not flags & ACK:
                        w.write(frame(SETTINGS, ACK, 0))
                    elif kind == PING and not flags & ACK:
                        w.write(frame(PING, ACK, 0, payload))
                    elif kind == HEADERS:
                        seen["answers"] += 1
                    elif kind == DATA:
                        seen["data"] += length
        except OSError:
            pass
        return time.time() - sent

    reading = asyncio.ensure_future(read())
    tricks, next_stream = 0, 257
    deadline = sent + lifetime
    while not reading.done() and time.time() < deadline:
        wait = min(2.0 if keep_alive_trick else lifetime, deadline - time.time())
        await asyncio.wait([reading], timeout=max(wait, 0))
        if keep_alive_trick and not reading.done() and not w.is_closing():
            # One more stream, at once reset: a request started and ended.
            w.write(frame(HEADERS, END_HEADERS, next_stream, GET_ROOT)
                    + frame(RST_STREAM, 0, next_stream, CANCEL.to_bytes(4, "big")))
            tricks, next_stream = tricks + 1, next_stream + 2
    took = reading.result() if reading.done() else None
    reading.cancel()
    w.close()
    return took, tricks, seen["answers"], seen["data"]


async def zero_window_subrow(certs, backend, attackers, keep_alive_trick):
    env = marketplace_env(backend)
    m = Service("marketplace", env, certs)
    idle, fds0, lines0 = m.rss(), fds(m.pid), len(m.log_lines())
    sampler = Sampler(m.pid, 0.05)
    attacks = [asyncio.ensure_future(zero_window_attacker(m.port, keep_alive_trick, 30))
               for _ in range(attackers)]
    await asyncio.sleep(0.2)  # their 128 requests are in
    # Another client's pages: a fresh HTTP/1.1 connection ten times a second for 15 s.
    statuses, t0 = [], time.time()
    tick = t0
    while time.time() - t0 < 15:
        statuses.append(await http1_status(m.port))
        tick = max(tick + 0.1, time.time())
        await asyncio.sleep(tick - time.time())
    results = await asyncio.gather(*attacks)
    sampler.stop()
    stalled = m.metric("bookstore_connections_closed_total", 'listener="http"',
                       'reason="send_stalled"')
    lines = len(m.log_lines()) - lines0
    ok = sum(1 for s in statuses if s == 200)
    others = sorted({str(s) for s in statuses if s != 200})
    took = [t for t, _, _, _ in results if t is not None]
    if not took:
        closed = "not closed within 30 s"
    elif max(took) - min(took) < 0.05:
        closed = f"closed after {max(took):.1f} s"
    else:
        closed = f"closed after {min(took):.1f}–{max(took):.1f} s"
    if 0 < len(took) < attackers:
        closed += f" ({attackers - len(took)} not within 30 s)"
    tricks = sum(t for _, t, _, _ in results)
    answers = sum(a for _, _, a, _ in results)
    data = sum(d for _, _, _, d in results)
    s = "s" if attackers > 1 else ""
    row(f"{attackers} h2c connection{s}: stream window 0, 128 `GET /` streams, never a "
        "WINDOW_UPDATE" + (", and one more stream opened and reset (CANCEL) every 2 s"
                           if keep_alive_trick else ""),
        "`SEND_TIMEOUT` 10 s (answers waiting, none delivered); an answer ready gives its place "
        "back",
        f"another client's pages (fresh HTTP/1.1, 10 a second for 15 s): {ok} of {len(statuses)} "
        f"200{' (others: ' + ', '.join(others) + ')' if others else ''}; attacker "
        f"connection{s} {closed} ({stalled:.0f} `send_stalled`; {answers} answers' HEADERS and "
        f"{data} DATA bytes reached {'them' if attackers > 1 else 'it'}"
        f"{f', {tricks} streams opened and reset' if keep_alive_trick else ''}); peak RSS "
        f"{mib(idle)} → {mib(sampler.peak_rss)} MiB, open files {fds0} → {sampler.peak_fds}; "
        f"{lines} log lines")
    m.stop()


async def row_zero_window(certs, backend):
    """1 and 8 zero-window h2c connections holding 128 streams, without and with a stream
    opened and reset every 2 s, while another client asks for pages (4 sub-rows)"""
    for attackers in (1, 8):
        for keep_alive_trick in (False, True):
            await zero_window_subrow(certs, backend, attackers, keep_alive_trick)


async def header_blocks_subrow(certs, backend, block, what):
    env = marketplace_env(backend)
    m = Service("marketplace", env, certs)
    idle = m.rss()
    sampler = Sampler(m.pid, 0.02)
    attack = PREFACE + frame(SETTINGS, 0, 0) + block
    closed = [0]

    async def hold(r, w):
        # Stops writing at the first write the server no longer takes; then held until the
        # server closes it (or it is cancelled at the end).
        try:
            w.write(attack)
            await w.drain()
            while await r.read(65536):
                pass
        except OSError:
            pass
        closed[0] += 1

    conns, holders = [], []
    t0 = time.time()
    for _ in range(10):
        # 200 at a time: a burst of 2,000 would overflow the kernel's accept queue.
        opened = await asyncio.gather(
            *(asyncio.open_connection(LOOPBACK, m.port) for _ in range(200)),
            return_exceptions=True)
        for c in opened:
            if isinstance(c, tuple):
                conns.append(c)
                holders.append(asyncio.ensure_future(hold(*c)))
    # Held while the server reads them: at least a second, then until nothing has changed
    # for 2 s (connections closed, and the two counters), 15 s at most.
    held, last, same_since = time.time(), None, time.time()
    while time.time() - held < 15:
        await asyncio.sleep(0.25)
        now = (closed[0],
               m.metric("bookstore_connections_closed_total", 'listener="http"',
                        'reason="head_too_large"'),
               m.metric("bookstore_connections_closed_total", 'listener="http"',
                        'reason="head_budget"'))
        if now != last:
            last, same_since = now, time.time()
        elif time.time() - held >= 1 and time.time() - same_since >= 2:
            break
    meanwhile = await http1_status(m.port, "/style.css")
    took = time.time() - t0
    too_large = m.metric("bookstore_connections_closed_total", 'listener="http"',
                         'reason="head_too_large"')
    gave_way = m.metric("bookstore_connections_closed_total", 'listener="http"',
                        'reason="head_budget"')
    still_open = m.metric("bookstore_connections_open", 'listener="http"')
    server_closed = closed[0]
    for h in holders:
        h.cancel()
    await asyncio.gather(*holders, return_exceptions=True)
    close_all(conns)
    peak = max(sampler.stop().peak_rss, m.rss())
    secs, after = settle(m, idle, peak)
    row(f"2,000 h2c connections (200 at a time) each sending {what}, then holding it",
        "`MAX_HEAD_BYTES` 24 KiB a header block, `MAX_HEAD_BYTES_TOTAL` 16 MiB in all "
        "(container limit 160 MiB; target peak ≤ 80 MiB)",
        f"{len(conns)} connected; {server_closed} closed by the server within {took:.0f} s "
        f"({too_large:.0f} `head_too_large`, {gave_way:.0f} `head_budget`, {still_open:.0f} "
        f"still open); `/style.css` {meanwhile} meanwhile; RSS {mib(idle)} → {mib(peak)} MiB "
        f"(sampled every 20 ms), {mib(after)} MiB {secs if secs is not None else '>60'} s later")
    m.stop()


async def row_h2_header_blocks(certs, backend):
    """2,000 h2c connections each holding an unfinished 96 KiB header block (HEADERS and five
    CONTINUATIONs of 16 KiB zeros), then each holding a 24 KiB one (2 sub-rows)"""
    zeros = b"".join(frame(kind, 0, 1, bytes(16384))
                     for kind in (HEADERS,) + (CONTINUATION,) * 5)
    await header_blocks_subrow(
        certs, backend, zeros,
        "a header block of 96 KiB of zero bytes not ended (HEADERS and five CONTINUATIONs of "
        "16 KiB, no END_HEADERS)")
    await header_blocks_subrow(
        certs, backend, unfinished_block([16384, 8192]),
        "a header block of 24 KiB not ended (HEADERS of 16 KiB and a CONTINUATION of 8 KiB), "
        "one HPACK literal whose value runs to its end")


def mtls_context(certs):
    ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
    ctx.load_cert_chain(os.path.join(certs, "client.pem"), os.path.join(certs, "client.key"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def row_idle_tls(certs, backend):
    """15,000 idle TCP connections to the TLS port"""
    r = Service("recommendations", {}, certs)
    idle = r.rss()
    log0 = r.log_bytes()
    conns = await open_many(r.port, 15000)
    await asyncio.sleep(1)
    peak, open_fds = r.rss(), fds(r.pid)
    closed = await closed_within(conns, 20)
    peak = max(peak, r.rss())
    close_all(conns)
    secs, after = settle(r, idle, peak)
    warns = len(r.log_lines("WARN"))
    row(f"{len(conns):,} idle TCP connections to the TLS port",
        "`MAX_CONNECTIONS` 1024 (once the handshake is done), `MAX_HANDSHAKES` 128 (the oldest silent one gives way), `TLS_HANDSHAKE_TIMEOUT_SECS` 3",
        f"all closed within 20 s ({closed}); the process holds at most {open_fds} files; RSS "
        f"{mib(idle)} → {mib(peak)} MiB, {mib(after)} MiB "
        f"{secs if secs is not None else '>60'} s later; {warns} WARN lines, "
        f"{(r.log_bytes() - log0) / 1024:.1f} KiB of log")
    r.stop()


async def row_held_calls(certs, backend):
    """20 allowed connections × 256 held calls"""
    r = Service("recommendations", {"ARTIFICIAL_DELAY_MS": "2000", "MAX_CALLS": "100000"}, certs)
    idle = r.rss()
    run = subprocess.Popen(
        [os.path.join(BIN, "loadgen"), "grpc", "--addr", f"{LOOPBACK}:{r.port}", "--certs",
         certs, "--connections", "20", "-c", "5120", "-n", "5120", "--warmup", "0", "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = idle
    while run.poll() is None:
        peak = max(peak, r.rss())
        time.sleep(0.1)
    secs, after = settle(r, idle, peak)
    row("20 allowed connections × 256 held calls (`MAX_CALLS` raised to let them in)",
        "`MAX_CALLS_PER_CONNECTION` 256; jemalloc",
        f"RSS {mib(idle)} → {mib(peak)} MiB, back to {mib(after)} MiB "
        f"{secs if secs is not None else '>60'} s later")
    r.stop()


async def row_worst_tls(certs, backend):
    """1,000 mutual-TLS connections held open and 2,048 held calls (the worst the caps allow)"""
    # The worst these limits allow: every connection slot holding a finished mutual-TLS
    # connection, and MAX_CALLS held calls.
    r = Service("recommendations", {"ARTIFICIAL_DELAY_MS": "3000"}, certs)
    idle = r.rss()
    ctx = mtls_context(certs)
    tls = []
    for _ in range(1000):
        try:
            tls.append(await asyncio.open_connection(LOOPBACK, r.port, ssl=ctx,
                                                     server_hostname="localhost"))
        except OSError:
            break
    run = subprocess.Popen(
        [os.path.join(BIN, "loadgen"), "grpc", "--addr", f"{LOOPBACK}:{r.port}", "--certs",
         certs, "--connections", "8", "-c", "2048", "-n", "2048", "--warmup", "0", "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = idle
    while run.poll() is None:
        peak = max(peak, r.rss())
        await asyncio.sleep(0.1)
    close_all(tls)
    secs, after = settle(r, idle, peak)
    row(f"{len(tls)} mutual-TLS connections held open and 2,048 held calls (the worst the caps "
        "allow)", "all of the above",
        f"RSS {mib(idle)} → {mib(peak)} MiB, {mib(after)} MiB "
        f"{secs if secs is not None else '>60'} s later")
    r.stop()


async def row_catalog_dev_zero(certs, backend):
    """`CATALOG_PATH=/dev/zero`"""
    t0 = time.time()
    p = subprocess.run([os.path.join(BIN, "recommendations")], capture_output=True, timeout=20,
                       env={"CATALOG_PATH": "/dev/zero", "CERTS_DIR": certs,
                            "LISTEN_ADDR": f"{LOOPBACK}:0", "ADMIN_ADDR": f"{LOOPBACK}:0"})
    line = [l for l in p.stderr.decode().splitlines() if "ERROR" in l][-1].split("cannot start: ")[-1]
    row("`CATALOG_PATH=/dev/zero`", "regular files only, `CATALOG_MAX_BYTES`",
        f"exit {p.returncode} after {(time.time() - t0) * 1000:.0f} ms: `{line}`")


def silent_flood(port, connections, opened, stop, seconds):
    """In a process of its own: `connections` TCP connections to `port` that never send a byte,
    each opened again as soon as the server closes it (or after 10 s), until `stop` is set or
    `seconds` have passed. `opened` counts the connections made."""
    asyncio.run(_silent_flood(port, connections, opened, stop, seconds))


async def _silent_flood(port, connections, opened, stop, seconds):
    count, running, live = [0], [True], set()

    async def one():
        while running[0]:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 5)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.01)
                continue
            if not running[0]:
                w.close()
                return
            count[0] += 1
            live.add(w)
            try:
                await asyncio.wait_for(r.read(4096), 10)  # the server sends nothing: a close
            except (OSError, asyncio.TimeoutError):
                pass
            live.discard(w)
            w.close()

    tasks = [asyncio.ensure_future(one()) for _ in range(connections)]
    end = time.time() + seconds
    while not stop.is_set() and time.time() < end:
        await asyncio.sleep(0.05)
        opened.value = count[0]
    # Not by cancellation alone: Python 3.11's wait_for can swallow a cancellation that
    # arrives as its operation completes, and the task would go on flooding.
    running[0] = False
    for w in list(live):
        w.close()
    for t in tasks:
        t.cancel()
    await asyncio.wait(tasks, timeout=5)
    opened.value = count[0]


def mtls_handshake(ctx, port, timeout):
    """A fresh connection and mutual-TLS handshake (ALPN h2) within `timeout` seconds: whether
    the handshake completed, whether the server then sent its HTTP/2 SETTINGS, how long the
    handshake took, and what went wrong (None if nothing)."""
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    done, answered, took, error = False, False, None, None
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as raw:
            raw.settimeout(max(deadline - time.monotonic(), 0.001))
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                took = time.monotonic() - t0
                done = tls.selected_alpn_protocol() == "h2"
                if not done:
                    error = f"ALPN {tls.selected_alpn_protocol()}"
                tls.settimeout(max(deadline - time.monotonic(), 0.001))
                tls.sendall(PREFACE + frame(SETTINGS, 0, 0))
                head = b""
                while len(head) < 9 and (chunk := tls.recv(9 - len(head))):
                    head += chunk
                answered = len(head) == 9 and head[3] == SETTINGS
                if not answered and error is None:
                    error = "no SETTINGS"
    except (OSError, ssl.SSLError) as e:
        error = f"{type(e).__name__} after {time.monotonic() - t0:.1f} s"
    return done, answered, took, error


async def row_tls_flood(certs, backend):
    """1,000 silent TCP connections to the TLS port, each reopened when closed, while a client
    with the marketplace's certificate makes 100 fresh mutual-TLS handshakes"""
    r = Service("recommendations", {}, certs)
    idle, fds0, warns0 = r.rss(), fds(r.pid), len(r.log_lines("WARN"))
    sampler = Sampler(r.pid, 0.05)
    spawn = multiprocessing.get_context("spawn")
    opened, stop = spawn.Value("q", 0, lock=False), spawn.Event()
    flood = spawn.Process(target=silent_flood, args=(r.port, 1000, opened, stop, 120),
                          daemon=True)
    flood.start()
    try:
        # The flood well under way (far more connections than the handshake budget) first.
        t0 = time.time()
        while opened.value < 2000 and time.time() - t0 < 20:
            time.sleep(0.02)
        under_way = time.time() - t0
        ctx = mtls_context(certs)
        results = []
        for _ in range(100):  # one every 50 ms at most: through more than one handshake timeout
            started = time.monotonic()
            results.append(mtls_handshake(ctx, r.port, 5))
            time.sleep(max(0.05 - (time.monotonic() - started), 0))
        flooded_for = time.time() - t0
        stop.set()
        flood.join(15)
    finally:
        if flood.is_alive():
            flood.kill()  # by its PID: the process started just above
            flood.join()
    sampler.stop()
    evicted = r.metric("bookstore_tls_handshakes_total", 'result="evicted"')
    timed_out = r.metric("bookstore_tls_handshakes_total", 'result="timed_out"')
    completed = r.metric("bookstore_tls_handshakes_total", 'result="completed"')
    warns = len(r.log_lines("WARN")) - warns0
    done = sum(1 for d, _, _, _ in results if d)
    answered = sum(1 for _, a, _, _ in results if a)
    times = sorted(t for d, _, t, _ in results if d)
    errors = sorted({e for _, _, _, e in results if e})
    failed = f"; failed: {', '.join(errors)}" if errors else ""
    median = f"{times[len(times) // 2] * 1000:.0f}" if times else "-"
    slowest = f"{times[-1] * 1000:.0f}" if times else "-"
    row("1,000 TCP connections to the TLS port that never send a byte, each reopened as soon as "
        "the server closes it, while a client with the marketplace's certificate connects 100 "
        "times (fresh connection and handshake, ALPN h2, 5 s each, one every 50 ms)",
        "`MAX_HANDSHAKES` 128: the oldest pending handshake that has sent nothing gives way; "
        "`TLS_HANDSHAKE_TIMEOUT_SECS` 3",
        f"the flood opened {opened.value:,} connections in {flooded_for:.1f} s (2,000 after "
        f"{under_way:.1f} s, then the client began); {done} of 100 handshakes completed within "
        f"5 s ({answered} then had the server's HTTP/2 SETTINGS; median {median} ms, slowest "
        f"{slowest} ms{failed}); {evicted:.0f} `evicted`, {timed_out:.0f} "
        f"`timed_out`, {completed:.0f} `completed`; open files {fds0} → {sampler.peak_fds} at "
        f"most, RSS {mib(idle)} → {mib(sampler.peak_rss)} MiB at most; {warns} WARN lines")
    r.stop()


# (name, row, needs the recommendations backend behind a marketplace), in table order.
ALL_ROWS = [
    ("header-timeout", row_header_timeout, True),
    ("long-header", row_long_header, True),
    ("slowloris", row_slowloris, True),
    ("idle-http", row_idle_http, True),
    ("worst-heads", row_worst_heads, True),
    ("sigterm", row_sigterm, True),
    ("zero-window", row_zero_window, True),
    ("h2-header-blocks", row_h2_header_blocks, True),
    ("idle-tls", row_idle_tls, False),
    ("held-calls", row_held_calls, False),
    ("worst-tls", row_worst_tls, False),
    ("catalog-dev-zero", row_catalog_dev_zero, False),
    ("tls-flood", row_tls_flood, False),
]

__doc__ += "".join(f"    {name:<17} {' '.join(fn.__doc__.split())}\n" for name, fn, _ in ALL_ROWS)


def make_pki():
    given = os.environ.get("PKI_DIR")
    if given:
        return given
    if not os.environ.get("BIN_DIR"):
        certs = tempfile.mkdtemp(prefix="bookstore-abuse-")
        subprocess.run(["cargo", "run", "-q", "--release", "-p", "bookstore-certs", "--", "--out",
                        certs, "--force"], cwd=ROOT, check=True)
        return certs
    maker = os.path.join(BIN, "bookstore-certs")
    script = os.path.join(ROOT, "certs", "openssl-dev-pki.sh")
    if os.path.exists(maker):
        certs = tempfile.mkdtemp(prefix="bookstore-abuse-")
        subprocess.run([maker, "--out", certs, "--force"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return certs
    if not os.path.exists(script):
        raise SystemExit(f"no {maker} and no {script}: set PKI_DIR to an existing PKI")
    certs = tempfile.mkdtemp(prefix="bookstore-abuse-")
    made = subprocess.run(["sh", script, certs], capture_output=True)
    if made.returncode != 0:
        raise SystemExit(made.stderr.decode(errors="replace"))
    return certs


async def main(selected):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    certs = make_pki()
    print("| Attack | Limit that stops it | Measured (release build, this machine) |")
    print("|---|---|---|")
    backend = None
    try:
        for name, run, needs_backend in ALL_ROWS:
            if name not in selected:
                continue
            if needs_backend and backend is None:
                backend = Service("recommendations", {}, certs)
            elif not needs_backend and backend is not None:
                backend.stop()
                backend = None
            await run(certs, backend)
    finally:
        for service in list(RUNNING):
            service.stop()


if __name__ == "__main__":
    names = [name for name, _, _ in ALL_ROWS]
    asked = sys.argv[1:]
    if any(a not in names for a in asked):
        raise SystemExit(__doc__)
    asyncio.run(main(set(asked) if asked else set(names)))
