"""deploy/grafana and deploy/prometheus: the dashboard, scrape configuration and rules ask only
for what the proxies expose.

The metric and label names come from a real ``ProxyMetrics`` after one event of every kind,
rendered and parsed like a scrape, so a renamed metric or label fails here. Every PromQL
expression goes through a small lexer (brackets, selectors, grouping clauses, Grafana
variables); where the ``promql_parser`` package or ``promtool`` is installed, they check the
same expressions too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.observability.metrics import ProxyMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "meshproxy-golden-signals.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

#: Labels that Prometheus itself puts on every scraped series.
SCRAPE_LABELS = frozenset({"job", "instance"})

#: Grafana's interval variables, replaced by a plain duration before an expression is parsed.
GRAFANA_INTERVALS = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "15s",
    "${__interval}": "15s",
    "$__range": "1h",
    "${__range}": "1h",
}


# -- what the proxy exposes -------------------------------------------------------------------


def _exposed() -> dict[str, frozenset[str]]:
    """Sample name -> label names, from a ProxyMetrics that saw one event of every kind."""
    m = ProxyMetrics()
    m.request_finished("inbound", "delivery.default", "default/delivery/0", 200, 0.004, 10, 20)
    m.request_finished("outbound", "package.default", "default", 503, 0.2, 0, 5)
    m.request_finished("outbound", "package.default", "default", 0, 0.01, 0, 0)
    m.connection_opened("inbound", True)
    m.connection_opened("outbound", False)
    m.tls_handshake("inbound", "ok")
    m.retry("package.default", "503")
    m.retry_budget_exhausted("package.default")
    m.endpoint_ejected("package.default", "127.0.0.1:18111")
    m.set_endpoints("package.default", 1, 1, 0)
    m.set_config_version("42")
    m.config_error()
    m.set_cert_expiry(1_900_000_000.0)
    body, _ = m.render()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in names.items()}


EXPOSED = _exposed()


def _control_exposed() -> dict[str, frozenset[str]]:
    """Sample name -> label names of the control plane's CA metrics, with a CA loaded (rules
    may alert on them: the control plane's pod is scraped too)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from meshproxy.control.ca_api import CASlot, CertificateCounts
    from meshproxy.identity.ca import CertificateAuthority

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CertificateCounts(slot=CASlot(CertificateAuthority.in_memory("cluster.local"))))
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in names.items()}


CONTROL_EXPOSED = _control_exposed()


def test_the_exposition_has_every_metric_of_the_spec() -> None:
    """Guards the fixture: every §6 metric has a sample, so its labels are known."""
    for name in (
        "meshproxy_requests_total",
        "meshproxy_request_duration_seconds_bucket",
        "meshproxy_request_duration_seconds_sum",
        "meshproxy_request_duration_seconds_count",
        "meshproxy_request_bytes_total",
        "meshproxy_response_bytes_total",
        "meshproxy_retries_total",
        "meshproxy_retries_budget_exhausted_total",
        "meshproxy_endpoint_ejections_total",
        "meshproxy_endpoints",
        "meshproxy_tcp_connections_open",
        "meshproxy_tls_handshakes_total",
        "meshproxy_config_version_info",
        "meshproxy_config_errors_total",
        "meshproxy_cert_expiry_timestamp_seconds",
    ):
        assert name in EXPOSED, name
    assert EXPOSED["meshproxy_requests_total"] == {
        "direction", "service", "route", "code", "classification", "grpc_status"  # §6, §9
    }
    assert "le" in EXPOSED["meshproxy_request_duration_seconds_bucket"]


