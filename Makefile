# k25jax quickstart: `make demo` (the main job) and `make test` (the suite). Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export JAX_PLATFORMS ?= cpu
export PYTHONPATH := $(CURDIR)

.PHONY: demo test data install bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(BIN)/python -m k25jax.data.prepare

demo: $(STAMP) data
	$(BIN)/python -m experiments.early_fusion --workdir out/early_fusion

test: $(STAMP) data
	$(BIN)/python -m pytest -n 2 --dist loadfile

bench: $(STAMP) data
	mkdir -p out
	$(BIN)/python -m benchmarks.train_step --out out/train_step.json

clean:
	rm -rf $(VENV) .cache
