"""`TrainingArguments`: transformers' own dataclass, plus the one table that says what happens to each field.

Every field of `transformers.TrainingArguments` is in `FIELD_POLICY`, classified as

* ``HONOURED``    – the facade implements transformers' semantics for it (the loop, logging, eval, saving ...);
* ``LIGHTNING``   – translated into an argument of `lightning.Trainer` by `translate_arguments`;
* ``UNSUPPORTED`` – not supported yet: a non-default value raises a `ValueError` naming the field.

"What happens to `eval_steps`?" is answered by reading this file. A transformers release that adds a field fails
`tests/test_training_args.py` until the field is classified here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import transformers

from . import launch, sharding, tensor_parallel
from .features import feature_callbacks
from .gpu_strategies import DeepSpeedAutoValues, check_cuda_switches, deepspeed_strategy, given_strategy, uses_deepspeed

HONOURED = "honoured"
LIGHTNING = "lightning"
UNSUPPORTED = "unsupported"

# field name -> (policy, where / why). Order follows transformers' own dataclass.
FIELD_POLICY: dict[str, tuple[str, str]] = {
    "output_dir": (HONOURED, "checkpoint-N folders, save_model(), Lightning's default_root_dir"),
    "per_device_train_batch_size": (HONOURED, "train DataLoader batch size"),
    "num_train_epochs": (HONOURED, "max_steps = ceil(epochs * update steps per epoch), as transformers"),
    "max_steps": (HONOURED, "lightning.Trainer(max_steps=...) and TrainerState.max_steps"),
    "learning_rate": (HONOURED, "optimizer lr (transformers' optimizer lookup)"),
    "lr_scheduler_type": (HONOURED, "transformers.get_scheduler, stepped once per update step (reduce_lr_on_plateau / "
                                    "greedy: on metric_for_best_model after each evaluation)"),
    "lr_scheduler_kwargs": (HONOURED, "transformers.get_scheduler(scheduler_specific_kwargs=...)"),
    "warmup_steps": (HONOURED, "args.get_warmup_steps (int or ratio)"),
    "optim": (HONOURED, "transformers.Trainer.get_optimizer_cls_and_kwargs"),
    "optim_args": (HONOURED, "transformers.Trainer.get_optimizer_cls_and_kwargs"),
    "weight_decay": (HONOURED, "decay / no-decay parameter groups as transformers"),
    "adam_beta1": (HONOURED, "optimizer kwargs"),
    "adam_beta2": (HONOURED, "optimizer kwargs"),
    "adam_epsilon": (HONOURED, "optimizer kwargs"),
    "optim_target_modules": (HONOURED, "transformers' optimizer lookup (GaLore, APOLLO)"),
    "gradient_accumulation_steps": (HONOURED, "one Lightning batch = one window of micro-batches; num_items_in_batch"),
    "average_tokens_across_devices": (HONOURED, "num_items_in_batch summed over processes"),
    "max_grad_norm": (HONOURED, "clip_grad_norm_ in on_before_optimizer_step (after unscaling), grad_norm logged"),
    "label_smoothing_factor": (HONOURED, "transformers' LabelSmoother in compute_loss"),
    "bf16": (LIGHTNING, "precision='bf16-mixed'"),
    "fp16": (LIGHTNING, "precision='16-mixed'"),
    "bf16_full_eval": (LIGHTNING, "features.FullEvalCast callback: evaluate()/predict() cast the model to bfloat16"),
    "fp16_full_eval": (LIGHTNING, "features.FullEvalCast callback: evaluate()/predict() cast the model to float16"),
    "tf32": (LIGHTNING, "features.TF32 callback: torch.backends.cuda.matmul / cudnn allow_tf32"),
    "activation_checkpointing": (LIGHTNING, "features.ActivationCheckpointing callback: gradient_checkpointing_enable"),
    "activation_checkpointing_kwargs": (LIGHTNING, "features.ActivationCheckpointing callback"),
    "gradient_checkpointing": (LIGHTNING, "deprecated alias of activation_checkpointing"),
    "gradient_checkpointing_kwargs": (LIGHTNING, "deprecated alias of activation_checkpointing_kwargs"),
    "torch_compile": (LIGHTNING, "features.TorchCompile callback: the training forward compiled in place "
                      "(nn.Module.compile), parameter names unchanged"),
    "torch_compile_backend": (LIGHTNING, "features.TorchCompile callback (sets torch_compile, as transformers)"),
    "torch_compile_mode": (LIGHTNING, "features.TorchCompile callback (sets torch_compile, as transformers)"),
    "use_liger_kernel": (LIGHTNING, "features.LigerKernel callback: transformers' apply_liger_kernel when fitting "
                         "starts (the `kernels` extra); refused without CUDA (Triton GPU kernels)"),
    "liger_kernel_config": (LIGHTNING, "features.LigerKernel callback: liger-kernel's "
                            "_apply_liger_kernel_to_instance(model=..., **liger_kernel_config)"),
    "use_cache": (HONOURED, "model.config.use_cache"),
    "neftune_noise_alpha": (LIGHTNING, "features.NEFTune callback: transformers' noise hook while fitting"),
    "torch_empty_cache_steps": (LIGHTNING, "features.EmptyDeviceCache callback: cache emptied every N steps"),
    "auto_find_batch_size": (HONOURED, "train() retried at a smaller batch on out-of-memory (transformers' "
                             "find_executable_batch_size); TrainerState.train_batch_size restored on resume"),
    "logging_strategy": (HONOURED, "DefaultFlowCallback sets should_log"),
    "logging_steps": (HONOURED, "TrainerState.logging_steps (int or ratio)"),
    "logging_first_step": (HONOURED, "DefaultFlowCallback"),
    "log_on_each_node": (HONOURED, "args.get_process_log_level()"),
    "logging_nan_inf_filter": (HONOURED, "nan/inf step losses replaced by the running mean, on the device"),
    "include_num_input_tokens_seen": (HONOURED, "TrainerState.num_input_tokens_seen"),
    "log_level": (HONOURED, "verbosity of transformers, datasets, lightning and hf_lightning loggers"),
    "log_level_replica": (HONOURED, "verbosity on replicas"),
    "disable_tqdm": (LIGHTNING, "enable_progress_bar=False"),
    "report_to": (LIGHTNING, "Lightning loggers: tensorboard, csv, mlflow, wandb"),
    "run_name": (LIGHTNING, "logger name / version"),
    "project": (LIGHTNING, "wandb / mlflow project name"),
    "trackio_space_id": (UNSUPPORTED, "trackio is not a Lightning logger"),
    "trackio_bucket_id": (UNSUPPORTED, "trackio is not a Lightning logger"),
    "trackio_static_space_id": (UNSUPPORTED, "trackio is not a Lightning logger"),
    "eval_strategy": (HONOURED, "DefaultFlowCallback sets should_evaluate; Lightning's validation loop runs it"),
    "eval_steps": (HONOURED, "TrainerState.eval_steps (int or ratio, defaults to logging_steps)"),
    "eval_delay": (HONOURED, "DefaultFlowCallback"),
    "per_device_eval_batch_size": (HONOURED, "eval DataLoader batch size"),
    "prediction_loss_only": (HONOURED, "prediction_step"),
    "eval_on_start": (HONOURED, "an evaluation right after on_train_begin"),
    "eval_do_concat_batches": (HONOURED, "transformers' EvalLoopContainer"),
    "eval_use_gather_object": (HONOURED, "under DDP each process evaluates its shard; results gathered with "
                               "accelerator.gather_for_metrics(use_gather_object=)"),
    "eval_accumulation_steps": (HONOURED, "predictions moved to CPU every N eval batches"),
    "include_for_metrics": (HONOURED, "EvalPrediction(inputs=..., losses=...)"),
    "batch_eval_metrics": (HONOURED, "compute_metrics(..., compute_result=) per batch"),
    "save_only_model": (HONOURED, "checkpoint folders without optimizer/scheduler/rng"),
    "save_strategy": (HONOURED, "DefaultFlowCallback sets should_save; checkpoint-N folders"),
    "save_steps": (HONOURED, "TrainerState.save_steps (int or ratio)"),
    "save_on_each_node": (HONOURED, "args.should_save"),
    "save_total_limit": (HONOURED, "oldest checkpoint folders rotated, the best one kept"),
    "enable_jit_checkpoint": (HONOURED, "on SIGTERM: checkpoint-N of the last finished step, then exit 143"),
    "push_to_hub": (HONOURED, "hub.py: transformers' init_hf_repo / _push_from_checkpoint / push_to_hub on each save "
                    "(background upload_folder futures; failures logged, training goes on); save_model() pushes"),
    "hub_token": (HONOURED, "create_repo / upload_folder(token=...); None: huggingface_hub's HF_TOKEN or saved login"),
    "hub_private_repo": (HONOURED, "create_repo(private=...)"),
    "hub_model_id": (HONOURED, "the repository (default: output_dir's name in the token's namespace)"),
    "hub_strategy": (HONOURED, "end / every_save / checkpoint (last-checkpoint/) / all_checkpoints, as transformers"),
    "hub_always_push": (HONOURED, "push even while the previous push runs (else that save's push is skipped, logged)"),
    "hub_revision": (HONOURED, "upload_folder(revision=...): the branch pushed to"),
    "load_best_model_at_end": (HONOURED, "best checkpoint's weights loaded after training"),
    "metric_for_best_model": (HONOURED, "TrainerState.best_metric / best_global_step"),
    "greater_is_better": (HONOURED, "best metric comparison"),
    "ignore_data_skip": (HONOURED, "resume without skipping consumed batches"),
    "restore_callback_states_from_checkpoint": (HONOURED, "stateful callbacks restored on resume"),
    "full_determinism": (HONOURED, "transformers.enable_full_determinism"),
    "seed": (HONOURED, "transformers.set_seed in __init__ and train()"),
    "data_seed": (HONOURED, "seed of the shuffling sampler"),
    "use_cpu": (LIGHTNING, "accelerator='cpu'"),
    "accelerator_config": (HONOURED, "data.py samplers/shards (split_batches, even_batches, use_seedable_sampler); "
                           "gradient_accumulation_kwargs num_steps / sync_each_batch; non_blocking (Lightning copies "
                           "to accelerators non-blocking anyway); other sub-fields refused by check_accelerator_config"),
    "parallelism_config": (LIGHTNING, "tensor_parallel.py: tp_size (the model's tp plan) and dp_shard_size (FSDP2) "
                           "→ ModelParallelStrategy; dp_replicate_size/cp_size/sp_size refused"),
    "dataloader_drop_last": (HONOURED, "DataLoader(drop_last=...)"),
    "dataloader_num_workers": (HONOURED, "DataLoader(num_workers=...)"),
    "dataloader_pin_memory": (HONOURED, "DataLoader(pin_memory=...)"),
    "dataloader_persistent_workers": (HONOURED, "DataLoader(persistent_workers=...)"),
    "dataloader_prefetch_factor": (HONOURED, "DataLoader(prefetch_factor=...)"),
    "dataloader_multiprocessing_context": (HONOURED, "DataLoader(multiprocessing_context=...)"),
    "dataloader_in_order": (HONOURED, "DataLoader(in_order=...)"),
    "remove_unused_columns": (HONOURED, "columns the model's forward does not take are dropped"),
    "label_names": (HONOURED, "prediction_step labels"),
    "train_sampling_strategy": (HONOURED, "random / sequential / group_by_length ('batch_rebalance' refused)"),
    "length_column_name": (HONOURED, "group_by_length lengths"),
    "ddp_find_unused_parameters": (LIGHTNING, "DDPStrategy(find_unused_parameters=...)"),
    "ddp_bucket_cap_mb": (LIGHTNING, "DDPStrategy(bucket_cap_mb=...)"),
    "ddp_broadcast_buffers": (LIGHTNING, "DDPStrategy(broadcast_buffers=...)"),
    "ddp_static_graph": (LIGHTNING, "DDPStrategy(static_graph=...)"),
    "ddp_backend": (LIGHTNING, "DDPStrategy(process_group_backend=...)"),
    "ddp_timeout": (LIGHTNING, "DDPStrategy(timeout=...)"),
    "fsdp": (LIGHTNING, "sharding.fsdp_strategy: FSDP2 (fully_shard) on ModelParallelStrategy; FSDP1 "
             "(fsdp_config version 1) gpu_strategies.fsdp1_strategy, CUDA only"),
    "fsdp_config": (LIGHTNING, "sharding.py: version 2, wrap classes, reshard_after_forward, cpu_offload, "
                    "activation_checkpointing, cpu_ram_efficient_loading; state_dict_type FULL_STATE_DICT"),
    "deepspeed": (LIGHTNING, "gpu_strategies: DeepSpeedStrategy(config=...) with transformers' \"auto\" values "
                  "(HfTrainerDeepSpeedConfig); refused without CUDA (Lightning's DeepSpeed runs on CUDA only)"),
    "debug": (LIGHTNING, "features.UnderflowOverflow callback ('underflow_overflow'); 'tpu_metrics_debug' refused"),
    "skip_memory_metrics": (HONOURED, "transformers' TrainerMemoryTracker (run.MemoryMetrics): *_mem_* metrics"),
    "do_train": (HONOURED, "read by scripts, not by the Trainer (as transformers)"),
    "do_eval": (HONOURED, "read by scripts, not by the Trainer (as transformers)"),
    "do_predict": (HONOURED, "read by scripts, not by the Trainer (as transformers)"),
    "resume_from_checkpoint": (HONOURED, "read by scripts, not by the Trainer (as transformers)"),
    "local_rank": (LIGHTNING, "set by the launcher; Lightning reads the environment"),
    # Added by hf_lightning.TrainingArguments:
    "lightning_trainer_kwargs": (LIGHTNING, "passed to lightning.Trainer (plugins, profiler, strategy options ...)"),
    "save_lightning_checkpoint": (HONOURED, "export: checkpoint-N/lightning.ckpt written beside the HF files"),
    # Seq2SeqTrainingArguments (hf_lightning/seq2seq.py):
    "sortish_sampler": (HONOURED, "as transformers 5.24: no sampler reads it (a warning says so when set)"),
    "predict_with_generate": (HONOURED, "Seq2SeqTrainer.prediction_step generates (steps.generation_step)"),
    "generation_max_length": (HONOURED, "generate(max_length=) in evaluate/predict and in-training evaluations"),
    "generation_num_beams": (HONOURED, "generate(num_beams=) in evaluate/predict and in-training evaluations"),
    "generation_config": (HONOURED, "Seq2SeqTrainer sets model.generation_config (transformers' loader)"),
    "async_save": (HONOURED, "background_save.BackgroundSave: files written, flushed and renamed in by a thread"),
}

# Values that are refused although they are legal for transformers.
REFUSED_VALUES: dict[str, tuple[Any, ...]] = {"train_sampling_strategy": ("batch_rebalance",)}

# transformers' own lightning-free building blocks decide these; we check them but never touch them.
_DEFAULTS = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments) if f.init}


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' `TrainingArguments`, with the fields that reach Lightning directly.

    Any `transformers.TrainingArguments` (or subclass) instance is accepted by `hf_lightning.Trainer` as is; this
    subclass only adds what transformers has no name for.
    """

    lightning_trainer_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Extra keyword arguments for `lightning.Trainer` (e.g. devices, num_nodes, strategy, "
            "accelerator). They win over what is translated from the other fields."
        },
    )
    save_lightning_checkpoint: bool = field(
        default=False,
        metadata={"help": "Also write a Lightning `lightning.ckpt` file into every checkpoint-N folder (an export: "
                          "Lightning's `fit(ckpt_path=)` reads the checkpoint-N folder itself)."},
    )
    async_save: bool = field(
        default=False,
        metadata={"help": "Write checkpoints in a background thread: a save only copies the weights and optimizer "
                          "state into reused CPU buffers (as much memory again) and training goes on while the "
                          "files are written, flushed and renamed in. Pays off where spare cores (or a GPU) exist."},
    )


