"""Checkpoints from the state of the CUDA-only strategies: DeepSpeed (Lightning's DeepSpeedStrategy) and FSDP1
(Lightning's FSDPStrategy). checkpoint.py calls these beside the FSDP2 path of sharding.py.

`checkpoint-N/` then holds what transformers.Trainer writes under accelerate, plus a consolidated model:

    DeepSpeed   model.safetensors     rank 0's save_pretrained of the whole model: ZeRO-1/2 hold it on every rank;
                                      ZeRO-3 gathers it (`_zero3_consolidated_16bit_state_dict`, the 16-bit weights
                                      accelerate's get_state_dict returns) when stage3_gather_16bit_weights_on_model_save
                                      is set, else rank 0 rebuilds the fp32 weights from the engine's files with
                                      DeepSpeed's zero_to_fp32 (where transformers writes no weights at all)
                global_stepN/, latest the engine's own checkpoint (`engine.save_checkpoint`, every rank its partition):
                                      weights, fp32 master weights and optimizer state; resumed with
                                      `engine.load_checkpoint`, as transformers' deepspeed_load_checkpoint does
    FSDP1       model.safetensors     gathered from the FSDP root (Lightning wraps the LightningModule) by torch's
                                      get_model_state_dict(full_state_dict=True, cpu_offload=True), written by rank 0
                optimizer_0/          the optimizer as a torch distributed checkpoint, as the FSDP2 path writes it
                                      (the transformers model's names: it resumes under FSDP2, DDP, one process)

The LightningModule is what both strategies wrap, so their names carry its `model.` prefix; the files do not.
"""

from __future__ import annotations

import os

from . import compat

PREFIX = "model."  # the transformers model's attribute on the LightningModule (module.TransformersModule.model)
LATEST = "latest"  # DeepSpeed's file naming the tag (global_stepN) of the newest engine checkpoint in a folder


def strategy_of(hooks):
    """The Lightning strategy a facade trains with, or None before a lightning.Trainer exists."""
    lightning_trainer = hooks.accelerator.lightning_trainer
    return None if lightning_trainer is None else lightning_trainer.strategy


def deepspeed_engine(strategy):
    """The DeepSpeedEngine of a DeepSpeedStrategy that has set up (None for other strategies, or before setup)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    import deepspeed

    engine = strategy.model
    return engine if isinstance(engine, deepspeed.DeepSpeedEngine) else None


def fsdp1_root(strategy):
    """The FullyShardedDataParallel root of a Lightning FSDPStrategy (it wraps the LightningModule), else None."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(strategy, FSDPStrategy):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = strategy.model
    return root if isinstance(root, FullyShardedDataParallel) else None


def has_engine_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, LATEST))


def _strip(state_dict: dict) -> dict:
    return {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}


def _is_peft(model) -> bool:
    from .adapters import peft_model

    return peft_model(model) is not None


# ---------------------------------------------------------------------- saving


def save_engine_checkpoint(strategy, model, folder: str) -> bool:
    """DeepSpeed: the engine's checkpoint (global_stepN/ + latest) into `folder`, every rank its partition; a PEFT
    model's frozen weights left out, as transformers does. False (nothing written) for other strategies."""
    engine = deepspeed_engine(strategy)
    if engine is None:
        return False
    engine.save_checkpoint(folder, exclude_frozen_parameters=_is_peft(model))
    return True


