"""Every private name of Lightning and transformers that hf_lightning relies on, in one place.

Each function here reaches one name that is not part of its library's public API, says why no public one does the
job, and is pinned by a test in tests/test_compat.py that fails when an upgrade moves it. Nothing else in the package
touches a `_`-name of another library.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

# ---------------------------------------------------------------------- Lightning


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The lightning.Trainer a LightningModule is attached to, or None (the public `.trainer` raises when detached)."""
    return module._trainer


def let_control_decide_validation(trainer: pl.Trainer, should_validate: Callable[..., bool]) -> None:
    """Lightning decides when to validate from `val_check_interval`; transformers' TrainerControl decides here, so the
    fit loop's epoch loop asks `should_validate` instead (its `_should_check_val_fx`, called after every batch)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if not hasattr(epoch_loop, "_should_check_val_fx"):
        raise RuntimeError("lightning's _TrainingEpochLoop no longer has `_should_check_val_fx`: update compat.py.")
    epoch_loop._should_check_val_fx = should_validate


def is_last_batch(trainer: pl.Trainer) -> bool:
    """Whether the batch just trained is the epoch's last one (Lightning knows it from its one-batch look-ahead)."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def move_fit_loop_to(trainer: pl.Trainer, global_step: int, epochs_trained: int) -> None:
    """Start Lightning's fit loop at a resumed epoch and optimizer step (what Lightning's own loop restore sets for a
    manual-optimization run; resumes from transformers' folders do not go through Lightning's ckpt_path)."""
    fit_loop = trainer.fit_loop
    for tracker in (fit_loop.epoch_progress.total, fit_loop.epoch_progress.current):
        tracker.ready = tracker.started = tracker.processed = tracker.completed = epochs_trained
    step_progress = fit_loop.epoch_loop.manual_optimization.optim_step_progress
    step_progress.total.ready = step_progress.total.completed = global_step


def mark_epoch_finished(checkpoint: dict) -> None:
    """Rewrite the fit-loop state of a Lightning checkpoint saved on an epoch's last batch into the state Lightning
    has once that epoch ended: its own restore of "mid-epoch, last batch" starts one epoch late. The loop state is a
    dict of progress counters plus the epoch loop's `_batches_that_stepped`."""
    fit_loop = checkpoint["loops"]["fit_loop"]
    epochs = fit_loop["epoch_progress"]
    for part in ("total", "current"):
        done = epochs[part]["ready"]
        epochs[part].update(ready=done, started=done, processed=done, completed=done)
    batches = fit_loop["epoch_loop.batch_progress"]
    total = batches["total"]["ready"]
    batches["total"].update(ready=total, started=total, processed=total, completed=total)
    batches["current"] = {key: 0 for key in batches["current"]}
    batches["is_last_batch"] = False
    epoch_loop_state = fit_loop.get("epoch_loop.state_dict", {})
    if "_batches_that_stepped" in epoch_loop_state:
        epoch_loop_state["_batches_that_stepped"] += 1


# ---------------------------------------------------------------------- torch


def unscales_in_step(optimizer) -> bool:
    """Whether an optimizer unscales fp16 gradients inside its own `step()` (torch's fused AdamW says so through
    `_step_supports_amp_scaling`, which GradScaler reads); Lightning then leaves the unscaling to it."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps it
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


# ---------------------------------------------------------------------- torch


def compiled_call(module: torch.nn.Module):
    """The compiled forward that `module.compile()` installed in place (None when not compiled): kept aside while
    the model evaluates inside fit, and dropped after training, since `nn.Module` has no public way to undo it."""
    return module._compiled_call_impl


def set_compiled_call(module: torch.nn.Module, call) -> None:
    module._compiled_call_impl = call


# ---------------------------------------------------------------------- transformers


def tied_weight_keys(model) -> set[str]:
    """Names (or patterns) of weights save_pretrained leaves out because they are tied to another one."""
    return set(getattr(model, "_tied_weights_keys", None) or {})


def no_split_modules(model) -> list[str]:
    """The layer classes a transformers model says must not be split across devices: the layers that accelerate's
    FSDP plugin wraps (and checkpoints) when none are named (its `set_auto_wrap_policy`)."""
    return list(getattr(model, "_no_split_modules", None) or [])


def resolved_tp_plan(model, tp_size: int) -> dict[str, str]:
    """The model's tensor-parallel plan with its `*` rules expanded to the concrete module/parameter names that
    transformers' `apply_tensor_parallelism` takes: what `from_pretrained(tp_plan=...)` computes in
    `_resolve_parallel_plans` (no public spelling; its public `resolve_parallel_plans` is deprecated and warns)."""
    from transformers.distributed import DistributedConfig

    tp_plan, _, _ = model._resolve_parallel_plans(DistributedConfig(tp_size=tp_size))
    return tp_plan


def settle_generation_config(model):
    """The model's generation config after a `generate()` in transformers' Seq2SeqTrainer.prediction_step: marked as
    no longer derived from the model config (`_from_model_config`), and with GenerationConfig's default parameters
    filled in where unset (`_get_default_generation_params`), in place, since the padding length reads `max_length`
    from it; there is no public spelling of either."""
    gen_config = model.generation_config
    if gen_config._from_model_config:
        gen_config._from_model_config = False
    gen_config.update(**gen_config._get_default_generation_params(), defaults_only=True)
    return gen_config


def transformers_push_from_checkpoint() -> Callable[[Any, str], None]:
    """transformers.Trainer._push_from_checkpoint, borrowed by hub.py: transformers' checkpoint push (which files go up,
    the commit messages, `last-checkpoint`, the skip while a push runs) has no public entry point."""
    from transformers.trainer import Trainer

    return Trainer._push_from_checkpoint


def mixed_mesh_grad_norm(model, max_norm: float):
    """transformers.Trainer._mixed_mesh_grad_norm: the gradient norm (and clip) when gradients live on different
    device meshes (tensor-parallel DTensors beside replicated tensors), which one clip_grad_norm_ cannot span. It reads
    only its arguments, so it runs without a transformers Trainer."""
    from transformers.trainer import Trainer

    return Trainer._mixed_mesh_grad_norm(None, model, max_norm)


def zero3_consolidated_state_dict(engine, exclude_frozen_parameters: bool = False) -> dict | None:
    """DeepSpeed ZeRO-3's whole 16-bit weights on rank 0 (None on the others), gathered one layer at a time: the
    engine's `_zero3_consolidated_16bit_state_dict`, which accelerate's get_state_dict and transformers' save_model
    call under ZeRO-3 too (DeepSpeed's public save_16bit_model only writes a pickle file). Every rank must call it."""
    return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=exclude_frozen_parameters)


