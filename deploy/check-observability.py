#!/usr/bin/env python3
"""The dashboard and the alerts, proven against a real Prometheus and the real services.

  deploy/check-observability.py [--bin-dir target/debug] [--seconds 25] [--svg PATH]

1. `promtool check rules` and `promtool test rules` on k8s/components/monitoring/alerts.yml, and
   the PrometheusRule in the same folder carries exactly those rules.
2. Starts recommendations (with FAILURE_RATE, so error and retry series move) and the marketplace
   on loopback with a fresh development PKI, and Prometheus (Debian's `prometheus` package)
   scraping both admin ports every second with the alert rules loaded.
3. Drives pages with the load generator, then asks Prometheus, through its HTTP API, for every
   query of every dashboard panel and every alert's expression (without its threshold): each
   must return data. Every rule must evaluate without error, and RecommendationsErrorRate,
   whose condition the injected failures meet, must be pending or firing.
4. With --svg, draws four of the dashboard's panels from that run's data.

Grafana itself is in no registry these machines reach: the dashboard's queries are what is
checked here, not its rendering. Exits 1 on the first problem, with what Prometheus said.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITORING = os.path.join(ROOT, "k8s", "components", "monitoring")
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval becomes at a 1 s scrape


def fail(message):
    print(f"FAILED: {message}")
    sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def wait_for(url, what, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if get(url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    fail(f"{what} not ready at {url} within {seconds} s")


class Prometheus:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}/api/v1"

    def api(self, path, **params):
        url = f"{self.base}/{path}?{urllib.parse.urlencode(params)}"
        try:
            _, body = get(url, timeout=10)
        except urllib.error.HTTPError as e:
            body = e.read().decode()
        answer = json.loads(body)
        if answer.get("status") != "success":
            fail(f"{path} {params}: {answer.get('error', body)}")
        return answer["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def query_range(self, expr, start, end, step):
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]


def check_rules():
    subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=MONITORING, check=True)
    subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=MONITORING, check=True)
    with open(os.path.join(MONITORING, "alerts.yml")) as f:
        rules = yaml.safe_load(f)
    with open(os.path.join(MONITORING, "prometheusrule.yaml")) as f:
        operator = yaml.safe_load(f)
    if operator["spec"] != rules:
        fail("prometheusrule.yaml's spec differs from alerts.yml: edit both")
    print("PrometheusRule carries alerts.yml unchanged")
    return rules


def dashboard_queries():
    with open(os.path.join(MONITORING, "dashboard.json")) as f:
        dashboard = json.load(f)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"].replace("$__rate_interval", RATE_INTERVAL)


def without_threshold(expr):
    """An alert's expression without its final comparison: the series it watches."""
    match = re.match(r"(?s)^(.*?)\s*(==|!=|>=|<=|>|<)\s*[0-9.e+*\s]+$", expr.strip())
    return match.group(1) if match else expr


def start(binary, env, log):
    return subprocess.Popen(
        [binary], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "debug"))
    parser.add_argument("--seconds", type=int, default=25)
    parser.add_argument("--svg")
    args = parser.parse_args()

    rules = check_rules()
    work = tempfile.mkdtemp(prefix="bookstore-observability-")
    bins = {name: os.path.join(args.bin_dir, name) for name in
            ("recommendations", "marketplace", "loadgen", "bookstore-certs")}
    subprocess.run([bins["bookstore-certs"], "--out", f"{work}/pki", "--share", f"{work}/share"],
                   check=True, capture_output=True)
    grpc, rec_admin, web, web_admin, prom = (free_port() for _ in range(5))
    processes = []
    log = open(f"{work}/services.log", "w")
    try:
        processes.append(start(bins["recommendations"], {
            "CERTS_DIR": f"{work}/share/recommendations",
            # Both loopback addresses, so the marketplace balances over two.
            "LISTEN_ADDR": f"[::]:{grpc}",
            "ADMIN_ADDR": f"127.0.0.1:{rec_admin}",
            "FAILURE_RATE": "0.15",
            "RUST_LOG": "warn",
        }, log))
        processes.append(start(bins["marketplace"], {
            "CERTS_DIR": f"{work}/share/marketplace",
            "LISTEN_ADDR": f"127.0.0.1:{web}",
            "ADMIN_ADDR": f"127.0.0.1:{web_admin}",
            "RECOMMENDATIONS_HOST": "localhost",
            "RECOMMENDATIONS_PORT": str(grpc),
            "RECOMMENDATIONS_TLS_NAME": "localhost",
            "RUST_LOG": "warn",
        }, log))
        wait_for(f"http://127.0.0.1:{rec_admin}/readyz", "recommendations")
        wait_for(f"http://127.0.0.1:{web_admin}/readyz", "the marketplace")

        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [os.path.join(MONITORING, "alerts.yml")],
            "scrape_configs": [{
                "job_name": "bookstore",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{rec_admin}"], "labels": {"service": "recommendations"}},
                    {"targets": [f"127.0.0.1:{web_admin}"], "labels": {"service": "marketplace"}},
                ],
            }],
        }
        with open(f"{work}/prometheus.yml", "w") as f:
            yaml.safe_dump(config, f)
        processes.append(subprocess.Popen(
            ["prometheus", f"--config.file={work}/prometheus.yml",
             f"--storage.tsdb.path={work}/data", f"--web.listen-address=127.0.0.1:{prom}"],
            stdout=open(f"{work}/prometheus.log", "w"), stderr=subprocess.STDOUT))
        wait_for(f"http://127.0.0.1:{prom}/-/ready", "Prometheus")
        prometheus = Prometheus(prom)

        started = time.time()
        load = subprocess.run(
            [bins["loadgen"], "http", "--url", f"http://127.0.0.1:{web}/", "-c", "8",
             "-d", str(args.seconds)], capture_output=True, text=True)
        print(load.stdout.strip().splitlines()[0] if load.stdout.strip() else load.stderr[-500:])
        time.sleep(3)  # the last scrapes and rule evaluations
        ended = time.time()

        targets = prometheus.api("targets")["activeTargets"]
        down = [t["scrapeUrl"] for t in targets if t["health"] != "up"]
        if len(targets) != 2 or down:
            fail(f"scrape targets: {len(targets)}, down: {down}")

        checked = 0
        for title, expr in dashboard_queries():
            result = prometheus.query(expr)
            if not result:
                fail(f"dashboard panel {title!r}: no data for {expr}")
            print(f"panel  {title}: {len(result)} series")
            checked += 1
        for group in rules["groups"]:
            for rule in group["rules"]:
                expr = without_threshold(rule["expr"])
                result = prometheus.query(expr)
                if not result:
                    fail(f"alert {rule['alert']}: no data for {expr}")
                print(f"alert  {rule['alert']}: {len(result)} series")
                checked += 1
        loaded = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        broken = [(r["name"], r.get("lastError")) for r in loaded if r.get("health") != "ok"]
        if len(loaded) != sum(len(g["rules"]) for g in rules["groups"]) or broken:
            fail(f"rules loaded: {len(loaded)}, not healthy: {broken}")
        states = {a["labels"]["alertname"]: a["state"] for a in prometheus.api("alerts")["alerts"]}
        if states.get("RecommendationsErrorRate") not in ("pending", "firing"):
            fail(f"RecommendationsErrorRate not raised by the injected failures: {states}")
        print(f"{checked} queries returned data; {len(loaded)} rules healthy; alerts now: {states}")

        if args.svg:
            draw(prometheus, started, ended, args.svg)
            print(f"wrote {args.svg}")
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
    print("observability check passed")


