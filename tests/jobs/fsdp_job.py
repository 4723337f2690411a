"""Launched by tests/test_sharding.py with `torchrun --nproc_per_node N` (CPU, gloo): FSDP2 through `fsdp=True`.

    torchrun --nproc_per_node N fsdp_job.py MODE OUTPUT_DIR [--kill-at S] [--resume]

MODE: fsdp (TrainingArguments(fsdp=True)), ddp (the same run without it), mp (a ModelParallelStrategy passed in
lightning_trainer_kwargs). --kill-at S: rank 0 SIGKILLs itself at the end of step S, before that step's save
(torchrun then ends rank 1).
Writes history.json, final/ (save_model, called on every rank as with transformers under FSDP) and
numel_<rank>.json (this rank's local parameter and optimizer-state element counts).
"""

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import transformers

import hf_lightning
from helpers import lm_dataset, tiny_llama

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["fsdp", "ddp", "mp"])
parser.add_argument("output_dir")
parser.add_argument("--kill-at", type=int)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--max-steps", type=int, default=8)
cli = parser.parse_args()
rank = int(os.environ["RANK"])


class KillAt(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == cli.kill_at and rank == 0:  # before this step's save: the previous one resumes
            os.kill(os.getpid(), signal.SIGKILL)


class LocalNumel(transformers.TrainerCallback):
    """Elements this rank holds: its parameter shards and its optimizer state (after the first step)."""

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != 1:
            return
        local = lambda t: t.to_local().numel() if hasattr(t, "to_local") else t.numel()  # noqa: E731
        params = sum(local(p) for p in model.parameters())
        opt = sum(local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        with open(os.path.join(args.output_dir, f"numel_{rank}.json"), "w") as f:
            json.dump({"params": params, "optimizer": opt,
                       "full_params": sum(p.numel() for p in model.parameters())}, f)


extra = {}
if cli.mode == "fsdp":
    extra["fsdp"] = True
elif cli.mode == "mp":
    from lightning.pytorch.strategies import ModelParallelStrategy

    world = int(os.environ["WORLD_SIZE"])
    extra["lightning_trainer_kwargs"] = {
        "strategy": ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)}
args = hf_lightning.TrainingArguments(
    cli.output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=cli.max_steps,
    logging_steps=1, learning_rate=5e-3, save_steps=2, report_to="none", disable_tqdm=True, use_cpu=True, seed=3,
    ddp_backend="gloo", max_grad_norm=0.5, **extra,
)
os.makedirs(cli.output_dir, exist_ok=True)
callbacks = [LocalNumel()] + ([KillAt()] if cli.kill_at else [])
trainer = hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(40), callbacks=callbacks)
trainer.train(resume_from_checkpoint=True if cli.resume else None)
trainer.save_model(os.path.join(cli.output_dir, "final"))
if trainer.is_world_process_zero():
    with open(os.path.join(cli.output_dir, "history.json"), "w") as f:
        json.dump(trainer.state.log_history, f)
    print("STRATEGY", type(trainer.lightning_trainer.strategy).__name__, flush=True)
