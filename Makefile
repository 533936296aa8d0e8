# Two entry points: `make demo` (the main job) and `make test`.
# Both create .venv on first use with the CPU build of torch that pip finds
# on these machines, then the project with every extra.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint docs benchmark serve-docs

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt tests/recorder_plugin/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: any resolver left alone would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# the test plugin depends on this project, which is not on any index
	$(BIN)/pip install --quiet --no-deps ./tests/recorder_plugin
	touch $(STAMP)

# The registrars run offline next to the embedded LaminDB instance unless the
# environment already configures them.
DEMO_DIR := $(CURDIR)/.lamin-lightning
DEMO_ENV := WANDB_MODE=$${WANDB_MODE:-offline} \
	WANDB_DIR=$${WANDB_DIR:-$(DEMO_DIR)/wandb} \
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(DEMO_DIR)/mlflow.db} \
	CLEARML_OFFLINE_MODE=$${CLEARML_OFFLINE_MODE:-1} \
	CLEARML_CACHE_DIR=$${CLEARML_CACHE_DIR:-$(DEMO_DIR)/clearml}

demo: $(STAMP)
	mkdir -p $(DEMO_DIR)/wandb
	$(DEMO_ENV) $(BIN)/python examples/digits/train.py fit --config examples/digits/config.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check lamin_lightning_core lamin_lightning_adapters tests examples
	$(BIN)/ruff format --check lamin_lightning_core lamin_lightning_adapters tests examples

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

serve-docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

benchmark: $(STAMP)
	$(BIN)/python benchmarks/bench_checkpoint.py
