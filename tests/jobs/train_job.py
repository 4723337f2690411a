"""A training job run in a subprocess by tests/test_checkpoint.py, so that crashes are real (SIGKILL).

    python train_job.py FRAMEWORK OUTPUT_DIR [--kill-at-step N] [--kill-in-save N] [--resume PATH|latest]
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import transformers

import hf_lightning
from helpers import classification_dataset, tiny_bert

parser = argparse.ArgumentParser()
parser.add_argument("framework", choices=["hf", "hl"])
parser.add_argument("output_dir")
parser.add_argument("--kill-at-step", type=int)
parser.add_argument("--kill-in-save", type=int, help="SIGKILL inside the N-th torch.save call")
parser.add_argument("--resume")
parser.add_argument("--save-steps", type=int, default=2)
parser.add_argument("--grad-accum", type=int, default=2)
opts = parser.parse_args()


class KillAfterSave(transformers.TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == opts.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


if opts.kill_in_save:
    real_save, calls = torch.save, [0]

    def dying_save(*args, **kwargs):
        calls[0] += 1
        if calls[0] == opts.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(*args, **kwargs)

    torch.save = dying_save

trainer_cls = transformers.Trainer if opts.framework == "hf" else hf_lightning.Trainer
args_cls = transformers.TrainingArguments if opts.framework == "hf" else hf_lightning.TrainingArguments
args = args_cls(
    opts.output_dir, per_device_train_batch_size=3, gradient_accumulation_steps=opts.grad_accum,
    num_train_epochs=3, save_steps=opts.save_steps, logging_steps=1, learning_rate=1e-2, report_to="none",
    disable_tqdm=True, use_cpu=True, seed=7,
)
trainer = trainer_cls(tiny_bert(dropout=0.2), args=args, train_dataset=classification_dataset(20),
                      callbacks=[KillAfterSave()])
resume = True if opts.resume == "latest" else opts.resume
trainer.train(resume_from_checkpoint=resume)
trainer.save_model(os.path.join(opts.output_dir, "final"))
