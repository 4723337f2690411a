"""torch.compile on CPU: transformers.Trainer and hf_lightning.Trainer, eager and `torch_compile=True`, same run.

Four runs per round, each a fresh subprocess of bench/_worker.py (interleaved, so machine noise hits them alike):
transformers eager, hf_lightning eager, transformers compiled, hf_lightning compiled (inductor, the default backend
that `torch_compile=True` picks). Every run gets its own empty TORCHINDUCTOR_CACHE_DIR, so each compiled run compiles
from scratch rather than loading an earlier run's graphs. Every run logs its loss at every step (`logging_steps=1`,
eager and compiled alike), so the steady step includes that per-step log.

Reported, medians over the rounds:

* **compile time (s)**: the first step (its on_step_begin to its on_step_end, where torch.compile traces and
  compiles the forward and the backward) minus the median steady step. Eager runs show the same quantity: the cost of
  a first step without compiling.
* **median step (ms)**: the median of the step intervals after the first 10 steps.
* **compiled / eager**: a framework's compiled median step over its eager one.
* **vs transformers**: hf_lightning's median step (and, compiled, compile time) over transformers' in the same mode.
* **first step (s)**: from spawning the process to the end of the first step (imports, setup, compile).
* **max abs Δloss vs eager**: the largest difference between a compiled run's per-step losses and its framework's eager
  run's; **vs transformers**: hf_lightning's losses against transformers' in the same mode.

    python bench/compile.py [--rounds 1] [--steps 30] [--model llama-s|llama|bert] [--malloc steady|default]

bench/README.md ("torch.compile") keeps the dated measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from speed import NAMES, WORKER, check_origin, environment, preflight, ratio

MODES = ("eager", "compiled")


def run(model: str, framework: str, mode: str, steps: int, malloc: str) -> dict:
    env = environment(malloc)
    cache = tempfile.mkdtemp(prefix="hfl-compile-bench-")
    env["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold cache: each compiled run pays the whole compile
    flags = ["--losses"] + (["--compile"] if mode == "compiled" else [])
    try:
        spawn = time.time()
        out = subprocess.run([sys.executable, WORKER, model, framework, str(steps), repr(spawn), *flags],
                             capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if out.returncode:
        sys.exit(f"{framework} {mode} on {model} failed (exit code {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if framework == "hl":
        check_origin(framework, result.pop("hf_lightning_file", None), None)
    if len(result["losses"]) != steps:
        sys.exit(f"{framework} {mode}: logged {len(result['losses'])} losses for {steps} steps")
    print(f"{NAMES[framework]} {mode}: step {result['median_step_ms']:.2f} ms, first step "
          f"{result['first_step_compute_s']:.2f} s", file=sys.stderr)
    return result


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="every round runs the four runs once (default 1)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run, at least 12 (default 30)")
    parser.add_argument("--model", choices=["llama-s", "llama", "bert"], default="llama-s",
                        help="llama-s: the Llama of speed.py (2 layers x 128) at batch 4 x 32 tokens (default); "
                             "llama, bert: speed.py's models and batches")
    parser.add_argument("--malloc", choices=["steady", "default"], default="steady",
                        help="glibc malloc thresholds, as in speed.py (default steady)")
    opts = parser.parse_args()
    if opts.steps < 12:  # the worker times the steps after the first 10 (warm-up)
        parser.error("--steps must be at least 12")
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")
    preflight(None)
    keys = [(f, m) for m in MODES for f in ("hf", "hl")]
    results = {k: [] for k in keys}
    for _ in range(opts.rounds):
        for framework, mode in keys:
            results[(framework, mode)].append(run(opts.model, framework, mode, opts.steps, opts.malloc))

    def med(key, field):
        return statistics.median(r[field] for r in results[key])

    step = {k: med(k, "median_step_ms") for k in keys}
    compile_s = {k: med(k, "first_step_compute_s") - step[k] / 1000 for k in keys}
    # Losses are per round: a run compares with the other runs of its round.
    vs_eager = {(f, m): max(max_diff(c["losses"], e["losses"]) for c, e in zip(results[(f, m)], results[(f, "eager")]))
                for f, m in keys}
    vs_hf = {(f, m): max(max_diff(c["losses"], h["losses"]) for c, h in zip(results[(f, m)], results[("hf", m)]))
             for f, m in keys}
    print(f"\n{opts.model}, {opts.steps} steps, {opts.rounds} round(s), {opts.malloc} malloc\n")
    head = ["framework", "mode", "compile time (s)", "vs transformers", "median step (ms)", "compiled / eager",
            "vs transformers", "first step (s)", "max abs Δloss vs eager", "vs transformers"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for f, m in keys:
        hl = f == "hl"
        cells = [NAMES[f], m,
                 f"{compile_s[(f, m)]:.2f}",
                 ratio(compile_s[(f, m)], compile_s[("hf", m)]) if hl and m == "compiled" else "",
                 f"{step[(f, m)]:.2f}", ratio(step[(f, m)], step[(f, "eager")]) if m == "compiled" else "",
                 ratio(step[(f, m)], step[("hf", m)]) if hl else "",
                 f"{med((f, m), 'first_step_s'):.2f}",
                 f"{vs_eager[(f, m)]:.1e}" if m == "compiled" else "",
                 f"{vs_hf[(f, m)]:.1e}" if hl else ""]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
