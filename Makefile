# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> Creating $(VENV) and installing voicepipe with its models."
	@echo "==> The first time, pip builds llama-cpp-python from source: this may take several minutes"
	@echo "    (about 7 on 2 cores) with little output while it compiles; pip caches the wheel for next time."
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[test]'
	touch $(STAMP)
	@echo "==> Installed into $(VENV)."

run: setup
	@echo "==> Starting voicepipe up (the ready banner gives the URL; Ctrl-C stops everything)"
	$(VENV)/bin/voicepipe up

# Chromium for the browser tests (Debian's package; installed when we are root, else they skip).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "Chromium is not installed: the browser tests will be skipped"; }

test: setup browser
	$(PY) -m pytest

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info
