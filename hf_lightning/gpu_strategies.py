"""The strategies that only run where CUDA is: DeepSpeed, FSDP1, and what `accelerate launch` sets for them.

    deepspeed= (path or dict)       lightning DeepSpeedStrategy(config=...): transformers' own HfTrainerDeepSpeedConfig
                                    fills the "auto" values (trainer_config_process when the TrainingArguments are made,
                                    trainer_config_finalize when fitting starts: DeepSpeedAutoValues)
    accelerate launch --use_deepspeed   the DeepSpeedPlugin transformers' TrainingArguments builds from the environment
    fsdp_config version 1 (FSDP1)   lightning FSDPStrategy: `fsdp1_strategy(args, model)`, for the FSDP code to call
    accelerate launch --use_fsdp    `launcher_fsdp_plugin_args()`: the FSDP_* environment read as accelerate's
                                    FullyShardedDataParallelPlugin reads it, in transformers' `fsdp_plugin_args` shape
    lightning_trainer_kwargs        `given_strategy()`: Lightning's DeepSpeed / FSDP names and objects
      {"strategy": ...}             ("deepspeed_stage_3", FSDPStrategy(...)); a DeepSpeed config completed as above

Lightning's DeepSpeedStrategy and FSDPStrategy refuse anything but CUDA, so on a machine without it each switch is a
one-line error at `Trainer(...)` time (`check_cuda_switches`), before any process starts.
"""

from __future__ import annotations

import copy
import functools
import os
from datetime import timedelta
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from .compat import no_split_modules


def _cuda() -> bool:
    return torch.cuda.is_available()


def uses_deepspeed(args) -> bool:
    """`deepspeed=` given, or `accelerate launch --use_deepspeed` (transformers then builds `args.deepspeed_plugin`)."""
    return bool(getattr(args, "deepspeed", None)) or getattr(args, "deepspeed_plugin", None) is not None


def check_cuda_switches(args, environ: Mapping[str, str] | None = None) -> None:
    """Refuse, naming the field, a switch this machine cannot run and a combination no strategy can."""
    environ = os.environ if environ is None else environ
    fsdp_on = bool(getattr(args, "fsdp", None)) or environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if uses_deepspeed(args) and fsdp_on:
        raise ValueError("TrainingArguments.deepspeed and fsdp are both set (or accelerate launch set both): choose one "
                         "sharded strategy, leave the other unset.")
    given = dict(getattr(args, "lightning_trainer_kwargs", None) or {}).get("strategy")
    if args.save_only_model and args.load_best_model_at_end and (uses_deepspeed(args) or is_deepspeed_class(given)):
        # as transformers: the best model is DeepSpeed's engine checkpoint, which save_only_model does not write
        raise ValueError("TrainingArguments.save_only_model=True with load_best_model_at_end=True under DeepSpeed: "
                         "the best model loads from the engine's checkpoint, which save_only_model leaves out; set "
                         "one of them to False.")
    if uses_deepspeed(args):
        source = f"deepspeed={args.deepspeed!r}" if args.deepspeed else "deepspeed (from accelerate launch)"
        if args.use_cpu or not _cuda():
            raise ValueError(f"TrainingArguments.{source}: DeepSpeed needs CUDA GPUs (Lightning's DeepSpeedStrategy "
                             "runs on CUDA only) and this run has none; remove `deepspeed`, or use fsdp (FSDP2 runs "
                             "on CPU).")
        config = deepspeed_config(args).config
        for section in ("optimizer", "scheduler"):
            if section in config:
                raise ValueError(f"TrainingArguments.deepspeed: the config's '{section}' section is not supported by "
                                 "hf_lightning: it builds transformers' optimizer and scheduler from TrainingArguments "
                                 f"(optim, learning_rate, lr_scheduler_type, ...); remove '{section}' from the config.")
    check_given_strategy(args)
    if getattr(args, "use_liger_kernel", False) and (args.use_cpu or not _cuda()):
        raise ValueError("TrainingArguments.use_liger_kernel=True: Liger's kernels are Triton GPU kernels and this run "
                         "has no CUDA device; set use_liger_kernel=False.")


# ---------------------------------------------------------------------- lightning_trainer_kwargs={"strategy": ...}