# -- a small PromQL lexer ---------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`[^`]*`)
    | (?P<dur>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)
    | (?P<num>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}\[\]:@])
    """,
    re.VERBOSE,
)

AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile".split()
)
FUNCTIONS = AGGREGATIONS | frozenset(
    """abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min
    count_over_time day_of_month day_of_week day_of_year days_in_month delta deriv exp floor
    histogram_quantile holt_winters hour idelta increase irate label_join label_replace
    last_over_time ln log10 log2 max_over_time min_over_time minute month predict_linear
    present_over_time quantile_over_time rate resets round scalar sgn sort sort_desc sqrt
    stddev_over_time stdvar_over_time sum_over_time time timestamp vector year""".split()
)
#: Keywords followed by a parenthesised list of label names.
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
#: Keywords and literals that are neither metrics nor functions.
WORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "Inf", "NaN"})
MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})
PAIRS = {"(": ")", "{": "}", "[": "]"}


@dataclass
class Analysis:
    """What one expression asks for."""

    #: (metric name, label names of its matchers), one per selector.
    selectors: list[tuple[str, frozenset[str]]] = field(default_factory=list)
    #: Label names of by/without/on/ignoring/group_left/group_right clauses.
    grouping: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    #: The contents of every range or subquery bracket, as written.
    ranges: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> set[str]:
        return {name for name, _ in self.selectors}


def substitute_intervals(expr: str) -> str:
    """Replace Grafana's interval variables by durations (longest names first)."""
    for variable in sorted(GRAFANA_INTERVALS, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_INTERVALS[variable])
    return expr


def tokenize(expr: str) -> list[tuple[str, str]]:
    """Return (kind, text) tokens without whitespace; raise ValueError on anything else."""
    tokens, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"unexpected {expr[pos:pos + 20]!r} at {pos} in {expr!r}")
        if match.lastgroup != "ws":
            tokens.append((match.lastgroup, match.group()))
        pos = match.end()
    return tokens


def analyse(expr: str) -> Analysis:
    """Lex a PromQL expression (Grafana intervals already substituted) and collect what it
    references; raise ValueError when brackets do not balance or a part is malformed."""
    tokens = tokenize(expr)
    if not tokens:
        raise ValueError("empty expression")
    stack: list[str] = []
    for kind, text in tokens:
        if kind == "op" and text in PAIRS:
            stack.append(PAIRS[text])
        elif kind == "op" and text in PAIRS.values():
            if not stack or stack.pop() != text:
                raise ValueError(f"unbalanced {text!r} in {expr!r}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r} in {expr!r}")

    result = Analysis()
    i = 0

    def following(j: int) -> tuple[str, str]:
        return tokens[j] if j < len(tokens) else ("end", "")

    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "ident" and text in LABEL_LISTS:
            if following(i + 1) != ("op", "("):
                if text in ("group_left", "group_right"):
                    i += 1
                    continue
                raise ValueError(f"{text} without a label list in {expr!r}")
            i += 2
            expect_label = True
            while following(i) != ("op", ")"):
                kind, text = following(i)
                if expect_label and kind == "ident":
                    result.grouping.add(text)
                elif not (not expect_label and (kind, text) == ("op", ",")):
                    raise ValueError(f"bad label list near {text!r} in {expr!r}")
                expect_label = not expect_label
                i += 1
            i += 1
        elif kind == "ident" and (
            following(i + 1) == ("op", "(")
            or (text in AGGREGATIONS and following(i + 1)[1] in ("by", "without"))
        ):
            if text not in FUNCTIONS:
                raise ValueError(f"unknown function {text!r} in {expr!r}")
            result.functions.add(text)
            i += 1
        elif kind == "ident" and text in WORDS:
            i += 1
        elif kind == "ident" or (kind, text) == ("op", "{"):
            name = text if kind == "ident" else ""
            if kind == "ident":
                i += 1
            labels: set[str] = set()
            if following(i) == ("op", "{"):
                i += 1
                while following(i) != ("op", "}"):
                    label, op, value = following(i), following(i + 1), following(i + 2)
                    if label[0] != "ident" or op[1] not in MATCH_OPS or value[0] != "str":
                        raise ValueError(f"bad matcher near {label[1]!r} in {expr!r}")
                    labels.add(label[1])
                    i += 3
                    if following(i) == ("op", ","):
                        i += 1
                i += 1
            if not name:
                raise ValueError(f"selector without a metric name in {expr!r}")
            result.selectors.append((name, frozenset(labels)))
        elif (kind, text) == ("op", "["):
            j = i + 1
            inside = []
            while following(j) != ("op", "]"):
                inside.append(following(j))
                j += 1
            shape = [k if k != "op" else t for k, t in inside]
            if shape not in (["dur"], ["dur", ":"], ["dur", ":", "dur"]):
                raise ValueError(f"bad range {inside} in {expr!r}")
            result.ranges.append("".join(t for _, t in inside))
            i = j + 1
        else:
            i += 1
    return result


