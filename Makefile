# The README's two commands: `make demo` and `make test`. Both build .venv from scratch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile targets/boards.json | sha1sum | cut -c1-12)
# Device toolchains (NVRTC, ptxas, headers from PyPI), one per CUDA release of the boards: the
# releases and their pins are the boards table's `_cuda_releases` (targets/boards.json).
BOARDS := targets/boards.json
CUDA_PINS = $(shell $(PYTHON) -c 'import json,sys; print(" ".join(json.load(open("$(BOARDS)"))["_cuda_releases"][sys.argv[1]]))' $(1))
CUDA_RELEASES := $(shell $(PYTHON) -c 'import json; print(" ".join(k for k in json.load(open("$(BOARDS)"))["_cuda_releases"] if k[0] != "_"))')
PYTEST_ARGS ?=

.PHONY: install test demo bench train-gpu gpu-kit gpu-check clean cross-compiler sass-tools browser $(addprefix cuda-,$(CUDA_RELEASES))

$(STAMP): pyproject.toml Makefile $(BOARDS)
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build on local disk, so nothing pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[compile,runtime,dev]'
	$(MAKE) $(addprefix cuda-,$(CUDA_RELEASES)) sass-tools cross-compiler browser
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# One pip call per release: `pip --target` replaces the whole nvidia/ folder on each call.
$(addprefix cuda-,$(CUDA_RELEASES)): cuda-%:
	$(BIN)/pip install --quiet --no-deps --upgrade --target $(VENV)/cuda/$* $(call CUDA_PINS,$*)

# cuobjdump + nvdisasm, to read what the cubins execute (`edgeflow inspect`: tensor cores, dp4a).
# CUDA 13's (PyPI) read sm_75 and newer only; for Xavier's sm_72, the CUDA 11.8/12 ones of
# Debian's non-free `nvidia-cuda-toolkit` .deb: fetched alone and unpacked into the venv (no
# root, nothing installed, no dependencies); where that fails, sm_72 SASS stays unread (unknown).
sass-tools:
	$(BIN)/pip install --quiet --no-deps --upgrade --target $(VENV)/cuda/tools \
	  nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37
	@set -e; . /etc/os-release; d=$$(mktemp -d); trap 'rm -rf '$$d EXIT; \
	printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
	  "$$VERSION_CODENAME" > $$d/non-free.sources; \
	mkdir -p $$d/lists/partial $$d/cache/archives/partial; \
	apt="apt-get -qq -o Dir::Etc::sourcelist=$$d/non-free.sources -o Dir::Etc::sourceparts=- \
	  -o Dir::State::Lists=$$d/lists -o Dir::Cache=$$d/cache -o Debug::NoLocking=1 -o APT::Sandbox::User=$$(id -un)"; \
	if $$apt update && (cd $$d && $$apt download nvidia-cuda-toolkit) && dpkg-deb -x $$d/nvidia-cuda-toolkit_*.deb $$d/x; then \
	  mkdir -p $(VENV)/cuda/sass-legacy/bin && cp $$d/x/usr/bin/cuobjdump $$d/x/usr/bin/nvdisasm $(VENV)/cuda/sass-legacy/bin/; \
	else echo "sass-tools: Debian's nvidia-cuda-toolkit could not be fetched: sm_72 SASS will not be read" >&2; fi

# The aarch64 cross toolchain for the host part of Jetson packages, and qemu-user, which runs the
# aarch64 int8 (sdot) kernels in the tests (Debian's packages).
cross-compiler:
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null; }

# Headless chromium and its driver for the daemon's browser test (Debian's packages).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m edgeflow.demo out

# The benchmark suite (bench/suite.py: speed against ONNX Runtime and PyTorch on the same network,
# size and threads in one run, OpenCV DIS, compile time, the runtime's peak memory, predicted fps
# per Jetson board, EPE against ms per pair with a plot), the pipelined stream against the network
# alone, the correlation operator against TOPI and torch, and what compression buys; JSON under
# out/bench/ (suite.json, suite.md: the README's tables, epe_vs_ms.png). compress.py runs before the
# suite, whose accuracy section reuses its int8 and pruned packages. Not part of `make test`.
bench: install
	mkdir -p out/bench
	$(BIN)/edgeflow compile flownet2-s --target host --size 384x512 --weights random \
	  -o out/bench/flownet2-s-host-384x512.tar
	$(BIN)/python bench/pipeline.py out/bench/flownet2-s-host-384x512.tar --json > out/bench/pipeline.json.tmp
	mv out/bench/pipeline.json.tmp out/bench/pipeline.json
	$(BIN)/python bench/correlation.py --json > out/bench/correlation.json.tmp
	mv out/bench/correlation.json.tmp out/bench/correlation.json
	$(BIN)/python bench/compress.py --json > out/bench/compress.json.tmp
	mv out/bench/compress.json.tmp out/bench/compress.json
	$(BIN)/python bench/suite.py --out out/bench
	cat out/bench/pipeline.json out/bench/correlation.json out/bench/compress.json

# Time-boxed training on a machine with an NVIDIA GPU and torch (bench/train_gpu.sh says how);
# no install step: it also runs where no package registry can be reached. Not part of `make test`.
train-gpu:
	bash bench/train_gpu.sh

# Our CUDA kernels as a kit for a GPU machine without TVM (bench/gpu_check.py says how), and the
# checks that machine runs on it (bench/gpu_check.sh). Neither is part of `make test`.
gpu-kit: install
	$(BIN)/python bench/gpu_check.py prepare out/gpu-kit

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) out build *.egg-info
