"""The CUDA-only switches (gpu_strategies.py, features.LigerKernel), tested where this machine can: the translation
into Lightning's DeepSpeedStrategy / FSDPStrategy, the one-line errors without CUDA, and that use_liger_kernel reaches
liger-kernel's apply function. Training itself runs in bench/gpu_strategies.sh on a GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import transformers

import hf_lightning
from hf_lightning import gpu_strategies
from hf_lightning.training_args import translate_arguments
from helpers import classification_dataset, lm_dataset, tiny_bert, tiny_llama

# transformers' own TrainingArguments(deepspeed=...) needs the package; it builds from source (pip install
# --no-build-isolation deepspeed), so it is an extra and not in `dev`.
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="the `deepspeed` extra is not installed")

AUTO = "auto"
ZERO2 = {
    "train_micro_batch_size_per_gpu": AUTO, "gradient_accumulation_steps": AUTO, "train_batch_size": AUTO,
    "gradient_clipping": AUTO, "bf16": {"enabled": AUTO},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": AUTO, "overlap_comm": True},
}
ZERO3_OFFLOAD = {
    "train_micro_batch_size_per_gpu": AUTO, "gradient_accumulation_steps": AUTO, "gradient_clipping": AUTO,
    "fp16": {"enabled": AUTO},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": AUTO, "stage3_prefetch_bucket_size": AUTO,
                          "stage3_param_persistence_threshold": AUTO,
                          "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}},
}


@pytest.fixture
def cuda(monkeypatch):
    """What a CUDA machine answers (also to transformers' bf16 check); everything past the checks is the real code."""
    monkeypatch.setattr(gpu_strategies, "_cuda", lambda: True)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)


@pytest.fixture(autouse=True)
def _no_deepspeed_config_left():
    """transformers keeps the last DeepSpeed config in a module global (from_pretrained reads ZeRO-3 from it)."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _finalized(args, model, max_steps):
    """The config Lightning's strategy holds once fitting starts (DeepSpeedAutoValues ran in a real lightning.Trainer)."""
    import lightning.pytorch as pl

    kwargs = translate_arguments(args)
    strategy = kwargs["strategy"]
    callback = next(cb for cb in kwargs["callbacks"] if isinstance(cb, gpu_strategies.DeepSpeedAutoValues))
    lightning_trainer = pl.Trainer(max_steps=max_steps, strategy=strategy, accelerator="cpu", devices=1, logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False)
    callback.setup(lightning_trainer, types.SimpleNamespace(model=model), "fit")
    return strategy, strategy.config


@needs_deepspeed
def test_deepspeed_is_refused_without_cuda_before_any_process_starts(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), deepspeed=ZERO2, report_to="none")
    with pytest.raises(ValueError, match=r"deepspeed=.*DeepSpeed needs CUDA") as err:
        hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))
    assert "\n" not in str(err.value)


@needs_deepspeed
def test_zero2_autos_are_filled_as_transformers_fills_them(tmp_path, cuda):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    args = hf_lightning.TrainingArguments(str(tmp_path), deepspeed=ZERO2, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=3, max_grad_norm=0.5, bf16=True,
                                          report_to="none")
    hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))  # accepted where CUDA is
    strategy, config = _finalized(args, tiny_bert(), max_steps=10)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 16 * 16, "overlap_comm": True}
    # hf_lightning's Lightning step is the whole accumulation window: Lightning (and DeepSpeed) own these two
    assert "gradient_accumulation_steps" not in config and "train_batch_size" not in config
    assert config["zero_allow_untested_optimizer"] is True
    assert ZERO2["zero_optimization"]["reduce_bucket_size"] == AUTO  # the user's dict is left alone


@needs_deepspeed
def test_zero3_offload_from_a_json_file(tmp_path, cuda):
    path = tmp_path / "ds_zero3.json"
    path.write_text(json.dumps(ZERO3_OFFLOAD))
    args = hf_lightning.TrainingArguments(str(tmp_path), deepspeed=str(path), per_device_train_batch_size=2,
                                          fp16=True, report_to="none")
    _, config = _finalized(args, tiny_llama(), max_steps=7)
    zero = config["zero_optimization"]
    hidden = 16
    assert zero["stage"] == 3
    assert zero["reduce_bucket_size"] == hidden * hidden
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    assert zero["stage3_param_persistence_threshold"] == 10 * hidden
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert config["fp16"] == {"enabled": True} and config["gradient_clipping"] == 1.0
    assert transformers.integrations.is_deepspeed_zero3_enabled()  # from_pretrained sees ZeRO-3, as transformers