def _default_of(name: str) -> Any:
    f = _DEFAULTS.get(name)
    if f is None:
        return None
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _is_default(name: str, value: Any) -> bool:
    default = _default_of(name)
    if value == default:
        return True
    # transformers normalises some defaults in __post_init__ (None -> [] / {} / enum).
    if value in (None, [], {}, "", "no", "none") and default in (None, [], {}, "", "no", "none"):
        return True
    return False


def check_supported(args: transformers.TrainingArguments) -> None:
    """Raise a ValueError naming the first field set to a value hf_lightning does not support yet."""
    check_cuda_switches(args)  # first: a combination (deepspeed + fsdp) is named as such
    sharding.check_arguments(args)
    tensor_parallel.check_arguments(args)
    for name, (policy, why) in FIELD_POLICY.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if policy == UNSUPPORTED and not _is_default(name, value):
            raise ValueError(
                f"TrainingArguments.{name}={value!r} is not supported by hf_lightning yet ({why}). "
                f"Leave `{name}` at its default ({_default_of(name)!r})."
            )
        refused = REFUSED_VALUES.get(name, ())
        if value in refused:
            raise ValueError(f"TrainingArguments.{name}={value!r} is not supported by hf_lightning yet.")
    if "tpu_metrics_debug" in [str(getattr(option, "value", option)) for option in args.debug or []]:
        raise ValueError(
            "TrainingArguments.debug='tpu_metrics_debug' is not supported by hf_lightning (no TPU/XLA strategy); "
            "'underflow_overflow' is."
        )
    check_accelerator_config(args)


