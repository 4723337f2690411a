"""features.py: the TrainingArguments switches that are a Lightning callback each, chosen from the field table.

NEFTune is pinned in test_optimizers.py (noise only while training, hook removed after, also after an exception) and
activation checkpointing by a differential test in test_trainer.py; here: which switch gives which callback, and that
the cache emptying runs on transformers' steps inside a real run.
"""

from __future__ import annotations

import accelerate.utils.memory
import pytest

import hf_lightning
from hf_lightning.features import TF32, ActivationCheckpointing, EmptyDeviceCache, NEFTune, feature_callbacks
from hf_lightning.training_args import FIELD_POLICY, LIGHTNING, translate_arguments
from helpers import classification_dataset, tiny_bert


# translate_arguments also adds hf_lightning's checkpoint finder (checkpoint.py); these are the switches' own.
FEATURES = (NEFTune, ActivationCheckpointing, TF32, EmptyDeviceCache)


def _args(tmp_path, **kwargs):
    return hf_lightning.TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, **kwargs)


@pytest.mark.parametrize("field, value, callback", [
    ("neftune_noise_alpha", 5.0, NEFTune),
    ("activation_checkpointing", True, ActivationCheckpointing),
    ("gradient_checkpointing", True, ActivationCheckpointing),
    ("tf32", False, TF32),
    ("torch_empty_cache_steps", 3, EmptyDeviceCache),
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
