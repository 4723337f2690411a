"""Speed and memory: a raw PyTorch loop, transformers.Trainer and hf_lightning.Trainer on the same models, interleaved.

Each run is a fresh subprocess (so time-to-first-step includes the imports, and peak RSS is per run); rounds
interleave the frameworks so that machine noise hits them alike. Prints a Markdown table of medians and ratios.

On CPU a step of these models is dominated by memory traffic, and glibc's malloc decides per process how much freed
memory it hands back to the kernel: a run that happens to trim its heap re-faults its activations every step, with
the same code. `--malloc steady` fixes malloc's mmap and trim thresholds for every framework alike, which isolates
what the frameworks add; `--malloc default` is what a user gets out of the box; `both` (the default) reports the two.

Each process also lands in a fast or a slow memory placement (the same code, for every framework alike); "fastest
run" compares the frameworks' best runs, which share the fast placement.

`--phases` adds a table that splits the step into the model's forward, backward, clipping, optimizer step and the
rest (see _worker.py): the rest is the framework's own per-step cost, which the step time alone hides in the
process-to-process noise of the compute.

`--baseline PATH` adds a fourth framework, "hl-baseline": the same hf_lightning worker, with PATH (a checkout of an
older hf_lightning, e.g. `git worktree add /tmp/hl-before <commit>`) first on PYTHONPATH, so that `import
hf_lightning` resolves there. Every run reports the `hf_lightning.__file__` it imported; a run that did not import
from the checkout it stands for stops the benchmark. The tables gain that row and "vs baseline" columns (this
checkout's hf_lightning over the baseline's: median step and first step).

    python bench/speed.py [--rounds 5] [--steps 150] [--models mlp bert llama] [--malloc both|default|steady]
                          [--phases] [--baseline PATH]

bench/README.md says what the figures mean and keeps the dated measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(BENCH, "_worker.py")
CHECKOUT = os.path.dirname(BENCH)  # the hf_lightning that "hl" must measure
NAMES = {"raw": "raw PyTorch", "hf": "transformers.Trainer", "hl": "hf_lightning.Trainer",
         "hl-baseline": "hf_lightning.Trainer (baseline)"}


STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def environment(malloc: str, baseline: str | None = None) -> dict:
    env = dict(os.environ)
    for key in STEADY_MALLOC:
        env.pop(key, None)
    if malloc == "steady":
        env.update(STEADY_MALLOC)
    if baseline is not None:  # ahead of the editable install of this checkout (a meta-path finder, searched last)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (baseline, env.get("PYTHONPATH")) if p)
    return env


def inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_origin(framework: str, module_file: str | None, baseline: str | None) -> None:
    """Stops the benchmark when a run measured another hf_lightning than the one it stands for."""
    expected = os.path.join(baseline if framework == "hl-baseline" else CHECKOUT, "hf_lightning")
    if module_file is None or not inside(module_file, expected):
        sys.exit(f"{framework}: imported hf_lightning from {module_file}, expected it under {expected}")


def preflight(baseline: str | None) -> None:
    """Imports hf_lightning once per checkout, as the worker will (same sys.path: the script's folder first): checks
    where it resolves before any timing, and writes the baseline's bytecode (unless PYTHONDONTWRITEBYTECODE) outside
    the timed runs."""
    for framework, path in [("hl", None)] + ([("hl-baseline", baseline)] if baseline else []):
        out = subprocess.run([sys.executable, "-c", "import hf_lightning; print(hf_lightning.__file__)"],
                             capture_output=True, text=True, env=environment("default", path), cwd=BENCH)
        if out.returncode:
            sys.exit(f"{framework}: import hf_lightning failed:\n{out.stderr[-3000:]}")
        module_file = out.stdout.strip().splitlines()[-1]
        check_origin(framework, module_file, baseline)
        print(f"{framework}: hf_lightning from {os.path.dirname(module_file)}", file=sys.stderr)


def run(model: str, framework: str, steps: int, malloc: str, phases: bool = False, baseline: str | None = None) -> dict:
    env = environment(malloc, baseline if framework == "hl-baseline" else None)
    spawn = time.time()
    extra = ["--phases"] if phases else []
    out = subprocess.run([sys.executable, WORKER, model, framework, str(steps), repr(spawn), *extra],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{framework} on {model} failed (exit code {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    module_file = result.pop("hf_lightning_file", None)
    if framework in ("hl", "hl-baseline"):
        check_origin(framework, module_file, baseline)
    return result


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--models", nargs="+", default=["mlp", "bert", "llama"])
    parser.add_argument("--malloc", choices=["both", "default", "steady"], default="both")
    parser.add_argument("--phases", action="store_true", help="also split the step into forward/backward/... (ms)")
    parser.add_argument("--baseline", metavar="PATH",
                        help="a checkout of an older hf_lightning (the folder holding hf_lightning/), run as a 4th "
                             "framework, hl-baseline")
    opts = parser.parse_args()
    if opts.steps < 12:  # the worker times the steps after the first 10 (warm-up)
        parser.error("--steps must be at least 12")
    baseline = None
    if opts.baseline:
        baseline = os.path.realpath(opts.baseline)
        if not os.path.isfile(os.path.join(baseline, "hf_lightning", "__init__.py")):
            parser.error(f"--baseline {opts.baseline}: no hf_lightning/__init__.py there")
        if baseline == os.path.realpath(CHECKOUT):
            parser.error(f"--baseline {opts.baseline} is this checkout")
    frameworks = ("raw", "hf", "hl") + (("hl-baseline",) if baseline else ())
    preflight(baseline)
    mallocs = ["default", "steady"] if opts.malloc == "both" else [opts.malloc]
    keys = [(m, a) for m in opts.models for a in mallocs]
    results = {(k, f): [] for k in keys for f in frameworks}
    for _ in range(opts.rounds):  # every round runs every framework once, so machine noise hits them alike
        for model, malloc in keys:
            for framework in frameworks:
                results[((model, malloc), framework)].append(
                    run(model, framework, opts.steps, malloc, opts.phases, baseline))
    vs_base = ["vs baseline"] if baseline else []
    head = (["model", "malloc", "framework", "median step (ms)", "vs raw", "vs transformers", *vs_base,
             "fastest run (ms)", "vs raw", "first step (s)", "vs transformers", *vs_base, "peak RSS (MB)",
             "vs transformers"])
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for key in keys:
        med = {f: {k: statistics.median(r[k] for r in results[(key, f)]) for k in results[(key, f)][0]}
               for f in frameworks}
        # A process lands in a fast or a slow memory placement, for every framework alike (bench/README.md); the
        # fastest run compares the frameworks in the same placement.
        best = {f: min(r["median_step_ms"] for r in results[(key, f)]) for f in frameworks}
        for f in frameworks:
            m, hf, raw = med[f], med["hf"], med["raw"]
            # "vs baseline": this checkout's hf_lightning (and the baseline itself, 1.00x) over the baseline's
            step_base, first_base = [], []
            if baseline:
                b = med["hl-baseline"]
                hl_row = f in ("hl", "hl-baseline")
                step_base = [ratio(m["median_step_ms"], b["median_step_ms"]) if hl_row else ""]
                first_base = [ratio(m["first_step_s"], b["first_step_s"]) if hl_row else ""]
            step, first, rss = m["median_step_ms"], m["first_step_s"], m["peak_rss_mb"]
            cells = [key[0], key[1], NAMES[f],
                     f"{step:.2f}", ratio(step, raw["median_step_ms"]), ratio(step, hf["median_step_ms"]), *step_base,
                     f"{best[f]:.2f}", ratio(best[f], best["raw"]),
                     f"{first:.2f}", ratio(first, hf["first_step_s"]), *first_base,
                     f"{rss:.0f}", ratio(rss, hf["peak_rss_mb"])]
            print("| " + " | ".join(cells) + " |")
    if opts.phases:
        print()
        head = ["model", "malloc", "framework", "forward", "backward", "clip", "optimizer", "rest (ms)", "rest vs raw",
                *(["rest vs baseline"] if baseline else [])]
        print("| " + " | ".join(head) + " |")
        print("|" + " --- |" * len(head))
        for key in keys:
            med = {f: {k: statistics.median(r[k] for r in results[(key, f)]) for k in results[(key, f)][0]}
                   for f in frameworks}
            for f in frameworks:
                m = med[f]
                rest_base = []
                if baseline:
                    hl_row = f in ("hl", "hl-baseline")
                    rest_base = [f"{m['rest_ms'] - med['hl-baseline']['rest_ms']:+.2f}" if hl_row else ""]
                cells = [key[0], key[1], NAMES[f], *(f"{m[f'{p}_ms']:.2f}" for p in
                                                     ("forward", "backward", "clip", "optimizer", "rest")),
                         f"{m['rest_ms'] - med['raw']['rest_ms']:+.2f}", *rest_base]
                print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