# accelerate's GradientAccumulationPlugin options: transformers steps the scheduler and sets sync_gradients itself,
# so these two change nothing there, nor here.
_NO_EFFECT_GA_KWARGS = {"adjust_scheduler", "sync_with_dataloader"}


def check_accelerator_config(args: transformers.TrainingArguments) -> None:
    """Refuse the `accelerator_config` sub-fields that have no meaning here, naming each one."""
    config = getattr(args, "accelerator_config", None)
    if config is None:
        return
    if config.dispatch_batches:
        raise ValueError(
            "TrainingArguments.accelerator_config.dispatch_batches=True is not supported by hf_lightning: every "
            "process loads its own shard (Lightning's DDP). Leave dispatch_batches unset."
        )
    if getattr(config, "use_configured_state", False):
        raise ValueError(
            "TrainingArguments.accelerator_config.use_configured_state=True is not supported by hf_lightning: "
            "Lightning's strategy sets up the processes. Leave it False."
        )
    unknown = set(config.gradient_accumulation_kwargs or {}) - {"num_steps", "sync_each_batch"} - _NO_EFFECT_GA_KWARGS
    if unknown:
        raise ValueError(
            f"TrainingArguments.accelerator_config.gradient_accumulation_kwargs has unknown keys {sorted(unknown)}; "
            "accelerate's GradientAccumulationPlugin takes num_steps, adjust_scheduler, sync_with_dataloader, "
            "sync_each_batch."
        )
    num_steps = (config.gradient_accumulation_kwargs or {}).get("num_steps")
    if num_steps is not None and args.gradient_accumulation_steps > 1 and num_steps != args.gradient_accumulation_steps:
        raise ValueError(
            "TrainingArguments.accelerator_config.gradient_accumulation_kwargs['num_steps'] is set but "
            "gradient_accumulation_steps is greater than 1: set only one of them."
        )


