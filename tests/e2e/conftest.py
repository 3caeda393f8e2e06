"""Fixtures: the stand-in upstreams (once per session) and cutover-proxy processes (per test).

Each test that needs a proxy gets its own process, proxy.toml and ports, so breaker state,
counters and config edits never leak between tests. Everything runs on 127.0.0.1 with free ports;
readiness is polled with deadlines; teardown kills whole process groups, also after a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_support import Legacy, Proxy, Runtime, SEPS, proxy_bin


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _failed(request) -> bool:
    return any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
               for w in ("setup", "call"))


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session", autouse=True)
def _binary():
    path = proxy_bin()
    if not path.is_file():
        pytest.exit(f"cutover-proxy binary not found at {path}: run `cargo build` or set CUTOVER_PROXY_BIN",
                    returncode=3)


@pytest.fixture(scope="session")
def upstreams(log_dir):
    """The legacy stand-in and one runtime per line separator, started in parallel."""
    apps = []
    try:
        legacy = Legacy(log_dir)
        apps.append(legacy)
        runtimes = {}
        for name in SEPS:
            runtimes[name] = Runtime(name, log_dir)
            apps.append(runtimes[name])
        for app in apps:
            app.wait_ready()
        yield legacy, runtimes
    finally:
        for app in apps:
            app.proc.stop()


@pytest.fixture(scope="session")
def legacy(upstreams) -> Legacy:
    return upstreams[0]


@pytest.fixture(scope="session")
def runtimes(upstreams) -> dict[str, Runtime]:
    return upstreams[1]


@pytest.fixture(scope="session")
def runtime(runtimes) -> Runtime:
    """The runtime with sse-starlette's default framing (CRLF)."""
    return runtimes["crlf"]


@pytest.fixture
def make_proxy(request, tmp_path, legacy, runtime):
    """Start a proxy: make_proxy(runtime=<Runtime or "host:port">, overrides={table: {key: value}})."""
    started: list[Proxy] = []

    def make(runtime_: Runtime | str | None = None, overrides: dict | None = None, workdir: Path | None = None,
             config_path: Path | None = None) -> Proxy:
        target = runtime_ if runtime_ is not None else runtime
        address = target if isinstance(target, str) else target.address
        wd = workdir or tmp_path / f"proxy{len(started)}"
        wd.mkdir(parents=True, exist_ok=True)
        p = Proxy(wd, legacy, address, overrides, config_path=config_path)
        started.append(p)
        return p

    yield make
    failed = _failed(request)
    problems = []
    for p in started:
        problems += p.close()
        if failed or problems:
            print(f"---- proxy log ({p.workdir}) ----\n{p.proc.log_tail(80)}")
    if failed or problems:
        for app in (legacy, runtime):
            print(f"---- {app.name} log ----\n{app.proc.log_tail(30)}")
    if problems:
        pytest.fail("cutover-proxy misbehaved:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def make_runtime(tmp_path):
    """A runtime of the test's own, e.g. with other uvicorn options."""
    started: list[Runtime] = []

    def make(sep: str = "crlf", extra_args: list[str] | None = None) -> Runtime:
        rt = Runtime(sep, tmp_path, name=f"runtime-extra{len(started)}", extra_args=extra_args)
        started.append(rt)
        rt.wait_ready()
        return rt

    yield make
    for rt in started:
        rt.proc.stop()


@pytest.fixture
def proxy(make_proxy) -> Proxy:
    """A proxy in front of the CRLF runtime with org-a allowlisted."""
    return make_proxy()

