# Warren: the two commands a newcomer needs are `make run` and `make test`.
# Both install what a fresh Debian machine with only the Rust toolchain lacks.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/warren-target
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
VENV := tests/interop/.venv
WARREN_BIN := $(CARGO_TARGET_DIR)/release/warren

.PHONY: deps run build test unit interop node-deps lint fuzz-smoke clean-data

## deps: system packages the build and the interop tests need (libclang for RocksDB's
## bindgen, python3-venv for the interop suite, Node.js and Chromium for the browser
## tests), installed only when missing.
deps:
	@missing=""; \
	dpkg -s libclang-dev >/dev/null 2>&1 || missing="$$missing libclang-dev"; \
	python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	command -v g++ >/dev/null 2>&1 || missing="$$missing g++"; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

## run: the broker with embedded defaults (data in ./data, AMQP on 5672).
run: deps
	cargo run --release -p warren -- --data-dir ./data

build: deps
	# Benches are checked by `make lint` (clippy --all-targets), not built here.
	cargo build --release --workspace --bins --tests

## test: the whole suite: Rust unit and integration tests, then the interop suite
## (pika, kombu, Celery, paho, stomp.py; stompjs and the live example in Chromium)
## against the release binary.
test: build unit interop

unit:
	cargo test --release --workspace

$(VENV)/.installed: tests/interop/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/interop/requirements.txt
	touch $@

NODE_DIRS := tests/interop/node examples/live-vehicles

node-deps:
	@for d in $(NODE_DIRS); do \
	  if [ ! -f $$d/node_modules/.package-lock.json ] || [ $$d/package-lock.json -nt $$d/node_modules/.package-lock.json ]; then \
	    (cd $$d && npm ci --no-audit --no-fund --loglevel=error) || exit 1; \
	  fi; \
	done

interop: $(VENV)/.installed node-deps
	# The same command as `build`: a `-p warren` build resolves features differently and
	# would compile a second copy of the dependencies.
	cargo build --release --workspace --bins --tests
	cd tests/interop && WARREN_BIN=$(WARREN_BIN) .venv/bin/pytest -q

## lint: formatting and clippy, as CI runs them.
lint: deps
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets -- -D warnings

## fuzz-smoke: short libFuzzer runs of the AMQP frame, STOMP frame and MQTT packet
## decoders (needs cargo-fuzz).
fuzz-smoke:
	cd fuzz && mkdir -p corpus/amqp_frame && RUSTC_BOOTSTRAP=1 cargo fuzz run amqp_frame corpus/amqp_frame seeds/amqp_frame -- -max_total_time=60
	cd fuzz && mkdir -p corpus/stomp_frame && RUSTC_BOOTSTRAP=1 cargo fuzz run stomp_frame corpus/stomp_frame seeds/stomp_frame -- -max_total_time=60
	cd fuzz && mkdir -p corpus/mqtt_packet && RUSTC_BOOTSTRAP=1 cargo fuzz run mqtt_packet corpus/mqtt_packet seeds/mqtt_packet -- -max_total_time=60

clean-data:
	rm -rf ./data