def apply_accelerator_config(args: transformers.TrainingArguments) -> None:
    """What transformers' Trainer writes back into its args: gradient_accumulation_kwargs['num_steps'] becomes
    `gradient_accumulation_steps` (transformers accumulates itself); `non_blocking` without pinned memory warns."""
    config = getattr(args, "accelerator_config", None)
    if config is None:
        return
    num_steps = (config.gradient_accumulation_kwargs or {}).get("num_steps")
    if num_steps is not None:
        args.gradient_accumulation_steps = num_steps
    if config.non_blocking and not args.dataloader_pin_memory:
        import logging

        logging.getLogger("transformers.trainer").warning(
            "`non_blocking` is enabled but `dataloader_pin_memory` is not. For the best performance, it's "
            "recommended to enable both."
        )


def _precision(args: transformers.TrainingArguments) -> str:
    if args.bf16:
        return "bf16-mixed"
    if args.fp16:
        return "16-mixed"
    return "32-true"


def _strategy(args: transformers.TrainingArguments, model=None) -> Any:
    """DDP options only matter when more than one process trains; 'auto' otherwise. fsdp: sharding.py."""
    if uses_deepspeed(args):
        return deepspeed_strategy(args)
    if tensor_parallel.tp_size(args) > 1:
        return tensor_parallel.strategy(args)
    if sharding.fsdp_settings(args) is not None:
        return sharding.fsdp_strategy(args, model)
    ddp_options = {
        "find_unused_parameters": args.ddp_find_unused_parameters,
        "bucket_cap_mb": args.ddp_bucket_cap_mb,
        "broadcast_buffers": args.ddp_broadcast_buffers,
        "static_graph": args.ddp_static_graph,
    }
    ddp_options = {k: v for k, v in ddp_options.items() if v is not None}
    if not ddp_options and args.ddp_backend is None:
        return "auto"
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(process_group_backend=args.ddp_backend, timeout=timedelta(seconds=args.ddp_timeout), **ddp_options)