def full_state_dict(strategy, model, folder: str, engine_saved: bool = False) -> dict | None:
    """The consolidated weights (keys of `model`) on rank 0 and {} on the others, for the strategies whose `model`
    does not hold them whole: ZeRO-3 and FSDP1. None for any other strategy (the model's own state_dict is whole).
    Every rank must call it. ZeRO-3 without stage3_gather_16bit_weights_on_model_save reads the engine checkpoint
    in `folder`, writing it there first (as transformers' save_model does then) unless the caller just wrote it
    (`engine_saved`, the same on every rank)."""
    root = fsdp1_root(strategy)
    if root is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # offloading a root that computes on the CPU already makes torch's FSDP1 free memory it then reads (SIGSEGV)
        offload = root.compute_device.type != "cpu"
        return _strip(get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=offload)))
    engine = deepspeed_engine(strategy)
    if engine is None or not engine.zero_optimization_partition_weights():
        return None
    if engine.zero_gather_16bit_weights_on_model_save():
        weights = compat.zero3_consolidated_state_dict(engine, exclude_frozen_parameters=_is_peft(model))
        return _strip(weights) if weights is not None else {}
    # Not judged by a `latest` file in the folder: one left by an earlier save (save_model twice into output_dir)
    # holds older weights, and ranks that do not see rank 0's file (no shared disk) would skip a collective.
    if not engine_saved:
        save_engine_checkpoint(strategy, model, folder)
    strategy.barrier("hf_lightning.zero3_weights")
    if strategy.global_rank != 0:
        return {}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # the engine's module is the LightningModule: its checkpoint's names carry the prefix
    return _strip(get_fp32_state_dict_from_zero_checkpoint(folder))


def optimizer_root(strategy, model):
    """The module whose parameters' names torch's distributed state-dict functions use for the optimizer state:
    FSDP1's root, else the (FSDP2-sharded) model itself."""
    root = fsdp1_root(strategy)
    return model if root is None else root


def optimizer_prefix(module) -> str:
    """The prefix of the transformers model's parameter names among `module`'s: PREFIX for FSDP1's root (it wraps
    the LightningModule), none for the model itself (FSDP2, DDP, one process). The DCP optimizer folder holds the
    names without it, so that it moves between all of them."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return PREFIX if isinstance(module, FullyShardedDataParallel) else ""


# ---------------------------------------------------------------------- loading


def restores_state_dict_entry(strategy) -> bool:
    """Whether Lightning restores weights from the "state_dict" entry of the checkpoint a strategy's load_checkpoint
    returns. FSDPStrategy and ModelParallelStrategy override load_model_state_dict to do nothing, as DeepSpeedStrategy
    does but with load_full_weights under ZeRO-3 (Lightning 2.6.6): their checkpoint-N folders' weights go into the
    shards in load_checkpoint already, and a module.state_dict() there would gather the full weights on every rank
    (FSDP1) for nothing."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return bool(strategy.load_full_weights and strategy.zero_stage_3)
    return not isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def load_engine_checkpoint(strategy, model, folder: str, load_optimizer: bool = True) -> bool:
    """DeepSpeed: weights (and, with `load_optimizer`, the fp32 master weights and optimizer state) from the
    engine's checkpoint in `folder`, as transformers' deepspeed_load_checkpoint. False for other strategies."""
    engine = deepspeed_engine(strategy)
    if engine is None:
        return False
    if not has_engine_checkpoint(folder):
        raise ValueError(
            f"{folder} holds no DeepSpeed checkpoint ({LATEST} and global_stepN/), and this run trains under "
            "DeepSpeed, whose fp32 master weights and optimizer state come from there: resume a checkpoint written "
            "under DeepSpeed, or start this run from the folder's weights: from_pretrained(<folder>).")
    load_path, _ = engine.load_checkpoint(folder, load_optimizer_states=load_optimizer, load_lr_scheduler_states=False,
                                          load_module_strict=not _is_peft(model))
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint in {folder} (see its log above).")
    return True


def fsdp1_loader(strategy, model):
    """For FSDP1, a `load(model, state_dict)` putting consolidated weights (every rank holds them) into the shards,
    returning (missing, unexpected) in the model's names, the tied weights save_pretrained drops not missing.
    None for other strategies."""
    root = fsdp1_root(strategy)
    if root is None:
        return None
    import re

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    def load(_model, state_dict: dict):
        result = set_model_state_dict(root, {PREFIX + k: v for k, v in state_dict.items()},
                                      options=StateDictOptions(full_state_dict=True, strict=False))
        tied = compat.tied_weight_keys(model)
        missing = [k[len(PREFIX):] for k in result.missing_keys if k.startswith(PREFIX)]
        missing = [k for k in missing if not any(k == t or re.fullmatch(t, k) for t in tied)]
        unexpected = [k[len(PREFIX):] for k in result.unexpected_keys]
        return type(result)(missing, unexpected)

    return load
