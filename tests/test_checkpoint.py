"""Checkpoints: transformers' folder layout, exact resume after a real SIGKILL, both formats, crash safety."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

import hf_lightning
from helpers import classification_dataset, tiny_bert

JOB = os.path.join(os.path.dirname(__file__), "jobs", "train_job.py")


def job(framework, out, *extra, expect_kill=False):
    proc = subprocess.run([sys.executable, JOB, framework, str(out), *map(str, extra)],
                          capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_weights(out):
    return safetensors.torch.load_file(os.path.join(out, "final", "model.safetensors"))


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    job("hl", root / "hl")
    job("hf", root / "hf")
    return root


def test_folder_layout_matches_transformers(uninterrupted):
    hl, hf = uninterrupted / "hl" / "checkpoint-4", uninterrupted / "hf" / "checkpoint-4"
    assert sorted(os.listdir(hl)) == sorted(os.listdir(hf) + ["lightning.ckpt"])
    hl_state = json.load(open(hl / "trainer_state.json"))
    hf_state = json.load(open(hf / "trainer_state.json"))
    assert hl_state.keys() == hf_state.keys()
    for key in ("global_step", "epoch", "max_steps", "save_steps", "logging_steps", "train_batch_size"):
        assert hl_state[key] == hf_state[key], key
    assert sorted(os.listdir(uninterrupted / "hl")) == sorted(os.listdir(uninterrupted / "hf"))
    ckpt = torch.load(hl / "lightning.ckpt", weights_only=False)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters"} <= set(ckpt)
    assert ckpt["hyper_parameters"]["training_args"]["gradient_accumulation_steps"] == 2
    assert "hf_lightning.TrainingFlow" in ckpt["callbacks"]
    # Final model = transformers' (same seed and data) to float tolerance; save_model() loads with from_pretrained.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(uninterrupted / "hl" / "final")
    reference = final_weights(uninterrupted / "hf")
    for name, value in model.state_dict().items():
        assert torch.allclose(value, reference[name], atol=1e-6), name


@pytest.mark.parametrize("kill_at,resume_from", [
    (2, "latest"),                              # mid-epoch (4 update steps per epoch), GA with a short window
    (4, "latest"),                              # epoch boundary
    (6, "checkpoint-6/lightning.ckpt"),         # mid-epoch, from the Lightning checkpoint file
])
def test_sigkill_then_resume_is_bitwise_exact(uninterrupted, tmp_path, kill_at, resume_from):
    out = tmp_path / "run"
    job("hl", out, "--kill-at-step", kill_at, expect_kill=True)
    assert os.path.isdir(out / f"checkpoint-{kill_at}")
    resume = resume_from if resume_from == "latest" else out / resume_from
    job("hl", out, "--resume", resume)
    assert_bitwise(final_weights(out), final_weights(uninterrupted / "hl"))


def test_transformers_resumes_our_folder_and_we_resume_its(uninterrupted, tmp_path):
    ours = tmp_path / "ours"
    shutil.copytree(uninterrupted / "hl" / "checkpoint-6", ours / "checkpoint-6")
    job("hf", ours, "--resume", "latest")
    theirs = tmp_path / "theirs"
    shutil.copytree(uninterrupted / "hf" / "checkpoint-6", theirs / "checkpoint-6")
    job("hl", theirs, "--resume", "latest")
    reference = final_weights(uninterrupted / "hf")
    for result in (final_weights(ours), final_weights(theirs)):
        for name, value in result.items():
            assert torch.allclose(value, reference[name], atol=1e-6), name


def test_killed_while_saving_never_leaves_a_partial_latest(uninterrupted, tmp_path):
    rng = random.Random(0)
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        # torch.save is called 3 times per checkpoint (optimizer, scheduler, rng) plus the Lightning file.
        job("hl", out, "--kill-in-save", rng.randint(5, 13), expect_kill=True)
        latest = transformers.trainer_utils.get_last_checkpoint(str(out))
        if latest is not None:
            assert {"model.safetensors", "trainer_state.json", "optimizer.pt", "lightning.ckpt"} <= set(os.listdir(latest))
        job("hl", out, "--resume", "latest" if latest else "")
        assert_bitwise(final_weights(out), final_weights(uninterrupted / "hl"))


def _trainer(tmp_path, **kw):
    options = dict(per_device_train_batch_size=4, max_steps=4, save_steps=2, report_to="none", disable_tqdm=True)
    options.update(kw)
    args = hf_lightning.TrainingArguments(str(tmp_path), **options)
    return hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(16))


def test_bad_checkpoints_get_clear_errors(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.train()
    folder = tmp_path / "run" / "checkpoint-2"
    with pytest.raises(ValueError, match="no checkpoint-N folder"):
        _trainer(tmp_path / "empty").train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="does not exist"):
        _trainer(tmp_path / "x").train(resume_from_checkpoint=str(tmp_path / "nope"))
    # Truncated optimizer file.
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    with open(broken / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="optimizer.pt"):
        _trainer(tmp_path / "y").train(resume_from_checkpoint=str(broken))
    # Another model.
    other = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, num_labels=2))
    args = hf_lightning.TrainingArguments(str(tmp_path / "z"), max_steps=4, report_to="none")
    with pytest.raises(ValueError, match="model.safetensors|does not fit"):
        hf_lightning.Trainer(other, args=args, train_dataset=classification_dataset(16)).train(
            resume_from_checkpoint=str(folder))
    # Another optimizer.
    with pytest.raises(ValueError, match="optimizer"):
        _trainer(tmp_path / "w", optim="sgd").train(resume_from_checkpoint=str(folder))


def test_save_errors_surface(tmp_path, monkeypatch):
    import errno

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    trainer = _trainer(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    # The failed save never became a checkpoint-N folder that resume_from_checkpoint=True would pick.
    assert transformers.trainer_utils.get_last_checkpoint(str(tmp_path)) is None


def test_best_model_and_total_limit(tmp_path):
    def metric(pred):
        return {"score": float(-abs(pred.predictions).mean())}

    args = hf_lightning.TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=4,
                                          eval_strategy="epoch", save_strategy="epoch", save_total_limit=1,
                                          load_best_model_at_end=True, metric_for_best_model="score",
                                          greater_is_better=True, report_to="none", disable_tqdm=True)
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(8),
                                   eval_dataset=classification_dataset(4), compute_metrics=metric)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.listdir(tmp_path).count(os.path.basename(best)) == 1
    assert [d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")] == [os.path.basename(best)]
    saved = safetensors.torch.load_file(os.path.join(best, "model.safetensors"))
    for name, value in trainer.model.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name


def test_model_rebuilt_from_the_lightning_checkpoint_alone(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    model = hf_lightning.model_from_lightning_checkpoint(str(tmp_path / "checkpoint-4" / "lightning.ckpt"))
    assert type(model) is type(trainer.model)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_save_options(tmp_path):
    # save_steps as a ratio of max_steps, save_only_model, no Lightning file.
    trainer = _trainer(tmp_path / "a", save_steps=0.5, save_only_model=True, save_lightning_checkpoint=False)
    trainer.train()
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoint-2", "checkpoint-4"]
    files = set(os.listdir(tmp_path / "a" / "checkpoint-2"))
    assert "model.safetensors" in files and not files & {"optimizer.pt", "scheduler.pt", "lightning.ckpt"}
    # save_strategy="best": a folder only when the metric improved.
    def metric(pred):
        metric.calls += 1
        return {"score": [0.5, 0.4, 0.6, 0.1][metric.calls - 1]}
    metric.calls = 0
    args = hf_lightning.TrainingArguments(str(tmp_path / "b"), per_device_train_batch_size=4, max_steps=4,
                                          eval_strategy="steps", eval_steps=1, save_strategy="best",
                                          metric_for_best_model="score", greater_is_better=True, report_to="none")
    hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(16),
                         eval_dataset=classification_dataset(4), compute_metrics=metric).train()
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-1", "checkpoint-3"]


def test_resumed_logs_match_the_uninterrupted_run(tmp_path):
    def args(out, **kw):
        return hf_lightning.TrainingArguments(str(out), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                                              num_train_epochs=3, save_steps=2, logging_steps=1, report_to="none",
                                              disable_tqdm=True, **kw)

    full = hf_lightning.Trainer(tiny_bert(), args=args(tmp_path / "full"), train_dataset=classification_dataset(20))
    full.train()
    resumed = hf_lightning.Trainer(tiny_bert(seed=5), args=args(tmp_path / "resumed"),
                                   train_dataset=classification_dataset(20))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))  # mid-epoch
    after = lambda h: [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}  # noqa: E731
                       for e in h if e["step"] > 2]
    assert after(resumed.state.log_history)[:-1] == after(full.state.log_history)[:-1]  # state.epoch included


def test_best_checkpoint_that_was_never_saved(tmp_path):
    def metric(pred):
        metric.calls += 1
        return {"score": [0.9, 0.1, 0.2, 0.3][metric.calls - 1]}

    outcome = {}
    for key, cls, args_cls in (("hf", transformers.Trainer, transformers.TrainingArguments),
                               ("hl", hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        metric.calls = 0
        args = args_cls(str(tmp_path / key), per_device_train_batch_size=2, max_steps=8, eval_strategy="steps",
                        eval_steps=2, save_steps=4, save_total_limit=1, metric_for_best_model="score",
                        greater_is_better=True, report_to="none", use_cpu=True)
        trainer = cls(tiny_bert(), args=args, train_dataset=classification_dataset(16),
                      eval_dataset=classification_dataset(4), compute_metrics=metric)
        trainer.train()
        outcome[key] = trainer
    assert outcome["hl"].state.best_model_checkpoint == outcome["hf"].state.best_model_checkpoint is None
    assert sorted(os.listdir(tmp_path / "hl")) == sorted(os.listdir(tmp_path / "hf"))



def test_plain_lightning_fit_with_ckpt_path(tmp_path):
    def args(out):
        return hf_lightning.TrainingArguments(str(out), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                                              num_train_epochs=3, save_steps=2, report_to="none", disable_tqdm=True,
                                              learning_rate=1e-2)

    full = hf_lightning.Trainer(tiny_bert(dropout=0.2), args=args(tmp_path / "full"),
                                train_dataset=classification_dataset(20))
    full.train()
    # 4 update steps per epoch: checkpoint-6 is mid-epoch, checkpoint-4 ends epoch 1.
    for name in ("checkpoint-6", "checkpoint-4"):
        other = hf_lightning.Trainer(tiny_bert(dropout=0.2, seed=9), args=args(tmp_path / name),
                                     train_dataset=classification_dataset(20))
        other.train()  # sets up the run; then continue it the Lightning way from a checkpoint of `full`
        other.lightning_trainer.fit(other.lightning_module, ckpt_path=str(tmp_path / "full" / name / "lightning.ckpt"))
        assert other.state.global_step == other.lightning_trainer.global_step == 12
        for key, value in full.model.state_dict().items():
            assert torch.equal(other.model.state_dict()[key], value), (name, key)

