# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU wheel of this exact release lies on the build machines; an open range pulls a CUDA build.
TORCH  := torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint docs docs-serve pytest bench figures figures-paper lab notebooks clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	touch $(STAMP)

# GPT-2-style vs VGG-style block spectra: the JS0 table, each model's 5 most heterogeneous blocks, the files
demo: install
	$(BIN)/hessian-blocks js --model gpt2-nano --model vgg16 --steps 25 --probes 2 --batch-size 4 --top 5 \
		--out $(DEMO_OUT)

# lint, the docs site (strict: a broken link fails), then every test (the notebooks run in tests/test_notebooks.py)
test: lint docs pytest

lint: install
	$(BIN)/ruff check .

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

pytest: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q tests

bench: install
	$(BIN)/python benchmarks/block_hvp.py

figures: install
	$(BIN)/hessian-blocks figures --out figures --results runs/figures-medium

# the paper-size groups whose work units are committed (figures/paper/results): seconds, no recomputation
figures-paper: install
	$(BIN)/hessian-blocks figures --size paper --results figures/paper/results --out figures/paper \
		--only spectra --only heterogeneity --only comparison

# rewrite the notebooks from notebooks/build_notebooks.py (they are generated: edit the builder)
notebooks: install
	$(BIN)/python notebooks/build_notebooks.py

# JupyterLab on the notebooks (the extra .[notebooks])
lab: install
	$(BIN)/python -m pip install --quiet -e '.[dev,docs,notebooks]'
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf $(VENV) runs build site *.egg-info
