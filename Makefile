# The README's two commands: `make demo` and `make test`. Both build .venv from scratch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
# Device toolchain of JetPack 6 (CUDA 12.6): NVRTC, ptxas and headers, from PyPI.
CUDA126 := nvidia-cuda-nvrtc-cu12==12.6.85 nvidia-cuda-nvcc-cu12==12.6.85 \
           nvidia-cuda-runtime-cu12==12.6.77 nvidia-cuda-cccl-cu12==12.6.77
PYTEST_ARGS ?=

.PHONY: install test demo bench clean cross-compiler

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build on local disk, so nothing pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[compile,dev]'
	# one pip call: `pip --target` replaces the whole nvidia/ folder on each call
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/cuda/12.6 $(CUDA126)
	$(MAKE) cross-compiler
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The aarch64 cross toolchain for the host part of Jetson packages (Debian's package).
cross-compiler:
	@command -v aarch64-linux-gnu-g++ >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null; }

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m edgeflow.demo out

clean:
	rm -rf $(VENV) out build *.egg-info
