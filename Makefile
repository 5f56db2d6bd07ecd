# softcal: every target does its own set-up on a fresh machine.
#   make test        CPU build (torch 2.13.0, CPU wheel) + the test suite, twice, side by side: on
#                    the CPU kernels (test-cpu) and on the CUDA kernels run by the emulator in
#                    tests/cuda_emu (test-emu); the large shapes (marker `slow`) are left to test-slow
#   make test-slow   the large-shape cases (C = 50257, 128256, ...) on both, as CI runs them
#   make test-emu-asan  the CUDA-kernel tests under the emulator built with AddressSanitizer,
#                    threads in a random (seeded) order between barriers
#   make test-wheel  build a wheel, install it (not editable) into a fresh virtual environment and
#                    run the packaging tests against the installed package
#   make lint        ruff (pyproject.toml) and clang-format (.clang-format) on the tree
#   make calibrate   the main job: `softcal calibrate` on the embedded DenseNet-40 / CIFAR-10 logits
#   make bench       the CPU loss benchmark (both THP settings) -> benchmarks/results/
#   make cuda-check  compile + link + import the CUDA extension without a GPU (torch 2.14.1, CUDA
#                    13.0) and its static gates (no spill, 16-byte loads); no test suite rerun
# CI (.ci/run, .github/workflows/ci.yml) runs each suite once: lint, test, test-slow, test-emu-asan,
# test-wheel, cuda-check.
SHELL       := /bin/bash
PYTHON      ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
# pyarrow: an optional dependency of softcal (Parquet input); installed here so that its test runs
# scikit-learn: the isotonic-regression oracle of tests/calibration/test_calibrators.py (tests only)
DEPS        := numpy scipy matplotlib tqdm pytest ninja setuptools wheel pyarrow scikit-learn
# the peers that tests/metrics/test_metrics_peers.py compares softcal.metrics with (test environment
# only, never a dependency of softcal): relplot (smooth ECE), uncertainty-calibration (debiased
# calibration error), netcal (MMCE, ECE, MCE; it brings pyro-ppl, gpytorch and tensorboard)
ORACLES     := relplot==1.0.3 uncertainty-calibration==0.1.4 netcal==1.4.0
CUDA_VENV   ?= .venv-cuda
CUDA_TORCH  ?= torch==2.14.1
CUDA_HOME   ?= /usr/local/cuda-13.0
MAX_JOBS    ?= 2
TEST_JOBS   ?= 2
LINTERS     := ruff==0.17.6 clang-format==23.1.5

.PHONY: venv build test test-cpu test-emu test-slow test-emu-asan test-wheel lint calibrate bench cuda-check clean

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q $(TORCH_SPEC) $(DEPS)
	$(VPY) -m pip install -q $(TORCH_SPEC) $(ORACLES)
	touch $@

venv: $(VENV)/.ready

# The extension is rebuilt only when a source changed: the stamp depends on csrc/**, setup.py and
# pyproject.toml (softcal/*.py need no rebuild: the install is editable). A missing
# softcal/_C*.so (deleted by hand) removes the stamp first.
EXT_SOURCES := $(shell find csrc -type f) setup.py pyproject.toml
BUILD_STAMP := build/.softcal-extension.stamp

$(BUILD_STAMP): $(VENV)/.ready $(EXT_SOURCES)
	MAX_JOBS=$(MAX_JOBS) SOFTCAL_CPU_ONLY=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p $(dir $@) && touch $@

build: $(VENV)/.ready
	@ls softcal/_C*.so >/dev/null 2>&1 || rm -f $(BUILD_STAMP)
	@$(MAKE) --no-print-directory $(BUILD_STAMP)
	$(VPY) -c "import torch, softcal; assert softcal.backend('cpu') == 'extension', 'extension did not load'; print('softcal', softcal.__version__, 'cpu backend:', softcal.backend('cpu'))"

# The two suites run side by side (TEST_JOBS=2: one pytest process each, so both cores work);
# each one's output is printed whole when it ends (--output-sync). TEST_JOBS=1: one after the other.
test: build
	@$(MAKE) --no-print-directory -j$(TEST_JOBS) --output-sync=target test-cpu test-emu

test-cpu: build
	$(VPY) -m pytest -q -m "not slow" tests

test-emu: build
	SOFTCAL_EMULATE_CUDA=1 $(VPY) -m pytest -q -m "not slow" tests

test-slow: build
	$(VPY) -m pytest -q -m slow tests
	SOFTCAL_EMULATE_CUDA=1 $(VPY) -m pytest -q -m slow tests

