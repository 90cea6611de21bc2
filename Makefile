# hwgen — the two commands a user needs: `make demo` and `make test`.
# Both set up .venv themselves (idempotent: a stamp file records the install).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hwgen-installed
OUT    ?= build

.PHONY: setup tools demo test bench clean

setup: $(STAMP)

# torch is pinned and installed first: 2.13.0 resolves to the local CPU build,
# while an unpinned torch would pull several GB of CUDA packages (DESIGN.md).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Debian packages that PyPI has no equivalent for, installed when missing (CI runs as root):
# Icarus Verilog (the second RTL simulator, `--sim icarus`) and Chromium (the report test
# opens the HTML report in a real headless browser). Checked every time; cheap when present.
DEB_TOOLS := iverilog:iverilog chromium:chromium

tools:
	@missing=""; for t in $(DEB_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (sudo apt-get install$$missing)"; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	fi

demo: setup
	$(BIN)/hwgen flow --model minilm --out $(OUT)/minilm --rows 8 --cols 8 --skip impl --json
	$(BIN)/hwgen report $(OUT)/minilm --json

test: setup tools
	$(BIN)/python -m pytest -q -n 2

bench: setup
	$(BIN)/python -m hwgen.bench --out $(OUT)/bench

clean:
	rm -rf $(OUT) .hwgen-cache
