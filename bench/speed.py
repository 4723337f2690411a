"""Speed and memory: a raw PyTorch loop, transformers.Trainer and hf_lightning.Trainer on the same models, interleaved.

Each run is a fresh subprocess (so time-to-first-step includes the imports, and peak RSS is per run); rounds
interleave the three frameworks so that machine noise hits them alike. Prints a Markdown table of medians and ratios.

On CPU a step of these models is dominated by memory traffic, and glibc's malloc decides per process how much freed
memory it hands back to the kernel: a run that happens to trim its heap re-faults its activations every step (one
run: 1,200 minor page faults per step, another: 3,400, +10% step time, with the same code). `--malloc steady` fixes
malloc's mmap and trim thresholds for all three frameworks alike (0-10 faults per step), which isolates what the
frameworks add; `--malloc default` is what a user gets out of the box; `both` (the default) reports the two.

Each process also lands in a fast or a slow memory placement (the same code, a few percent apart, for every framework
alike); "fastest run" compares the frameworks' best runs, which share the fast placement.

`--phases` adds a table that splits the step into the model's forward, backward, clipping, optimizer step and the
rest (see _worker.py): the rest is the framework's own per-step cost, which the step time alone hides in the
process-to-process noise of the compute (a few percent here).

    python bench/speed.py [--rounds 5] [--steps 150] [--models mlp bert llama] [--malloc both|default|steady]
                          [--phases]
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


STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def run(model: str, framework: str, steps: int, malloc: str, phases: bool = False) -> dict:
    env = dict(os.environ)
    for key in STEADY_MALLOC:
        env.pop(key, None)
    if malloc == "steady":
        env.update(STEADY_MALLOC)
    spawn = time.time()
    extra = ["--phases"] if phases else []
    out = subprocess.run([sys.executable, WORKER, model, framework, str(steps), repr(spawn), *extra],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--models", nargs="+", default=["mlp", "bert", "llama"])
    parser.add_argument("--malloc", choices=["both", "default", "steady"], default="both")
    parser.add_argument("--phases", action="store_true", help="also split the step into forward/backward/... (ms)")
    opts = parser.parse_args()
    mallocs = ["default", "steady"] if opts.malloc == "both" else [opts.malloc]
    keys = [(m, a) for m in opts.models for a in mallocs]
    results = {(k, f): [] for k in keys for f in FRAMEWORKS}
    for _ in range(opts.rounds):
        for model, malloc in keys:
            for framework in FRAMEWORKS:
                results[((model, malloc), framework)].append(run(model, framework, opts.steps, malloc, opts.phases))
    print("| model | malloc | framework | median step (ms) | vs raw | vs transformers | fastest run (ms) | vs raw "
          "| first step (s) | vs transformers | peak RSS (MB) | vs transformers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in keys:
        med = {f: {k: statistics.median(r[k] for r in results[(key, f)]) for k in results[(key, f)][0]}
               for f in FRAMEWORKS}
        # A process lands in a fast or a slow memory placement (BERT here: ~19.5-20.5 vs ~21.5-22.5 ms, for every
        # framework alike); the fastest run compares the frameworks in the same placement.
        best = {f: min(r["median_step_ms"] for r in results[(key, f)]) for f in FRAMEWORKS}
        for f in FRAMEWORKS:
            m, hf = med[f], med["hf"]
            print(f"| {key[0]} | {key[1]} | {NAMES[f]} | {m['median_step_ms']:.2f} | "
                  f"{m['median_step_ms'] / med['raw']['median_step_ms']:.2f}x | "
                  f"{m['median_step_ms'] / hf['median_step_ms']:.2f}x | {best[f]:.2f} | {best[f] / best['raw']:.2f}x | "
                  f"{m['first_step_s']:.2f} | "
                  f"{m['first_step_s'] / hf['first_step_s']:.2f}x | {m['peak_rss_mb']:.0f} | "
                  f"{m['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x |")
    if opts.phases:
        print()
        print("| model | malloc | framework | forward | backward | clip | optimizer | rest (ms) | rest vs raw |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for key in keys:
            med = {f: {k: statistics.median(r[k] for r in results[(key, f)]) for k in results[(key, f)][0]}
                   for f in FRAMEWORKS}
            for f in FRAMEWORKS:
                m = med[f]
                print(f"| {key[0]} | {key[1]} | {NAMES[f]} | {m['forward_ms']:.2f} | {m['backward_ms']:.2f} | "
                      f"{m['clip_ms']:.2f} | {m['optimizer_ms']:.2f} | {m['rest_ms']:.2f} | "
                      f"{m['rest_ms'] - med['raw']['rest_ms']:+.2f} |")


if __name__ == "__main__":
    main()