def translate_arguments(args: transformers.TrainingArguments, model=None) -> dict[str, Any]:
    """The `lightning.Trainer` keyword arguments that `args` stands for (loop limits are set by the facade); `model`
    names FSDP1's layer classes to wrap."""
    kwargs: dict[str, Any] = {
        "default_root_dir": args.output_dir,
        "precision": _precision(args),
        "enable_progress_bar": not args.disable_tqdm,
        "strategy": _strategy(args, model),
        # HF semantics run the loop's cadences: no sanity check, no Lightning checkpointing or gradient clipping.
        "num_sanity_val_steps": 0,
        # Lightning's checkpointing is on only for its ModelCheckpoint that resolves fit(ckpt_path="last") to the
        # newest checkpoint-N folder (it saves nothing); the folder is read by FolderCheckpointIO.
        "enable_checkpointing": True,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
        "log_every_n_steps": 1,
        # NEFTune, activation checkpointing, tf32, empty_cache: a small Lightning callback each (features.py).
        "callbacks": feature_callbacks(args),
    }
    if uses_deepspeed(args):
        kwargs["callbacks"].append(DeepSpeedAutoValues(args))
    if args.use_cpu:
        kwargs["accelerator"] = "cpu"
    # transformers trains on the device of this process; several processes come from a launcher (torchrun,
    # accelerate launch, SLURM) or from Lightning's own (lightning_trainer_kwargs devices/num_nodes): launch.py.
    extra = dict(getattr(args, "lightning_trainer_kwargs", None) or {})
    topology = launch.topology(extra)
    if topology.world_size <= 1:
        kwargs["devices"] = 1
    else:
        kwargs.update(devices=topology.local_world_size, num_nodes=topology.num_nodes)
        if kwargs["strategy"] == "auto":
            kwargs["strategy"] = "ddp"
    _check_lightning_kwargs(extra)
    if extra.get("strategy") is not None:  # a Lightning strategy name or object: gpu_strategies.given_strategy
        extra["strategy"], strategy_callbacks = given_strategy(args, extra["strategy"])
        kwargs["callbacks"] += strategy_callbacks
    kwargs["callbacks"] += list(extra.pop("callbacks", None) or [])
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import CheckpointIO

    from .checkpoint import FolderCheckpointIO, LastCheckpointFinder

    # A user's own ModelCheckpoint keeps Lightning's "last" for its files; enable_checkpointing=False turns it off.
    if extra.get("enable_checkpointing", True) and not any(isinstance(cb, ModelCheckpoint) for cb in kwargs["callbacks"]):
        kwargs["callbacks"].append(LastCheckpointFinder(args.output_dir))
    plugins = extra.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    # A user's own CheckpointIO wins (then only .ckpt files are Lightning checkpoints).
    kwargs["plugins"] = plugins if any(isinstance(p, CheckpointIO) for p in plugins) else [FolderCheckpointIO(args), *plugins]
    kwargs.update(extra)
    return kwargs


