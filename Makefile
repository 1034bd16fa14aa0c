# make test: set up .venv (if missing or stale) and run the test suite.
# make demo: set up and run the main job.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.collabvit-installed
FMNIST := /usr/share/datasets/fashion-mnist
GOLDEN ?= ../shared/golden

.PHONY: setup data test test-all demo demo-golden results lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

# Fashion-MNIST comes from Debian; install it when missing and we can (root + apt).
data:
	@if [ -d $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist, or pass --data-path DIR with its IDX files"; \
	fi

test: setup data
	$(PY) -m pytest -q

test-all: setup data
	$(PY) -m pytest -q -m ''

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# The main job: the shipped Fashion-MNIST pair on the Fashion-MNIST test set at the
# default operating point (chosen on the validation split), six lines + results JSON.
demo: setup data
	$(VENV)/bin/collabvit eval --results-file runs/demo/results.json

# The reference's tiny golden ViT pair on its 16 golden inputs (checks the arithmetic).
demo-golden: setup
	$(VENV)/bin/collabvit eval --data-set tensors --data-path $(GOLDEN)/inputs.safetensors \
		--inputs-normalized --batch-size 8 \
		--model vit_tiny_patch16_224 --model-weights $(GOLDEN)/tiny_edge.safetensors \
		--model-kwargs '{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3, "num_classes": 10}' \
		--server-model vit_tiny_patch16_224 --server-weights $(GOLDEN)/tiny_server.safetensors \
		--server-kwargs '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "num_classes": 10}' \
		--masking-mode attention_sum_threshold --masking-th 0.97 --uncer-mode min_entropy --uncer-th 2.2

results: setup data
	$(PY) scripts/fmnist_results.py

bench: setup
	$(PY) benchmarks/bench_forward.py

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
