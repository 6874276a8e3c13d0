#!/usr/bin/env python3
"""Checks the chart with Helm's own Go SDK (helm-python-sdk): lint, render
with the default values (plus the secrets an install must give) and the
production example, validate every rendered object against the Kubernetes
schemas (kubernetes-validate), and render values that make no sense, which
must fail with a clear message.

Run by .ci/run through helm/ci/run (which makes the Python environment)."""

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parent.parent
REPO = CHART.parent
# Metrics Prometheus makes itself, and those of the process collector the
# binaries register (prometheus crate, "process" feature).
PROMETHEUS_OWN = {"up"}
PROCESS = {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
           "process_open_fds", "process_max_fds", "process_start_time_seconds", "process_threads"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "clamp_min",
    "clamp_max", "topk", "bottomk", "abs", "absent", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "bool", "offset", "le", "label_values", "e", "inf", "nan",
}


def exported_metrics():
    """Metric names the binaries register: the string literals given to the
    metric constructors in the sources (gauge("…"), Opts::new("…"), …)."""
    names = set(PROCESS)
    pattern = re.compile(r'(?:gauge|int_gauge|counter|histogram|counter_vec|gauge_vec|histogram_vec|Opts::new|'
                         r'HistogramOpts::new|IntCounter::new|IntGauge::new|Gauge::new|Counter::new)\(\s*"([a-z_:][a-z0-9_:]*)"')
    for src in REPO.glob("*/src/**/*.rs"):
        names.update(pattern.findall(src.read_text()))
    for src in REPO.glob("tools/*/src/**/*.rs"):
        names.update(pattern.findall(src.read_text()))
    return names


def metric_names(expr):
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)            # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                         # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)                        # ranges
    found = set()
    for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if word.lower() in PROMQL_WORDS or re.fullmatch(r"[0-9.e+-]+", word):
            continue
        found.add(word)
    return found