def test_the_lexer_finds_names_and_refuses_malformed_expressions() -> None:
    a = analyse(
        'histogram_quantile(0.99, sum by (le, service) '
        '(rate(x_bucket{service=~"a|b", direction!="in"}[1m]))) / on (service) group_left y'
    )
    assert a.selectors == [("x_bucket", {"service", "direction"}), ("y", frozenset())]
    assert a.grouping == {"le", "service"}
    assert a.functions == {"histogram_quantile", "sum", "rate"}
    assert a.ranges == ["1m"]
    assert analyse("x - time() < 6 * 3600 and y > 0.1").metrics == {"x", "y"}
    b = analyse("max without (pod) (x) + sum(y) by (service)")
    assert (b.metrics, b.grouping, b.functions) == ({"x", "y"}, {"pod", "service"}, {"max", "sum"})
    for bad in (
        "sum(rate(x[1m])",
        "sum(rate(x[1m])))",
        "rate(x[1m)]",
        'x{a="b"',
        "rate(x[$__rate_interval])",
        'x{a=b}',
        "sum by (a b) (x)",
        "frobnicate(x)",
        "rate(x[abc])",
    ):
        with pytest.raises(ValueError):
            analyse(bad)


# -- the scrape configuration -----------------------------------------------------------------


def _prometheus() -> dict:
    return yaml.safe_load(PROMETHEUS.read_text())


def _target_labels(config: dict) -> frozenset[str]:
    """Labels the scrape configuration puts on series besides job and instance."""
    labels = set(SCRAPE_LABELS)
    for job in config["scrape_configs"]:
        for rule in job.get("relabel_configs", []):
            target = rule.get("target_label", "")
            if target and not target.startswith("__"):
                labels.add(target)
        for static in job.get("static_configs", []):
            labels.update(static.get("labels", {}))
    return frozenset(labels)


TARGET_LABELS = _target_labels(_prometheus())


