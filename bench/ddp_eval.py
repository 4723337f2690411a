"""Sharded evaluation under DDP: `evaluate()` of a 2,000-row set with 2 processes vs 1, on CPU.

    .venv/bin/python bench/ddp_eval.py [--rounds 3] [--rows 2000] [--threads 1] [--frameworks hf_lightning,transformers,raw]

Each run is `torchrun --nproc_per_node N bench/ddp_eval.py --worker ...` (N = 1, then 2; gloo), so both sides start
the same way. A worker builds a BERT classifier from config (2 layers x 128, sequence 64), evaluates once to warm up,
then times a second `hf_lightning.Trainer.evaluate()` (per-device batch 16) on rank 0, between two barriers: the
wall time the user waits, Lightning's per-call setup included. Each process uses `--threads` torch threads (1 by
default): with 2 cores, 1 process x 1 thread against 2 processes x 1 thread compares the same per-process compute,
so the ratio is what sharding the set buys (a 1-process run with 2 threads gets little from intra-op threads on a
model this small, and 2 processes x 2 threads would oversubscribe the 2 cores). The ratio printed is the median
2-process time over the median 1-process time (target <= 0.6). On a shared machine, where other processes take the
cores, the minimum over the rounds (the least disturbed run) and the CPU seconds of the busiest process are printed
too: the CPU time does not count the time a process waits for a core. The same measurement runs for
transformers.Trainer (accelerate's sharded evaluation) and for a raw PyTorch loop (each process forwards its share of
the rows, one all_gather at the end): the raw loop's ratio is what two processes on this machine can give at best.

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


def raw_evaluate(model, dataset, batch_size: int) -> tuple[dict, float]:
    """The raw PyTorch floor: this process's contiguous share of the rows (as a sharded loader gives), a no-grad
    forward per batch, one all_gather of the logits and labels at the end; the metric and the mean loss."""
    import torch

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    share = -(-len(dataset) // world)
    rows = dataset[rank * share:(rank + 1) * share]
    start = time.perf_counter()
    model.eval()
    logits, labels, losses = [], [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {key: torch.stack([row[key] for row in rows[i:i + batch_size]]) for key in rows[0]}
            out = model(**batch)
            logits.append(out.logits), labels.append(batch["labels"]), losses.append(out.loss.repeat(len(batch["labels"])))
    local = torch.cat([torch.cat(logits), torch.cat(labels)[:, None].float(), torch.cat(losses)[:, None]], dim=1)
    if world > 1:
        local = torch.nn.functional.pad(local, (0, 0, 0, share - len(local)))  # equal sizes for all_gather
        parts = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(parts, local)
        local = torch.cat(parts)[: len(dataset)]
    return {"eval_rows": float(len(local)), "eval_loss": local[:, -1].mean().item(),
            "eval_runtime": time.perf_counter() - start}, time.perf_counter() - start


def worker(rows: int, threads: int, output_dir: str, phases: bool = False, framework: str = "hf_lightning") -> None:
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
    if framework == "raw":
        if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        raw_evaluate(model, dataset, 16)  # warm-up, as the trainers'
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics, _ = raw_evaluate(model, dataset, 16)
        cpu_seconds = time.process_time() - cpu_start
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        assert metrics["eval_rows"] == rows, metrics
        with open(os.path.join(output_dir, f"result-{rank}.json"), "w") as f:
            json.dump({"rank": rank, "seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds,
                       "eval_runtime": metrics["eval_runtime"]}, f)
        return
    module = transformers if framework == "transformers" else hf_lightning
    args = module.TrainingArguments(output_dir, per_device_eval_batch_size=16, report_to="none", use_cpu=True,
                                    ddp_backend="gloo", disable_tqdm=True, log_level="error")
    trainer = module.Trainer(model, args=args, eval_dataset=dataset,
                             compute_metrics=lambda p: {"rows": float(len(p.label_ids))})
    totals: dict[str, float] = {}
    marks: dict[str, float] = {}
    if phases and framework == "hf_lightning":
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
    if phases and framework == "hf_lightning":
        first, last = marks["first_batch"], marks["last_batch_end"]
        result["phases"] = {
            "setup": first - start, "batches": last - first, "prediction_step": totals.get("prediction_step", 0.0),
            "collectives": totals.get("collectives", 0.0), "end": returned - last, "evaluate": returned - start}
    if trainer.is_world_process_zero():
        assert metrics["eval_rows"] == rows, metrics  # every row counted once
    # a file per process: the processes' prints may interleave on the shared stdout
    with open(os.path.join(output_dir, f"result-{trainer.args.process_index}.json"), "w") as f:
        json.dump(result, f)


def run(processes: int, rows: int, threads: int, phases: bool = False, framework: str = "hf_lightning") -> dict:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as output_dir:
        proc = subprocess.run(
            [torchrun, "--nproc_per_node", str(processes), "--master_port", str(port), os.path.abspath(__file__),
             "--worker", "--rows", str(rows), "--threads", str(threads), "--output", output_dir, "--framework", framework]
            + (["--phases"] if phases else []),
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        files = [os.path.join(output_dir, f"result-{rank}.json") for rank in range(processes)]
        if proc.returncode != 0 or not all(os.path.isfile(path) for path in files):
            raise SystemExit(f"{framework}: {processes}-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
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
    parser.add_argument("--frameworks", default="hf_lightning,transformers,raw",
                        help="comma-separated: hf_lightning, transformers (transformers.Trainer), raw (a PyTorch loop)")
    parser.add_argument("--framework", default="hf_lightning", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options.rows, options.threads, options.output, options.phases, options.framework)
        return
    frameworks = options.frameworks.split(",")
    times = {(name, n): [] for name in frameworks for n in (1, 2)}
    cpu = {(name, n): [] for name in frameworks for n in (1, 2)}
    for round_index in range(options.rounds):  # alternating, so machine noise hits every case alike
        for name in frameworks:
            for processes in (1, 2):
                result = run(processes, options.rows, options.threads, options.phases, name)
                times[name, processes].append(result["seconds"])
                cpu[name, processes].append(result["cpu_seconds"])
                print(f"round {round_index + 1}: {name}, {processes} process(es): {result['seconds']:.2f} s "
                      f"(eval_runtime {result['eval_runtime']:.2f} s, CPU {result['cpu_seconds']:.2f} s)", flush=True)
    print(f"\nevaluate() of {options.rows} rows, {options.threads} thread(s) per process, {options.rounds} rounds "
          "(target for hf_lightning: 2 processes <= 0.6x 1 process)\n")
    print("| framework | 1 process (s, median) | 2 processes (s, median) | ratio of medians | ratio of minima "
          "| ratio of CPU s, busiest process |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in frameworks:
        one, two = statistics.median(times[name, 1]), statistics.median(times[name, 2])
        print(f"| {name} | {one:.2f} | {two:.2f} | {two / one:.2f}x | {min(times[name, 2]) / min(times[name, 1]):.2f}x "
              f"| {statistics.median(cpu[name, 2]) / statistics.median(cpu[name, 1]):.2f}x |")

if __name__ == "__main__":
    if "--worker" in sys.argv:  # the worker imports hf_lightning from this checkout, as the tests do
        sys.path.insert(0, os.path.dirname(HERE))
    main()
