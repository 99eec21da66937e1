#!/usr/bin/env bash
# The one prepared GPU run of issue #14 (about 8 minutes on one H200): CUDA tests, BENCH --full, the
# miniImageNet-sized pipeline in fp32 / AMP / compile, the official recipe's timing; all figures in one JSON.
#   bash tools/gpu_check.sh [OUT]            (OUT defaults to logs/gpu_check; add --tiny after it for a CPU dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-logs/gpu_check}"
shift || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 900 python3 -m tools.gpu_check --out "$OUT" "$@"