# ruff and clang-format come from the test environment; the configurations are in the repository
lint: $(VENV)/.ready
	$(VPY) -m pip install -q $(LINTERS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

# The CUDA kernels under the emulator with AddressSanitizer (the analogue of compute-sanitizer
# memcheck for the kernels' global-memory accesses), threads run in a random order between
# barriers (seeded: the same every run). libstdc++ is preloaded with libasan so that ASan's
# __cxa_throw interceptor finds the real one (else the first C++ exception, an expected error
# included, aborts the process).
test-emu-asan: build
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 SOFTCAL_EMU_ASAN=1 \
		SOFTCAL_EMU_SCHEDULE=random SOFTCAL_EMU_SEED=1 \
		SOFTCAL_EMULATE_CUDA=1 $(VPY) -m pytest -q tests/cuda/test_cuda.py tests/cuda/test_cuda_emu.py

# The wheel: `pip wheel --no-build-isolation --no-deps .` (against the installed torch, as the
# editable build), installed with --no-deps into a fresh virtual environment $(WHEEL_VENV), which
# reads its dependencies (torch, numpy, ...) from $(VENV) through a .pth file (a second torch
# install would add 750 MB and minutes); softcal itself comes from the wheel only. The CPU suite
# runs from $(WHEEL_TEST), a copy of tests/, csrc/ and README.md without softcal/, so that the
# source tree cannot shadow the installed package.
WHEEL_DIR   := build/wheel-dist
WHEEL_VENV  := build/wheel-venv
WHEEL_TEST  := build/wheel-test
# what the installed package can break (its data files, the entry point, the extension's ops built by
# `pip wheel`, the examples and docs run against it); the whole CPU suite runs once, in `make test`
WHEEL_TESTS := tests/project/test_repo.py tests/loss/test_core.py tests/cli/test_cli.py \
	tests/cli/test_cli_workflow.py tests/project/test_readme.py tests/distributed/test_examples.py \
	tests/calibration/test_calibration.py tests/lm_head/test_lm_head_ops.py

test-wheel: $(VENV)/.ready
	rm -rf $(WHEEL_DIR) $(WHEEL_VENV) $(WHEEL_TEST)
	MAX_JOBS=$(MAX_JOBS) SOFTCAL_CPU_ONLY=1 $(VPY) -m pip wheel -q --no-build-isolation --no-deps -w $(WHEEL_DIR) .
	$(VPY) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q --no-deps --no-index $(WHEEL_DIR)/softcal-*.whl
	$(VPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(WHEEL_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_softcal_test_deps.pth"
	mkdir -p $(WHEEL_TEST) && cp -r tests csrc benchmarks docs examples README.md pyproject.toml $(WHEEL_TEST)/
	cd $(WHEEL_TEST) && ../wheel-venv/bin/python -c "import os, softcal; p = os.path.realpath(softcal.__file__); \
		assert '/wheel-venv/' in p, p; assert softcal.backend('cpu') == 'extension'; \
		assert os.path.isfile(os.path.join(os.path.dirname(p), 'data', 'densenet40_c10_logits.npz')); \
		print('testing the installed wheel:', p)"
	cd $(WHEEL_TEST) && ../wheel-venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $(WHEEL_TESTS)

calibrate: build
	$(VENV)/bin/softcal calibrate

bench: build
	$(VPY) benchmarks/bench_loss.py --device cpu --thp both --out benchmarks/results

# The CUDA build is made in a copy of the tree (build/cuda-check) so that it never replaces the
# CPU build's softcal/_C*.so; a test of the copy checks that every op has a CUDA kernel.
$(CUDA_VENV)/.ready:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q $(CUDA_TORCH) $(DEPS) nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
	touch $@

cuda-check: $(CUDA_VENV)/.ready
	rm -rf build/cuda-check && mkdir -p build/cuda-check
	cp -r setup.py pyproject.toml README.md csrc softcal tests benchmarks docs examples build/cuda-check/
	rm -f build/cuda-check/softcal/_C*.so
	cd build/cuda-check && (CUDA_HOME=$(CUDA_HOME) SOFTCAL_FORCE_CUDA=1 SOFTCAL_PTXAS_VERBOSE=1 \
		MAX_JOBS=$(MAX_JOBS) TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" \
		../../$(CUDA_VENV)/bin/python setup.py -q build_ext --inplace > build.log 2>&1 \
		|| (tail -n 60 build.log; exit 1))
	# static gates (no GPU): no register spill in a float32/bfloat16/float16 kernel (ptxas -v), and
	# the streaming kernels' hot loops read with 16-byte loads (SASS of sm_90)
	$(CUDA_VENV)/bin/python tests/static/ptxas_report.py build/cuda-check/build.log --fail-on-spill --min-kernels 300
	PATH="$$($(CUDA_VENV)/bin/python -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "bin"))'):$$PATH" \
		$(CUDA_VENV)/bin/python tests/static/sass_report.py $$(ls build/cuda-check/softcal/_C*.so) --check
	# the build imports under torch 2.14.1 and every op has its CUDA kernel (the suites ran in `make test`)
	cd build/cuda-check && SOFTCAL_EXPECT_CUDA=1 ../../$(CUDA_VENV)/bin/python -m pytest -q \
		tests/cuda/test_cuda.py::test_cuda_kernels_registered tests/cuda/test_static_gates.py

clean:
	rm -rf build *.egg-info softcal/_C*.so