def relabel(rules: list[dict], labels: dict[str, str]) -> dict[str, str] | None:
    """Apply keep/drop/replace relabel rules the way Prometheus does (anchored regex,
    ';'-joined source labels, $N in the replacement); None when the target is dropped."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        match = re.fullmatch(str(rule.get("regex", "(.*)")), value)
        if action == "keep":
            if match is None:
                return None
        elif action == "drop":
            if match is not None:
                return None
        elif action == "replace":
            if match is not None:
                replacement = str(rule.get("replacement", "$1"))
                new = re.sub(r"\$\{?(\d+)\}?", lambda g: match.group(int(g.group(1))) or "", replacement)
                if new:
                    labels[rule["target_label"]] = new
                else:
                    labels.pop(rule["target_label"], None)
        else:
            raise AssertionError(f"relabel action {action} not simulated")
    return labels


def _pod(ip: str, annotations: dict[str, str], phase: str = "Running", port: str = "8080") -> dict:
    meta = {
        "__address__": f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}",
        "__metrics_path__": "/metrics",
        "__scheme__": "http",
        "__meta_kubernetes_namespace": "shop",
        "__meta_kubernetes_pod_name": "cart-7d9f-x2x",
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": phase,
        "__meta_kubernetes_pod_container_name": "cart",
        "__meta_kubernetes_pod_label_app": "cart",
    }
    for key, value in annotations.items():
        meta["__meta_kubernetes_pod_annotation_" + re.sub(r"[^A-Za-z0-9_]", "_", key)] = value
    return meta


INJECTED = {"prometheus.io/scrape": "true", "prometheus.io/port": "15021", "prometheus.io/path": "/metrics"}


def _pod_job() -> dict:
    jobs = [j for j in _prometheus()["scrape_configs"] if "kubernetes_sd_configs" in j]
    assert len(jobs) == 1
    return jobs[0]


def test_prometheus_config_scrapes_annotated_pods() -> None:
    config = _prometheus()
    assert config["rule_files"] == ["rules.yml"]
    job = _pod_job()
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    rules = job["relabel_configs"]
    sources = {s for rule in rules for s in rule.get("source_labels", [])}
    for annotation in ("scrape", "port", "path"):
        assert f"__meta_kubernetes_pod_annotation_prometheus_io_{annotation}" in sources
    keep = [r for r in rules if r.get("action") == "keep"]
    assert keep and keep[0]["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]

    # What the injector puts on a pod (spec §7) leads to the health port's /metrics.
    target = relabel(rules, _pod("10.1.2.3", INJECTED))
    assert target is not None
    assert target["__address__"] == "10.1.2.3:15021"
    assert target["__metrics_path__"] == "/metrics"
    assert target["__scheme__"] == "http"
    assert target["namespace"] == "shop" and target["pod"] == "cart-7d9f-x2x"
    assert relabel(rules, _pod("fd00::a:1", INJECTED))["__address__"] == "[fd00::a:1]:15021"
    # Every declared container port becomes the same target.
    assert relabel(rules, _pod("10.1.2.3", INJECTED, port="9090")) == target
    # Another path and port are followed too.
    other = relabel(rules, _pod("10.1.2.3", {**INJECTED, "prometheus.io/port": "9102",
                                             "prometheus.io/path": "/stats"}))
    assert (other["__address__"], other["__metrics_path__"]) == ("10.1.2.3:9102", "/stats")

    assert relabel(rules, _pod("10.1.2.3", {})) is None
    assert relabel(rules, _pod("10.1.2.3", {**INJECTED, "prometheus.io/scrape": "false"})) is None
    assert relabel(rules, _pod("10.1.2.3", INJECTED, phase="Succeeded")) is None


def test_prometheus_config_has_a_static_job_for_meshproxy_up() -> None:
    static = [j for j in _prometheus()["scrape_configs"] if "static_configs" in j]
    assert static
    for job in static:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for group in job["static_configs"]:
            for address in group["targets"]:
                host, _, port = address.rpartition(":")
                assert host == "127.0.0.1" and port.isdigit(), address


def test_scrape_labels_never_collide_with_proxy_labels() -> None:
    """A target label that a series also has would rename the series' one to exported_*."""
    proxy_labels = set().union(*EXPOSED.values())
    assert not TARGET_LABELS & proxy_labels
    assert {"namespace", "pod"} <= TARGET_LABELS


# -- the dashboard ----------------------------------------------------------------------------


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict]) -> list[dict]:
    """Every panel, rows' collapsed panels included."""
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(_panels(panel.get("panels", [])))
    return found


def _targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(p, t) for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]


def _variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _variable_query(variable: dict) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def check_expression(expr: str, known: dict[str, frozenset[str]]) -> Analysis:
    """Assert that ``expr`` lexes and asks only for known metrics and their labels (or the
    scrape's target labels); return the analysis."""
    analysis = analyse(substitute_intervals(expr))
    assert analysis.selectors, f"no metric in {expr!r}"
    allowed = set(TARGET_LABELS)
    for name, matchers in analysis.selectors:
        assert name in known, f"{name} is not exposed by the proxy ({expr!r})"
        unknown = matchers - known[name] - TARGET_LABELS
        assert not unknown, f"{name} has no label {sorted(unknown)} ({expr!r})"
        allowed |= known[name]
    assert analysis.grouping <= allowed, f"unknown labels {analysis.grouping - allowed} in {expr!r}"
    return analysis