def _given_class(strategy) -> type | None:
    """The class of a strategy object, or the one Lightning's StrategyRegistry builds for a name (None: unknown)."""
    if not isinstance(strategy, str):
        return type(strategy)
    from lightning.pytorch.strategies import StrategyRegistry

    return StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None


def is_deepspeed_class(strategy) -> bool:
    """Whether a strategy name or object of lightning_trainer_kwargs is Lightning's DeepSpeedStrategy."""
    cls = _given_class(strategy) if strategy is not None else None
    return cls is not None and issubclass(cls, DeepSpeedStrategy)


def check_given_strategy(args) -> None:
    """A DeepSpeed / FSDP1 strategy (name or object) in lightning_trainer_kwargs, refused where it cannot run or where
    a TrainingArguments switch already chose the strategy; before any process starts."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = dict(getattr(args, "lightning_trainer_kwargs", None) or {}).get("strategy")
    cls = _given_class(strategy) if strategy is not None else None
    if strategy is not None and uses_deepspeed(args):
        raise ValueError(f"TrainingArguments.deepspeed is set and lightning_trainer_kwargs strategy={strategy!r} too: "
                         "remove one of them (or pass DeepSpeedStrategy(config=...) there and no deepspeed=).")
    if cls is None or not issubclass(cls, (DeepSpeedStrategy, FSDPStrategy)) or not (args.use_cpu or not _cuda()):
        return
    if issubclass(cls, DeepSpeedStrategy):
        raise ValueError(f"lightning_trainer_kwargs strategy={strategy!r} is Lightning's DeepSpeedStrategy, which "
                         "needs CUDA GPUs, and this run has none; on CPU use TrainingArguments(fsdp=True) (FSDP2).")
    raise ValueError(f"lightning_trainer_kwargs strategy={strategy!r} is Lightning's FSDPStrategy (FSDP1), which needs "
                     "CUDA GPUs, and this run has none; on CPU use FSDP2: TrainingArguments(fsdp=True), or strategy="
                     "ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1).")


def given_strategy(args, strategy) -> tuple[Any, list]:
    """The strategy of lightning_trainer_kwargs as hf_lightning runs it, and the callbacks it needs.

    A Lightning registry name of DeepSpeed or FSDP becomes its object (what Lightning would build); "model_parallel"
    is FSDP2 as fsdp=True runs it (sharding.py). A DeepSpeedStrategy's config gets transformers' "auto" values from
    the TrainingArguments for what it leaves unset (micro-batch size, gradient_clipping = max_grad_norm), as for
    deepspeed=: the engine then clips and accumulates as transformers does under DeepSpeed."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, StrategyRegistry

    if strategy == "model_parallel":
        from . import sharding

        return sharding.model_parallel_strategy(args), []
    cls = _given_class(strategy)
    if isinstance(strategy, str) and cls is not None and issubclass(cls, (DeepSpeedStrategy, FSDPStrategy)):
        # what Lightning builds for the name, as hf_lightning's subclass that also resumes checkpoint-N folders
        folder_cls = FolderDeepSpeedStrategy if issubclass(cls, DeepSpeedStrategy) else FolderFSDPStrategy
        strategy = folder_cls(**StrategyRegistry[strategy]["init_params"])
    if not isinstance(strategy, DeepSpeedStrategy):
        return strategy, []
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = copy.deepcopy(strategy.config)
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"lightning_trainer_kwargs strategy: the DeepSpeed config's '{section}' section is not "
                             "supported by hf_lightning: it builds transformers' optimizer and scheduler from "
                             f"TrainingArguments; remove '{section}' from the config.")
    for key in ("train_micro_batch_size_per_gpu", "gradient_clipping"):
        config.setdefault(key, "auto")
    hf_config = HfTrainerDeepSpeedConfig(config)
    hf_config.trainer_config_process(args)  # transformers' own filling, and its error on a contradicting value
    strategy.config.clear()
    strategy.config.update(lightning_deepspeed_config(hf_config))
    return strategy, [DeepSpeedAutoValues(args, hf_config)]


# ---------------------------------------------------------------------- DeepSpeed


