# Two commands for a fresh Debian 12 machine (as root):
#   make run    install what is missing, build, run the main job (pipelines/verl_lora.lua)
#   make test   install what is missing, build, run every test (plus a sanitizer build)
# Other targets: build, asan, bench, clean.

BUILD ?= build
ASAN_BUILD ?= build-asan
JOBS ?= $(shell nproc)
ARGS ?=

.PHONY: all deps build run test test-asan asan bench clean

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
	$(MAKE) --no-print-directory test-asan

$(ASAN_BUILD)/build.ninja: | deps
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DWS_SANITIZE=address,undefined

asan: deps $(ASAN_BUILD)/build.ninja
	cmake --build $(ASAN_BUILD) -j $(JOBS)

# The sanitizer build runs the C unit tests, the Lua specs and the
# end-to-end tests of the binary. Left to the main build: anything under
# mpirun (Open MPI itself is not leak-clean), and the tests that load the
# instrumented ws.so into an uninstrumented stock lua5.4 or python.
test-asan: asan
	ASAN_OPTIONS=detect_leaks=1:protect_shadow_gap=0 \
	ctest --test-dir $(ASAN_BUILD) --output-on-failure -j $(JOBS) -L 'c|lua|e2e' \
	      -E 'mpi|lua_module|peer'

bench: build
	$(BUILD)/wshost bench/copy.lua
	$(BUILD)/wshost bench/sync.lua

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
