#!/usr/bin/env bash
# On one NVIDIA GPU: Llama-125M from config, bf16, batch 16 x 1024 tokens; raw loop vs transformers.Trainer vs
# hf_lightning.Trainer. Uses the machine's own torch (pip install -e . without the CPU constraints).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e . 2>/dev/null || true
# liger-kernel (hf_liger / hl_liger rows) from a folder of wheels where the machine has no index: WHEELS=/path
if [ -n "${WHEELS:-}" ]; then
  python -m pip install -q --no-index --find-links "$WHEELS" liger-kernel || echo "liger-kernel did not install from $WHEELS"
fi
python bench/gpu.py --steps "${STEPS:-30}" --rounds "${ROUNDS:-2}"
