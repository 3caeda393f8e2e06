#!/usr/bin/env bash
# Checks the operator's view of cutover-proxy: alert rules, their unit tests, the Grafana
# dashboard and docs/metrics.md, against the series src/state/metrics.rs registers.
#
#   scripts/check-observability.sh           check (part of `make test`)
#   scripts/check-observability.sh --write   regenerate deploy/prometheus/alerts.yaml from rules.yml
#
# 1. promtool check rules deploy/prometheus/rules.yml
# 2. promtool test rules deploy/prometheus/alerts_test.yml: at least one firing and one
#    not-firing case per alert
# 3. deploy/prometheus/alerts.yaml (PrometheusRule) carries exactly rules.yml's groups.
#    rules.yml is the source; the PrometheusRule is generated from it by --write (a fixed header,
#    then rules.yml's `groups:` indented under `spec:`), so the comparison is textual and needs no
#    YAML library. promtool also checks the extracted spec.
# 4. Every metric named by a rule, a dashboard query or a dashboard variable is one src/state/metrics.rs
#    registers (histograms: only their _bucket/_sum/_count series) or one a recording rule
#    records (named level:metric:operations, each with a promql_expr_test in alerts_test.yml and
#    a line in docs/metrics.md); dashboard queries parse as
#    PromQL; the dashboard's structure is importable; docs/metrics.md documents every series;
#    every alert has severity, summary, description and a runbook_url into docs/operations.md
#    whose anchor exists there.
# 5. When tests/it/metrics_exposition.rs has written <target>/metrics-exposition.txt, the names
#    parsed from src/state/metrics.rs match the families the running proxy exports.
#
# Needs promtool (Debian's `prometheus` package; scripts/install-deps.sh test) and python3
# (standard library only).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=check
case "${1:-}" in
  "") ;;
  --write) mode=write ;;
  *) echo "usage: $0 [--write]" >&2; exit 2 ;;
esac

if [ "$mode" = check ]; then
  if ! command -v promtool >/dev/null; then
    echo "promtool not found: install Debian's prometheus package (scripts/install-deps.sh test)" >&2
    exit 1
  fi
  echo "== promtool check rules"
  promtool check rules deploy/prometheus/rules.yml
  echo "== promtool test rules"
  promtool test rules deploy/prometheus/alerts_test.yml
fi

echo "== consistency of rules, PrometheusRule, dashboard and docs"
MODE="$mode" EXPOSITION="${CARGO_TARGET_DIR:-target}/metrics-exposition.txt" python3 - <<'PY'
import json
import os
import re
import subprocess
import sys
import tempfile

RULES = "deploy/prometheus/rules.yml"
CRD = "deploy/prometheus/alerts.yaml"
TESTS = "deploy/prometheus/alerts_test.yml"
DASHBOARD = "deploy/grafana/dashboard.json"
METRICS_RS = "src/state/metrics.rs"
METRICS_DOC = "docs/metrics.md"
OPERATIONS_DOC = "docs/operations.md"

CRD_HEADER = """\
# GENERATED from deploy/prometheus/rules.yml by `scripts/check-observability.sh --write`:
# edit rules.yml and regenerate; `make test` fails when the two differ.
#
# For the Prometheus Operator: its ruleSelector must match these labels (kube-prometheus-stack
# selects `release: <helm release>` by default; add that label in your overlay).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: cutover-proxy
  labels:
    app.kubernetes.io/name: cutover-proxy
    app.kubernetes.io/component: alerting
spec:
"""

failures = []


def fail(msg):
    failures.append(msg)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def crd_from_rules(rules_text):
    lines = rules_text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("groups:"))
    body = "\n".join(("  " + l) if l.strip() else "" for l in lines[start:])
    return CRD_HEADER + body + "\n"


rules_text = read(RULES)
if os.environ["MODE"] == "write":
    with open(CRD, "w", encoding="utf-8") as f:
        f.write(crd_from_rules(rules_text))
    print(f"wrote {CRD}")
    sys.exit(0)

