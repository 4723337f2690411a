"""features.py: the TrainingArguments switches that are a Lightning callback each, chosen from the field table.

NEFTune is pinned in test_optimizers.py (noise only while training, hook removed after, also after an exception) and
activation checkpointing by a differential test in test_trainer.py; here: which switch gives which callback, and that
the cache emptying runs on transformers' steps inside a real run, and that torch_compile trains like eager with the
uncompiled parameter names in its checkpoints (aot_eager: dynamo and AOTAutograd without inductor's codegen, 24 s cold
on two cores); inductor gave the same 20 losses within 6e-8 when run by hand.
"""

from __future__ import annotations

import hashlib
import os
import threading

import accelerate.utils.memory
import pytest
import safetensors
import torch

import hf_lightning
from hf_lightning import compat
from hf_lightning.features import TF32, ActivationCheckpointing, EmptyDeviceCache, NEFTune, TorchCompile, feature_callbacks
from hf_lightning.training_args import FIELD_POLICY, LIGHTNING, translate_arguments
from helpers import classification_dataset, tiny_bert


# translate_arguments also adds hf_lightning's checkpoint finder (checkpoint.py); these are the switches' own.
FEATURES = (NEFTune, ActivationCheckpointing, TF32, EmptyDeviceCache, TorchCompile)


def _args(tmp_path, **kwargs):
    return hf_lightning.TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True,
                                          **{"save_strategy": "no", **kwargs})


@pytest.mark.parametrize("field, value, callback", [
    ("neftune_noise_alpha", 5.0, NEFTune),
    ("activation_checkpointing", True, ActivationCheckpointing),
    ("gradient_checkpointing", True, ActivationCheckpointing),
    ("tf32", False, TF32),
    ("torch_empty_cache_steps", 3, EmptyDeviceCache),
    ("torch_compile", True, TorchCompile),
    # a backend or a mode alone switch torch_compile on, as in transformers
    ("torch_compile_backend", "eager", TorchCompile),
    ("torch_compile_mode", "reduce-overhead", TorchCompile),
])
def test_each_switch_adds_its_callback_to_the_lightning_trainer(tmp_path, field, value, callback):
    assert FIELD_POLICY[field][0] == LIGHTNING
    assert feature_callbacks(_args(tmp_path)) == []
    kwargs = translate_arguments(_args(tmp_path, **{field: value}))
    assert [type(cb) for cb in kwargs["callbacks"] if isinstance(cb, FEATURES)] == [callback]


def test_user_lightning_callbacks_in_lightning_trainer_kwargs_are_kept(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor

    monitor = LearningRateMonitor()
    kwargs = translate_arguments(_args(tmp_path, neftune_noise_alpha=1.0,
                                       lightning_trainer_kwargs={"callbacks": [monitor]}))
    kept = [type(cb) for cb in kwargs["callbacks"] if isinstance(cb, (*FEATURES, LearningRateMonitor))]
    assert kept == [NEFTune, LearningRateMonitor]


def test_empty_cache_runs_every_n_steps_before_the_backward(tmp_path, monkeypatch):
    calls = []
    trainer_ref = {}
    monkeypatch.setattr(accelerate.utils.memory, "clear_device_cache",
                        lambda *a, **k: calls.append(trainer_ref["t"].state.global_step))
    trainer = hf_lightning.Trainer(
        tiny_bert(), args=_args(tmp_path, max_steps=7, torch_empty_cache_steps=3, gradient_accumulation_steps=2,
                                per_device_train_batch_size=2),
        train_dataset=classification_dataset(40),
    )
    trainer_ref["t"] = trainer
    trainer.train()
    # transformers empties the cache in every micro-batch of the steps whose global_step % 3 == 0 (0, 3, 6).
    assert calls == [0, 0, 3, 3, 6, 6]


def _compile_run(tmp_path, name, **kwargs):
    """20 steps of a tiny BERT; records which (training, inside torch.compile) pairs its forwards ran as (a set, so
    that the recording itself does not make dynamo recompile at every step)."""
    model = tiny_bert()
    traced = set()
    model.register_forward_pre_hook(lambda module, _: traced.add((module.training, torch.compiler.is_compiling())))
    trainer = hf_lightning.Trainer(
        model, args=_args(tmp_path / name, max_steps=20, logging_steps=1, per_device_train_batch_size=4,
                          save_strategy="steps", save_steps=10, eval_strategy="steps", eval_steps=10, **kwargs),
        train_dataset=classification_dataset(40), eval_dataset=classification_dataset(8, seed=1),
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return trainer, losses, traced


def test_torch_compile_trains_like_eager_and_checkpoints_uncompiled_names(tmp_path):
    _, eager, eager_traced = _compile_run(tmp_path, "eager")
    # aot_eager runs dynamo and AOTAutograd (the compiled forward and backward) without inductor's codegen.
    trainer, compiled, traced = _compile_run(tmp_path, "compiled", torch_compile_backend="aot_eager")
    # training forwards compiled, the evaluations at steps 10 and 20 not (transformers evaluates self.model)
    assert eager_traced == {(True, False), (False, False)} and traced == {(True, True), (False, False)}
    assert len(compiled) == 20 and compiled == pytest.approx(eager, abs=1e-4)
    # the user's model object, uncompiled again after training; its names are the ones saved
    assert compat.compiled_call(trainer.model) is None
    names = set(tiny_bert().state_dict())
    with safetensors.safe_open(str(tmp_path / "compiled" / "checkpoint-10" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved and saved <= names and not any("_orig_mod" in n for n in saved)
    optimizer_state = torch.load(tmp_path / "compiled" / "checkpoint-10" / "optimizer.pt", weights_only=True)
    assert len(optimizer_state["state"]) == len(list(tiny_bert().parameters()))

    resumed = hf_lightning.Trainer(
        tiny_bert(), args=_args(tmp_path / "compiled", max_steps=20, logging_steps=1, per_device_train_batch_size=4,
                                torch_compile_backend="aot_eager"),
        train_dataset=classification_dataset(40),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "compiled" / "checkpoint-10"))
    tail = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 10]
    assert tail == pytest.approx(compiled[10:], abs=1e-4)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread states from Linux's /proc")
def test_exit_handler_waits_for_running_threads():
    """The process group's exit handler returns only once no other thread is runnable: a gloo worker still releasing
    a finished collective's tensors when the interpreter shuts down aborts the process (the FSDP2 jobs of
    test_sharding.py assert that no rank prints "terminate called")."""
    from hf_lightning.features import wait_for_idle_threads

    stop = threading.Event()

    def spin():  # hashing a large buffer runs without the GIL, as a collective's worker thread does
        data = b"x" * 10_000_000
        while not stop.is_set():
            hashlib.sha256(data)

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        assert wait_for_idle_threads(0.3) is False
    finally:
        stop.set()
        worker.join()
    assert wait_for_idle_threads(2.0) is True
