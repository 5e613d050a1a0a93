# Two commands on a fresh machine (Python 3.11 + pip):  make demo   |   make test
# Both create .venv and install the package with exact pins from constraints.txt.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP_VERSION := 26.3

export RAY_USAGE_STATS_ENABLED := 0
export RAY_ACCEPT_CPU_ONLY := 1

.PHONY: install test test-spark demo demo-s3 lint bench bench-train bench-label bench-scale cluster-up cluster-down clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt cluster/build-constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "pip==$(PIP_VERSION)"
	$(PY) -m pip install -q -c constraints.txt --build-constraint cluster/build-constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# The Spark query of cluster/QUERIES.md on the real job's output (needs Java 17+; pyspark is 450 MB).
test-spark: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,spark]'
	EMOTION_SPARK_TESTS=1 $(PY) -m pytest -q tests/test_spark.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m jobs.demo --workdir demo_out

demo-s3: $(STAMP)
	$(PY) -m jobs.demo --workdir demo_out --s3

bench-train: $(STAMP)
	$(PY) -m bench.train_bench

bench-label: $(STAMP)
	$(PY) -m bench.label_bench --only local,s3,large,plan,throttled

bench-scale: $(STAMP)
	$(PY) -m bench.label_bench --only scale,shards
	$(PY) -m bench.listing_bench

bench: bench-train bench-label bench-scale

cluster-up: $(STAMP)
	$(VENV)/bin/python -m cluster.local up

cluster-down: $(STAMP)
	$(VENV)/bin/python -m cluster.local down

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache *.egg-info
