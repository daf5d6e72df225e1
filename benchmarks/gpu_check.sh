#!/usr/bin/env bash
# The GPU check, at most 9 minutes on one H200 (each run has a timeout) (docs/gpu.md): synthetic CREMA-D shards at 224 px
# and 3 s, then benchmarks/train_step.py streamed with 8 and 16 loader workers, from the
# device cache, at batch 64 and with compile=inductor, nvidia-smi sampled alongside; then the
# projection of a paper-length CCAT run on CREMA-D. JSON lines go to stdout and to
# $OUT/gpu_check.jsonl (OUT defaults to ./gpu_check_out), nvidia-smi samples to $OUT/*.csv.
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny sizes: check that it runs
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " != *" --dry-run "* ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: torch sees no CUDA device; run it on the GPU machine, or pass --dry-run" >&2
    exit 1
fi
exec "$PYTHON" benchmarks/_gpu_check.py "$@"
