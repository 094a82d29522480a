# Set-up is part of every target: a fresh machine needs only python3 (with venv) and make.
# TORCH pins the CPU build available on these machines; override it for a GPU machine.
VENV  ?= .venv
TORCH ?= torch==2.13.0
BIN   := $(VENV)/bin
# The Avalanche integration's tests get a venv of their own: avalanche-lib needs torchvision, whose wheels need
# torch's CUDA build (about 6 GB; it runs on the CPU). These two lie on the disk of these machines.
AVALANCHE_VENV  ?= .venv-avalanche
AVALANCHE_TORCH ?= torch==2.14.1 torchvision==0.29.1
ABIN := $(AVALANCHE_VENV)/bin

.PHONY: demo test test-avalanche bench clean

$(BIN)/supsup: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,lightning]"
	touch $@

$(ABIN)/supsup: pyproject.toml
	python3 -m venv $(AVALANCHE_VENV)
	$(ABIN)/pip install --quiet $(AVALANCHE_TORCH)
	$(ABIN)/pip install --quiet -e ".[avalanche]" "pytest>=8"
	touch $@

## demo: the main job — a real SupSup run on MNIST (5 PermutedMNIST tasks, task given and inferred) into runs/demo;
## it ends by pointing at `supsup report runs/demo` (figures beside the paper's)
demo: $(BIN)/supsup
	$(BIN)/supsup run demo --out runs/demo --force

## test: the whole test suite (fetches and verifies MNIST on first use), then the Avalanche tests in their venv
## (SUPSUP_REQUIRE: integrations whose library is installed there, so that a failed import fails, not skips)
test: $(BIN)/supsup
	SUPSUP_REQUIRE=lightning $(BIN)/python -m pytest -q
	$(MAKE) test-avalanche

test-avalanche: $(ABIN)/supsup
	SUPSUP_REQUIRE=avalanche $(ABIN)/python -m pytest -q tests/test_integrations_avalanche.py

bench: $(BIN)/supsup
	$(BIN)/supsup bench --quick

clean:
	rm -rf $(VENV) $(AVALANCHE_VENV) runs .pytest_cache