def deepspeed_config(args):
    """transformers' HfTrainerDeepSpeedConfig of this run, its TrainingArguments-based "auto" values filled.

    `TrainingArguments(deepspeed=...)` made it already (`args.hf_deepspeed_config`); under `accelerate launch
    --use_deepspeed` it is made from accelerate's plugin as transformers' `propagate_args_to_deepspeed` does.
    """
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is None:
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        plugin = args.deepspeed_plugin
        hf_config = HfTrainerDeepSpeedConfig(plugin.deepspeed_config)
        hf_config.trainer_config_process(args)
        args.hf_deepspeed_config = hf_config  # as transformers keeps it: from_pretrained finds ZeRO-3 through it
    return hf_config


# Lightning sets these from its own loop (accumulate_grad_batches, its batch size); hf_lightning's Lightning step is a
# whole accumulation window, so the engine accumulates nothing: DeepSpeed derives train_batch_size from the rest.
_LIGHTNING_OWNED_KEYS = ("gradient_accumulation_steps", "train_batch_size")


def lightning_deepspeed_config(hf_config) -> dict:
    """The DeepSpeed config Lightning's DeepSpeedStrategy takes, from transformers' filled one."""
    config = copy.deepcopy(hf_config.config)
    for key in _LIGHTNING_OWNED_KEYS:
        config.pop(key, None)
    # transformers' optimizer is not one of DeepSpeed's own: transformers allows it the same way (deepspeed_optim_sched)
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def deepspeed_strategy(args):
    """Lightning's DeepSpeedStrategy for `deepspeed=`; the model-dependent "auto" values wait for DeepSpeedAutoValues."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return FolderDeepSpeedStrategy(config=lightning_deepspeed_config(deepspeed_config(args)),
                                   timeout=timedelta(seconds=args.ddp_timeout))


class FolderDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, which also resumes `fit(ckpt_path=<checkpoint-N folder>)`: its load_checkpoint
    reads only its own engine folders, past the CheckpointIO; a checkpoint-N folder goes through FolderCheckpointIO,
    whose weights come, with the optimizer state, from the engine checkpoint in it (gpu_checkpoints.py)."""

    reads_checkpoint_folders = True

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from . import sharding

        if not sharding.is_checkpoint_folder(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return sharding.load_checkpoint_folder(self, checkpoint_path, weights_only)


class FolderFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1), which also resumes `fit(ckpt_path=<checkpoint-N folder>)`: as
    sharding.FolderModelParallelStrategy, the folder's consolidated weights into the shards and its DCP optimizer
    folder into the optimizer, over the names of the FSDP root (the wrapped LightningModule)."""

    reads_checkpoint_folders = True

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from . import sharding

        if not sharding.is_checkpoint_folder(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return sharding.load_checkpoint_folder(self, checkpoint_path, weights_only, optimizer_model=self.model)


def zero3(strategy) -> bool:
    """Whether `strategy` is DeepSpeed ZeRO-3 (parameters partitioned: generate() needs synced_gpus)."""
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


class DeepSpeedAutoValues(pl.Callback):
    """transformers' `trainer_config_finalize` when fitting starts (the model and the number of steps are known):
    `zero_optimization.*` bucket sizes from the model's hidden size, `scheduler.params.total_num_steps`, the
    mismatches between the config and TrainingArguments refused. It runs before Lightning's strategy reads its config.
    """

    def __init__(self, args, hf_config=None):
        self.args = args
        self.hf_config = hf_config  # a lightning_trainer_kwargs DeepSpeedStrategy's (given_strategy); else deepspeed='s

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        hf_config = self.hf_config or deepspeed_config(self.args)
        hf_config.trainer_config_finalize(self.args, pl_module.model, trainer.max_steps)
        strategy_config = trainer.strategy.config
        strategy_config.clear()
        strategy_config.update(lightning_deepspeed_config(hf_config))


def is_deepspeed(strategy) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def micro_batch_sync(strategy, last: bool, skip_sync: bool):
    """The context one micro-batch's backward runs in. DeepSpeed: as accelerate's DeepSpeedEngineWrapper, the engine is
    told whether this micro-batch ends the window (its ZeRO stages reject DDP's no_sync); DDP: no_sync but the last."""
    if is_deepspeed(strategy):
        strategy.deepspeed_engine.set_gradient_accumulation_boundary(is_boundary=last)
        return None
    return strategy.block_backward_sync() if skip_sync else None


def engine_grad_norm(strategy):
    """DeepSpeed clips inside its step (`gradient_clipping`); the norm reported is the engine's, as accelerate's
    `clip_grad_norm_` returns it under DeepSpeed. None for other strategies."""
    if not is_deepspeed(strategy):
        return None
    grad_norm = strategy.deepspeed_engine.get_global_grad_norm()
    return grad_norm.item() if hasattr(grad_norm, "item") else grad_norm


# ---------------------------------------------------------------------- FSDP1 (fsdp_config version 1)


def _env_bool(environ: Mapping[str, str], name: str, default: str = "false") -> bool:
    from accelerate.utils import str_to_bool

    return str_to_bool(environ.get(name, default)) == 1


def launcher_fsdp_plugin_args(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """What `accelerate launch --use_fsdp ...` (flags or config file) put in the environment, read with the defaults
    of accelerate's FullyShardedDataParallelPlugin, in the shape of transformers' `args.fsdp_plugin_args`; None when
    accelerate did not ask for FSDP."""
    environ = os.environ if environ is None else environ
    if not _env_bool(environ, "ACCELERATE_USE_FSDP"):
        return None
    version = int(environ.get("FSDP_VERSION", "1"))
    if version == 1:
        sharding = environ.get("FSDP_SHARDING_STRATEGY", environ.get("FSDP_RESHARD_AFTER_FORWARD", "FULL_SHARD"))
    else:
        sharding = _env_bool(environ, "FSDP_RESHARD_AFTER_FORWARD", "true")
    plugin_args: dict[str, Any] = {
        "fsdp_version": version,
        "reshard_after_forward": sharding,
        "cpu_offload": _env_bool(environ, "FSDP_OFFLOAD_PARAMS"),
        # accelerate's plugin wraps nothing (NO_WRAP) unless --fsdp_auto_wrap_policy is given; the guide gives only
        # --fsdp_transformer_layer_cls_to_wrap, and a layer named to wrap is wrapped here rather than ignored
        "auto_wrap_policy": environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP"
                                        if environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") else "NO_WRAP").upper(),
        "min_num_params": int(environ.get("FSDP_MIN_NUM_PARAMS", "0")),
        "state_dict_type": environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT").upper(),
        "activation_checkpointing": _env_bool(environ, "FSDP_ACTIVATION_CHECKPOINTING"),
        "cpu_ram_efficient_loading": _env_bool(environ, "FSDP_CPU_RAM_EFFICIENT_LOADING"),
    }
    if "FSDP_TRANSFORMER_CLS_TO_WRAP" in environ:
        plugin_args["transformer_cls_names_to_wrap"] = environ["FSDP_TRANSFORMER_CLS_TO_WRAP"]
    if version == 1:
        plugin_args.update(
            backward_prefetch=environ.get("FSDP_BACKWARD_PREFETCH", "NO_PREFETCH").upper(),
            forward_prefetch=_env_bool(environ, "FSDP_FORWARD_PREFETCH"),
            use_orig_params=_env_bool(environ, "FSDP_USE_ORIG_PARAMS"),
            sync_module_states=_env_bool(environ, "FSDP_SYNC_MODULE_STATES"),
        )
    return plugin_args


def apply_launcher_fsdp(args, environ: Mapping[str, str] | None = None) -> None:
    """`accelerate launch --use_fsdp` without `fsdp=` in the script: the launcher's FSDP settings become the run's
    `fsdp`, `fsdp_config` and `fsdp_plugin_args`, as if the script had passed them, so that one translation serves
    both (transformers gets the same from accelerate's plugin, which reads this environment)."""
    plugin_args = launcher_fsdp_plugin_args(environ)
    if plugin_args is None or getattr(args, "fsdp", None):
        return
    config = {"version": plugin_args["fsdp_version"], "reshard_after_forward": plugin_args["reshard_after_forward"],
              "cpu_offload": plugin_args["cpu_offload"], "auto_wrap_policy": plugin_args["auto_wrap_policy"],
              "min_num_params": plugin_args["min_num_params"], "state_dict_type": plugin_args["state_dict_type"],
              "activation_checkpointing": plugin_args["activation_checkpointing"],
              "cpu_ram_efficient_loading": plugin_args["cpu_ram_efficient_loading"]}
    if "transformer_cls_names_to_wrap" in plugin_args:
        config["transformer_layer_cls_to_wrap"] = plugin_args["transformer_cls_names_to_wrap"].split(",")
    args.fsdp, args.fsdp_config, args.fsdp_plugin_args = True, config, plugin_args


def _layer_classes(model, names) -> set[type]:
    from accelerate.utils.dataclasses import get_module_class_from_name

    classes = set()
    for name in names:
        cls = get_module_class_from_name(model, name)
        if cls is None:
            raise ValueError(f"fsdp_config['transformer_layer_cls_to_wrap'] names {name!r}, which {type(model).__name__}"
                             " does not contain; name one of its layer classes (its _no_split_modules: "
                             f"{no_split_modules(model)}).")
        classes.add(cls)
    return classes


def _sharding_strategy(value) -> str:
    from accelerate.utils.constants import FSDP_SHARDING_STRATEGY

    text = str(value).upper()
    if text.isdigit():  # accelerate's numbering: 1 = FULL_SHARD ...
        text = FSDP_SHARDING_STRATEGY[int(text) - 1]
    if text not in FSDP_SHARDING_STRATEGY:
        raise ValueError(f"fsdp sharding strategy {value!r} is unknown; choose one of {FSDP_SHARDING_STRATEGY} "
                         "(or its number, 1-5, as accelerate launch --fsdp_sharding_strategy takes).")
    return text


_STATE_DICT_TYPES = {"FULL_STATE_DICT": "full", "SHARDED_STATE_DICT": "sharded"}


def check_fsdp1_device(args) -> None:
    if args.use_cpu or not _cuda():
        raise ValueError("TrainingArguments.fsdp_config version 1 (FSDP1) needs CUDA GPUs (Lightning's FSDPStrategy "
                         "refuses the CPU) and this run has none; set fsdp_config={'version': 2} (FSDP2 runs on CPU).")


def fsdp1_strategy(args, model, plugin_args: Mapping[str, Any] | None = None):
    """Lightning's FSDPStrategy for FSDP1: transformers' `args.fsdp_plugin_args` (or accelerate launch's, from
    `launcher_fsdp_plugin_args()`) mapped as accelerate's FullyShardedDataParallelPlugin maps them onto FSDP."""
    plugin_args = dict(plugin_args if plugin_args is not None else getattr(args, "fsdp_plugin_args", None) or {})
    check_fsdp1_device(args)
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import BackwardPrefetch
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    state_dict_type = str(plugin_args.get("state_dict_type", "FULL_STATE_DICT")).upper()
    if state_dict_type not in _STATE_DICT_TYPES:
        raise ValueError(f"fsdp_config['state_dict_type']={state_dict_type!r} is not supported with FSDP1 here; "
                         f"choose one of {sorted(_STATE_DICT_TYPES)}.")
    policy = str(plugin_args.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")).upper()
    layers = None
    auto_wrap_policy = None
    if policy == "TRANSFORMER_BASED_WRAP":
        names = plugin_args.get("transformer_cls_names_to_wrap")
        names = names.split(",") if isinstance(names, str) else names
        layers = _layer_classes(model, names if names is not None else no_split_modules(model))
        auto_wrap_policy = layers
    elif policy == "SIZE_BASED_WRAP" and int(plugin_args.get("min_num_params") or 0) > 0:
        auto_wrap_policy = functools.partial(size_based_auto_wrap_policy,
                                             min_num_params=int(plugin_args["min_num_params"]))
    checkpointed = None
    if plugin_args.get("activation_checkpointing"):
        # accelerate checkpoints the layers it wraps; with another wrap policy, the model's own layer classes
        checkpointed = layers or _layer_classes(model, no_split_modules(model))
    fsdp_kwargs: dict[str, Any] = {}
    prefetch = str(plugin_args.get("backward_prefetch", "NO_PREFETCH")).upper()
    if prefetch != "NO_PREFETCH":
        fsdp_kwargs["backward_prefetch"] = BackwardPrefetch[prefetch]
    for name in ("forward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers"):
        if name in plugin_args:
            fsdp_kwargs[name] = bool(plugin_args[name])
    return FolderFSDPStrategy(
        sharding_strategy=_sharding_strategy(plugin_args.get("reshard_after_forward", "FULL_SHARD")),
        cpu_offload=bool(plugin_args.get("cpu_offload", False)),
        auto_wrap_policy=auto_wrap_policy,
        activation_checkpointing_policy=checkpointed,
        state_dict_type=_STATE_DICT_TYPES[state_dict_type],
        timeout=timedelta(seconds=args.ddp_timeout),
        **fsdp_kwargs,
    )
