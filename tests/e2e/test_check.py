"""`cutover-proxy check --config F`: 0 when valid; otherwise non-zero and the offending key named."""

from __future__ import annotations

import pytest

from e2e_support import REPO, run_check

BASE = """\
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19901"
metrics_listen = "127.0.0.1:19090"

[legacy]
address = "127.0.0.1:3001"

[runtime]
address = "runtime:8000"
stream_path = "/api/v1/execute/stream"
health_path = "/health"
execution_timeout_ms = 300000
health_interval_ms = 5000

[rollout]
default_mode = "direct_llm"
runtime_orgs = ["org-a"]

[identity]
jwt_secret_env = "JWT_SECRET"
org_claim = "orgId"

[breaker]
window_secs = 300
min_requests = 10
error_rate = 0.5
timeout_rate = 0.3
latency_ratio = 0.8
open_secs = 30
half_open_probes = 3

[admin]
token_env = "CUTOVER_ADMIN_TOKEN"
"""


def check_text(tmp_path, text: str):
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return path, run_check(path)


def test_contract_example_is_valid(tmp_path):
    path, r = check_text(tmp_path, BASE)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


@pytest.mark.parametrize("name", ["proxy.toml", "demo/proxy.toml"])
def test_shipped_configs_are_valid(name):
    r = run_check(REPO / name)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("edit, key", [
    (("[breaker]\n", "[breaker]\nerror_rat = 0.5\n"), "breaker.error_rat"),          # unknown key (typo)
    (("[admin]\n", "[admin]\ntoken = \"x\"\n"), "admin.token"),                       # unknown key
    (("[admin]\n", "[bogus]\nx = 1\n\n[admin]\n"), "bogus"),                         # unknown table
    (('default_mode = "direct_llm"', 'default_mode = "runtime"'), "rollout.default_mode"),   # bad mode
    (("error_rate = 0.5", "error_rate = 1.5"), "breaker.error_rate"),                # rate > 1
    (("timeout_rate = 0.3", "timeout_rate = -0.1"), "breaker.timeout_rate"),         # rate < 0
    (("min_requests = 10", 'min_requests = "ten"'), "breaker.min_requests"),         # wrong type
    (('address = "127.0.0.1:3001"', 'address = "nonsense"'), "legacy.address"),      # bad address
    (("execution_timeout_ms = 300000", "execution_timeout_ms = 0"), "runtime.execution_timeout_ms"),
    (('runtime_orgs = ["org-a"]', 'runtime_orgs = ["org-a", " "]'), "rollout.runtime_orgs"),
])
def test_invalid_config_names_the_key(tmp_path, edit, key):
    old, new = edit
    assert old in BASE
    path, r = check_text(tmp_path, BASE.replace(old, new, 1))
    assert r.returncode != 0, f"accepted: {r.stdout}"
    assert key in r.stderr, f"{key} not named in: {r.stderr!r}"


def test_missing_file_fails(tmp_path):
    r = run_check(tmp_path / "nope.toml")
    assert r.returncode != 0
    assert "nope.toml" in r.stderr


def test_syntax_error_names_the_key_or_line(tmp_path):
    text = BASE.replace('address = "127.0.0.1:3001"', "address = 127.0.0.1:3001")
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l == "address = 127.0.0.1:3001")
    path, r = check_text(tmp_path, text)
    assert r.returncode != 0
    assert "legacy.address" in r.stderr and f"line {line}" in r.stderr, r.stderr