@needs_deepspeed
def test_a_value_that_contradicts_training_arguments_is_transformers_error(tmp_path, cuda):
    args = hf_lightning.TrainingArguments(str(tmp_path), deepspeed={**ZERO2, "train_micro_batch_size_per_gpu": 2},
                                          per_device_train_batch_size=4, report_to="none")
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=2 vs hf per_device_train_batch_size=4"):
        _finalized(args, tiny_bert(), max_steps=3)


@needs_deepspeed
def test_deepspeed_optimizer_section_is_refused(tmp_path, cuda):
    config = {**ZERO2, "optimizer": {"type": "AdamW", "params": {"lr": AUTO}}}
    args = hf_lightning.TrainingArguments(str(tmp_path), deepspeed=config, report_to="none")
    with pytest.raises(ValueError, match="'optimizer' section"):
        hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))


@needs_deepspeed
def test_deepspeed_and_fsdp_together_are_refused(tmp_path, cuda, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = hf_lightning.TrainingArguments(str(tmp_path), deepspeed=ZERO2, report_to="none")
    with pytest.raises(ValueError, match="deepspeed and fsdp are both set"):
        hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))


@needs_deepspeed
def test_accelerate_launch_use_deepspeed_environment(tmp_path, cuda, monkeypatch):
    """`accelerate launch --use_deepspeed --zero_stage 3 --offload_optimizer_device cpu`: the environment it sets."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    args = hf_lightning.TrainingArguments(str(tmp_path), per_device_train_batch_size=2, report_to="none")
    assert gpu_strategies.uses_deepspeed(args)
    _, config = _finalized(args, tiny_bert(), max_steps=5)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["train_micro_batch_size_per_gpu"] == 2


# ---------------------------------------------------------------------- FSDP1


FSDP1_CONFIG = {"version": 1, "transformer_layer_cls_to_wrap": "BertLayer", "activation_checkpointing": True,
                "state_dict_type": "SHARDED_STATE_DICT", "backward_prefetch": "backward_pre"}


def test_hf_lightning_does_not_import_deepspeed_unless_asked(tmp_path):
    """deepspeed, once installed, warns at import ("Setting accelerator to CPU"); hf_lightning imports it only for
    deepspeed= (transformers' save_pretrained imports it through accelerate's unwrap_model whenever installed)."""
    code = ("import sys; sys.path.insert(0, 'tests'); import hf_lightning; from helpers import tiny_llama, lm_dataset; "
            "from hf_lightning.training_args import translate_arguments; "
            f"args = hf_lightning.TrainingArguments({str(tmp_path)!r}, fsdp=True, use_cpu=True, report_to='none'); "
            "t = hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(4)); "
            "translate_arguments(args, t.model); print('deepspeed' in sys.modules)")
    env = {**os.environ, "WORLD_SIZE": "1"}  # fsdp's launcher check, as torchrun -n 1 leaves it
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_fsdp1_is_refused_without_cuda(tmp_path):
    args = transformers.TrainingArguments(str(tmp_path), fsdp="full_shard", fsdp_config=dict(FSDP1_CONFIG),
                                          report_to="none")
    with pytest.raises(ValueError, match=r"fsdp_config version 1 \(FSDP1\) needs CUDA"):
        gpu_strategies.fsdp1_strategy(args, tiny_bert())


def test_fsdp1_translation(tmp_path, cuda):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy

    args = transformers.TrainingArguments(str(tmp_path), fsdp="shard_grad_op offload", fsdp_config=dict(FSDP1_CONFIG),
                                          report_to="none")
    model = tiny_bert()
    strategy = gpu_strategies.fsdp1_strategy(args, model)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert strategy.cpu_offload.offload_params is True
    layer = type(model.bert.encoder.layer[0])
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {layer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {layer}
    assert strategy._state_dict_type == "sharded"
    assert strategy.kwargs["backward_prefetch"] == BackwardPrefetch.BACKWARD_PRE
    assert strategy.kwargs["use_orig_params"] is True and strategy.kwargs["sync_module_states"] is True

    missing = transformers.TrainingArguments(str(tmp_path), fsdp="full_shard", report_to="none",
                                             fsdp_config={"version": 1, "transformer_layer_cls_to_wrap": "LlamaLayer"})
    with pytest.raises(ValueError, match=r"transformer_layer_cls_to_wrap'\] names 'LlamaLayer'.*BertLayer"):
        gpu_strategies.fsdp1_strategy(missing, model)


def test_accelerate_launch_fsdp_flags_of_the_guide(tmp_path, cuda, monkeypatch):
    """`accelerate launch --use_fsdp --fsdp_transformer_layer_cls_to_wrap BertLayer --fsdp_sharding_strategy 1
    --fsdp_state_dict_type FULL_STATE_DICT`: the environment accelerate.utils.launch sets for those flags."""
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "1",
           "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_MIN_NUM_PARAMS": "0",
           "FSDP_TRANSFORMER_CLS_TO_WRAP": "BertLayer", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
           "FSDP_FORWARD_PREFETCH": "false", "FSDP_USE_ORIG_PARAMS": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
           "FSDP_SYNC_MODULE_STATES": "true", "FSDP_ACTIVATION_CHECKPOINTING": "false"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from torch.distributed.fsdp import ShardingStrategy

    args = hf_lightning.TrainingArguments(str(tmp_path), report_to="none")
    gpu_strategies.apply_launcher_fsdp(args)
    assert args.fsdp is True
    assert args.fsdp_config["version"] == 1 and args.fsdp_config["transformer_layer_cls_to_wrap"] == ["BertLayer"]
    model = tiny_bert()
    strategy = gpu_strategies.fsdp1_strategy(args, model)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    # the named layer is wrapped (accelerate itself wraps nothing unless --fsdp_auto_wrap_policy is given too)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {type(model.bert.encoder.layer[0])}
    assert strategy._state_dict_type == "full" and strategy.cpu_offload.offload_params is False
    assert strategy.kwargs["use_orig_params"] is True
    # The run's strategy: the Trainer's args (fsdp from the launcher) translate to that FSDPStrategy
    trainer = hf_lightning.Trainer(model, args=hf_lightning.TrainingArguments(str(tmp_path), report_to="none"),
                                   train_dataset=classification_dataset(4))
    chosen = translate_arguments(trainer.args, model)["strategy"]
    # Lightning's FSDPStrategy, as hf_lightning's subclass that also resumes checkpoint-N folders
    assert isinstance(chosen, gpu_strategies.FolderFSDPStrategy)
    assert chosen.sharding_strategy == ShardingStrategy.FULL_SHARD


# ---------------------------------------------------------------------- lightning_trainer_kwargs={"strategy": ...}


def _given(tmp_path, strategy, **fields):
    return hf_lightning.TrainingArguments(str(tmp_path), report_to="none",
                                          lightning_trainer_kwargs={"strategy": strategy}, **fields)


def test_lightning_cuda_strategies_are_refused_on_cpu_naming_them(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    cases = [("deepspeed_stage_3_offload", r"strategy='deepspeed_stage_3_offload' is Lightning's DeepSpeedStrategy, "
              r"which needs CUDA.*fsdp=True"),
             ("fsdp_cpu_offload", r"strategy='fsdp_cpu_offload' is Lightning's FSDPStrategy \(FSDP1\), which needs "
              r"CUDA.*fsdp=True.*ModelParallelStrategy"),
             (FSDPStrategy(), r"strategy=<.*FSDPStrategy.*> is Lightning's FSDPStrategy \(FSDP1\), which needs CUDA")]
    for strategy, fragment in cases:
        with pytest.raises(ValueError, match=fragment) as err:
            hf_lightning.Trainer(tiny_bert(), args=_given(tmp_path, strategy), train_dataset=classification_dataset(4))
        assert "\n" not in str(err.value)


def test_save_only_model_with_load_best_model_at_end_is_refused_under_deepspeed(tmp_path):
    """transformers' own refusal: the best model would be read from an engine checkpoint that is not written."""
    args = _given(tmp_path, "deepspeed_stage_2", save_only_model=True, load_best_model_at_end=True,
                  eval_strategy="steps", save_strategy="steps")
    with pytest.raises(ValueError, match=r"save_only_model=True with load_best_model_at_end=True under DeepSp") as err:
        hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4),
                             eval_dataset=classification_dataset(4))
    assert "\n" not in str(err.value)


