# The two commands of the README:
#   make demo   runs the pipeline on the shipped demo data (installs first if needed)
#   make test   installs everything and runs lint + the whole test suite (what CI runs)
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/snakemake --profile profiles/local
	@echo "restored images: results/demo/*.ome.zarr (and .tif); report: results/demo/report/index.html"

lint: install
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/snakefmt --check Snakefile workflow
	$(BIN)/snakemake --lint

test: lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/levin.py --subset 6 --iterations 500
	$(BIN)/python bench/dag_dryrun.py

clean:
	rm -rf results .snakemake
