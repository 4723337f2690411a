"""module.py: the LightningModule runs every micro-batch as transformers' training_step does."""

from __future__ import annotations

import transformers
from torch import nn

import hf_lightning
from helpers import classification_dataset, tiny_bert


def test_every_micro_batch_runs_in_training_mode(tmp_path):
    # transformers calls model.train() before each micro-batch; hf_lightning skips the call only when it changes
    # nothing. A callback that switches a submodule to eval, and a module that overrides train(), must both be seen.
    class Counting(nn.Linear):
        calls = 0

        def train(self, mode=True):
            Counting.calls += 1
            return super().train(mode)

    class EvalEncoder(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step % 2 == 0:
                model.bert.encoder.eval()
            else:  # alone, a leaf deep in the tree
                model.bert.encoder.layer[-1].output.dropout.eval()

    model = tiny_bert(dropout=0.1)
    seen = []
    model.bert.encoder.register_forward_pre_hook(lambda module, inputs: seen.append(module.training))
    model.bert.encoder.layer[-1].output.dropout.register_forward_pre_hook(
        lambda module, inputs: seen.append(module.training))
    args = hf_lightning.TrainingArguments(tmp_path, max_steps=3, gradient_accumulation_steps=2, report_to="none",
                                          save_strategy="no", use_cpu=True, per_device_train_batch_size=4)
    hf_lightning.Trainer(model, args=args, train_dataset=classification_dataset(24), callbacks=[EvalEncoder()]).train()
    assert seen == [True] * 12

    model = tiny_bert()
    model.classifier = Counting(model.classifier.in_features, model.classifier.out_features)
    hf_lightning.Trainer(model, args=args, train_dataset=classification_dataset(24)).train()
    assert Counting.calls >= 6  # once per micro-batch (plus Lightning's own calls)
