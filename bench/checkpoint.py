"""Save and resume cost of a ~100M-parameter model: transformers.Trainer vs hf_lightning.Trainer, same run.

Each framework trains a Llama (~100M parameters, from config) for 2 steps with save_steps=2, then resumes from the
checkpoint in a fresh Trainer. Reported: time of the save (on_save minus the step end), time from train(resume) to
the first resumed step, and the checkpoint folder's size (hf_lightning's includes lightning.ckpt, which holds a
second copy of weights and optimizer state; `save_lightning_checkpoint=False` drops it).

    python bench/checkpoint.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import torch
import transformers

import hf_lightning


def model():
    torch.manual_seed(0)
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
    ids = torch.randint(0, 32000, (8, 128))
    data = [{"input_ids": row, "labels": row} for row in ids]
    out = os.path.join(root, framework + ("-nockpt" if extra else ""))
    args = args_cls(out, per_device_train_batch_size=2, max_steps=3, save_steps=2, report_to="none",
                    disable_tqdm=True, use_cpu=True, log_level="error", **extra)
    clock = Clock()
    trainer_cls(model(), args=args, train_dataset=data, callbacks=[clock]).train()
    save_s = clock.marks["save"][2] - clock.marks["step_end"][2]
    size = folder_mb(os.path.join(out, "checkpoint-2"))
    clock2 = Clock()
    start = time.time()
    trainer_cls(model(), args=args, train_dataset=data, callbacks=[clock2]).train(
        resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    resume_s = clock2.marks["step_end"][3] - start
    return save_s, resume_s, size


def main():
    root = tempfile.mkdtemp()
    params = sum(p.numel() for p in model().parameters()) / 1e6
    print(f"Llama from config, {params:.0f}M parameters, 2 CPU steps of 2x128 tokens before the save\n")
    print("| framework | save (s) | resume to first step (s) | checkpoint-2 size (MB) |")
    print("| --- | --- | --- | --- |")
    for name, framework, extra in (("transformers.Trainer", "hf", {}), ("hf_lightning.Trainer", "hl", {}),
                                   ("hf_lightning, save_lightning_checkpoint=False", "hl",
                                    {"save_lightning_checkpoint": False})):
        save_s, resume_s, size = run(framework, root, **extra)
        print(f"| {name} | {save_s:.2f} | {resume_s:.2f} | {size:.0f} |")
        sys.stdout.flush()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
