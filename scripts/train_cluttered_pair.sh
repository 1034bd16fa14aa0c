#!/usr/bin/env bash
# The cluttered Fashion-MNIST pair's recipes: the CNN teacher (stride-2 stem), then the
# server and the edge ViTs distilled from it. Every run checkpoints each epoch; rerunning
# this script continues where it stopped (--resume), so the schedule can be split into parts.
# On 2 cores the edge and the first SERVER_SIDE_EPOCHS of the server train side by side, one
# thread each; the server then finishes on both. Logs: runs/cluttered_pair/<name>/log.jsonl
# and train.log. bf16 only where benchmarks/bench_train.py measured a gain (CNN, server).
# The server trains on 13 to 49 of the 49 patches (--token-drop 0.75): on these canvases the
# edge sends it about the item's patches, 13 on average, not nearly all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/cluttered_pair}
THREADS=${THREADS:-2}
SERVER_SIDE_EPOCHS=${SERVER_SIDE_EPOCHS:-14}
TRAIN=".venv/bin/collabvit train --data-set fmnist-cluttered --resume --quiet"
mkdir -p "$OUT"

finished() {  # name [epoch]: has the run exported its model at the end (or at that epoch)?
    .venv/bin/python - "$OUT/$1/model_card.json" "${2:-}" <<'EOF'
import json, sys
from pathlib import Path
card = Path(sys.argv[1])
if not card.is_file():
    sys.exit(1)
card = json.loads(card.read_text())
wanted = int(sys.argv[2]) if sys.argv[2] else card["training"]["epochs"]
sys.exit(0 if card["epochs_trained"] >= wanted else 1)
EOF
}

run() {  # name threads flags...: skip a finished run, else train (or continue) it
    local name=$1 threads=$2; shift 2
    if finished "$name"; then echo "$name: done"; return; fi
    mkdir -p "$OUT/$name"
    OMP_NUM_THREADS=$threads $TRAIN --out-dir "$OUT/$name" "$@" 2>&1 | tee -a "$OUT/$name/train.log"
}

SERVER=(--model collabvit_cluttered_server --epochs 90 --token-drop 0.75 --ema-decay 0.999
        --teacher "$OUT/teacher" --distill hard --bf16)
EDGE=(--model collabvit_cluttered_edge --epochs 40 --ema-decay 0.999 --teacher "$OUT/teacher"
      --distill hard)

# The teacher ships in models/: a fresh run distils from it rather than training it again.
if [ ! -e "$OUT/teacher/model_card.json" ] && [ -e models/collabvit_cluttered_cnn/model_card.json ]; then
    mkdir -p "$OUT/teacher"
    cp models/collabvit_cluttered_cnn/model.safetensors models/collabvit_cluttered_cnn/model_card.json \
        "$OUT/teacher/"
fi
run teacher "$THREADS" --model collabvit_cluttered_cnn --epochs 30 --ema-decay 0.999 --bf16
if [ "$THREADS" -ge 2 ] && ! finished edge && ! finished server "$SERVER_SIDE_EPOCHS"; then
    run edge 1 "${EDGE[@]}" &
    edge=$!
    run server 1 "${SERVER[@]}" --stop-after "$SERVER_SIDE_EPOCHS"
    wait "$edge"
fi
run edge "$THREADS" "${EDGE[@]}"
run server "$THREADS" "${SERVER[@]}"
