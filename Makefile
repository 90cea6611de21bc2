# hwgen — the two commands a user needs: `make demo` and `make test`.
# Both set up .venv themselves (idempotent: a stamp file records the install).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hwgen-installed
OUT    ?= build

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch is pinned and installed first: 2.13.0 resolves to the local CPU build,
# while an unpinned torch would pull several GB of CUDA packages (DESIGN.md).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/hwgen quantize --model minilm --bits w8a8 --out $(OUT)/minilm --json
	$(BIN)/hwgen golden $(OUT)/minilm --text "hwgen turns transformer blocks into verified FPGA kernels." --json

test: setup
	$(BIN)/python -m pytest -q -n 2

bench: setup
	$(BIN)/python -m hwgen.bench --out $(OUT)/bench

clean:
	rm -rf $(OUT) .hwgen-cache
