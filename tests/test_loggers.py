"""loggers.py: report_to → Lightning loggers (TensorBoard, CSV, MLflow, W&B, Logger instances)."""

from __future__ import annotations

import glob
import os

import pytest

import hf_lightning
from helpers import classification_dataset, tiny_bert

EVENTS = [
    "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
    "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_evaluate", "on_predict",
    "on_save", "on_log", "on_prediction_step", "on_push_begin",
]


def _args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=2, report_to="none", save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return hf_lightning.TrainingArguments(str(tmp_path), **base)


def test_report_to_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'hf-lightning[loggers]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = hf_lightning.Trainer(tiny_bert(), args=_args(tmp_path, max_steps=4, logging_steps=1,
                                                           report_to="tensorboard", run_name="tb-run"),
                                   train_dataset=classification_dataset(8))
    trainer.train()
    files = glob.glob(str(tmp_path / "runs" / "tb-run" / "events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(os.path.dirname(files[0]))
    acc.Reload()
    losses = acc.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    expected = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert [e.value for e in losses] == pytest.approx(expected, rel=1e-5)


def test_report_to_unknown_and_logger_instances(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    with pytest.raises(ValueError, match="report_to"):
        hf_lightning.Trainer(tiny_bert(), args=_args(tmp_path, report_to="comet_mlx"),
                             train_dataset=classification_dataset(4)).train()
    logger = CSVLogger(str(tmp_path / "mine"))
    trainer = hf_lightning.Trainer(tiny_bert(), args=_args(tmp_path, max_steps=2, logging_steps=1,
                                                           report_to=[logger]),
                                   train_dataset=classification_dataset(4))
    trainer.train()
    assert trainer.lightning_trainer.loggers == [logger]
    assert os.path.isfile(os.path.join(logger.log_dir, "metrics.csv"))


def test_report_to_mlflow_needs_a_store_chosen_by_the_user(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'hf-lightning[loggers]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI.*MLFLOW_ALLOW_FILE_STORE=true"):
        hf_lightning.Trainer(tiny_bert(), args=_args(tmp_path, report_to="mlflow"),
                             train_dataset=classification_dataset(8)).train()


def test_report_to_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'hf-lightning[loggers]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's choice: a local file store under output_dir

    trainer = hf_lightning.Trainer(tiny_bert(), args=_args(tmp_path, max_steps=3, logging_steps=1,
                                                           report_to="mlflow", run_name="mlflow-run"),
                                   train_dataset=classification_dataset(8))
    trainer.train()
    loggers = {type(lg).__name__: lg for lg in trainer.lightning_trainer.loggers}
    assert list(loggers) == ["MLFlowLogger"]
    mlflow_logger = loggers["MLFlowLogger"]
    history = MlflowClient(mlflow_logger._tracking_uri).get_metric_history(mlflow_logger.run_id, "loss")
    expected = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(expected, rel=1e-6)
    assert MlflowClient(mlflow_logger._tracking_uri).get_run(mlflow_logger.run_id).info.run_name == "mlflow-run"


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'hf-lightning[loggers]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trainer = hf_lightning.Trainer(tiny_bert(), args=_args(tmp_path, max_steps=3, logging_steps=1,
                                                           report_to="wandb", run_name="wandb-run"),
                                   train_dataset=classification_dataset(8))
    trainer.train()
    assert [type(lg).__name__ for lg in trainer.lightning_trainer.loggers] == ["WandbLogger"]
    # wandb ran offline (no network) and wrote the metrics into its local run file, which its service process writes
    # asynchronously, even after finish(): wait for it.
    import time

    import wandb

    wandb.finish()
    deadline, runs, content = time.time() + 60, [], b""
    while time.time() < deadline and not (b"grad_norm" in content and b"learning_rate" in content):
        time.sleep(0.5)
        runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
        content = open(runs[0], "rb").read() if len(runs) == 1 else b""
    assert len(runs) == 1
    assert b"grad_norm" in content and b"learning_rate" in content
