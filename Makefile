# One-command set-up: `make demo` and `make test` each create the virtual environment, install
# torch (the local CPU wheel, never a multi-GB CUDA build), the project with its dev extras, and
# the Fashion-MNIST files and the King James Bible (Debian's bible-kjv, for the language-model
# recipe) when they are absent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
KJV_PACKAGES := bible-kjv bible-kjv-text

.PHONY: setup data demo test test-slow lint docs docs-serve bench bench-trl reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed data

data:
	@if [ -n "$$KDISTILL_DATA" ] || ls $(FASHION_MNIST_DIR)/train-images-idx3-ubyte* >/dev/null 2>&1; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST not found and apt-get is not available."; \
		echo "Put the four official files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"; \
		echo "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder and set KDISTILL_DATA to it."; \
		exit 1; \
	fi
	@if bible -f Gen1:1 2>/dev/null | grep -q '^Ge1:1 '; then \
		echo "King James Bible (bible-kjv): found"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(KJV_PACKAGES); \
	else \
		echo "King James Bible not found and apt-get is not available: the language-model recipe"; \
		echo "(data.dataset: kjv) needs Debian's $(KJV_PACKAGES), or data.text.text_file."; \
	fi

demo: setup
	$(BIN)/kdistill demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# kdistill side by side with TRL's GKD trainer (bench/bench_trl.py): TRL lives in its own virtual
# environment (never the project's); kdistill runs there from src/ through PYTHONPATH.
TRL_VENV ?= /work/venv-trl
TRL_PACKAGES := torch==$(TORCH_VERSION) trl==1.16.0 transformers==5.24.0 tokenizers pyyaml \
	pydantic safetensors numpy tqdm matplotlib

$(TRL_VENV)/.installed:
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install --quiet $(TRL_PACKAGES)
	touch $@

bench-trl: $(TRL_VENV)/.installed
	PYTHONPATH=$(CURDIR)/src nice -n 10 $(TRL_VENV)/bin/python bench/bench_trl.py \
		--json bench/results/trl-$$(date +%F).json

# the documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or page fails
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

docs-serve: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

reference: $(VENV)/.installed
	$(BIN)/kdistill reference --out docs/recipe-reference.md

clean:
	rm -rf $(VENV) runs site .pytest_cache