PICTURE = [
    ("Pages per second, by status",
     'sum by (status) (rate(http_requests_total{route="/"}[5s]))', "{status}"),
    ("Recommend calls served, by code",
     'sum by (grpc_code) (rate(grpc_server_handled_total{grpc_method="Recommend"}[5s])) > 0',
     "{grpc_code}"),
    ("Backend calls per second: each address, and retries",
     'sum by (addr) (rate(bookstore_backend_calls_total[5s])) or '
     'sum by (outcome) (rate(bookstore_client_retries_total{outcome="attempted"}[5s]))',
     "{addr}{outcome}"),
    ("Resident memory (MiB)", 'process_resident_memory_bytes{job="bookstore"} / 1048576',
     "{service}"),
]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def draw(prometheus, start, end, path):
    """Four panels as an SVG, from the run's own samples (a picture of the dashboard's data)."""
    width, height, pad = 460, 210, 44
    parts = []
    for n, (title, expr, legend) in enumerate(PICTURE):
        x0, y0 = (n % 2) * width, (n // 2) * height
        series = prometheus.query_range(expr, start, end, 1)
        # From the first sample any series has (a rate needs a few scrapes first).
        first = min((float(s["values"][0][0]) for s in series if s["values"]), default=start)
        values = [float(v) for s in series for _, v in s["values"] if v not in ("NaN", "+Inf")]
        top = max(values + [1e-9]) * 1.1
        parts.append(f'<g transform="translate({x0},{y0})">'
                     f'<rect width="{width - 10}" height="{height - 10}" fill="#fafafa" '
                     f'stroke="#ccc"/><text x="10" y="18" font-size="13" '
                     f'font-weight="bold">{title}</text>'
                     f'<text x="10" y="{height - 16}" font-size="10" fill="#666">'
                     f'the last {end - first:.0f} s; top {top:.3g}</text>')
        legends = []
        for i, s in enumerate(series):
            name = legend
            for key, value in s["metric"].items():
                name = name.replace("{" + key + "}", value)
            name = re.sub(r"\{[a-z_]+\}", "", name) or "value"
            points = " ".join(
                f"{pad + (float(t) - first) / (end - first) * (width - pad - 20):.1f},"
                f"{height - 30 - float(v) / top * (height - 60):.1f}"
                for t, v in s["values"] if v not in ("NaN", "+Inf"))
            colour = COLOURS[i % len(COLOURS)]
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
                         f'points="{points}"/>')
            legends.append(f'<text x="{width - 160}" y="{36 + 13 * i}" font-size="11" '
                           f'fill="{colour}">{name}</text>')
        if legends:
            parts.append(f'<rect x="{width - 166}" y="24" width="150" '
                         f'height="{13 * len(legends) + 6}" fill="white" opacity="0.85"/>')
        parts.extend(legends)
        parts.append("</g>")
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{2 * height}" '
           f'font-family="sans-serif">{"".join(parts)}</svg>\n')
    with open(path, "w") as f:
        f.write(svg)


if __name__ == "__main__":
    main()
