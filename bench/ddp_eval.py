"""Sharded evaluation under DDP: `evaluate()` of a 2,000-row set with 2 processes vs 1, on CPU.

    .venv/bin/python bench/ddp_eval.py [--rounds 3] [--rows 2000] [--threads 1]

Each run is `torchrun --nproc_per_node N bench/ddp_eval.py --worker ...` (N = 1, then 2; gloo), so both sides start
the same way. A worker builds a BERT classifier from config (2 layers x 128, sequence 64), evaluates once to warm up,
then times a second `hf_lightning.Trainer.evaluate()` (per-device batch 16) on rank 0, between two barriers: the
wall time the user waits, Lightning's per-call setup included. Each process uses `--threads` torch threads (1 by
default): with 2 cores, 1 process x 1 thread against 2 processes x 1 thread compares the same per-process compute,
so the ratio is what sharding the set buys (a 1-process run with 2 threads gets little from intra-op threads on a
model this small, and 2 processes x 2 threads would oversubscribe the 2 cores). The ratio printed is the median
2-process time over the median 1-process time (target <= 0.6).
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


def worker(rows: int, threads: int, output_dir: str) -> None:
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
    trainer.evaluate()  # warm-up: imports, first Lightning setup, allocator
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    start = time.perf_counter()
    metrics = trainer.evaluate()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    seconds = time.perf_counter() - start
    if trainer.is_world_process_zero():
        assert metrics["eval_rows"] == rows, metrics  # every row counted once
        print("RESULT " + json.dumps({"processes": trainer.args.world_size, "seconds": seconds,
                                      "eval_runtime": metrics["eval_runtime"]}), flush=True)


def run(processes: int, rows: int, threads: int) -> dict:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as output_dir:
        proc = subprocess.run(
            [torchrun, "--nproc_per_node", str(processes), "--master_port", str(port), os.path.abspath(__file__),
             "--worker", "--rows", str(rows), "--threads", str(threads), "--output", output_dir],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{processes}-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (both cases)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options.rows, options.threads, options.output)
        return
    times: dict[int, list[float]] = {1: [], 2: []}
    for round_index in range(options.rounds):  # alternating, so machine noise hits both alike
        for processes in (1, 2):
            result = run(processes, options.rows, options.threads)
            times[processes].append(result["seconds"])
            print(f"round {round_index + 1}: {processes} process(es): {result['seconds']:.2f} s "
                  f"(eval_runtime {result['eval_runtime']:.2f} s)", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"evaluate() of {options.rows} rows, {options.threads} thread(s) per process, median of {options.rounds}: "
          f"1 process {one:.2f} s, 2 processes {two:.2f} s, ratio {two / one:.2f}x (target <= 0.6x)")


if __name__ == "__main__":
    if "--worker" in sys.argv:  # the worker imports hf_lightning from this checkout, as the tests do
        sys.path.insert(0, os.path.dirname(HERE))
    main()
