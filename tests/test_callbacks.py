"""TrainerCallbacks and Lightning callbacks in one list: HF's event order, TrainerControl, Lightning monitors."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import importlib.util
import logging
import os

import lightning.pytorch as pl
import pytest
import transformers
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

import hf_lightning
from differential import transformers_bug
from helpers import Recorder, classification_dataset, tiny_bert



class GuideEarlyStoppingCallback(TrainerCallback):
    """Verbatim from the transformers Trainer guide."""

    def __init__(self, num_steps=10):
        self.num_steps = num_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.num_steps:
            return {"should_training_stop": True}
        else:
            return {}


def _args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=2, report_to="none", save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return hf_lightning.TrainingArguments(str(tmp_path), **base)


def _hf_args(tmp_path):
    return transformers.TrainingArguments(str(tmp_path), per_device_train_batch_size=2, report_to="none",
                                          save_strategy="no", use_cpu=True, disable_tqdm=True)


def test_guide_callback_keyword_on_transformers(tmp_path):
    with transformers_bug(TypeError, "unexpected keyword argument 'callback'", "transformers 5.24's Trainer has no "
                          "`callback=` keyword, which the guide's early-stopping example passes"):
        hf = transformers.Trainer(tiny_bert(), args=_hf_args(tmp_path), train_dataset=classification_dataset(40),
                                  callback=[GuideEarlyStoppingCallback()])
    assert any(isinstance(cb, GuideEarlyStoppingCallback) for cb in hf.callback_handler.callbacks)


def test_guide_callback_returning_a_dict_on_transformers(tmp_path):
    hf = transformers.Trainer(tiny_bert(), args=_hf_args(tmp_path), train_dataset=classification_dataset(40),
                              callbacks=[GuideEarlyStoppingCallback()])
    with transformers_bug(AttributeError, "'dict' object has no attribute", "transformers 5.24 cannot take the "
                          "dict {'should_training_stop': True} that the guide's callback returns from on_step_end"):
        hf.train()
    assert hf.state.global_step == 10


def test_guide_callback_example_works(tmp_path):
    data = classification_dataset(40)
    trainer = hf_lightning.Trainer(tiny_bert(), args=_args(tmp_path, num_train_epochs=3, eval_strategy="steps",
                                                           eval_steps=15),
                                   train_dataset=data, eval_dataset=classification_dataset(4),
                                   callback=[GuideEarlyStoppingCallback()])
    trainer.train()
    assert trainer.state.global_step == 10
    # It stopped right after step 10, without the validation Lightning runs when trainer.should_stop is set.
    assert not any("eval_loss" in e for e in trainer.state.log_history)
    assert trainer.lightning_trainer.global_step == 10


def test_unknown_control_key_is_a_clear_error(tmp_path):
    class Typo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            return {"should_trainig_stop": True}

    trainer = hf_lightning.Trainer(tiny_bert(), args=_args(tmp_path, max_steps=3), callbacks=[Typo],
                                   train_dataset=classification_dataset(8))
    with pytest.raises(ValueError, match="should_trainig_stop"):
        trainer.train()


def test_add_pop_remove_callbacks(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor

    recorder = Recorder()
    trainer = hf_lightning.Trainer(tiny_bert(), args=_args(tmp_path, max_steps=2), callbacks=[Recorder],
                                   train_dataset=classification_dataset(8))
    trainer.add_callback(recorder)
    trainer.add_callback(LearningRateMonitor)
    assert isinstance(trainer.pop_callback(Recorder), Recorder)  # the class instance added first
    trainer.remove_callback(LearningRateMonitor)
    trainer.train()
    assert ("on_step_end", 2) in recorder.events
    assert not any(isinstance(cb, LearningRateMonitor) for cb in trainer.lightning_trainer.callbacks)


def test_transformers_early_stopping_and_its_state_in_checkpoints(tmp_path):
    from transformers import EarlyStoppingCallback

    def make_args(args_cls, key):
        return args_cls(str(tmp_path / key), per_device_train_batch_size=2, num_train_epochs=20, report_to="none",
                        eval_strategy="steps", eval_steps=2, save_steps=2, metric_for_best_model="eval_loss",
                        load_best_model_at_end=True, learning_rate=0.05, use_cpu=True, disable_tqdm=True,
                        save_total_limit=2)

    outcome = {}
    for key, cls, args_cls in (("hf", transformers.Trainer, transformers.TrainingArguments),
                               ("hl", hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        trainer = cls(tiny_bert(), args=make_args(args_cls, key), train_dataset=classification_dataset(8),
                      eval_dataset=classification_dataset(6, seed=3),
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=0.001)])
        trainer.train()
        outcome[key] = trainer
    hf, hl = outcome["hf"], outcome["hl"]
    assert hl.state.global_step == hf.state.global_step < 80
    assert hl.state.best_global_step == hf.state.best_global_step
    assert hl.state.best_metric == pytest.approx(hf.state.best_metric)
    assert os.path.basename(hl.state.best_model_checkpoint) == os.path.basename(hf.state.best_model_checkpoint)
    assert sorted(os.listdir(tmp_path / "hl")) == sorted(os.listdir(tmp_path / "hf"))
    state = transformers.TrainerState.load_from_json(
        os.path.join(hl.state.best_model_checkpoint, "trainer_state.json"))
    assert "EarlyStoppingCallback" in state.stateful_callbacks


def test_lightning_callbacks_in_the_same_list(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor

    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            hf_trainer = pl_module.hf_trainer  # HF's TrainerState, reachable from a Lightning callback
            seen.setdefault("steps", []).append(hf_trainer.state.global_step)

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen.setdefault("eval_loss", []).append(float(trainer.callback_metrics["eval_loss"]))

    early = EarlyStopping(monitor="eval_loss", patience=1, min_delta=10.0)  # stops after the 2nd evaluation
    recorder = Recorder()
    trainer = hf_lightning.Trainer(
        tiny_bert(), args=_args(tmp_path, num_train_epochs=10, eval_strategy="epoch", report_to="csv",
                                logging_steps=1),
        train_dataset=classification_dataset(8), eval_dataset=classification_dataset(4, seed=2),
        callbacks=[Spy(), early, LearningRateMonitor(logging_interval="step"), recorder],
    )
    trainer.train()
    assert seen["steps"][:4] == [1, 2, 3, 4]
    assert len(seen["eval_loss"]) == 2
    assert trainer.state.global_step == 8  # 2 epochs of 4 steps, then Lightning's EarlyStopping stopped the run
    assert early.stopped_epoch == 1
    assert recorder.events[-1] == ("on_train_end", 8)
    assert recorder.events.count(("on_epoch_end", 8)) == 1
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))[0])))
    assert {"loss", "grad_norm", "learning_rate", "eval_loss", "lr-AdamW/pg1"} <= set(rows[0].keys())
    assert [r["step"] for r in rows if r["eval_loss"]] == ["4", "8"]


def test_more_lightning_callbacks_and_report_to_all(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # so that "all" includes MLflow where it is installed
    from lightning.pytorch.callbacks import RichProgressBar, StochasticWeightAveraging

    swa = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1)
    trainer = hf_lightning.Trainer(
        tiny_bert(), args=_args(tmp_path, num_train_epochs=3, logging_steps=1, report_to="all", disable_tqdm=False),
        train_dataset=classification_dataset(8), callbacks=[RichProgressBar(), swa],
    )
    trainer.train()
    # transformers expands "all" to every installed integration (it has no CSV one).
    names = {type(lg).__name__ for lg in trainer.lightning_trainer.loggers}
    assert names == {name for package, name in (("tensorboard", "TensorBoardLogger"), ("mlflow", "MLFlowLogger"),
                                                ("wandb", "WandbLogger")) if importlib.util.find_spec(package)}
    assert isinstance(trainer.lightning_trainer.progress_bar_callback, RichProgressBar)
    # SWA took over the schedule from epoch 1 (SWALR anneals to swa_lrs) and averaged the weights.
    lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    per_epoch = [lrs[0:4], lrs[4:8], lrs[8:12]]
    assert all(len(set(epoch)) == 1 for epoch in per_epoch)  # SWALR is an epoch-interval schedule
    assert per_epoch[0][0] < per_epoch[1][0] < per_epoch[2][0] < 1e-3  # annealing towards swa_lrs
    assert int(swa.n_averaged) == 3  # one average per epoch


def test_stateful_callbacks_restored_on_resume(tmp_path):
    from transformers import EarlyStoppingCallback

    def make(out, restore):
        args = hf_lightning.TrainingArguments(
            str(out), per_device_train_batch_size=2, num_train_epochs=3, eval_strategy="steps", eval_steps=2,
            save_steps=2, metric_for_best_model="eval_loss", learning_rate=0.0, report_to="none", disable_tqdm=True,
            restore_callback_states_from_checkpoint=restore)
        stopper = EarlyStoppingCallback(early_stopping_patience=5)
        trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(8),
                                       eval_dataset=classification_dataset(4), callbacks=[stopper])
        return trainer, stopper

    trainer, stopper = make(tmp_path / "a", restore=False)
    trainer.train()
    assert stopper.early_stopping_patience_counter == 5  # lr=0: the metric never improves after the first eval
    saved = transformers.TrainerState.load_from_json(str(tmp_path / "a" / "checkpoint-6" / "trainer_state.json"))
    counter = saved.stateful_callbacks["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"]
    assert counter == 2
    # Evaluations at steps 8, 10, 12 after the resume: the counter continues only when told to restore it. As in
    # transformers, the restored callback is a new instance, rebuilt from the saved constructor args, that replaces
    # the one passed in.
    for restore, expected in ((True, counter + 3), (False, 3)):
        resumed, stopper = make(tmp_path / f"b{restore}", restore=restore)
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
        [running] = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)]
        assert (running is stopper) is not restore
        assert running.early_stopping_patience_counter == expected


class Tally(TrainerCallback, ExportableState):
    """A stateful callback with constructor args (`tag`, `weight`) and an attribute (`total`)."""

    def __init__(self, tag: str = "new", weight: int = 1):
        self.tag, self.weight, self.total = tag, weight, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.total += self.weight

    def state(self) -> dict:
        return {"args": {"tag": self.tag, "weight": self.weight}, "attributes": {"total": self.total}}


class Dropped(Tally):
    """Saved in the checkpoint, absent from the resumed run."""


class ControlAtTrainBegin(TrainerCallback):
    def __init__(self):
        self.seen = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen = dataclasses.asdict(control)


@contextlib.contextmanager
def _warnings_of(*logger_names):
    """The warning messages of these loggers (transformers' own do not propagate to the root logger)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in logger_names]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield records
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def test_stateful_callbacks_resume_across_transformers_and_hf_lightning(tmp_path):
    """Checkpoints of either Trainer resumed by either one restore the same callbacks: rebuilt from their saved args
    with their saved attributes, two instances of one class in order, the saved TrainerControl, and a warning naming
    a saved callback the resumed run lacks."""
    impls = {"hf": (transformers.Trainer, transformers.TrainingArguments),
             "hl": (hf_lightning.Trainer, hf_lightning.TrainingArguments)}

    def trainer(key, out, callbacks):
        cls, args_cls = impls[key]
        args = args_cls(str(out), per_device_train_batch_size=4, max_steps=4, save_steps=2, logging_steps=1,
                        report_to="none", disable_tqdm=True, use_cpu=True, restore_callback_states_from_checkpoint=True)
        return cls(tiny_bert(), args=args, train_dataset=classification_dataset(16), callbacks=callbacks)

    for saver in impls:
        trainer(saver, tmp_path / saver, [Tally("a", 1), Tally("b", 10), Dropped("gone")]).train()
    outcomes = {}
    for saver in impls:
        for resumer in impls:
            control = ControlAtTrainBegin()
            resumed = trainer(resumer, tmp_path / f"{saver}-{resumer}", [Tally(), control, Tally()])
            with _warnings_of("transformers", "hf_lightning") as records:
                resumed.train(resume_from_checkpoint=str(tmp_path / saver / "checkpoint-2"))
            tallies = [(cb.tag, cb.weight, cb.total) for cb in resumed.callback_handler.callbacks
                       if isinstance(cb, Tally)]
            missing = [r.getMessage() for r in records if "not included in current configuration" in r.getMessage()]
            outcomes[saver, resumer] = (tallies, control.seen, missing)
    for key, (tallies, control_seen, missing) in outcomes.items():
        assert [tag for tag, _, _ in tallies] == ["a", "b"], key  # rebuilt from the saved args, in order
        assert control_seen["should_save"], key  # the TrainerControl as saved, in the middle of the save
        assert len(missing) == 1 and "Dropped" in missing[0], key
    # Either checkpoint resumes the same under both Trainers.
    assert outcomes["hf", "hl"] == outcomes["hf", "hf"]
    assert outcomes["hl", "hf"] == outcomes["hl", "hl"]
    # hf_lightning's checkpoint holds each instance's state at the save: 2 steps before it, 2 after the resume.
    # (transformers 5.24 appends every save's states to the list it started with, so its own checkpoint restores
    # several instances of one class from their states when training began.)
    assert outcomes["hl", "hl"][0] == [("a", 1, 4), ("b", 10, 40)]
