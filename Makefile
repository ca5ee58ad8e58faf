# handover: the two quick-start commands, and helpers.
#   make demo   - the main job on an emulated host (see README)
#   make test   - every test: unit, property, and system tests in QEMU
# Each does its own set-up: a virtualenv cached outside the repository
# (HANDOVER_VENV, default ~/.cache/handover/venv), the build tools of the C tests
# (gcc with ASan/UBSan, clang for libFuzzer: `make tools`) and, for system tests, the
# apt packages and Debian kernel the QEMU lab needs (cached in ~/.cache/handover-lab).

PYTHON ?= python3
HANDOVER_VENV ?= $(HOME)/.cache/handover/venv
VPY := $(HANDOVER_VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv tools man test test-unit test-system test-kernel test-keepalive kernel kernel-debian kernel-check qemu qemu-check demo demo-vm bench bench-keepalive bench-vm vectors clean-venv

$(VPY): pyproject.toml
	@echo "handover: setting up $(HANDOVER_VENV)" >&2
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq python3-venv)
	$(PYTHON) -m venv $(HANDOVER_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@touch $(VPY)

venv: $(VPY)

# the C parser tests: gcc (ASan/UBSan) and clang (libFuzzer); apt-get only what is missing
TOOLS := make gcc clang
tools:
	@need=""; for t in $(TOOLS); do command -v $$t >/dev/null || need="$$need $$t"; done; \
	if [ -n "$$need" ]; then \
		echo "handover: installing$$need (the C parser tests need them)" >&2; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; \
	fi

test: $(VPY) tools
	$(VPY) -m pytest -ra -m 'not kernel' $(PYTEST_ARGS) tests

test-unit: $(VPY)
	$(VPY) -m pytest -ra -m 'not system' $(PYTEST_ARGS) tests

test-system: $(VPY)
	$(VPY) -m pytest -ra -m 'system and not kernel' $(PYTEST_ARGS) tests

# the patched kernel: build it (cached in ~/.cache/handover-kernel) and boot it in the lab
#   make kernel          the lab configuration (everything built in)
#   make kernel-debian   Debian's own configuration with modules (localmodconfig)
#   make kernel-check    checkpatch --strict on every patch, and every patch compiles alone
kernel: $(VPY)
	$(VPY) tools/kernel.py build

kernel-debian: $(VPY)
	$(VPY) tools/kernel.py build --config debian

kernel-check: $(VPY)
	$(VPY) tools/kernel.py checkpatch
	$(VPY) tools/kernel.py check-series --config lab
	$(VPY) tools/kernel.py check-series --config debian

# the patched QEMU (the VMM side; cached in ~/.cache/handover-qemu, compiles under nice -n 19)
#   make qemu         Debian's qemu 7.2 source + qemu-patches/, qemu-system-x86_64 only
#   make qemu-check   every patch applies in order, QEMU's checkpatch.pl on each, and the
#                     host-side smoke test of the built binary (skipped when not built)
qemu: $(VPY)
	$(VPY) tools/qemu.py build

qemu-check: $(VPY)
	$(VPY) tools/qemu.py check
	$(VPY) -m pytest -ra -m qemu $(PYTEST_ARGS) tests/qemu

test-kernel: $(VPY)
	HANDOVER_BUILD_KERNEL=1 $(VPY) -m pytest -ra -s -m kernel $(PYTEST_ARGS) tests

# the keepalive proof alone: a device kept alive across kexec, and the fallback (needs the kernel)
test-keepalive: $(VPY)
	HANDOVER_BUILD_KERNEL=1 $(VPY) -m pytest -ra -s -m kernel $(PYTEST_ARGS) tests/system/test_keepalive.py

demo: $(VPY)
	$(VPY) tools/demo.py

# a VM keeps its passthrough device through a QEMU restart and a host kexec (builds the
# patched kernel and QEMU first when missing: an hour or more cold)
demo-vm: $(VPY)
	$(VPY) tools/demo_vm.py

# the VM's pause across a host kexec, with a timeline picture
bench-vm: $(VPY)
	$(VPY) benchmarks/bench_vm_restart.py --svg vm-restart.svg

bench: $(VPY)
	$(VPY) benchmarks/bench_format.py

# kexec -> keepalive device usable, and the boot time the patches add against the stock kernel
bench-keepalive: $(VPY)
	$(VPY) benchmarks/bench_keepalive_kexec.py

vectors: $(VPY)
	$(VPY) -m tests.vectors.make_vectors

# man pages from the click definitions (docs/man/handover*.1)
man: $(VPY)
	$(VPY) tools/manpage.py docs/man

clean-venv:
	rm -rf $(HANDOVER_VENV)
