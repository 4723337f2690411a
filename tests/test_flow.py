"""flow.py: transformers' log → evaluate → save inside Lightning's loop, the event order, the loss filter."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from torch import nn
from transformers import TrainerCallback

import hf_lightning
from differential import assert_same_history, assert_same_run, run_pair
from helpers import Recorder, classification_dataset, tiny_bert


def test_nan_losses_are_filtered_like_transformers(tmp_path):
    def nan_on_some_batches(outputs, labels, num_items_in_batch=None):
        loss = nn.functional.cross_entropy(outputs.logits, labels)
        if int(labels.sum()) % 2 == 1:  # a NaN value whose gradient stays finite
            loss = loss + (torch.tensor(float("nan")) - loss.detach())
        return loss

    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(16), None,
        trainer_kwargs={"compute_loss_func": nan_on_some_batches},
        per_device_train_batch_size=2, max_steps=8, logging_steps=3, max_grad_norm=0.0,
    )
    assert_same_run(results)
    losses = [e["loss"] for e in results["hl"][0].state.log_history if "loss" in e]
    assert losses and all(np.isfinite(losses))


def test_nan_filter_reads_the_value_on_cpu_and_stays_on_the_device_elsewhere():
    from hf_lightning.flow import add_filtered_loss

    losses = [1.0, float("nan"), 2.0, float("inf"), 0.5]
    totals = {}
    for read_value in (True, False):  # False: the accelerator path (no host sync), run here on CPU tensors
        total = torch.zeros(())
        for step, value in enumerate(losses):
            add_filtered_loss(total, torch.tensor(value), step + 1, read_value=read_value)
        totals[read_value] = total.item()
    expected = 1.0  # transformers: a non-finite step adds the mean so far (tr_loss / (1 + steps since the last log))
    expected += expected / 2
    expected += 2.0
    expected += expected / 4
    expected += 0.5
    assert totals[True] == totals[False] == pytest.approx(expected)


def test_event_order_matches_transformers(tmp_path):
    recorders = {}

    def after(trainer):
        trainer.evaluate()
        trainer.predict(classification_dataset(4, seed=7))
        return None

    for key in ("hf", "hl"):
        recorders[key] = Recorder()
    # 14 rows / batch 2 = 7 micro-batches per epoch; GA=2 -> 4 update steps (last window short);
    # max_steps=6 cuts epoch 2; log/eval/save every 2 steps coincide.
    results = {}
    for key, cls, args_cls in (("hf", transformers.Trainer, transformers.TrainingArguments),
                               ("hl", hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        args = args_cls(str(tmp_path / key), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                        max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=2, save_steps=2,
                        report_to="none", disable_tqdm=True, use_cpu=True, per_device_eval_batch_size=2)
        trainer = cls(tiny_bert(), args=args, train_dataset=classification_dataset(14),
                      eval_dataset=classification_dataset(5, seed=1), callbacks=[recorders[key]])
        trainer.train()
        after(trainer)
        results[key] = trainer
    assert recorders["hl"].events == recorders["hf"].events
    assert not recorders["hl"].bad_refs
    assert_same_history(results["hf"].state.log_history, results["hl"].state.log_history)
    assert sorted(os.listdir(tmp_path / "hl")) == sorted(d for d in os.listdir(tmp_path / "hf"))


def test_should_epoch_stop_and_should_evaluate_from_a_callback(tmp_path):
    class Control(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % 4 == 2:  # stop each 4-step epoch after its second step
                control.should_epoch_stop = True
            if state.global_step == 1:
                control.should_evaluate = True

    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(8), classification_dataset(4, seed=1),
        trainer_kwargs={"callbacks": [Control()]}, per_device_train_batch_size=2, num_train_epochs=3,
        logging_steps=1,
    )
    hf, hl = results["hf"][0], results["hl"][0]
    assert hl.state.global_step == hf.state.global_step == 10
    assert_same_history(hf.state.log_history, hl.state.log_history)


@pytest.mark.parametrize("case", ["no_epochs", "resume_finished_run", "resume_past_max_steps"])
def test_nothing_left_to_train_ends_the_run_as_transformers(tmp_path, case):
    """Lightning skips its fit loop here; transformers still logs the summary, fires on_train_end, returns TrainOutput."""
    args = dict(per_device_train_batch_size=4, report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=1)
    first = dict(num_train_epochs=0, save_strategy="no") if case == "no_epochs" else dict(
        num_train_epochs=1, save_strategy="steps", save_steps=2)
    second = dict(first, max_steps=1) if case == "resume_past_max_steps" else first
    results = {}
    for key, trainer_cls, args_cls in (("hf", transformers.Trainer, transformers.TrainingArguments),
                                       ("hl", hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        out = str(tmp_path / key)
        if case != "no_epochs":
            trainer_cls(tiny_bert(), args=args_cls(out, **args, **first), train_dataset=classification_dataset(8)).train()
        recorder = Recorder()
        trainer = trainer_cls(tiny_bert(), args=args_cls(out, **args, **second), train_dataset=classification_dataset(8),
                              callbacks=[recorder])
        output = trainer.train(resume_from_checkpoint=None if case == "no_epochs" else True)
        results[key] = (trainer, output, recorder.events)
    (hf_trainer, hf_output, hf_events), (hl_trainer, hl_output, hl_events) = results["hf"], results["hl"]
    assert isinstance(hl_output, transformers.trainer_utils.TrainOutput)
    assert hl_output.global_step == hf_output.global_step and hl_output.training_loss == hf_output.training_loss
    assert {k: v for k, v in hl_output.metrics.items() if "runtime" not in k} == {
        k: v for k, v in hf_output.metrics.items() if "runtime" not in k}
    assert_same_history(hf_trainer.state.log_history, hl_trainer.state.log_history)
    assert hl_events == hf_events and ("on_train_end", hf_output.global_step) in hl_events
