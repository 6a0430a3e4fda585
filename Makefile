# The two commands of the README:
#   make demo   runs the pipeline on the shipped demo data (installs first if needed)
#   make test   installs everything and runs lint + the whole test suite (what CI runs)
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install demo test lint slurm bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/snakemake --profile profiles/local
	@echo "restored images: results/demo/*.ome.zarr (and .tif); report: results/demo/report/index.html"

lint: install
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/snakefmt --check Snakefile workflow
	$(BIN)/snakemake --lint --configfile config/config.yaml

# In CI (CI=true, root, Debian) a single-node SLURM cluster is started for the `slurm`
# tests; elsewhere they are skipped with the reason.
slurm:
	@if [ "$${CI:-}" = true ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		bash .ci/slurm/start.sh || echo "SLURM could not be started: slurm tests will be skipped"; fi

test: lint slurm
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/levin.py --subset 6 --iterations 500
	$(BIN)/python bench/dag_dryrun.py

clean:
	rm -rf results .snakemake
