#!/usr/bin/env python3
"""The dashboard and the alerts, proven against a real Prometheus and the real services.

  deploy/check-observability.py [--bin-dir target/debug] [--seconds 15] [--svg PATH]

1. `promtool check rules` and `promtool test rules` on k8s/components/monitoring/alerts.yml; the
   PrometheusRule in the same folder carries exactly those rules; every alert has a summary, a
   description and a runbook_url whose anchor is a heading of docs/operations.md; and every
   selector of a raw series, in the rules and in the dashboard, selects the bookstore's job.
2. Starts two recommendations replicas (on 127.0.0.1 and 127.0.0.2, given to the marketplace
   as RECOMMENDATIONS_ADDRS) and the marketplace, with a fresh development PKI, and Prometheus
   (Debian's `prometheus` package) scraping the three admin ports every second with the rules
   loaded.
3. Healthy load: drives pages with the load generator; every rule evaluates without error and
   no alert is pending or firing. Then asks Prometheus, through its HTTP API, for every query of
   every dashboard panel: each returns data, every value a number (not NaN), ratios within 0..1.
4. Faults, one at a time, each raising the alert that is for it and no other: one replica
   frozen with SIGSTOP (BackendAddressEjected, BackendAddressOutTooLong and BookstoreDown for its
   target, tickets; nothing pages, the other replica carries the pages); both replicas
   restarted with FAILURE_RATE=0.15 (RecommendationsErrorRate, a ticket; the
   few pages retries cannot save may raise the slow burn's ticket, and nothing pages); the
   marketplace restarted with MAX_REQUESTS_IN_FLIGHT=2 against 8 clients (MarketplaceShedding;
   the pages shed burn the error budget); then the marketplace stopped (BookstoreServiceDown).
   An alert with a `for` of minutes is checked as pending: its condition holds; promtool's tests
   check the timing.
5. With --svg, draws four of the dashboard's panels from the run's data, healthy then failing.

Grafana itself is in no registry these machines reach: the dashboard's queries are what is
checked here, not its rendering. Prometheus is Debian's 2.42, not the 3.5 the compose profile
ships: no 3.x is in a registry these machines reach (3.x normalises `le` labels to floats; the
one bucket the rules name, le="0.1", reads the same in both). The temporary folder, keys
included, is removed at the end. Exits 1 on the first problem, with what Prometheus said.
"""

import argparse
import json
import math
import os
import re
import shutil
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
OPERATIONS = os.path.join(ROOT, "docs", "operations.md")
# The dashboard's variables as this check sets them: no namespace label here, as under compose.
VARIABLES = {"$__rate_interval": RATE_INTERVAL, "$job": "bookstore", "$namespace": "",
             "$instance": ".*"}


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


def anchors(markdown_path):
    """GitHub's anchors for a Markdown file's headings."""
    with open(markdown_path) as f:
        headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}


# A raw series' selector: a metric name (not a function: no "(" after it) with its labels. Names
# with a ":" are recording rules, made from selected series.
SELECTOR = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\{[^}]*\})?(?![\w:]|\s*\()")
NOT_SERIES = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
              "or", "unless", "le", "offset", "e", "inf", "nan"}


def unscoped(expr, label):
    """The raw series selectors of `expr` that do not carry `label` (e.g. job="bookstore")."""
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r'"[^"]*"', '""', expr)  # strings
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    found = []
    for name, labels in SELECTOR.findall(expr):
        if name in NOT_SERIES or ":" in name:
            continue
        if label.split("=")[0] + "=" not in (labels or ""):
            found.append(name + (labels or ""))
    return found


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
    known = anchors(OPERATIONS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            for selector in unscoped(rule["expr"], 'job="bookstore"'):
                fail(f"rule {name}: {selector} does not select job=\"bookstore\"")
            if "alert" not in rule:
                continue
            notes = rule.get("annotations", {})
            missing = [k for k in ("summary", "description", "runbook_url") if not notes.get(k)]
            if missing:
                fail(f"alert {name}: no {', '.join(missing)}")
            page, _, anchor = notes["runbook_url"].partition("#")
            if page != "docs/operations.md" or anchor not in known:
                fail(f"alert {name}: runbook_url {notes['runbook_url']} is no heading of "
                     "docs/operations.md")
            if rule.get("labels", {}).get("severity") not in ("page", "ticket"):
                fail(f"alert {name}: severity is neither page nor ticket")
    print("every alert has a description and a runbook that exists; every selector is scoped")
    for panel, expr, _ in dashboard_queries():
        for selector in unscoped(expr, 'job=~"$job"'):
            fail(f"dashboard panel {panel!r}: {selector} does not select job=~\"$job\"")
    return rules


def dashboard_queries():
    """(panel title, query, unit) for every query of the dashboard, as written."""
    with open(os.path.join(MONITORING, "dashboard.json")) as f:
        dashboard = json.load(f)
    for panel in dashboard["panels"]:
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], unit


