#!/usr/bin/env python3
"""The abuse table of docs/security.md, measured against the release binaries on loopback.

    cargo build --release -p recommendations -p marketplace -p loadgen
    python3 bench/abuse.py            # about 6 minutes; prints a Markdown table

Each row starts fresh services with their shipped defaults (RUST_LOG=info, text logs), sends
one kind of abuse from this process (plain sockets, and Python's ssl for mutual TLS), and reads
the server's resident memory and open files from /proc, its log from a file, and its metrics
from the admin port. Memory "after" is RSS at the first second at which at least three quarters
of what the burst took are given back (give or take 1 MiB), or after 60 s if that never happens. Every loop here is bounded in count and
time; only loopback addresses are used.
"""

import asyncio
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        os.unlink(self.log.name)


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


ROWS = []


def row(attack, limit, outcome):
    ROWS.append((attack, limit, outcome))
    print(f"| {attack} | {limit} | {outcome} |", flush=True)


async def marketplace_rows(certs, backend):
    env = {"RECOMMENDATIONS_HOST": LOOPBACK, "RECOMMENDATIONS_PORT": str(backend.port),
           "RECOMMENDATIONS_TLS_NAME": "localhost"}

    m = Service("marketplace", env, certs)
    (conn,) = await open_many(m.port, 1, b"GET / HTTP/1.1\r\nHost: x\r\n")
    t0 = time.time()
    await closed_within([conn], 30)
    row("`GET / HTTP/1.1\\r\\nHost: x\\r\\n`, then nothing", "`HEADER_READ_TIMEOUT_SECS` 10",
        f"closed by the server after {time.time() - t0:.1f} s")
    m.stop()

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

    # The worst these limits allow: every connection slot holding a full head buffer.
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


def mtls_context(certs):
    ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
    ctx.load_cert_chain(os.path.join(certs, "client.pem"), os.path.join(certs, "client.key"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def recommendations_rows(certs):
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
        "`MAX_CONNECTIONS` 1024, `MAX_HANDSHAKES` 128, `TLS_HANDSHAKE_TIMEOUT_SECS` 10",
        f"all closed within 20 s ({closed}); the process holds at most {open_fds} files; RSS "
        f"{mib(idle)} → {mib(peak)} MiB, {mib(after)} MiB "
        f"{secs if secs is not None else '>60'} s later; {warns} WARN lines, "
        f"{(r.log_bytes() - log0) / 1024:.1f} KiB of log")
    r.stop()

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

    t0 = time.time()
    p = subprocess.run([os.path.join(BIN, "recommendations")], capture_output=True, timeout=20,
                       env={"CATALOG_PATH": "/dev/zero", "CERTS_DIR": certs,
                            "LISTEN_ADDR": f"{LOOPBACK}:0", "ADMIN_ADDR": f"{LOOPBACK}:0"})
    line = [l for l in p.stderr.decode().splitlines() if "ERROR" in l][-1].split("cannot start: ")[-1]
    row("`CATALOG_PATH=/dev/zero`", "regular files only, `CATALOG_MAX_BYTES`",
        f"exit {p.returncode} after {(time.time() - t0) * 1000:.0f} ms: `{line}`")


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    certs = tempfile.mkdtemp(prefix="bookstore-abuse-")
    subprocess.run(["cargo", "run", "-q", "--release", "-p", "bookstore-certs", "--", "--out",
                    certs, "--force"], cwd=ROOT, check=True)
    print("| Attack | Limit that stops it | Measured (release build, this machine) |")
    print("|---|---|---|")
    backend = Service("recommendations", {}, certs)
    try:
        await marketplace_rows(certs, backend)
    finally:
        backend.stop()
    await recommendations_rows(certs)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        raise SystemExit(__doc__)
    asyncio.run(main())
