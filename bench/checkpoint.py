"""Save and resume cost of an 81M-parameter model: transformers.Trainer vs hf_lightning.Trainer, same run.

Each framework trains a Llama (81M parameters, from config) for 7 steps with a save at step 3, then resumes from that
checkpoint in a fresh Trainer. Reported: time of the save (on_save minus the step end), the stall (the step interval
that holds the save minus the median of the others: what a save costs training), time from train(resume) to the
first resumed step, and the checkpoint folder's size. hf_lightning's folders hold exactly transformers' files by
default; `save_lightning_checkpoint=True` adds the lightning.ckpt export (a second copy of weights and optimizer).

    python bench/checkpoint.py           # the 81M Llama (slow on CPU: run it on a quiet machine)
    python bench/checkpoint.py --tiny    # a 2-layer toy: checks that the script runs
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import transformers

import hf_lightning


TINY = "--tiny" in sys.argv
SAVE_AT, STEPS = 3, 7


def model():
    torch.manual_seed(0)
    if TINY:
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=8, num_attention_heads=10,
        num_key_value_heads=10, max_position_embeddings=128))


def folder_mb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


class Clock(transformers.TrainerCallback):
    def __init__(self):
        self.marks = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.setdefault("step_end", {})[state.global_step] = time.time()

    def on_save(self, args, state, control, **kwargs):
        self.marks.setdefault("save", {})[state.global_step] = time.time()


def run(framework, root, **extra):
    trainer_cls = transformers.Trainer if framework == "hf" else hf_lightning.Trainer
    args_cls = transformers.TrainingArguments if framework == "hf" else hf_lightning.TrainingArguments
    ids = torch.randint(0, 32000, (2 * STEPS, 128))
    data = [{"input_ids": row, "labels": row} for row in ids]
    out = os.path.join(root, framework + ("-export" if extra else ""))
    args = args_cls(out, per_device_train_batch_size=2, max_steps=STEPS, save_steps=SAVE_AT, report_to="none",
                    disable_tqdm=True, use_cpu=True, log_level="error", **extra)
    clock = Clock()
    trainer_cls(model(), args=args, train_dataset=data, callbacks=[clock]).train()
    ends = clock.marks["step_end"]
    save_s = clock.marks["save"][SAVE_AT] - ends[SAVE_AT]
    intervals = {step: ends[step] - ends[step - 1] for step in range(2, STEPS + 1)}
    with_save = intervals.pop(SAVE_AT + 1)
    stall_s = with_save - statistics.median(intervals.values())
    size = folder_mb(os.path.join(out, f"checkpoint-{SAVE_AT}"))
    clock2 = Clock()
    start = time.time()
    trainer_cls(model(), args=args, train_dataset=data, callbacks=[clock2]).train(
        resume_from_checkpoint=os.path.join(out, f"checkpoint-{SAVE_AT}"))
    resume_s = clock2.marks["step_end"][SAVE_AT + 1] - start
    return save_s, stall_s, resume_s, size


def main():
    root = tempfile.mkdtemp()
    params = sum(p.numel() for p in model().parameters()) / 1e6
    print(f"Llama from config, {params:.0f}M parameters, {STEPS} CPU steps of 2x128 tokens, a save at step {SAVE_AT}\n")
    print(f"| framework | save (s) | stall around the save (s) | resume to first step (s) | checkpoint size (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, framework, extra in (("transformers.Trainer", "hf", {}), ("hf_lightning.Trainer", "hl", {}),
                                   ("hf_lightning, save_lightning_checkpoint=True", "hl",
                                    {"save_lightning_checkpoint": True})):
        save_s, stall_s, resume_s, size = run(framework, root, **extra)
        print(f"| {name} | {save_s:.2f} | {stall_s:.2f} | {resume_s:.2f} | {size:.0f} |")
        sys.stdout.flush()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