@needs_deepspeed
def test_lightning_deepspeed_name_gets_transformers_semantics(tmp_path, cuda):
    """A registry name: Lightning's DeepSpeedStrategy, its config given what TrainingArguments says (micro-batch,
    clipping by max_grad_norm in the engine), the accumulation window left to hf_lightning's step."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    args = _given(tmp_path, "deepspeed_stage_3_offload", per_device_train_batch_size=4, gradient_accumulation_steps=3,
                  max_grad_norm=0.5)
    hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))  # accepted where CUDA is
    kwargs = translate_arguments(args)
    strategy = kwargs["strategy"]
    assert isinstance(strategy, DeepSpeedStrategy) and gpu_strategies.is_deepspeed(strategy)
    config = strategy.config
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_clipping"] == 0.5
    assert "gradient_accumulation_steps" not in config and "train_batch_size" not in config
    assert any(isinstance(cb, gpu_strategies.DeepSpeedAutoValues) for cb in kwargs["callbacks"])
    # the subclass that also resumes checkpoint-N folders; generate() under it syncs the ranks (ZeRO-3)
    assert isinstance(strategy, gpu_strategies.FolderDeepSpeedStrategy) and gpu_strategies.zero3(strategy)
    assert transformers.integrations.is_deepspeed_zero3_enabled()


@needs_deepspeed
def test_lightning_deepspeed_object_with_auto_values(tmp_path, cuda):
    """DeepSpeedStrategy(config=...) with transformers' "auto" values: filled as deepspeed= fills them, a value that
    contradicts TrainingArguments is transformers' error."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    given = DeepSpeedStrategy(config=json.loads(json.dumps(ZERO2)))
    args = _given(tmp_path, given, per_device_train_batch_size=2, bf16=True)
    kwargs = translate_arguments(args)
    assert kwargs["strategy"] is given
    callback = next(cb for cb in kwargs["callbacks"] if isinstance(cb, gpu_strategies.DeepSpeedAutoValues))
    import lightning.pytorch as pl

    lightning_trainer = pl.Trainer(max_steps=4, strategy=given, accelerator="cpu", devices=1, logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False)
    callback.setup(lightning_trainer, types.SimpleNamespace(model=tiny_bert()), "fit")
    assert given.config["zero_optimization"]["reduce_bucket_size"] == 16 * 16
    assert given.config["gradient_clipping"] == 1.0 and given.config["bf16"] == {"enabled": True}
    assert given.config["train_micro_batch_size_per_gpu"] == 2

    contradicting = DeepSpeedStrategy(config={**ZERO2, "gradient_clipping": 0.3})
    kwargs = translate_arguments(_given(tmp_path, contradicting))
    callback = next(cb for cb in kwargs["callbacks"] if isinstance(cb, gpu_strategies.DeepSpeedAutoValues))
    with pytest.raises(ValueError, match="gradient_clipping=0.3 vs hf max_grad_norm=1.0"):
        callback.setup(lightning_trainer, types.SimpleNamespace(model=tiny_bert()), "fit")
    with pytest.raises(ValueError, match="deepspeed is set and lightning_trainer_kwargs strategy="):
        hf_lightning.Trainer(tiny_bert(), args=hf_lightning.TrainingArguments(
            str(tmp_path), deepspeed=ZERO2, report_to="none", lightning_trainer_kwargs={"strategy": "deepspeed"}))


