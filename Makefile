# The two commands of the README: `make demo` and `make test`. Each works on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist

.PHONY: demo test data lint clean

# torch==2.13.0 first: on these machines that request takes the CPU build lying on disk, and
# then the package's "torch" requirement is already satisfied (no CUDA download).
$(STAMP): pyproject.toml setup.py lowbit/kernels/csrc/lowbit_kernels.c lowbit/kernels/csrc/lowbit_binary.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray,onnx]'
	touch $(STAMP)

# Debian's Fashion-MNIST, when apt is usable; otherwise say how to get it and carry on.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
		echo "fashion-mnist: found in $(FMNIST)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "fashion-mnist: apt-get install dataset-fashion-mnist failed; tests that need it are skipped"; \
	else \
		echo "fashion-mnist: not installed and apt is not usable here; run 'sudo apt-get install dataset-fashion-mnist' or set LOWBIT_DATA"; \
	fi

# The sign-vs-linear study, quick variant (resumes where a previous `make demo` stopped), then
# its report; `lowbit report` prints where the report is.
demo: $(STAMP) data
	$(BIN)/lowbit study sign-vs-linear --quick --out runs/demo
	$(BIN)/lowbit report runs/demo

test: $(STAMP) data
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check lowbit tests benchmarks
	$(BIN)/ruff format --check lowbit tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
