# Set-up is part of every target: a fresh machine needs only python3 (with venv) and make.
# TORCH pins the CPU build available on these machines; override it for a GPU machine.
VENV  ?= .venv
TORCH ?= torch==2.13.0
BIN   := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/supsup: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

## demo: the main job — a real SupSup run on MNIST (5 PermutedMNIST tasks, task given and inferred) into runs/demo;
## it ends by pointing at `supsup report runs/demo` (figures beside the paper's)
demo: $(BIN)/supsup
	$(BIN)/supsup run demo --out runs/demo --force

## test: the whole test suite (fetches and verifies MNIST on first use)
test: $(BIN)/supsup
	$(BIN)/python -m pytest -q

bench: $(BIN)/supsup
	$(BIN)/supsup bench --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