def test_lightning_fsdp_name_is_lightnings_fsdp_strategy(tmp_path, cuda):
    from lightning.pytorch.strategies import FSDPStrategy

    args = _given(tmp_path, "fsdp_cpu_offload")
    hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))  # accepted where CUDA is
    strategy = translate_arguments(args)["strategy"]
    assert isinstance(strategy, FSDPStrategy) and strategy.cpu_offload.offload_params is True
    assert isinstance(strategy, gpu_strategies.FolderFSDPStrategy)  # also resumes checkpoint-N folders


# ---------------------------------------------------------------------- Liger


def test_liger_is_refused_without_cuda(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), use_liger_kernel=True, report_to="none")
    with pytest.raises(ValueError, match="use_liger_kernel=True: Liger's kernels are Triton GPU kernels") as err:
        hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(4))
    assert "\n" not in str(err.value)


def test_liger_switch_reaches_liger_kernels_apply_function(tmp_path, cuda, monkeypatch):
    """transformers' apply_liger_kernel runs for real; liger-kernel itself (Triton, GPU only) is stood in for by a
    module with its entry point, recording what it is given."""
    calls = []
    package = types.ModuleType("liger_kernel")
    liger_transformers = types.ModuleType("liger_kernel.transformers")
    liger_transformers._apply_liger_kernel_to_instance = lambda model, **config: calls.append((model, config))
    package.transformers = liger_transformers
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", liger_transformers)
    import transformers.integrations.liger as hf_liger

    monkeypatch.setattr(hf_liger, "is_liger_kernel_available", lambda: True)
    config = {"rope": False, "fused_linear_cross_entropy": True}
    args = hf_lightning.TrainingArguments(str(tmp_path), use_liger_kernel=True, liger_kernel_config=config,
                                          max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
    model = tiny_llama()
    hf_lightning.Trainer(model, args=args, train_dataset=lm_dataset(4)).train()
    assert calls == [(model, config)]
