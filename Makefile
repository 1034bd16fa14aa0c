# make test: set up .venv (if missing or stale) and run the test suite.
# make demo: set up and run the main job.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.collabvit-installed
FMNIST := /usr/share/datasets/fashion-mnist
GOLDEN ?= tests/golden

.PHONY: setup data test test-all demo demo-deploy demo-golden results results-cluttered findings \
	findings-cluttered deploy-table frontier onnx-report lint bench bench-quick \
	bench-sweep bench-serve bench-train clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[full,test]'
	@touch $(STAMP)

# Fashion-MNIST comes from Debian; install it when missing and we can (root + apt).
data:
	@if [ -d $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist, or pass --data-path DIR with its IDX files"; \
	fi

PYTEST_FLAGS ?=

test: setup data
	$(PY) -m pytest -q $(PYTEST_FLAGS)

# Also the tests marked slow (DeiT-Base end to end and anything over ~20 s).
test-all: setup data
	$(PY) -m pytest -q -m '' $(PYTEST_FLAGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

# The main job, on both built-in data sets: each shipped pair on its 10,000 test images at
# its default operating point (chosen on the validation split), eight lines + results JSON.
demo: setup data
	@echo "Fashion-MNIST (a garment fills the frame): the shipped pair, 10,000 test images"
	@$(VENV)/bin/collabvit eval --results-file runs/demo/results.json
	@echo
	@echo "Cluttered Fashion-MNIST (one item among clutter): the shipped pair, 10,000 test canvases"
	@$(VENV)/bin/collabvit eval --data-set fmnist-cluttered --results-file runs/demo/cluttered_results.json

# The same job over HTTP: `collabvit serve` in the background, `collabvit edge` against it
# (DEPLOY_PORT, default 8000); prints the demo's lines plus bytes and latency. EDGE_FLAGS go
# to the edge (EDGE_FLAGS="--data-set fmnist-cluttered": the cluttered pair).
demo-deploy: setup data
	$(PY) scripts/demo_deploy.py $(EDGE_FLAGS)

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
	$(PY) scripts/learning_curves.py
	$(PY) scripts/cluttered_examples.py

# The cluttered pair: default point, selection curve, item recall, collaboration; then the
# bytes per codec at that point, the bytes target, and what the edge sends of the first four
# test canvases (README, docs/findings/cluttered).
results-cluttered: setup data
	$(PY) scripts/cluttered_results.py
	$(PY) scripts/deploy_table.py --data-set fmnist-cluttered
	$(PY) scripts/cluttered_results.py --bytes-only
	$(VENV)/bin/collabvit visualize --data-set fmnist-cluttered --indices 0 1 2 3 --quiet \
		--uncer-mode none --output-dir runs/results/cluttered_views
	cp runs/results/cluttered_views/views.png docs/findings/cluttered/views.png
	$(PY) scripts/learning_curves.py --data-set fmnist-cluttered

# Each shipped pair's frontier on the validation split, stored in its edge's card: the
# points `collabvit edge --budget-bps/--budget-cost` moves along (after the pair's results
# target, which stores its default operating point).
FRONTIER_DELTAS := 0.5,0.6,0.7,0.8,0.85,0.9,0.93,0.95,0.97,0.98,0.99,0.995,0.998,0.999,0.9995,1.0
CLUTTERED_FRONTIER_DELTAS := 0.3,0.4,0.5,0.6,0.7,0.75,0.8,0.85,0.9,0.93,0.95,0.97,0.98,0.99,0.995,0.999,1.0
FRONTIER_SWEEP := $(VENV)/bin/collabvit sweep --split val --quiet --no-plots \
	--attention-modes mean --uncer-modes min_entropy --num-etas 41
frontier: setup data
	$(FRONTIER_SWEEP) --out-dir runs/frontier/fmnist --policy attention_sum_threshold=$(FRONTIER_DELTAS)
	$(PY) scripts/ship_frontier.py runs/frontier/fmnist/frontier.json
	$(FRONTIER_SWEEP) --data-set fmnist-cluttered --out-dir runs/frontier/cluttered \
		--policy attention_sum_threshold=$(CLUTTERED_FRONTIER_DELTAS)
	$(PY) scripts/ship_frontier.py runs/frontier/cluttered/frontier.json

# The exported edge (fp32 and int8) against the torch edge on every test image of each
# shipped pair, and the int8 graph's collaborative accuracy (README, Deploy on a device).
onnx-report: setup data
	$(PY) scripts/onnx_edge_report.py

# The paper's comparisons at our scale, each at equal communication cost (README, Findings).
SWEEP := $(VENV)/bin/collabvit sweep --quiet
findings: setup data
	$(SWEEP) --out-dir runs/findings/attention --attention-modes mean rollout
	$(SWEEP) --out-dir runs/findings/policies \
		--policy attention_sum_threshold=0.9,0.95,0.97,0.98,0.99,0.995,0.998,0.999,0.9995,1.0 \
		--policy attention_threshold=0.0005,0.001,0.002,0.003,0.004,0.006,0.008,0.012 \
		--policy topk=25,30,35,38,41,44,46,47,49 --policy random=25,30,35,38,41,44,46,47,49
	$(SWEEP) --out-dir runs/findings/measures --uncer-modes min_entropy shannon_entropy margin \
		--budget 0.25 --temperature-scaling
	for name in attention policies measures; do mkdir -p docs/findings/$$name && \
		cp runs/findings/$$name/sweep.json runs/findings/$$name/frontier.png \
		   docs/findings/$$name/; done
	$(PY) scripts/findings_table.py

# The frontier on cluttered canvases: every policy, both attention modes, the three measures,
# compared at equal cost (README, cluttered findings).
CLUTTERED_SWEEP := $(SWEEP) --data-set fmnist-cluttered --compare-at 0.05,0.1,0.2
findings-cluttered: setup data
	$(CLUTTERED_SWEEP) --out-dir runs/findings/cluttered_frontier --attention-modes mean rollout \
		--uncer-modes min_entropy shannon_entropy margin \
		--policy attention_sum_threshold=0.5,0.7,0.8,0.9,0.95,0.98,0.99,0.999 \
		--policy attention_threshold=0.005,0.01,0.015,0.02,0.03 \
		--policy topk=8,12,16,20,24,32,49 --policy random=8,12,16,20,24,32,49
	mkdir -p docs/findings/cluttered_frontier
	cp runs/findings/cluttered_frontier/sweep.json runs/findings/cluttered_frontier/frontier.png \
		docs/findings/cluttered_frontier/
	$(PY) scripts/findings_table.py --table cluttered-findings-table

# The benchmark suite: every benchmark, then the targets, into benchmarks/RESULTS.md.
bench: setup data
	$(PY) -m benchmarks

bench-quick: setup data
	$(PY) -m benchmarks --quick

bench-sweep: setup data
	$(PY) -m benchmarks.bench_sweep

# Served throughput and latency at concurrency 32, load and fuzz (benchmarks/RESULTS.md).
bench-serve: setup data
	$(PY) -m benchmarks.bench_serve

# Training steps with and without bfloat16 autocast (benchmarks/RESULTS.md).
bench-train: setup data
	$(PY) -m benchmarks.bench_train

# The README's bytes-per-codec table, measured over HTTP (benchmarks/deploy_results.json).
deploy-table: setup data
	$(PY) scripts/deploy_table.py

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