# ---------------------------------------------------------------- exported series
metrics_rs = read(METRICS_RS)
# Each series is registered through one of the helpers `counter`, `counter_vec`, `gauge`,
# `gauge_vec`, `histogram_vec` (first argument the registry `r`, then the name), or directly as
# `reg(r, Gauge::new("name", ...))`.
registered = [
    (kind, name)
    for kind, name in re.findall(
        r'\b(counter|gauge|histogram)(?:_vec)?\(\s*r,\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', metrics_rs
    )
] + [("gauge", name) for name in re.findall(r'reg\(\s*r,\s*Gauge::new\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', metrics_rs)]
exported = {name: kind for kind, name in registered}
invocations = len(re.findall(r"\b(?:counter|counter_vec|gauge|gauge_vec|histogram_vec)\(\s*r,", metrics_rs)) + len(
    re.findall(r"reg\(\s*r,\s*Gauge::new\(", metrics_rs)
)
if invocations != len(registered) or len(exported) != len(registered) or not registered:
    fail(f"{METRICS_RS}: {invocations} registrations but {len(registered)} parsed "
         f"({len(exported)} distinct names); update the parser in {sys.argv[0] or 'this script'}")
series = set()  # names that exist in Prometheus
for name, kind in exported.items():
    if kind == "histogram":
        series |= {name + "_bucket", name + "_sum", name + "_count"}
    else:
        series.add(name)
for required in ("chat_execution_total", "chat_execution_success_total",
                 "chat_execution_error_total", "chat_execution_timeout_total",
                 "chat_execution_latency_ms", "chat_runtime_fallback_enabled"):
    if required not in exported:
        fail(f"{METRICS_RS}: the contract's {required} is not registered")

# ---------------------------------------------------------------- PromQL names
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan", "atan2"}


def metric_names(expr):
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    e = re.sub(r"`[^`]*`|'(?:[^'\\]|\\.)*'", '""', e)
    e = re.sub(r"\{[^}]*\}", "", e)                         # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                        # ranges, subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{[^}]*\}|\$\w+", " ", e)                # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)", e):
        tok = m.group(1)
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or tok.lower() in KEYWORDS:
            continue
        names.add(tok)
    return names


def check_names(where, expr, allowed_extra=()):
    names = metric_names(expr)
    if not names and "absent(" not in expr:
        fail(f"{where}: no metric found in {expr!r}")
    for n in sorted(names):
        if n in series or n in allowed_extra:
            continue
        hint = ""
        if exported.get(n) == "histogram":
            hint = " (a histogram: use its _bucket, _sum or _count series)"
        fail(f"{where}: {n} is not a series cutover-proxy exports{hint}")


# ---------------------------------------------------------------- rules.yml
def block_scalar_or_value(lines, i, key_re):
    """Value of `key:` at lines[i]: inline, quoted, or a `|`/`>` block (more indented lines)."""
    m = key_re.match(lines[i])
    indent = len(lines[i]) - len(lines[i].lstrip())
    value = m.group(1).strip()
    if value and value[0] in "|>":
        out = []
        for l in lines[i + 1:]:
            if l.strip() and len(l) - len(l.lstrip()) <= indent:
                break
            out.append(l.strip())
        return "\n".join(out).strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


rule_lines = rules_text.splitlines()
alerts = {}  # name -> {"expr", "severity", "summary", "description", "runbook_url"}
records = {}  # recording rule name -> {"expr"}, in file order
current = None
expr_re = re.compile(r"^\s*(?:- )?expr:\s*(.*)$")
for i, line in enumerate(rule_lines):
    m = re.match(r"^\s*- (alert|record):\s*(\S+)", line)
    if m:
        if m.group(1) == "record":
            if not re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", m.group(2)):
                fail(f"{RULES}: recording rule {m.group(2)} is not named level:metric:operations")
            current = records.setdefault(m.group(2), {})
        else:
            current = alerts.setdefault(m.group(2), {})
        continue
    if re.match(r"^\s*- name:", line):
        current = None
        continue
    if current is None:
        continue
    if expr_re.match(line):
        current["expr"] = block_scalar_or_value(rule_lines, i, expr_re)
    for key in ("severity", "summary", "description", "runbook_url"):
        key_re = re.compile(rf"^\s*{key}:\s*(.*)$")
        if key_re.match(line):
            current[key] = block_scalar_or_value(rule_lines, i, key_re)

promtool_out = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True,
                              text=True).stdout
m = re.search(r"(\d+) rules found", promtool_out)
if not m or int(m.group(1)) != len(alerts) + len(records):
    fail(f"{RULES}: parsed {len(alerts)} alerts and {len(records)} recording rules but promtool "
         f"found {m.group(1) if m else '?'} rules; keep one `- alert:` or `- record:` per rule")