def transformers_finish_current_push() -> Callable[[Any], None]:
    """transformers.Trainer._finish_current_push (wait for the push in progress), which ends transformers' train()."""
    from transformers.trainer import Trainer

    return Trainer._finish_current_push


@functools.lru_cache(maxsize=None)
def optimizer_lookup() -> Callable[[Any, Any], tuple[type, dict]]:
    """transformers.Trainer.get_optimizer_cls_and_kwargs without importing transformers.trainer (and accelerate, a
    visible part of start-up) where the release has the lookup in its own module (5.x's `trainer_optimizer`, whose handler table
    and context are private)."""
    import transformers

    try:
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS, OptimizerContext, _parse_optim_args
    except ImportError:
        return transformers.Trainer.get_optimizer_cls_and_kwargs

    def lookup(args, model=None):
        name = str(getattr(args.optim, "value", args.optim))
        optimizer_kwargs: dict[str, Any] = {"lr": args.learning_rate}
        if name == "galore_adafactor_layerwise":
            # transformers gives GaLoreAdafactor its fixed-lr settings for `galore_adafactor` only; the layer-wise
            # form then fails in its own lookup ("Cannot combine manual lr and relative_step=True").
            optimizer_kwargs.update(scale_parameter=False, relative_step=False)
        ctx = OptimizerContext(
            args=args,
            model=model,
            optimizer_kwargs=optimizer_kwargs,
            adam_kwargs={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
            optim_args=_parse_optim_args(args.optim_args),
        )
        handler = _OPTIMIZER_HANDLERS.get(args.optim)
        if handler is None:
            raise ValueError(f"TrainingArguments.optim={args.optim!r} is not an optimizer transformers knows.")
        return handler(ctx)

    return lookup


# ---------------------------------------------------------------------- Lightning's subprocess launcher (launch.py)


def subprocess_script_launcher() -> type:
    """Lightning's launcher that re-runs the script in each other process of a node (its "ddp" strategy's): there is
    no public way to give its children more environment than LOCAL_RANK/WORLD_SIZE/NODE_RANK, so launch.py subclasses
    it."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    return _SubprocessScriptLauncher


def set_launcher(strategy, launcher) -> None:
    """Install `launcher` on a strategy (its `launcher` property has no setter; the strategy configures its own)."""
    if not hasattr(strategy, "_launcher"):
        raise RuntimeError("lightning's strategies no longer keep `_launcher`: update compat.py.")
    strategy._launcher = launcher


def script_command() -> list[str]:
    """The command line Lightning's launcher re-runs the script with (`python script.py ARGS` or `python -m ...`)."""
    from lightning.fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd

    return list(_basic_subprocess_cmd())


def save_pretrained_weights(model, state_dict: dict) -> dict | None:
    """The tensors `model.save_pretrained(d, state_dict=state_dict)` writes to d/model.safetensors, for a writer that
    writes that file itself (background_save.DirectWriter): the state dict less the model's `_keys_to_ignore_on_save`,
    less its tied weights (transformers' `remove_tied_weights_from_state_dict`, which finds them by shared storage),
    with the weight conversions of loading reverted (`revert_weight_conversion`), in save_pretrained's order. There is
    no public spelling: save_pretrained writes the file itself. None where save_pretrained does more than that (a
    quantized, tensor-parallel, offloaded, adapter or wrapped model; more than one shard; a class with a
    save_pretrained of its own) or this transformers lacks a step: the caller lets save_pretrained write the file. tests/test_compat.py checks byte equality with its file."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import modeling_utils

    try:
        from transformers.core_model_loading import revert_weight_conversion
        remove_tied = modeling_utils.remove_tied_weights_from_state_dict
    except (ImportError, AttributeError):
        return None
    if (type(model).save_pretrained is not modeling_utils.PreTrainedModel.save_pretrained  # a subclass's own
            or getattr(model, "hf_quantizer", None) is not None or getattr(model, "_hf_peft_config_loaded", False)
            or getattr(model, "_tp_size", None) is not None or getattr(model, "hf_device_map", None) is not None
            or getattr(model.config, "distributed_config", None) is not None
            or getattr(modeling_utils, "IS_SAGEMAKER_MP_POST_1_10", False)
            or modeling_utils.unwrap_model(model) is not model):
        return None
    state_dict = dict(state_dict)
    for key in model._keys_to_ignore_on_save or ():
        state_dict.pop(key, None)
    state_dict = revert_weight_conversion(model, remove_tied(state_dict, model))
    if split_torch_state_dict_into_shards(state_dict, max_shard_size="50GB").is_sharded:  # save_pretrained's default
        return None
    return state_dict