def with_variables(expr):
    """A dashboard query with its variables set as this check sets them."""
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def check_values(title, expr, unit, result):
    """Each of a panel query's values is a number, and a ratio lies within 0..1."""
    for series in result:
        value = float(series["value"][1])
        if math.isnan(value) or math.isinf(value):
            fail(f"dashboard panel {title!r}: {value} for {series['metric']} in {expr}")
        if value < 0 or (unit == "percentunit" and value > 1):
            fail(f"dashboard panel {title!r}: {value} out of range for {series['metric']}")


def alert_states(prometheus):
    return {(a["labels"]["alertname"], a["labels"].get("service", "")): a["state"]
            for a in prometheus.api("alerts")["alerts"]}


def start(binary, env, log):
    return subprocess.Popen(
        [binary], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
    )


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()


def expect_alerts(prometheus, what, required, allowed=(), seconds=15):
    """Waits until every alert in `required` is pending or firing, then checks that nothing
    outside `required` and `allowed` is: each fault raises what is for it and nothing else."""
    deadline = time.time() + seconds
    while True:
        states = alert_states(prometheus)
        if all(key in states for key in required) or time.time() > deadline:
            break
        time.sleep(0.5)
    missing = [key for key in required if key not in states]
    if missing:
        fail(f"{what}: {missing} not raised; alerts now: {states}")
    extra = {key: state for key, state in states.items()
             if key not in required and key not in allowed}
    if extra:
        fail(f"{what}: alerts that are not for it: {extra}")
    print(f"{what}: alerts now {states}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "debug"))
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--svg")
    args = parser.parse_args()

    rules = check_rules()
    work = tempfile.mkdtemp(prefix="bookstore-observability-")
    bins = {name: os.path.join(args.bin_dir, name) for name in
            ("recommendations", "marketplace", "loadgen", "bookstore-certs")}
    processes = []
    try:
        subprocess.run([bins["bookstore-certs"], "--out", f"{work}/pki", "--share",
                        f"{work}/share"], check=True, capture_output=True)
        grpc, web, web_admin, prom = (free_port() for _ in range(4))
        # Two replicas on one port, each on a loopback address of its own, which the marketplace
        # is given as RECOMMENDATIONS_ADDRS and balances over.
        replicas = {"127.0.0.1": free_port(), "127.0.0.2": free_port()}
        log = open(f"{work}/services.log", "w")

        def start_recommendations(extra):
            started = []
            for host, admin in replicas.items():
                process = start(bins["recommendations"], {
                    "CERTS_DIR": f"{work}/share/recommendations",
                    "LISTEN_ADDR": f"{host}:{grpc}",
                    "ADMIN_ADDR": f"127.0.0.1:{admin}",
                    "RUST_LOG": "warn",
                    **extra,
                }, log)
                processes.append(process)
                started.append(process)
            for admin in replicas.values():
                wait_for(f"http://127.0.0.1:{admin}/readyz", "recommendations")
            return started

        def start_marketplace(extra):
            process = start(bins["marketplace"], {
                "CERTS_DIR": f"{work}/share/marketplace",
                "LISTEN_ADDR": f"127.0.0.1:{web}",
                "ADMIN_ADDR": f"127.0.0.1:{web_admin}",
                "RECOMMENDATIONS_HOST": "localhost",
                "RECOMMENDATIONS_ADDRS": ",".join(f"{host}:{grpc}" for host in replicas),
                "RECOMMENDATIONS_PORT": str(grpc),
                "RECOMMENDATIONS_TLS_NAME": "localhost",
                "RUST_LOG": "warn",
                **extra,
            }, log)
            processes.append(process)
            wait_for(f"http://127.0.0.1:{web_admin}/readyz", "the marketplace")
            return process

        recommendations = start_recommendations({})
        marketplace = start_marketplace({})

        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [os.path.join(MONITORING, "alerts.yml")],
            "scrape_configs": [{
                "job_name": "bookstore",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{admin}" for admin in replicas.values()],
                     "labels": {"service": "recommendations"}},
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

        def load(seconds):
            """Drives pages for `seconds`; returns how many failed."""
            run = subprocess.run(
                [bins["loadgen"], "http", "--url", f"http://127.0.0.1:{web}/", "-c", "8",
                 "-d", str(seconds)], capture_output=True, text=True)
            report = run.stdout + run.stderr
            print(report.strip()[-1500:])
            counted = re.search(r"\((\d+) ok, (\d+) failed\)", report)
            if not counted or int(counted.group(1)) == 0:
                fail(f"the load generator served no page: {report[-500:]}")
            time.sleep(3)  # the last scrapes and rule evaluations
            return int(counted.group(2))

        # Healthy.
        started = time.time()
        load(args.seconds)
        targets = prometheus.api("targets")["activeTargets"]
        down = [t["scrapeUrl"] for t in targets if t["health"] != "up"]
        if len(targets) != 3 or down:
            fail(f"scrape targets: {len(targets)}, down: {down}")
        loaded = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        broken = [(r["name"], r.get("lastError")) for r in loaded if r.get("health") != "ok"]
        if len(loaded) != sum(len(g["rules"]) for g in rules["groups"]) or broken:
            fail(f"rules loaded: {len(loaded)}, not healthy: {broken}")
        expect_alerts(prometheus, "healthy load", required=[], seconds=0)
        checked = 0
        for title, expr, unit in dashboard_queries():
            expr = with_variables(expr)
            result = prometheus.query(expr)
            if not result:
                fail(f"dashboard panel {title!r}: no data for {expr}")
            check_values(title, expr, unit, result)
            print(f"panel  {title}: {len(result)} series")
            checked += 1
        print(f"{checked} dashboard queries returned numbers; {len(loaded)} rules healthy")
        balanced = prometheus.query(
            f'sum by (addr) (rate(grpc_client_handled_total{{job="bookstore"}}[{RATE_INTERVAL}])) > 0')
        if len(balanced) != len(replicas):
            fail(f"calls reached {len(balanced)} of the {len(replicas)} replicas: {balanced}")

        # One replica hung (SIGSTOP: its kernel still accepts connections, nothing answers): the
        # marketplace ejects it and keeps probing it, Prometheus cannot scrape it, and the other
        # replica carries the pages, so nothing pages. Calls that waited for it and were hedged
        # may exhaust the retry budget.
        hung = recommendations[1]
        hung_admin = f"127.0.0.1:{list(replicas.values())[1]}"
        hung.send_signal(signal.SIGSTOP)
        try:
            failed = load(args.seconds)
            if failed:
                fail(f"one replica frozen: {failed} pages failed; the other should serve them all")
            ejected = [("BackendAddressEjected", "marketplace"),
                       ("BackendAddressOutTooLong", "marketplace")]
            expect_alerts(prometheus, "one replica frozen",
                          required=ejected + [("BookstoreDown", "recommendations")],
                          allowed=[("MarketplaceRetryBudgetExhausted", "marketplace")])
            down = [a["labels"].get("instance") for a in prometheus.api("alerts")["alerts"]
                    if a["labels"]["alertname"] == "BookstoreDown"]
            if down != [hung_admin]:
                fail(f"one replica frozen: BookstoreDown for {down}, not for {hung_admin} alone")
        finally:
            hung.send_signal(signal.SIGCONT)

        # A backend failing 15 % of its calls: a cause, mostly absorbed by retries. Ejections
        # and an exhausted retry budget may come with it, and the few pages retries cannot save
        # (0.3 % in the runs so far: three times the error budget) make the slow burn's ticket
        # pending. Nothing pages.
        for replica in recommendations:
            stop(replica)
        recommendations = start_recommendations({"FAILURE_RATE": "0.15"})
        # Longer than the healthy load, so the failures are over 5 % of the 5-minute window.
        load(2 * args.seconds)
        causes = [("MarketplaceRetryBudgetExhausted", "marketplace"),
                  ("PageErrorBudgetBurnSlow", "")] + ejected
        expect_alerts(prometheus, "FAILURE_RATE=0.15",
                      required=[("RecommendationsErrorRate", "")], allowed=causes)
        if args.svg:
            draw(prometheus, started, time.time(), args.svg)
            print(f"wrote {args.svg}")

        # More requests than the marketplace takes (a limit of 2 against 8 clients): it sheds,
        # its in-flight gauge may sit at the limit, and the pages shed are 503s users see, so
        # the error budget burns.
        stop(marketplace)
        marketplace = start_marketplace({"MAX_REQUESTS_IN_FLIGHT": "2"})
        load(args.seconds)
        before = [("RecommendationsErrorRate", "")] + causes
        # (Pages let in may wait for a place: slow pages burn the latency budget too.)
        burning = [(f"Page{kind}BudgetBurn{pace}", "") for kind in ("Error", "Latency")
                   for pace in ("", "Slow")] + [("MarketplaceNearInFlightLimit", "marketplace")]
        expect_alerts(prometheus, "MAX_REQUESTS_IN_FLIGHT=2",
                      required=[("MarketplaceShedding", "")], allowed=before + burning)

        # The marketplace gone: nothing left to measure pages by.
        stop(marketplace)
        expect_alerts(prometheus, "marketplace stopped",
                      required=[("BookstoreServiceDown", "marketplace")],
                      allowed=[("BookstoreDown", "marketplace"), ("MarketplaceShedding", "")]
                      + before + burning)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)
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
