# Quick start: `make serve` and `make test`. Each creates or refreshes .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv serve test test-slow lint bench bench-quick loadtest clean fuzz train evaluate

venv: $(STAMP)

# Re-install only when the project's dependency list changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

serve: venv
	$(BIN)/orthovision serve

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -q

# Real Ray clusters on loopback: node loss under load, autoscaling (several minutes).
test-slow: venv
	$(BIN)/python -m pytest -m slow -q -s

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	$(BIN)/python -m bench.preprocess
	$(BIN)/python -m bench --json out/bench.json

bench-quick: venv
	$(BIN)/python -m bench --quick --json out/bench-quick.json

# Headless 60 s Locust run against a `make serve` started (and stopped) by the runner;
# CSV + HTML land in $(LOADTEST_OUT). LOADTEST_SHAPE: step | spike | none.
LOADTEST_SHAPE ?= step
LOADTEST_OUT ?= loadtests/reports
loadtest: venv
	$(BIN)/python -m loadtests.run --shape $(LOADTEST_SHAPE) --run-time 60s --out $(LOADTEST_OUT)

# The default checkpoint from scratch (docs/TRAINING.md): resumable, one log line a pass;
# the run folder lives outside the repository. `make evaluate` scores it on the test split.
TRAIN_OUT ?= $(HOME)/orthovision-runs/default
TRAIN_ARGS ?=
train: venv
	$(BIN)/orthovision train -c docs/train-default.yaml --out $(TRAIN_OUT) --resume $(TRAIN_ARGS)

EVAL_CHECKPOINT ?= $(TRAIN_OUT)
evaluate: venv
	$(BIN)/orthovision evaluate --checkpoint $(EVAL_CHECKPOINT) --data ../shared/data/fracture-xray \
		--split test --out $(EVAL_CHECKPOINT)/evaluation

clean:
	rm -rf $(VENV) .pytest_cache

# Coverage-guided decoder fuzzing (atheris): 100k executions, 2 s hang limit, 1 GiB memory
# (checked by the harness itself on its own peak RSS; libFuzzer's -rss_limit_mb reads the parent's).
FUZZ_RUNS ?= 100000
fuzz: venv
	rm -rf .fuzz-corpus && $(BIN)/python tests/orthovision/imaging/fuzz/seeds.py .fuzz-corpus
	OPENBLAS_NUM_THREADS=1 $(BIN)/python tests/orthovision/imaging/fuzz/fuzz_decoder.py -runs=$(FUZZ_RUNS) \
		-timeout=2 -rss_limit_mb=0 -max_len=262144 -print_final_stats=1 .fuzz-corpus

