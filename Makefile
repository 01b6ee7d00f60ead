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

# libtpu lets the tests AOT-compile for real TPU topologies on this CPU (tests/test_aot.py); test-only.
AOT_STAMP := $(VENV)/.installed-aot-stamp
$(AOT_STAMP): requirements-aot.txt $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-aot.txt
	touch $(AOT_STAMP)

install: $(STAMP)

data: $(STAMP)
	$(BIN)/python -m k25jax.data.prepare

demo: $(STAMP) data
	$(BIN)/python -m experiments.early_fusion --workdir out/early_fusion

# k25jax.runtime runs the suite under jemalloc when installed (installed by `data` as root; k25jax/runtime.py).
test: $(STAMP) $(AOT_STAMP) data
	$(BIN)/python -m k25jax.runtime $(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

# Performance figures quoted in the README (each benchmark writes one JSON file).
bench: $(STAMP) data
	mkdir -p out/bench
	$(BIN)/python -m benchmarks.train_step --out out/bench/train_step.json
	$(BIN)/python -m benchmarks.data --out out/bench/data.json
	$(BIN)/python -m benchmarks.vision --out out/bench/vision.json
	$(BIN)/python -m benchmarks.sampler --out out/bench/sampler.json
	$(BIN)/python -m benchmarks.dep --out out/bench/dep.json

clean:
	rm -rf $(VENV) .cache
