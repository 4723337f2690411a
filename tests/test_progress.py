"""The default callback list as transformers builds it, and the one progress bar (Lightning's) counting optimizer steps."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import transformers
from differential import run_pair
from helpers import classification_dataset, tiny_bert
from lightning.pytorch.callbacks import TQDMProgressBar
from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

import hf_lightning


class Marker(transformers.TrainerCallback):
    pass


def _kinds(trainer) -> list[type]:
    return [type(cb) for cb in trainer.callback_handler.callbacks]


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_default_callbacks_in_transformers_order(tmp_path, disable_tqdm):
    lists = {}
    for key, lib in (("hf", transformers), ("hl", hf_lightning)):
        args = lib.TrainingArguments(str(tmp_path / key), report_to="none", use_cpu=True, disable_tqdm=disable_tqdm)
        lists[key] = _kinds(lib.Trainer(tiny_bert(), args=args, callbacks=[Marker]))
    assert lists["hf"][:2] == lists["hl"][:2] == [DefaultFlowCallback, Marker]
    assert len(lists["hf"]) == len(lists["hl"]) == 3
    expected = PrinterCallback if disable_tqdm else ProgressCallback
    assert lists["hf"][2] is expected and issubclass(lists["hl"][2], expected)


def _bar(trainer):
    return trainer.lightning_trainer.progress_bar_callback


def test_removing_or_replacing_progress_callback_as_users_do(tmp_path):
    data = classification_dataset(4)

    def make(name, **kw):
        args = hf_lightning.TrainingArguments(str(tmp_path / name), report_to="none", use_cpu=True, max_steps=1,
                                              per_device_train_batch_size=4, **kw)
        return hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=data)

    default = make("default")
    default.train()
    assert isinstance(_bar(default), TQDMProgressBar)  # Lightning draws the bar

    removed = make("removed")
    removed.remove_callback(ProgressCallback)
    assert not any(isinstance(cb, ProgressCallback) for cb in removed.callback_handler.callbacks)
    removed.train()
    assert _bar(removed) is None

    # replaced by a ProgressCallback of the user's, which draws its own bar: Lightning's stays off (one bar, not two)
    replaced = make("replaced")
    assert isinstance(replaced.pop_callback(ProgressCallback), ProgressCallback)
    replaced.add_callback(ProgressCallback())
    replaced.train()
    assert _bar(replaced) is None

    printed = make("printed", disable_tqdm=True)
    printed.train()
    assert _bar(printed) is None


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_train_metrics_total_flos_as_transformers(tmp_path, disable_tqdm):
    # transformers' PrinterCallback pops total_flos from the dict train() returns; its ProgressCallback does not.
    results = run_pair(tmp_path, tiny_bert, classification_dataset(8), per_device_train_batch_size=4, max_steps=2,
                       disable_tqdm=disable_tqdm)
    hf_metrics, hl_metrics = results["hf"][1].metrics, results["hl"][1].metrics
    assert hf_metrics.keys() == hl_metrics.keys()
    assert ("total_flos" in hl_metrics) is not disable_tqdm
    if not disable_tqdm:
        assert hl_metrics["total_flos"] == hf_metrics["total_flos"]


class BarReader(pl.Callback):
    """Reads Lightning's own progress bar (a TQDMProgressBar) before each step and at the end."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.n, bar.total, trainer.global_step))

    def on_train_end(self, trainer, pl_module):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.n, bar.total, trainer.global_step))


def test_progress_bar_counts_optimizer_steps_up_to_max_steps(tmp_path):
    # 10 windows per epoch (gradient accumulation 2 over 20 batches of 2); max_steps=12 ends mid-epoch 2.
    reader = BarReader()
    args = hf_lightning.TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, max_steps=12,
                                          per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(40), callbacks=[reader])
    trainer.train()
    assert isinstance(trainer.lightning_trainer.progress_bar_callback, TQDMProgressBar)
    assert {total for _, total, _ in reader.seen} == {12}
    assert all(n == step for n, _, step in reader.seen), reader.seen
    assert reader.seen[-1][:2] == (12, 12)
