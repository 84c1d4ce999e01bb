# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test`.
# Each creates .venv and installs lrpc with the CPU build of PyTorch pinned (constraints.txt).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[torch,viz,minilm,eval,ray,test]"
	# zennit, the γ-rule oracle of tests/test_gamma_zennit.py: without its torchvision dependency, which has
	# no wheel for the CPU torch build (the test stands in for the two classes zennit imports from it)
	$(VENV)/bin/pip install -q --no-deps zennit
	touch $(STAMP)

.PHONY: demo test test-long bench
demo: $(STAMP)
	$(VENV)/bin/lrpc demo --force

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 tests

test-long: $(STAMP)
	LRPC_FUZZ_EXAMPLES=3000 $(VENV)/bin/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(VENV)/bin/lrpc bench llama-bench
