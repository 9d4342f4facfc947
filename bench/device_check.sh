#!/usr/bin/env bash
# Device check: one line per figure (see bench/device_check.py). Under 8 minutes on an H200:
#   bash bench/device_check.sh            # GPU figures (ViT-L/16 bf16, 40k-patch pyramid, 100k/200k bags, Stage 2)
#   bash bench/device_check.sh --compile  # the same with torch.compile on the encoder
#   bash bench/device_check.sh --smoke    # tiny, on CPU, for CI (< 60 s)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
for arg in "$@"; do
  if [[ "$arg" == "--smoke" ]]; then export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"; fi
done
exec "$python" "$here/device_check.py" "$@"
