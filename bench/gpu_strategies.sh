#!/usr/bin/env bash
# On a machine with NVIDIA GPUs (all of them are used), under 8 minutes: Llama-125M from config, bf16, 16 x 1024 tokens
# per step, DDP / FSDP1 / FSDP2 / DeepSpeed ZeRO-2 / ZeRO-3 through hf_lightning and through transformers.Trainer,
# each row in its own torchrun with a timeout. Prints a clear skip (exit 0) where there is no GPU.
# First a resume check per strategy (FSDP1, ZeRO-2, ZeRO-3): save half way, resume, compare with the uninterrupted run.
#   WHEELS=/path/to/wheels bench/gpu_strategies.sh   # also installs every wheel of that folder (deepspeed and its
#   needs), without an index. Built where pip works (deepspeed is an sdist; its ops compile at run time if needed):
#     DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed -w wheels
#     pip download --no-deps --only-binary=:all: hjson py-cpuinfo ninja nvidia-ml-py einops msgpack -d wheels
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "SKIP: bench/gpu_strategies.sh needs CUDA GPUs and this machine has none (nothing was run)."
  exit 0
fi
python -m pip install -q --no-deps -e . 2>/dev/null || true
if [ -n "${WHEELS:-}" ]; then
  python -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || echo "the wheels of $WHEELS did not install"
fi
timeout 470 python bench/gpu_strategies.py --steps "${STEPS:-30}" --timeout "${ROW_TIMEOUT:-75}" --budget 380 \
  --resume-budget 150