def loop_arguments(args, plan) -> dict[str, Any]:
    """The `lightning.Trainer` loop limits of one `train()` (a `run.TrainingPlan`)."""
    return {
        "max_steps": plan.max_steps,
        "max_epochs": plan.lightning_max_epochs,
        # transformers' TrainerControl decides when to evaluate (flow.py), not val_check_interval.
        "check_val_every_n_epoch": None,
        "val_check_interval": max(plan.max_steps, 1),
        # eval_on_start is Lightning's sanity check over the whole eval set.
        "num_sanity_val_steps": -1 if args.eval_on_start else 0,
    }


def _check_lightning_kwargs(extra: dict) -> None:
    """Refuse what would hang or silently differ, naming what to do instead."""
    launch.check_strategy(extra)
    # train() sets these from the TrainingArguments (loop_arguments): a value here would be overwritten silently.
    owned = {"max_steps": "max_steps", "max_epochs": "num_train_epochs", "val_check_interval": "eval_strategy/eval_steps",
             "check_val_every_n_epoch": "eval_strategy/eval_steps", "num_sanity_val_steps": "eval_on_start"}
    for key in sorted(owned.keys() & extra.keys()):
        raise ValueError(f"lightning_trainer_kwargs[{key!r}] is set by hf_lightning from TrainingArguments; set "
                         f"TrainingArguments.{owned[key]} instead.")
