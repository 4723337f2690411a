"""Speed and memory: a raw PyTorch loop, transformers.Trainer and hf_lightning.Trainer on the same models, interleaved.

Each run is a fresh subprocess (so time-to-first-step includes the imports, and peak RSS is per run); rounds
interleave the three frameworks so that machine noise hits them alike. Prints a Markdown table of medians and ratios.

    python bench/speed.py [--rounds 3] [--steps 60] [--models mlp bert llama]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")
FRAMEWORKS = ("raw", "hf", "hl")
NAMES = {"raw": "raw PyTorch", "hf": "transformers.Trainer", "hl": "hf_lightning.Trainer"}


def run(model: str, framework: str, steps: int) -> dict:
    spawn = time.time()
    out = subprocess.run([sys.executable, WORKER, model, framework, str(steps), repr(spawn)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--models", nargs="+", default=["mlp", "bert", "llama"])
    opts = parser.parse_args()
    results = {(m, f): [] for m in opts.models for f in FRAMEWORKS}
    for _ in range(opts.rounds):
        for model in opts.models:
            for framework in FRAMEWORKS:
                results[(model, framework)].append(run(model, framework, opts.steps))
    print(f"| model | framework | median step (ms) | vs raw | vs transformers | first step (s) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model in opts.models:
        med = {f: {k: statistics.median(r[k] for r in results[(model, f)]) for k in results[(model, f)][0]}
               for f in FRAMEWORKS}
        for f in FRAMEWORKS:
            m = med[f]
            print(f"| {model} | {NAMES[f]} | {m['median_step_ms']:.2f} | "
                  f"{m['median_step_ms'] / med['raw']['median_step_ms']:.2f}x | "
                  f"{m['median_step_ms'] / med['hf']['median_step_ms']:.2f}x | {m['first_step_s']:.2f} | "
                  f"{m['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
