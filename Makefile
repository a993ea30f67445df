# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU wheel of this exact release lies on the build machines; an open range pulls a CUDA build.
TORCH  := torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: install demo test bench figures figures-paper clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/hessian-blocks js --model gpt2-nano --model vgg16 --steps 25 --probes 2 --batch-size 4 --out $(DEMO_OUT)

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q tests

bench: install
	$(BIN)/python benchmarks/block_hvp.py

figures: install
	$(BIN)/hessian-blocks figures --out figures --results runs/figures-medium

# the paper-size groups whose work units are committed (figures/paper/results): seconds, no recomputation
figures-paper: install
	$(BIN)/hessian-blocks figures --size paper --results figures/paper/results --out figures/paper \
		--only spectra --only heterogeneity --only comparison

clean:
	rm -rf $(VENV) runs build *.egg-info
