#!/usr/bin/env python3
"""Checks the chart with Helm's own Go SDK (helm-python-sdk): lint, render
with the default values (plus the secrets an install must give) and the
production example, validate every rendered object against the Kubernetes
schemas (kubernetes-validate), and render values that make no sense, which
must fail with a clear message.

Run by .ci/run through helm/ci/run (which makes the Python environment)."""

import json
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parent.parent
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

    print(json.dumps({"rendered": counts, "bad_values_refused": refused, "failures": len(failures)}, indent=1))
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
