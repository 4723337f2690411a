"""Sharded evaluation under DDP: `evaluate()` of a 2,000-row set with 2 processes vs 1, on CPU.

    .venv/bin/python bench/ddp_eval.py [--rounds 3] [--rows 2000] [--threads 1]

Each run is `torchrun --nproc_per_node N bench/ddp_eval.py --worker ...` (N = 1, then 2; gloo), so both sides start
the same way. A worker builds a BERT classifier from config (2 layers x 128, sequence 64), evaluates once to warm up,
then times a second `hf_lightning.Trainer.evaluate()` (per-device batch 16) on rank 0, between two barriers: the
wall time the user waits, Lightning's per-call setup included. Each process uses `--threads` torch threads (1 by
default): with 2 cores, 1 process x 1 thread against 2 processes x 1 thread compares the same per-process compute,
so the ratio is what sharding the set buys (a 1-process run with 2 threads gets little from intra-op threads on a
model this small, and 2 processes x 2 threads would oversubscribe the 2 cores). The ratio printed is the median
2-process time over the median 1-process time (target <= 0.6). On a shared machine, where other processes take the
cores, the minimum over the rounds (the least disturbed run) and the CPU seconds of the busiest process are printed
too: the CPU time does not count the time a process waits for a core.

`--phases` also prints, per process, where the timed `evaluate()` goes: Lightning's setup of `validate()` up to the
first batch, the batches (of which `prediction_step`, and the collectives: gathers and `pad_across_processes`), and
the end (the gathers of a deferred evaluation, compute_metrics, Lightning's teardown, the report).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _phase_timers(trainer, totals: dict, marks: dict):
    """Wrap the trainer's prediction_step and its accelerator's collectives with timers; a Lightning callback marks
    the loop's first batch and last batch end."""
    import functools

    import lightning.pytorch as pl

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    trainer.prediction_step = timed("prediction_step", trainer.prediction_step)
    accelerator = trainer.accelerator
    for name in ("gather", "gather_object", "pad_across_processes"):  # gather_for_metrics calls these
        setattr(accelerator, name, timed("collectives", getattr(accelerator, name)))

    class Marks(pl.Callback):
        def on_validation_batch_start(self, *args, **kwargs):
            marks.setdefault("first_batch", time.perf_counter())

        def on_validation_batch_end(self, *args, **kwargs):
            marks["last_batch_end"] = time.perf_counter()

    return Marks()


def worker(rows: int, threads: int, output_dir: str, phases: bool = False) -> None:
    import torch
    import transformers

    torch.set_num_threads(threads)
    import hf_lightning

    config = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (rows, 64), generator=generator)
    labels = torch.randint(0, 2, (rows,), generator=generator)
    dataset = [{"input_ids": ids[i], "attention_mask": torch.ones(64, dtype=torch.long), "labels": labels[i]}
               for i in range(rows)]
    args = hf_lightning.TrainingArguments(output_dir, per_device_eval_batch_size=16, report_to="none", use_cpu=True,
                                          ddp_backend="gloo", disable_tqdm=True, log_level="error")
    trainer = hf_lightning.Trainer(model, args=args, eval_dataset=dataset,
                                   compute_metrics=lambda p: {"rows": float(len(p.label_ids))})
    totals: dict[str, float] = {}
    marks: dict[str, float] = {}
    if phases:
        trainer.add_callback(_phase_timers(trainer, totals, marks))
    trainer.evaluate()  # warm-up: imports, first Lightning setup, allocator
    totals.clear(), marks.clear()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = trainer.evaluate()
    returned, cpu_seconds = time.perf_counter(), time.process_time() - cpu_start
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    seconds = time.perf_counter() - start
    result = {"rank": trainer.args.process_index, "processes": trainer.args.world_size, "seconds": seconds,
              "cpu_seconds": cpu_seconds, "eval_runtime": metrics["eval_runtime"]}
    if phases:
        first, last = marks["first_batch"], marks["last_batch_end"]
        result["phases"] = {
            "setup": first - start, "batches": last - first, "prediction_step": totals.get("prediction_step", 0.0),
            "collectives": totals.get("collectives", 0.0), "end": returned - last, "evaluate": returned - start}
    if trainer.is_world_process_zero():
        assert metrics["eval_rows"] == rows, metrics  # every row counted once
    # a file per process: the processes' prints may interleave on the shared stdout
    with open(os.path.join(output_dir, f"result-{trainer.args.process_index}.json"), "w") as f:
        json.dump(result, f)


def run(processes: int, rows: int, threads: int, phases: bool = False) -> dict:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as output_dir:
        proc = subprocess.run(
            [torchrun, "--nproc_per_node", str(processes), "--master_port", str(port), os.path.abspath(__file__),
             "--worker", "--rows", str(rows), "--threads", str(threads), "--output", output_dir]
            + (["--phases"] if phases else []),
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        files = [os.path.join(output_dir, f"result-{rank}.json") for rank in range(processes)]
        if proc.returncode != 0 or not all(os.path.isfile(path) for path in files):
            raise SystemExit(f"{processes}-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results = [json.load(open(path)) for path in files]
    for result in results:
        if "phases" in result:
            print(f"  {processes} process(es), rank {result['rank']}: "
                  + ", ".join(f"{name} {value:.3f} s" for name, value in result["phases"].items()), flush=True)
    result = results[0]
    result["cpu_seconds"] = max(result["cpu_seconds"] for result in results)  # the busiest process
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (both cases)")
    parser.add_argument("--phases", action="store_true", help="also print where each process's evaluate() goes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options.rows, options.threads, options.output, options.phases)
        return
    times: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    for round_index in range(options.rounds):  # alternating, so machine noise hits both alike
        for processes in (1, 2):
            result = run(processes, options.rows, options.threads, options.phases)
            times[processes].append(result["seconds"])
            cpu[processes].append(result["cpu_seconds"])
            print(f"round {round_index + 1}: {processes} process(es): {result['seconds']:.2f} s "
                  f"(eval_runtime {result['eval_runtime']:.2f} s, CPU {result['cpu_seconds']:.2f} s)", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"evaluate() of {options.rows} rows, {options.threads} thread(s) per process, median of {options.rounds}: "
          f"1 process {one:.2f} s, 2 processes {two:.2f} s, ratio {two / one:.2f}x (target <= 0.6x)")
    print(f"  minimum of {options.rounds}: 1 process {min(times[1]):.2f} s, 2 processes {min(times[2]):.2f} s, "
          f"ratio {min(times[2]) / min(times[1]):.2f}x; CPU seconds of the busiest process (median): "
          f"{statistics.median(cpu[1]):.2f} vs {statistics.median(cpu[2]):.2f}, "
          f"ratio {statistics.median(cpu[2]) / statistics.median(cpu[1]):.2f}x")


if __name__ == "__main__":
    if "--worker" in sys.argv:  # the worker imports hf_lightning from this checkout, as the tests do
        sys.path.insert(0, os.path.dirname(HERE))
    main()
