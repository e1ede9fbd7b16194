#!/usr/bin/env python3
"""Checks the monitoring files against promtool and against what the server exposes.

    python3 deploy/check_monitoring.py METRICS_TEXT WORK_DIR     # promtool on PATH

METRICS_TEXT is a scrape of a running server's /metrics. Checked:
- kubernetes/monitoring/prometheusrule.yaml: its rules pass `promtool check rules`, and
  `promtool test rules` runs alerts_test.yaml against them (each alert fires on its trouble
  and stays quiet on a healthy replica);
- grafana/apikeys.json: a dashboard (unique panel ids, every target a query), each query
  valid PromQL (promtool checks them as recording rules, Grafana's variables filled in);
- every metric the rules and the dashboard name is one the server exposes (two that are not
  in every scrape must be in the README's metrics table instead);
- kubernetes/monitoring/servicemonitor.yaml scrapes a port the Service has, selecting the
  Service's labels.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
MONITORING = os.path.join(HERE, "kubernetes", "monitoring")
# Not in every scrape, so they must be in the README's metrics table instead: the listener's
# gauge exists only on PostgreSQL, and a labelled counter's series appear once counted.
NOT_ALWAYS_THERE = {"apikeys_db_listener_connected", "apikeys_undecodable_requests_total"}
# Prometheus' own series, not the server's.
PROMETHEUS_OWN = {"up"}
METRIC = re.compile(r"\b((?:apikeys|process)_[a-z_]+)\b")


def fail(message):
    sys.exit(f"FAILED: {message}")


def ok(message):
    print(f"ok: {message}")


def promtool(*args, cwd=None):
    done = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}")
    return done.stdout


def exposed_names(text):
    """Every sample name the exposition has or declares (a family with no series yet, such
    as a labelled counter nothing has counted, is declared by its TYPE line alone)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            names.update(family + suffix for suffix in suffixes.get(kind, [""]))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def check_names(where, exprs, exposed, readme):
    for expr in exprs:
        for name in METRIC.findall(expr):
            if name in exposed:
                continue
            if name in NOT_ALWAYS_THERE and f"`{name}`" in readme:
                continue
            fail(f"{where} uses {name}, which the server does not expose")


def main(metrics_path, work):
    exposed = exposed_names(open(metrics_path).read())
    readme = open(os.path.join(HERE, "..", "README.md")).read()

    rule = yaml.safe_load(open(os.path.join(MONITORING, "prometheusrule.yaml")))
    if (rule["apiVersion"], rule["kind"]) != ("monitoring.coreos.com/v1", "PrometheusRule"):
        fail("prometheusrule.yaml is not a PrometheusRule")
    rules_path = os.path.join(work, "rules.yaml")
    with open(rules_path, "w") as f:
        yaml.safe_dump(rule["spec"], f)
    promtool("check", "rules", rules_path)
    shutil.copy(os.path.join(MONITORING, "alerts_test.yaml"), work)
    promtool("test", "rules", "alerts_test.yaml", cwd=work)
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    check_names("prometheusrule.yaml", [r["expr"] for r in alerts], exposed, readme)
    ok(f"{len(alerts)} alerts pass promtool check rules and their tests")

    dashboard = json.load(open(os.path.join(HERE, "grafana", "apikeys.json")))
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    if len(ids) != len(set(ids)):
        fail("grafana/apikeys.json: panel ids repeat")
    exprs = []
    for panel in panels:
        targets = panel.get("targets") or fail(f"panel {panel['title']!r} has no query")
        for target in targets:
            exprs.append(target.get("expr") or fail(f"panel {panel['title']!r}: a target without expr"))
    filled = [
        e.replace("$__rate_interval", "5m").replace("$job", "apikeys") for e in exprs
    ]
    queries = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(filled)],
            }
        ]
    }
    queries_path = os.path.join(work, "dashboard_queries.yaml")
    with open(queries_path, "w") as f:
        yaml.safe_dump(queries, f)
    promtool("check", "rules", queries_path)
    check_names("grafana/apikeys.json", exprs, exposed, readme)
    ok(f"the dashboard's {len(exprs)} queries in {len(panels)} panels are valid PromQL on exposed metrics")

    monitor = yaml.safe_load(open(os.path.join(MONITORING, "servicemonitor.yaml")))
    service = yaml.safe_load(open(os.path.join(HERE, "kubernetes", "service.yaml")))
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint["port"] not in ports:
            fail(f"servicemonitor.yaml scrapes port {endpoint['port']!r}, not one of {ports}")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    if not wanted <= service["metadata"]["labels"].items():
        fail("servicemonitor.yaml does not select the Service's labels")
    job = service["metadata"]["labels"].get(monitor["spec"]["jobLabel"])
    if any('job="' in r["expr"] and f'job="{job}"' not in r["expr"] for r in alerts):
        fail(f"an alert selects a job other than {job!r}, the ServiceMonitor's")
    ok("the ServiceMonitor scrapes the Service's metrics port, as job " + repr(job))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
