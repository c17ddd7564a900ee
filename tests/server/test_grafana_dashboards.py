"""deploy/grafana/*.json query only what a running kvmem server's /metrics exports: every metric name
in every `expr` (and template variable query) is a series of the right type, and every label a
selector matches on is one that series carries (or one Prometheus adds when scraping)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARDS = sorted((Path(__file__).parents[2] / "deploy" / "grafana").glob("*.json"))
PATIENCE = 120.0
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus, not by the exporter
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "clamp_min",
             "clamp_max", "label_values", "abs", "topk", "bottomk", "delta", "deriv", "time"}
IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def queries(node) -> list[str]:
    """Every PromQL string in a dashboard: panel targets' `expr` (rows' nested panels too) and query
    variables' `query`."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            elif key == "query" and node.get("type") == "query":
                found.append(value["query"] if isinstance(value, dict) else value)
            else:
                found.extend(queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(queries(item))
    return found


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it matches on) for every series selector in `expr`."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals: label values, regexes
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors: [$__rate_interval]
    found = []
    for m in re.finditer(rf"({IDENT})\s*(\{{[^}}]*\}})?(\s*\()?", expr):
        name, matchers, call = m.group(1), m.group(2), m.group(3)
        before = expr[:m.start()].rstrip()
        if name in KEYWORDS or re.search(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*$", before):
            continue  # a keyword, or a label name in a grouping clause
        if name in FUNCTIONS:  # a function, or an aggregation followed by its `by (...)`
            continue
        assert not call, f"unknown function {name!r} in {expr!r}"
        if re.search(r",\s*$", before) and re.search(r"label_values\s*\(", before):
            continue  # label_values(metric, LABEL)
        labels = set(re.findall(rf"({IDENT})\s*(?:=~|!~|!=|=)", matchers or ""))
        found.append((name, labels))
    return found


def label_values_labels(expr: str) -> list[tuple[str, str]]:
    return re.findall(rf"label_values\s*\(\s*({IDENT})[^,]*,\s*({IDENT})\s*\)", expr)


@pytest.fixture(scope="module")
def exported(tiny_server) -> dict[str, tuple[str, set[str]]]:
    """Sample name -> (its family's type, the labels its samples carry), after one request so every
    histogram has observations."""
    r = httpx.post(f"{tiny_server.base_url}/v1/completions", timeout=PATIENCE,
                   json={"model": tiny_server.model, "prompt": "The quick brown fox", "max_tokens": 4})
    assert r.status_code == 200, r.text
    text = httpx.get(f"{tiny_server.base_url}/metrics", timeout=PATIENCE).text
    out: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            kind, labels = out.get(s.name, (family.type, set()))
            out[s.name] = (kind, labels | set(s.labels))
    return out


def test_selector_parsing():
    e = ('histogram_quantile(0.95, sum by (le, kv_cache) (rate(kvmem:x_bucket{model_name=~"$m", kv_cache="a"}'
         '[$__rate_interval]))) / (sum(rate(vllm:y_total{engine=~"$e"}[5m])) > 0)')
    assert selectors(e) == [("kvmem:x_bucket", {"model_name", "kv_cache"}), ("vllm:y_total", {"engine"})]
    assert selectors("label_values(vllm:num_requests_running{job=~\"$job\"}, model_name)") == [
        ("vllm:num_requests_running", {"job"})]
    assert label_values_labels("label_values(vllm:a{x=\"1\"}, model_name)") == [("vllm:a", "model_name")]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_name_exported_series(path, exported):
    dashboard = json.loads(path.read_text())
    exprs = queries(dashboard)
    assert len(exprs) >= 10, path
    prefix = "kvmem:" if path.name == "kvmem.json" else "vllm:"
    for expr in exprs:
        found = selectors(expr)
        assert found, f"no metric in {expr!r}"
        for name, labels in found:
            assert name.startswith(prefix), (path.name, name)
            assert name in exported, f"{path.name}: {name!r} is not on /metrics (in {expr!r})"
            kind, carried = exported[name]
            if name.endswith("_bucket"):
                assert kind == "histogram" and "histogram_quantile" in expr, (name, expr)
            if re.search(rf"\b(rate|increase|irate)\(\s*{re.escape(name)}\b", expr):
                assert kind in ("counter", "histogram"), f"rate() of a {kind}: {name}"
            missing = labels - carried - SCRAPE_LABELS
            assert not missing, f"{path.name}: {name} has no label {missing} (in {expr!r})"
        for name, label in label_values_labels(expr):
            assert label in exported[name][1] | SCRAPE_LABELS, (name, label)


def test_dashboards_are_importable():
    assert {p.name for p in DASHBOARDS} >= {"kvmem.json", "vllm-compatible.json"}
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["uid"] and d["title"] and d["panels"]
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), path
        variables = {v["name"] for v in d["templating"]["list"]}
        assert {"datasource", "model_name"} <= variables, path
    kvmem = json.loads((DASHBOARDS[0].parent / "kvmem.json").read_text())
    assert any(p.get("repeat") == "kv_cache" for p in kvmem["panels"])  # per-strategy panels
