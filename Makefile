# cutover-proxy. `make demo` and `make test` work on a fresh Debian machine with only the Rust
# toolchain: they install what they need (scripts/install-deps.sh).

CARGO ?= cargo
VENV  ?= .venv
PY    := $(VENV)/bin/python

.PHONY: all build release demo test test-rust test-e2e lint check-config check-observability check-k8s deps deps-test venv bench soak fuzz clean

all: build

deps:
	@scripts/install-deps.sh build

deps-test:
	@scripts/install-deps.sh test

build: deps
	$(CARGO) build

release: deps
	$(CARGO) build --release

# Stand-in legacy and runtime upstreams plus the proxy in front of them; prints curl commands.
demo: release
	./target/release/cutover-proxy demo --config demo/proxy.toml

# The legacy stand-in's Express stack, exactly as locked.
LEGACY_NODE := tests/e2e/legacy/node_modules/.package-lock.json

$(LEGACY_NODE): tests/e2e/legacy/package-lock.json
	cd tests/e2e/legacy && npm ci --no-audit --no-fund --loglevel=error
	touch $(LEGACY_NODE)

$(PY): tests/e2e/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r tests/e2e/requirements.txt
	touch $(PY)

venv: $(PY)

test: deps-test lint test-rust check-observability check-config check-k8s test-e2e

test-rust:
	$(CARGO) test --all-targets

# Alert rules (promtool check + unit tests), dashboard and docs against the series we export;
# test-rust writes the exposition it compares against.
check-observability:
	scripts/check-observability.sh

# Kustomize builds, offline schema validation, and `check` on the ConfigMap's proxy.toml.
check-k8s: build
	CUTOVER_PROXY_BIN=$(CURDIR)/target/debug/cutover-proxy scripts/check-k8s.sh

check-config: build
	./target/debug/cutover-proxy check --config proxy.toml
	./target/debug/cutover-proxy check --config demo/proxy.toml

test-e2e: build venv $(LEGACY_NODE)
	CUTOVER_PROXY_BIN=$(CURDIR)/target/debug/cutover-proxy $(PY) -m pytest -q tests/e2e

# The fuzz targets run only under `make fuzz` (nightly); lint keeps them compiling against the
# crate as it is now.
lint:
	scripts/check-layers.sh
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) check --quiet --manifest-path fuzz/Cargo.toml --target-dir target/fuzz-check

bench: release
	$(CARGO) build --release --example lean_forwarder --example rewrite_ir
	@scripts/install-deps.sh bench
	bench/run.sh

# Fuzzing, not in `make test`: cargo-fuzz (nightly) on the SSE parser + mapper, the config parser,
# the chat request path, the runtime response decoder, the lean passthrough's heads and the response-head
# parser against the two it replaced (differential); FUZZ_SECS per target (6 x 150 s = 15 min).
FUZZ_SECS ?= 150
FUZZ_TARGETS := sse_mapper config_parse chat_request h1_response passthrough_heads response_heads

fuzz:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		dict=; if [ $$t = config_parse ]; then dict=-dict=fuzz/dicts/config.dict; fi; \
		echo "== fuzz $$t: $(FUZZ_SECS) s"; \
		cargo +nightly fuzz run --fuzz-dir fuzz --target-dir fuzz/target -O -a -s none $$t \
			fuzz/corpus/$$t fuzz/seeds/$$t -- -max_total_time=$(FUZZ_SECS) -print_final_stats=1 $$dict; \
	done

# Soak, not in `make test`: 10 min of mixed traffic with reloads against the release binary
# (SOAK_SECS, SOAK_CONCURRENCY, SOAK_RELOAD_SECS, SOAK_SAMPLE_SECS to change it).
soak: release venv $(LEGACY_NODE)
	scripts/soak.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV) .venv-k8s fuzz/target