def check_names(where, expr, exported, failures):
    for name in metric_names(expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in exported and base not in exported and name not in PROMETHEUS_OWN:
            failures.append(f"{where}: {name} is not a metric the binaries export ({expr})")
KUBE = "1.30.0"
SECRETS = {"secrets": {"ticketKey": "ab" * 32, "adminToken": "operator-token-0123456789"}}


def merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(chart, values):
    # Values are checked against values.schema.json as `helm install` does.
    chart.validate_schema(chart.merge_values(values))
    return chart.render(values, name="mesh", namespace="planetary-survival", is_install=True)


def objects(manifests):
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                yield path, doc


def check_alerts(chart, production, exported, failures):
    """promtool check and test the PrometheusRule as rendered for production."""
    manifests = render(chart, production)
    rules = [doc for _, doc in objects(manifests) if doc.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        failures.append(f"production renders {len(rules)} PrometheusRules, not 1")
        return 0
    spec = rules[0]["spec"]
    count = 0
    for group in spec["groups"]:
        for rule in group["rules"]:
            count += 1
            check_names(f"alert {rule.get('alert')}", rule["expr"], exported, failures)
    promtool = shutil.which("promtool")
    if not promtool:
        failures.append("promtool not found (Debian's prometheus package)")
        return count
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        shutil.copy(CHART / "tests" / "alerts.test.yaml", Path(tmp) / "alerts.test.yaml")
        for args in (["check", "rules", "rules.yaml"], ["test", "rules", "alerts.test.yaml"]):
            r = subprocess.run([promtool, *args], cwd=tmp, capture_output=True, text=True)
            if r.returncode != 0:
                failures.append(f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}")
    tested = set(re.findall(r"alertname: (\w+)", (CHART / "tests" / "alerts.test.yaml").read_text()))
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") and rule["alert"] not in tested:
                failures.append(f"alert {rule['alert']} has no promtool test")
    return count


def check_dashboards(exported, failures):
    """The six dashboards: JSON, unique uids, every panel with queries on real metrics."""
    files = sorted((CHART / "files" / "dashboards").glob("*.json"))
    if len(files) != 6:
        failures.append(f"{len(files)} dashboards, the design lists 6")
    uids, panels = set(), 0
    for f in files:
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            failures.append(f"{f.name}: not JSON: {e}")
            continue
        for key in ("uid", "title", "panels", "schemaVersion"):
            if key not in d:
                failures.append(f"{f.name}: no {key}")
        if d.get("uid") in uids:
            failures.append(f"{f.name}: uid {d.get('uid')} used twice")
        uids.add(d.get("uid"))
        for p in d.get("panels", []):
            panels += 1
            targets = p.get("targets") or []
            if not targets:
                failures.append(f"{f.name}: panel {p.get('title')!r} has no query")
            for t in targets:
                check_names(f"{f.name}: {p.get('title')}", t.get("expr", ""), exported, failures)
    return panels


def main() -> int:
    failures = []
    chart = helm.Chart.load(CHART)
    report = helm.lint(CHART, SECRETS, strict=True, kube_version="v" + KUBE)
    for m in report.get("messages", []):
        if m.get("severity", 0) >= 2:
            failures.append(f"lint: {m.get('path')}: {m.get('error')}")
    for e in report.get("errors", []) or []:
        failures.append(f"lint: {e}")

    production = yaml.safe_load((CHART / "values-production.yaml").read_text())
    cases = {"default": SECRETS, "production": production, "one coordinator, no policies": merge(
        SECRETS, {"coordinator": {"replicas": 1}, "networkPolicies": {"enabled": False}, "storageClass": {"create": False}})}
    counts = {}
    for case, values in cases.items():
        try:
            manifests = render(chart, values)
        except helm.HelmError as e:
            failures.append(f"{case}: does not render: {e}")
            continue
        kinds = {}
        for path, doc in objects(manifests):
            kind = doc.get("kind", "?")
            kinds[kind] = kinds.get(kind, 0) + 1
            try:
                kubernetes_validate.validate(doc, KUBE, strict=True)
            except kubernetes_validate.ValidationError as e:
                failures.append(f"{case}: {path}: {kind} {doc['metadata'].get('name')}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                # Custom resources (ServiceMonitor, PrometheusRule): checked
                # by their own tests, not the Kubernetes schemas.
                pass
        counts[case] = kinds

    # A roll with the coordinators first: the game servers keep their tag.
    try:
        images = {}
        for _, doc in objects(render(chart, merge(SECRETS, {"image": {"tag": "2.0.0", "gameServerTag": "1.9.0"}}))):
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                images[c["image"].rsplit("/", 1)[-1].split(":")[0]] = c["image"].rsplit(":", 1)[-1]
        if images.get("mesh-coordinator") != "2.0.0" or images.get("game-server") != "1.9.0":
            failures.append(f"image.gameServerTag: images rendered as {images}")
    except helm.HelmError as e:
        failures.append(f"image.gameServerTag: does not render: {e}")

    bad = [
        ("zero coordinators", merge(SECRETS, {"coordinator": {"replicas": 0}}), "replicas"),
        ("two coordinators in production", merge(production, {"coordinator": {"replicas": 2}}), "odd number"),
        ("four coordinators in production", merge(production, {"coordinator": {"replicas": 4}}), "odd number"),
        ("no signing key", {"secrets": {"adminToken": "operator-token-0123456789"}}, "ticketKey"),
        ("a malformed signing key", merge(SECRETS, {"secrets": {"ticketKey": "xyz"}}), "ticketKey"),
        ("a short operator token", merge(SECRETS, {"secrets": {"adminToken": "short"}}), "adminToken"),
        ("a tiny game-server volume", merge(SECRETS, {"gameServer": {"storage": "2Gi"}}), "gameServer.storage"),
        ("a tiny database volume", merge(SECRETS, {"cockroachdb": {"storage": "500Mi"}}), "cockroachdb.storage"),
        ("a drain longer than the grace period",
         merge(SECRETS, {"gameServer": {"drainTimeoutSeconds": 300, "terminationGracePeriodSeconds": 120}}),
         "drainTimeoutSeconds"),
        ("the bundled database in production", merge(production, {"cockroachdb": {"enabled": True}}), "insecure"),
        ("no database at all", merge(SECRETS, {"cockroachdb": {"enabled": False}}), "database.url"),
        ("a typo in the values", merge(SECRETS, {"gameServer": {"replica": 3}}), "replica"),
        ("a Redis group too small for a Sentinel quorum", merge(SECRETS, {"redis": {"replicas": 2}}), "replicas"),
        ("backups with nowhere to go", merge(SECRETS, {"backup": {"enabled": True}}), "backup.destination"),
        ("a backup schedule that is not cron", merge(production, {"backup": {"daily": {"schedule": "daily"}}}), "schedule"),
        ("an autoscaler floor above its ceiling",
         merge(SECRETS, {"gameServer": {"autoscaling": {"enabled": True, "minReplicas": 10, "maxReplicas": 5}}}),
         "minReplicas"),
    ]
    refused = 0
    for case, values, expect in bad:
        try:
            render(chart, values)
            failures.append(f"bad values rendered: {case}")
        except helm.HelmError as e:
            if expect not in str(e):
                failures.append(f"bad values ({case}) refused without naming {expect!r}: {e}")
            else:
                refused += 1

    exported = exported_metrics()
    alerts = check_alerts(chart, production, exported, failures)
    panels = check_dashboards(exported, failures)

    print(json.dumps({"rendered": counts, "bad_values_refused": refused, "alert_rules": alerts,
                      "dashboard_panels": panels, "metrics_exported": len(exported),
                      "failures": len(failures)}, indent=1))
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
