"""2D parallelism (tensor parallel 2 x FSDP2 data parallel 2 = 4 processes, torchrun, gloo, CPU) against 1 process
and against tensor parallel 2 alone: losses, grad norms, consolidated weights, evaluation and resume exactness.

    .venv/bin/python bench/tp2d.py [--steps 6] [--keep DIR]

Every run trains tests/helpers.py's tiny_llama on lm_dataset(40) with the same seed and the same global batch
(8 rows per optimizer step: gradient_accumulation_steps=2 x 4 rows), max_grad_norm=0.5 (below every norm, so the
clipping runs), a checkpoint every 2 steps, then evaluate()s 37 rows (compute_metrics records what it gets):

* single – one process, per-device batch 4;
* tp2    – `parallelism_config=ParallelismConfig(tp_size=2)`, 2 processes, per-device batch 4 (both TP ranks see it);
* tp2d   – `ParallelismConfig(tp_size=2, dp_shard_size=2)`, 4 processes, per-device batch 2: each data-parallel shard
           takes every other batch of the one shuffled order, as accelerate's loaders do;
* resumed – tp2d again in a fresh folder holding only a middle checkpoint of tp2d (checkpoint-2 of 6 steps),
  `train(resume_from_checkpoint=True)`;
  then tp2 (2 processes) from the same checkpoint: DCP reshards the 4-process optimizer state.

It prints one PASS/FAIL line per check with the largest difference seen, and exits 1 if any check fails. A run that
fails prints the last error line of its output and keeps the whole log beside its folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
PER_DEVICE = {"single": 4, "tp2": 4, "tp2d": 2}
PROCESSES = {"single": 1, "tp2": 2, "tp2d": 4}
DATA_PARALLEL = {"single": 1, "tp2": 1, "tp2d": 2}
# Odd: the 2 data-parallel shards' last round wraps around to row 0, which gather_for_metrics must trim. Evaluated one
# row per batch so that eval_loss (transformers' mean of per-batch losses) does not depend on how rows form batches.
EVAL_ROWS = 37


def worker(mode: str, out: str, steps: int, resume: bool) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    import transformers
    from accelerate import ParallelismConfig
    from helpers import lm_dataset, tiny_llama

    import hf_lightning

    torch.set_num_threads(1)  # 4 processes on 2 cores: more threads only oversubscribe them
    rank = int(os.environ.get("RANK", "0"))

    class LocalNumel(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step != 1:
                return
            local = lambda t: t.to_local().numel() if hasattr(t, "to_local") else t.numel()  # noqa: E731
            opt = [local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
            with open(os.path.join(out, f"numel_{rank}.json"), "w") as f:
                json.dump({"params": sum(local(p) for p in model.parameters()), "optimizer": sum(opt),
                           "full_params": sum(p.numel() for p in model.parameters())}, f)

    extra = {"ddp_backend": "gloo"} if mode != "single" else {}
    if mode == "tp2":
        extra["parallelism_config"] = ParallelismConfig(tp_size=2)
    elif mode == "tp2d":
        extra["parallelism_config"] = ParallelismConfig(tp_size=2, dp_shard_size=2)
    args = hf_lightning.TrainingArguments(
        out, per_device_train_batch_size=PER_DEVICE[mode], gradient_accumulation_steps=2, max_steps=steps,
        logging_steps=1, learning_rate=5e-3, save_steps=2, report_to="none", disable_tqdm=True, use_cpu=True,
        seed=3, max_grad_norm=0.5, per_device_eval_batch_size=1, include_for_metrics=["loss"], **extra)
    def rows(prediction):  # what compute_metrics receives: every eval row once, in dataset order
        return {"rows": len(prediction.label_ids), "first_labels": prediction.label_ids[:, 0].tolist(),
                "losses": prediction.losses.tolist(), "tokens": (prediction.label_ids[:, 1:] != -100).sum(1).tolist()}

    trainer = hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(40), callbacks=[LocalNumel()],
                                   eval_dataset=lm_dataset(EVAL_ROWS, seed=1), compute_metrics=rows)
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(os.path.join(out, "final"))
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(trainer.state.log_history, f)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(metrics, f)
        print("STRATEGY", type(trainer.lightning_trainer.strategy).__name__, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(mode: str, out: str, steps: int, resume: bool = False) -> tuple[float, str | None]:
    """Runs one mode; returns (seconds, None) or (seconds, the error's last line)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    command = [HERE, "--worker", mode, out, "--steps", str(steps)] + (["--resume"] if resume else [])
    if PROCESSES[mode] == 1:
        command = [sys.executable, *command]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
        command = [torchrun, "--nproc_per_node", str(PROCESSES[mode]), "--master_port", str(free_port()), *command]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode == 0 and os.path.isfile(os.path.join(out, "history.json")):
        return seconds, None
    with open(os.path.join(out + ".log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line or "error" in line]
    return seconds, (errors[-1] if errors else f"exit {proc.returncode}") + f" (full log: {out}.log)"


def train_entries(folder: str) -> list[dict]:
    return [e for e in json.load(open(os.path.join(folder, "history.json"))) if "loss" in e]


def weights(folder: str) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def compare_runs(report: Report, name: str, a: str, b: str, modes: tuple[str, str], loss_rtol: float,
                 weight_atol: float) -> None:
    """Run folder `a` against `b` (of `modes`): training losses, grad norms, lrs, final weights, evaluation."""
    ea, eb = train_entries(a), train_entries(b)
    if [e["step"] for e in ea] != [e["step"] for e in eb]:
        report.check(f"{name} steps", False, f"{[e['step'] for e in ea]} vs {[e['step'] for e in eb]}")
        return
    loss = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(ea, eb))
    norm = max(abs(x["grad_norm"] - y["grad_norm"]) / abs(y["grad_norm"]) for x, y in zip(ea, eb))
    lr = max(abs(x["learning_rate"] - y["learning_rate"]) for x, y in zip(ea, eb))
    report.check(f"{name} losses", loss <= loss_rtol and norm <= loss_rtol and lr == 0,
                 f"{len(ea)} steps, max rel diff loss {loss:.1e}, grad_norm {norm:.1e} (<= {loss_rtol:.0e}); "
                 f"lr equal: {lr == 0}")
    wa, wb = weights(os.path.join(a, "final")), weights(os.path.join(b, "final"))
    if wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        report.check(f"{name} weights", False, "the consolidated model.safetensors differ in keys or shapes")
        return
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    report.check(f"{name} weights", diff <= weight_atol,
                 f"{len(wa)} consolidated tensors, max abs diff {diff:.1e} (<= {weight_atol:.0e})")
    ma, mb = (json.load(open(os.path.join(folder, "eval.json"))) for folder in (a, b))
    dp = max(DATA_PARALLEL[mode] for mode in modes)  # the one-shard run's losses as the sharded run reports them
    la, lb = (token_weighted(m, DATA_PARALLEL[mode], dp) for m, mode in zip((ma, mb), modes))
    loss = max(abs(x - y) / abs(y) for x, y in zip(la, lb))
    report.check(f"{name} evaluate", ma["eval_rows"] == EVAL_ROWS and ma["eval_first_labels"] == mb["eval_first_labels"]
                 and loss <= loss_rtol, f"compute_metrics got {ma['eval_rows']} rows (of {EVAL_ROWS}), in the same "
                 f"order: {ma['eval_first_labels'] == mb['eval_first_labels']}; per-row eval losses max rel diff "
                 f"{loss:.1e}")


def token_weighted(metrics: dict, run_dp: int, dp: int) -> list[float]:
    """The per-row eval losses of a run with `run_dp` data-parallel shards as a run with `dp` shards reports them.
    transformers' prediction_step sums the label tokens of one round of batches over the shards
    (average_tokens_across_devices) and scales the loss by the shards, so each shard's loss is its token sum over
    the round's tokens x dp: with one row per batch, row i's mean loss x its tokens x dp / the round's tokens (the
    last round wraps around to row 0)."""
    losses, tokens = metrics["eval_losses"], metrics["eval_tokens"]  # tokens: the labels the shifted loss counts
    if run_dp == dp:
        return losses
    assert run_dp == 1, "only one-shard runs are reweighted"
    rounds = [sum(tokens[(i // dp * dp + j) % len(tokens)] for j in range(dp)) for i in range(len(tokens))]
    return [loss * n * dp / total for loss, n, total in zip(losses, tokens, rounds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--keep", help="write the runs here and keep them (default: a temporary folder, removed)")
    cli = parser.parse_args()
    if cli.steps < 4:
        parser.error("--steps must be at least 4: the resumed runs start from a checkpoint before the last step")
    root = cli.keep or tempfile.mkdtemp(prefix="tp2d_")
    os.makedirs(root, exist_ok=True)
    report = Report()
    try:
        failed_runs = set()
        for mode in ("single", "tp2", "tp2d"):
            seconds, error = launch(mode, os.path.join(root, mode), cli.steps)
            report.check(f"run {mode} ({PROCESSES[mode]} process{'es' if PROCESSES[mode] > 1 else ''})",
                         error is None, f"{seconds:.0f} s" if error is None else error)
            if error:
                failed_runs.add(mode)
        if "single" not in failed_runs and "tp2" not in failed_runs:
            compare_runs(report, "tp2 vs single", os.path.join(root, "tp2"), os.path.join(root, "single"),
                         ("tp2", "single"), 1e-5, 1e-5)
        if "tp2d" not in failed_runs:
            numel = [json.load(open(os.path.join(root, "tp2d", f"numel_{r}.json"))) for r in range(4)]
            share = max(n["params"] / n["full_params"] for n in numel)
            report.check("tp2d shards", share < 0.3 and all(n["optimizer"] == 2 * n["params"] for n in numel),
                         f"largest share of the parameters on one rank {share:.3f} (< 0.3), optimizer state 2x it")
            for other in ("single", "tp2"):
                if other not in failed_runs:
                    compare_runs(report, f"tp2d vs {other}", os.path.join(root, "tp2d"), os.path.join(root, other),
                                 ("tp2d", other), 1e-5, 1e-5)
            half = cli.steps // 2 // 2 * 2  # checkpoints come every 2 steps
            # the same topology resumes bitwise; another one (2 TP shards) reads the same checkpoint, DCP resharding
            # the optimizer from the 4 2D shards
            for topology, folder, label, tolerance in (
                    ("tp2d", "resume", f"tp2d resumed from checkpoint-{half}", 1e-6),
                    ("tp2", "resume_tp2", f"tp2 resumed from tp2d's checkpoint-{half}", 1e-5)):
                resumed = os.path.join(root, folder)
                shutil.copytree(os.path.join(root, "tp2d", f"checkpoint-{half}"),
                                os.path.join(resumed, f"checkpoint-{half}"))
                seconds, error = launch(topology, resumed, cli.steps, resume=True)
                report.check(f"run {label}", error is None, f"{seconds:.0f} s" if error is None else error)
                if error is None:
                    name = "tp2d resumed vs uninterrupted" if topology == "tp2d" else "tp2 resumed from tp2d vs tp2d"
                    compare_runs(report, name, resumed, os.path.join(root, "tp2d"), (topology, "tp2d"),
                                 tolerance, tolerance)
    finally:
        if not cli.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'FAIL' if report.failed else 'PASS'} tp2d: {report.failed} failed check(s)")
    return 1 if report.failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        options = argparse.ArgumentParser()
        options.add_argument("mode")
        options.add_argument("out")
        options.add_argument("--steps", type=int)
        options.add_argument("--resume", action="store_true")
        worker_cli = options.parse_args(sys.argv[2:])
        worker(worker_cli.mode, worker_cli.out, worker_cli.steps, worker_cli.resume)
    else:
        sys.exit(main())