def test_dashboard_loads_with_the_expected_frame() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"] == "meshproxy-golden-signals"
    assert dashboard["title"]
    variables = _variables(dashboard)
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    for name in ("namespace", "service", "direction"):
        assert name in variables, name
    service_query = _variable_query(variables["service"])
    assert re.fullmatch(r"label_values\(meshproxy_requests_total(\{.*\})?, *service\)", service_query)
    assert set(re.findall(r"[a-z]+bound", variables["direction"]["query"])) == {"inbound", "outbound"}

    panels = _panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    for panel, target in _targets(dashboard):
        assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    refs = [(p["id"], t["refId"]) for p, t in _targets(dashboard)]
    assert len(refs) == len(set(refs))


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _panels(_dashboard()["panels"]):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_expressions_use_only_exposed_metrics_and_labels() -> None:
    dashboard = _dashboard()
    variables = set(_variables(dashboard))
    for panel, target in _targets(dashboard):
        expr = target["expr"]
        analysis = check_expression(expr, EXPOSED)
        for used in re.findall(r"\$\{?(\w+)", expr):
            assert used.startswith("__") or used in variables, f"${used} in {panel['title']}"
        for range_ in analysis.ranges:
            assert range_ in ("1m", "1h"), f"range [{range_}] written out in {panel['title']}"
        # rate() always over Grafana's rate interval.
        for call in re.finditer(r"\brate\(", expr):
            assert re.match(r"rate\([^()]*\[\$__rate_interval\]\)", expr[call.start():]), expr
        legend = target.get("legendFormat", "")
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            allowed = analysis.grouping or set().union(*(EXPOSED[m] for m in analysis.metrics))
            assert label in allowed, f"legend {{{{{label}}}}} in {panel['title']}"


def test_dashboard_variable_queries_use_exposed_labels() -> None:
    for variable in _variables(_dashboard()).values():
        if variable["type"] != "query":
            continue
        query = _variable_query(variable)
        match = re.fullmatch(r"label_values\((.*), *(\w+)\)", query)
        assert match, query
        selector, label = match.groups()
        analysis = check_expression(selector, EXPOSED)
        assert all(label in EXPOSED[m] for m in analysis.metrics), query


def test_dashboard_shows_the_golden_signals() -> None:
    dashboard = _dashboard()
    exprs_by_type: dict[str, list[str]] = {}
    for panel, target in _targets(dashboard):
        exprs_by_type.setdefault(panel["type"], []).append(target["expr"])
    every = [e for exprs in exprs_by_type.values() for e in exprs]
    used = set().union(*(analyse(substitute_intervals(e)).metrics for e in every))
    assert used >= {
        "meshproxy_requests_total",
        "meshproxy_request_duration_seconds_bucket",
        "meshproxy_retries_total",
        "meshproxy_retries_budget_exhausted_total",
        "meshproxy_endpoint_ejections_total",
        "meshproxy_endpoints",
        "meshproxy_tcp_connections_open",
        "meshproxy_tls_handshakes_total",
        "meshproxy_config_version_info",
        "meshproxy_cert_expiry_timestamp_seconds",
    }
    joined = "\n".join(every)
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le" in joined
    assert 'classification="success"' in joined
    assert re.search(r"by \([^)]*\bcode\b", joined)
    assert re.search(r"by \([^)]*\breason\b[^)]*\) \(rate\(meshproxy_retries_total", joined)
    assert re.search(r"by \([^)]*\bstate\b[^)]*\) \(meshproxy_endpoints", joined)
    assert re.search(r"by \([^)]*\btls\b[^)]*\) \(meshproxy_tcp_connections_open", joined)
    assert re.search(r"by \([^)]*\bresult\b[^)]*\) \(rate\(meshproxy_tls_handshakes_total", joined)
    assert any("meshproxy_cert_expiry_timestamp_seconds" in e and "time()" in e
               for e in exprs_by_type["stat"])
    tables = exprs_by_type["table"]
    assert any("meshproxy_config_version_info" in e and "version" in e for e in tables)
    assert any(re.search(r"by \([^)]*\broute\b", e) and "meshproxy_requests_total" in e for e in tables)
    assert any(re.search(r"by \([^)]*\broute\b", e) and "histogram_quantile" in e for e in tables)


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "meshproxy.yaml").read_text())
    assert providers["apiVersion"] == 1
    assert providers["providers"][0]["type"] == "file"
    assert providers["providers"][0]["options"]["path"]
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"


