# The two commands a new user runs: `make run` and `make test`. Both build .venv first if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

export INTELLIGENTOPS_HOME ?= $(CURDIR)/.intelligentops
export DAGSTER_HOME := $(INTELLIGENTOPS_HOME)/dagster
# Models ship inside packages; nothing is fetched from a hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM := false
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ALLOW_PICKLE_DESERIALIZATION := false

PIPELINE ?= credit_risk

.PHONY: setup run test test-fast ui serve lock dagster-home clean

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# The project's modules compiled once: every process (a Dagster step, a server worker, a torchrun rank) then reads
# them compiled, also where PYTHONDONTWRITEBYTECODE keeps Python from writing them itself.
setup: $(BIN)/.installed
	@$(BIN)/python -m compileall -q -j 0 assets core orchestration resources workloads >/dev/null

dagster-home:
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

# One line per step on the console; the full log stays in the instance (make ui, Runs).
run: setup dagster-home
	$(BIN)/python -m orchestration.run $(PIPELINE); \
	status=$$?; $(BIN)/python -m orchestration.where $(PIPELINE); exit $$status

# Normal then shifted traffic to the server `make run` left up; the drift sensor asks for a retrain through the gates.
# SHIFT="--scale COLUMN=1.5" overrides the shift (python -m workloads.replay flags).
demo-drift: setup dagster-home
	$(BIN)/python -m orchestration.demo_drift $(PIPELINE) $(SHIFT)

# Every lane: tests/unit (pure functions), tests/stage (one stage on a real instance), tests/e2e (servers,
# daemons, the browser). .ci/run calls this.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit lane alone: no Dagster run, no subprocess; under two minutes.
test-fast: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# The champion of $(PIPELINE) in the foreground on port $(PORT) (Ctrl-C stops it); every decision is audited.
PORT ?= 8080
serve: setup dagster-home
	$(BIN)/python -m orchestration.serve $(PIPELINE) --port $(PORT)

UI_PORT ?= 3000
ui: setup dagster-home
	@echo "Dagster UI: http://127.0.0.1:$(UI_PORT)  (Ctrl-C stops it)"
	@echo "  First click Lineage (left) for the asset graph, then $(PIPELINE)/compliance_report > Checks for the gates."
	@echo "  Runs lists what make run did, with every step's log; Jobs > $(PIPELINE)__pipeline runs it again."
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(UI_PORT)

# Re-resolve the lock from requirements.in (needs the registries).
lock:
	rm -rf /tmp/intelligentops-lock && $(PYTHON) -m venv /tmp/intelligentops-lock
	/tmp/intelligentops-lock/bin/pip install --quiet -r requirements.in
	/tmp/intelligentops-lock/bin/pip freeze | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.txt

clean:
	rm -rf $(INTELLIGENTOPS_HOME)