# A recording rule reads exported series or the recording rules above it; what it records is a
# series the dashboard, the docs and later rules may name.
for name, r in records.items():
    if "expr" not in r:
        fail(f"{RULES}: {name} has no expr")
    else:
        check_names(f"{RULES} {name}", r["expr"])
    series.add(name)

anchors_wanted = {}
for name, a in sorted(alerts.items()):
    if "expr" not in a:
        fail(f"{RULES}: {name} has no expr")
        continue
    check_names(f"{RULES} {name}", a["expr"], allowed_extra={"up"})
    if a.get("severity") not in ("critical", "warning", "info"):
        fail(f"{RULES}: {name} needs a severity label (critical|warning|info)")
    for key in ("summary", "description"):
        if not a.get(key):
            fail(f"{RULES}: {name} needs a {key} annotation")
    url = a.get("runbook_url", "")
    m = re.fullmatch(r"docs/operations\.md#([a-z0-9-]+)", url)
    if not m:
        fail(f"{RULES}: {name}: runbook_url {url!r} is not docs/operations.md#<anchor>")
    else:
        anchors_wanted.setdefault(m.group(1), []).append(name)

# ---------------------------------------------------------------- alerts.yaml
if read(CRD) != crd_from_rules(rules_text):
    fail(f"{CRD} is not rules.yml wrapped in a PrometheusRule: run scripts/check-observability.sh --write")
else:
    # The spec as Prometheus sees it: de-indented, checked by promtool.
    crd = read(CRD).splitlines()
    start = crd.index("spec:") + 1
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as tmp:
        tmp.write("\n".join(l[2:] for l in crd[start:]) + "\n")
    r = subprocess.run(["promtool", "check", "rules", tmp.name], capture_output=True, text=True)
    os.unlink(tmp.name)
    if r.returncode != 0:
        fail(f"{CRD}: spec.groups do not pass promtool check rules:\n{r.stdout}{r.stderr}")

# ---------------------------------------------------------------- alerts_test.yml
cases = {}  # alertname -> [firing cases, quiet cases]
alertname = None
for line in read(TESTS).splitlines():
    m = re.match(r"^\s*alertname:\s*(\S+)", line)
    if m:
        alertname = m.group(1)
        continue
    m = re.match(r"^\s*exp_alerts:\s*(.*)$", line)
    if m and alertname:
        c = cases.setdefault(alertname, [0, 0])
        c[1 if m.group(1).strip() == "[]" else 0] += 1
        alertname = None
for name in sorted(alerts):
    firing, quiet = cases.get(name, [0, 0])
    if firing == 0 or quiet == 0:
        fail(f"{TESTS}: {name} needs a firing case and a not-firing case "
             f"(`exp_alerts: []`); has {firing} and {quiet}")
for name in sorted(set(cases) - set(alerts)):
    fail(f"{TESTS}: tests alert {name}, which rules.yml does not define")
tests_text = read(TESTS)
for name in records:
    if not re.search(rf"^\s*- expr:.*\b{re.escape(name)}\b", tests_text, re.M):
        fail(f"{TESTS}: recording rule {name} needs a promql_expr_test")

# ---------------------------------------------------------------- runbook anchors
def slug(heading):
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


if os.path.exists(OPERATIONS_DOC):
    ops = read(OPERATIONS_DOC)
    have = {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", ops, re.M)}
    have |= set(re.findall(r"""<a\s+(?:id|name)=["']([^"']+)["']""", ops))
    have |= set(re.findall(r"\{#([\w-]+)\}", ops))
    for anchor, names in sorted(anchors_wanted.items()):
        if anchor not in have:
            fail(f"{OPERATIONS_DOC}: no section #{anchor} (runbook of {', '.join(names)})")
else:
    print(f"note: {OPERATIONS_DOC} does not exist yet; runbook anchors not checked: "
          + ", ".join("#" + a for a in sorted(anchors_wanted)))

# ---------------------------------------------------------------- dashboard
exprs = []  # (where, query) of the dashboard and the docs' examples
try:
    dash = json.loads(read(DASHBOARD))
except ValueError as e:
    fail(f"{DASHBOARD}: not JSON: {e}")
    dash = {}
if dash:
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        fail(f"{DASHBOARD}: schemaVersion {dash.get('schemaVersion')!r}, expected 36 or later")
    for key in ("title", "uid"):
        if not dash.get(key):
            fail(f"{DASHBOARD}: missing {key}")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds_var = variables.get("datasource", {})
    if ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        fail(f"{DASHBOARD}: needs a `datasource` variable of type datasource (prometheus)")

    def all_panels(ps):
        for p in ps:
            yield p
            yield from all_panels(p.get("panels", []))

    ids = set()
    for p in all_panels(dash.get("panels", [])):
        where = f"{DASHBOARD} panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            fail(f"{where}: duplicate panel id")
        ids.add(p.get("id"))
        gp = p.get("gridPos", {})
        if not all(isinstance(gp.get(k), int) for k in ("h", "w", "x", "y")):
            fail(f"{where}: gridPos needs h, w, x, y")
        if p.get("type") == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"{where}: datasource must be the ${{datasource}} variable")
        if not p.get("targets"):
            fail(f"{where}: no queries")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${datasource}":
                fail(f"{where} query {t.get('refId')}: datasource must be ${{datasource}}")
            expr = t.get("expr", "")
            if not expr:
                fail(f"{where} query {t.get('refId')}: empty expr")
                continue
            check_names(where, expr)
            exprs.append((where, expr))
    for name, v in variables.items():
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q, re.S)
        if not m:
            fail(f"{DASHBOARD} variable {name}: expected label_values(<selector>, <label>), got {q!r}")
            continue
        check_names(f"{DASHBOARD} variable {name}", m.group(1))
        exprs.append((f"{DASHBOARD} variable {name}", m.group(1)))

