# Two commands for a fresh Debian 12 machine (as root):
#   make run    install what is missing, build, run the main job (pipelines/verl_lora.lua)
#   make test   install what is missing, build, run every test (plus a sanitizer build)
# Other targets: build, asan, tsan, lint, fuzz, bench, clean.

BUILD ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 30
JOBS ?= $(shell nproc)
ARGS ?=

.PHONY: all deps build run test test-asan asan test-tsan tsan lint fuzz bench clean

all: build

deps:
	@scripts/install-deps.sh

$(BUILD)/build.ninja: | deps
	cmake -S . -B $(BUILD) -G Ninja

build: deps $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

run: build
	$(BUILD)/wshost pipelines/verl_lora.lua $(ARGS)

test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory fuzz
	$(MAKE) --no-print-directory test-asan
	$(MAKE) --no-print-directory test-tsan

# The sanitizer build (ASan + UBSan) also has allocation fault injection
# (tests/e2e/fault_alloc.sh), which only test builds may carry. Configured on
# every run so an older build directory picks the options up.
asan: deps
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug \
	      -DWS_SANITIZE=address,undefined -DWS_FAULT_INJECTION=ON
	cmake --build $(ASAN_BUILD) -j $(JOBS)

# The sanitizer build runs every suite but the tests that load the
# instrumented ws.so or libwshost.so into an uninstrumented stock lua5.4,
# python or C program (lua_module, peer, install, torch, the python label). Open MPI
# keeps process-lifetime allocations, suppressed by library name in
# tests/lsan-openmpi.supp; naming them needs full stacks (the libraries have
# no frame pointers), so the MPI tests run apart with the slow unwinder.
# Left to the main build: mpi_large (its 2^31-element part takes over ten
# minutes instrumented), mpi_kill and disagg_kill_mpi (timing tests whose ranks
# die by signal, so LeakSanitizer never runs in them).
ASAN_ENV = ASAN_OPTIONS=detect_leaks=1:protect_shadow_gap=0
test-asan: asan
	$(ASAN_ENV) ctest --test-dir $(ASAN_BUILD) --output-on-failure -j $(JOBS) \
	      -L 'c|lua|e2e' -E 'mpi|lua_module|peer|install|torch'
	$(ASAN_ENV):fast_unwind_on_malloc=0 \
	LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan-openmpi.supp:print_suppressions=0 \
	ctest --test-dir $(ASAN_BUILD) --output-on-failure -j $(JOBS) -R 'mpi' \
	      -E 'lua_module|peer|install|torch|mpi_large|mpi_kill|disagg_kill'

# ThreadSanitizer over the C core's threaded paths: the cpu backend's copy,
# convert, fill and checksum workers (parallel.c, device_cpu.c). The C unit
# tests (test_parallel among them) run with several workers and sizes above the
# split threshold.
tsan: deps
	cmake -S . -B $(TSAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DWS_SANITIZE=thread \
	      -DWS_WITH_MPI=OFF -DWS_WITH_CUDA=OFF -DWS_BUILD_LUA_MODULE=OFF
	cmake --build $(TSAN_BUILD) -j $(JOBS)

# die_after_fork=0: test_tensor checks that a forked child restarts the
# workers, which ThreadSanitizer refuses by default.
test-tsan: tsan
	WSHOST_THREADS=4 TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:die_after_fork=0 \
	ctest --test-dir $(TSAN_BUILD) --output-on-failure -j $(JOBS) -L c

# cppcheck over the C core with the committed configuration (scripts/cppcheck.sh).
lint: deps
	scripts/cppcheck.sh

# libFuzzer (clang, with ASan and UBSan) over the parsers of untrusted files,
# the safetensors header and the checkpoint index: FUZZ_SECONDS per target from
# tests/fuzz/corpus; any crash, leak or sanitizer report fails (scripts/fuzz.sh).
fuzz: deps
	cmake -S . -B $(FUZZ_BUILD) -G Ninja -DCMAKE_C_COMPILER=clang -DWS_FUZZ=ON \
	      -DWS_WITH_CUDA=OFF -DWS_WITH_MPI=OFF -DWS_BUILD_LUA_MODULE=OFF
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzz_safetensors fuzz_safetensors_index
	scripts/fuzz.sh $(FUZZ_BUILD) $(FUZZ_SECONDS)

bench: build
	$(BUILD)/wshost bench/copy.lua
	$(BUILD)/wshost bench/sync.lua

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD)