# -- the rules --------------------------------------------------------------------------------


def _rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert groups
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    return [rule for group in groups for rule in group["rules"]]


def test_rules_reference_exposed_metrics_and_labels() -> None:
    known = {**EXPOSED, **CONTROL_EXPOSED}
    recorded = set()
    for rule in _rules():
        assert ("record" in rule) != ("alert" in rule), rule
        analysis = check_expression(rule["expr"], known)
        assert "$" not in rule["expr"], "a Grafana variable in a rule"
        if "record" in rule:
            name = rule["record"]
            assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), name
            assert name not in recorded and name not in EXPOSED, name
            recorded.add(name)
            labels = analysis.grouping or set().union(*(known[m] for m in analysis.metrics))
            known[name] = frozenset(labels)
        else:
            assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
            assert rule["annotations"]["summary"]
    assert recorded


def test_rules_cover_the_golden_signals_and_alert_on_success_rate_and_certificates() -> None:
    rules = _rules()
    recorded = " ".join(r["expr"] for r in rules if "record" in r)
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in recorded
    assert 'classification="success"' in recorded
    alerts = {r["alert"]: r["expr"] for r in rules if "alert" in r}
    assert any('classification="success"' in e for e in alerts.values())
    assert any("meshproxy_cert_expiry_timestamp_seconds" in e and "time()" in e for e in alerts.values())
    assert any("meshproxy_control_issuer_expiry_timestamp_seconds" in e and "time()" in e for e in alerts.values())


# -- optional second opinions -----------------------------------------------------------------


def _all_expressions() -> list[str]:
    return [t["expr"] for _, t in _targets(_dashboard())] + [r["expr"] for r in _rules()]


def test_expressions_parse_with_promql_parser() -> None:
    """The promql_parser package (Prometheus' grammar) agrees with the lexer (installed with
    the test extras)."""
    import promql_parser

    for expr in _all_expressions():
        text = substitute_intervals(expr)
        tree = promql_parser.parse(text)
        names, labels = set(), set()

        def visit(node: object) -> None:
            if isinstance(node, promql_parser.VectorSelector):
                names.add(node.name)
                labels.update(m.name for m in node.matchers.matchers if m.name != "__name__")
            if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
                labels.update(node.modifier.labels)

        promql_parser.walk(tree, visit)
        analysis = analyse(text)
        assert names == analysis.metrics, expr
        assert labels <= analysis.grouping | {l for _, ls in analysis.selectors for l in ls}, expr


def test_promtool_accepts_the_rules_and_every_dashboard_expression(tmp_path: Path) -> None:
    """promtool checks rules.yml, and the dashboard's expressions written as recording rules."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: run scripts/install-test-deps.sh (Debian package prometheus)"
    as_rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expression:{i}", "expr": substitute_intervals(t["expr"])}
        for i, (_, t) in enumerate(_targets(_dashboard()))
    ]}]}
    dashboard_rules = tmp_path / "dashboard-rules.yml"
    dashboard_rules.write_text(yaml.safe_dump(as_rules))
    result = subprocess.run([promtool, "check", "rules", str(RULES), str(dashboard_rules)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