# ---------------------------------------------------------------- docs/metrics.md
if os.path.exists(METRICS_DOC):
    doc = read(METRICS_DOC)
    for name in sorted(exported):
        if f"`{name}" not in doc:
            fail(f"{METRICS_DOC}: series {name} is not documented")
    for name in sorted(alerts):
        if name not in doc:
            fail(f"{METRICS_DOC}: alert {name} is not documented")
    for name in sorted(records):
        if f"`{name}`" not in doc:
            fail(f"{METRICS_DOC}: recording rule {name} is not documented")
    # Example queries (```promql blocks, one query per line, # comments) name real series and
    # parse: they join the dashboard's queries in the promtool check below.
    for block in re.findall(r"```promql\n(.*?)```", doc, re.S):
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                check_names(f"{METRICS_DOC} example", line)
                exprs.append((f"{METRICS_DOC} example", line))
else:
    fail(f"{METRICS_DOC} is missing")

# ---------------------------------------------------------------- PromQL syntax
# Every dashboard query and documented example must parse as PromQL: promtool checks them as
# recording rules, with the Grafana variables replaced by what Grafana would send.
def substitute(expr):
    expr = re.sub(r"\[\$\{?__\w+\}?\]", "[5m]", expr)
    return re.sub(r"\$\{[^}]*\}|\$\w+", ".*", expr)

with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as tmp:
    tmp.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (_, expr) in enumerate(exprs):
        tmp.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(substitute(expr))}\n")
r = subprocess.run(["promtool", "check", "rules", tmp.name], capture_output=True, text=True)
os.unlink(tmp.name)
if r.returncode != 0:
    out = r.stdout + r.stderr
    for i, (where, expr) in enumerate(exprs):
        if f"dashboard:query_{i}" in out or f"rule {i + 1}" in out:
            out += f"\n  query_{i} is {where}: {expr!r}"
    fail(f"queries do not parse as PromQL:\n{out}")

# ---------------------------------------------------------------- the live exposition
exposition = os.environ["EXPOSITION"]
if os.path.exists(exposition):
    live = dict(re.findall(r"^# TYPE (\S+) (\S+)$", read(exposition), re.M))
    for name, kind in sorted(live.items()):
        if not name.startswith(("chat_", "cutover_")):
            continue
        if name not in exported:
            fail(f"{exposition}: exports {name}, which this script did not find in {METRICS_RS}")
        elif exported[name] != kind:
            fail(f"{exposition}: {name} is a {kind}, {METRICS_RS} registers a {exported[name]}")
    for name in ("chat_execution_total", "chat_execution_latency_ms", "chat_runtime_fallback_enabled"):
        if name not in live:
            fail(f"{exposition}: {name} missing from the exposition")
    print(f"checked names against {exposition}")
else:
    print(f"note: {exposition} not found (written by `cargo test --test it metrics_exposition`); "
          "names checked against src/state/metrics.rs only")

if failures:
    print("\n".join("FAIL: " + f for f in failures), file=sys.stderr)
    sys.exit(1)
print(f"OK: {len(alerts)} alerts, {len(exported)} series, {len(exprs)} dashboard and doc queries")
PY
