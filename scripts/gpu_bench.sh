#!/bin/sh
# The GPU figures, on a machine with a CUDA GPU, in a few minutes: benchmarks/bench_gpu.py's
# section of benchmarks/RESULTS.md and its figures (benchmarks/figures/bench_gpu.json), for
# the suite's Targets table. Needs torch with CUDA, timm, numpy, safetensors and tqdm; the
# served figures also need fastapi and uvicorn (without them the section says so).
#
#     scripts/gpu_bench.sh              # from the repository's root, collabvit installed or not
#     OUT=/some/folder scripts/gpu_bench.sh   # also copies the two files there
#
# The suite's next run (`python -m benchmarks`, or `--only` any of its benchmarks) puts the
# stored figures in its Targets table.
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" -c "import sys, torch; torch.cuda.is_available() or sys.exit('gpu_bench: no CUDA GPU here')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" -m benchmarks.bench_gpu --output benchmarks/RESULTS.md \
    --json benchmarks/figures/bench_gpu.json "$@"
if [ -n "${OUT:-}" ]; then
    cp benchmarks/RESULTS.md benchmarks/figures/bench_gpu.json "$OUT"/
fi
