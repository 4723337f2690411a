#!/usr/bin/env bash
# On one NVIDIA GPU: Llama-125M from config, bf16, batch 16 x 1024 tokens; raw loop vs transformers.Trainer vs
# hf_lightning.Trainer; then bench/checkpoint.py --cuda. Uses the machine's own torch and packages (pip install
# --no-deps -e .: the GPU machines have no index, and hf_lightning imports datasets only where a dataset is one).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "SKIP: bench/gpu.sh needs a CUDA GPU and this machine has none (nothing was run)."
  exit 0
fi
python -m pip install -q --no-deps -e . 2>/dev/null || true
# liger-kernel (hf_liger / hl_liger rows) from a folder of wheels where the machine has no index: WHEELS=/path
if [ -n "${WHEELS:-}" ]; then
  python -m pip install -q --no-index --find-links "$WHEELS" liger-kernel || echo "liger-kernel did not install from $WHEELS"
fi
python bench/gpu.py --steps "${STEPS:-30}" --rounds "${ROUNDS:-2}"
# checkpoints on the GPU: save, stall (sync and async_save) and resume beside transformers.Trainer (~2 min)
python bench/checkpoint.py --cuda --rounds "${ROUNDS:-2}"
