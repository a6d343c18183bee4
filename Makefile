# The README's two set-up commands are `make demo` and `make test`. Each creates the virtual environment
# on first use (and refreshes it when pyproject.toml or constraints.txt change), installing exact pins.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= ../shared/data/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: venv demo test test-fast timm-tests lint format clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,onnx,transformers,app]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/smallvit demo --data $(DATA) --output $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# the suite without the tests marked slow, for quick iteration (make test, and so CI, runs everything)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

# timm's own tests/test_models.py (from the sdist of the installed timm) on every smallvit model
timm-tests: $(STAMP)
	PYTHON=$(BIN)/python scripts/timm_test_models.sh

# what .pre-commit-config.yaml runs too; mypy's and import-linter's settings are in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
