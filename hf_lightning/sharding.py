"""FSDP2: `fsdp=` / `fsdp_config=` on Lightning's `ModelParallelStrategy`, and checkpoints from sharded state.

transformers reads `fsdp`/`fsdp_config` into `args.fsdp_plugin_args` (accelerate's FullyShardedDataParallelPlugin
kwargs: version, reshard_after_forward, cpu_offload, auto_wrap_policy, transformer_cls_names_to_wrap,
activation_checkpointing, cpu_ram_efficient_loading, state_dict_type). The same reading drives here:

* `fsdp_strategy(args, model)` – the Lightning strategy: `ModelParallelStrategy(data_parallel_size=<world size from
  Lightning's topology, launch.py>, tensor_parallel_size=1)` for FSDP2 (the only version that runs on CPU); FSDP1
  (`version: 1`) is gpu_strategies.fsdp1_strategy (Lightning's FSDPStrategy, CUDA only).
* `configure_model(module)` – called from the LightningModule's `configure_model`: `fully_shard` on every layer of
  the wrap classes (default: the model's `_no_split_modules`), then on the root, as accelerate's FSDP2 does. It runs
  for any `ModelParallelStrategy`, also one passed in `lightning_trainer_kwargs`.
* checkpoints: the consolidated weights gathered on every rank (`get_model_state_dict(full_state_dict=True,
  cpu_offload=True)`) and written by rank 0 with `save_pretrained`; the optimizer as a torch distributed checkpoint
  folder `optimizer_0/` (accelerate's name) that any number of processes reads back (DCP reshards).
* `check_arguments` / `check_model` – the bad inputs, refused in the constructor before Lightning starts anything.
"""

from __future__ import annotations

import os
from typing import Any

import torch

OPTIMIZER_DIR = "optimizer_0"  # accelerate's `save_fsdp_optimizer` folder name (optimizer index 0)
_DCP_KEY = "optimizer"


# ---------------------------------------------------------------------- what was asked


def fsdp_settings(args) -> dict[str, Any] | None:
    """accelerate's FSDP plugin kwargs as transformers computed them from fsdp/fsdp_config, or None without fsdp."""
    if not getattr(args, "fsdp", None):
        return None
    return dict(getattr(args, "fsdp_plugin_args", None) or {"fsdp_version": 2})


def _lightning_kwargs(args) -> dict:
    return dict(getattr(args, "lightning_trainer_kwargs", None) or {})


def _extra_strategy(args):
    return _lightning_kwargs(args).get("strategy")


def is_model_parallel(strategy) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def _strategy_name(strategy) -> str:
    return (strategy if isinstance(strategy, str) else type(strategy).__name__).lower()


def check_arguments(args) -> None:
    """The fsdp settings hf_lightning cannot run, each refused naming the field (before any process starts)."""
    extra = _extra_strategy(args)  # one needing CUDA where there is none: gpu_strategies.check_given_strategy
    settings = fsdp_settings(args)
    sharded = settings is not None or is_model_parallel(extra) or (
        extra is not None and any(word in _strategy_name(extra) for word in ("fsdp", "model_parallel")))
    if sharded:
        optim = str(getattr(args.optim, "value", args.optim))
        if optim.endswith("_layerwise") or "lomo" in optim:
            raise ValueError(
                f"TrainingArguments.optim={optim!r} steps each parameter in its own backward hook, which a sharded "
                "strategy (fsdp / ModelParallelStrategy) cannot do on sharded gradients. Use an optimizer that steps "
                "once per update (e.g. optim='adamw_torch', or the GaLore/APOLLO optim without '_layerwise')."
            )
    if settings is None:
        return
    if extra is not None and not is_model_parallel(extra):
        raise ValueError(
            f"TrainingArguments.fsdp is set but lightning_trainer_kwargs strategy={extra!r} is another strategy: "
            "remove one of them (fsdp runs on Lightning's ModelParallelStrategy; pass a ModelParallelStrategy "
            "object there to choose its options)."
        )
    if settings.get("fsdp_version", 2) == 1:  # FSDP1: Lightning's FSDPStrategy, mapped by gpu_strategies.py
        from .gpu_strategies import check_fsdp1_device

        check_fsdp1_device(args)
        return
    if args.fsdp_config.get("xla"):
        raise ValueError("TrainingArguments.fsdp_config['xla']=True: XLA FSDP is not supported by hf_lightning.")
    policy = settings.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        raise ValueError(
            f"TrainingArguments.fsdp_config['auto_wrap_policy']={policy!r} is not supported by hf_lightning: use "
            "'TRANSFORMER_BASED_WRAP' (with transformer_layer_cls_to_wrap) or 'NO_WRAP'."
        )
    if settings.get("state_dict_type", "FULL_STATE_DICT") != "FULL_STATE_DICT":
        raise ValueError(
            f"TrainingArguments.fsdp_config['state_dict_type']={settings['state_dict_type']!r} is not supported by "
            "hf_lightning: checkpoints hold the consolidated model.safetensors and the optimizer as a sharded "
            "(DCP) folder. Use 'FULL_STATE_DICT'."
        )
    if settings.get("cpu_offload") and (args.use_cpu or not torch.cuda.is_available()):
        raise ValueError(  # FSDP2's CPUOffloadPolicy pins host memory for a device it copies to: there is none
            "TrainingArguments.fsdp_config['cpu_offload'] (fsdp='offload') moves parameters off the GPU, but this run "
            "trains on the CPU where they already are: remove 'offload' / cpu_offload."
        )
    if settings.get("activation_checkpointing") and args.activation_checkpointing:
        raise ValueError(  # transformers' own check, raised at its Trainer's construction
            "TrainingArguments.fsdp_config['activation_checkpointing'] and TrainingArguments.activation_checkpointing "
            "are both set: use fsdp_config['activation_checkpointing'] only."
        )


def wrap_class_names(args, model) -> list[str]:
    settings = fsdp_settings(args) or {}
    if settings.get("auto_wrap_policy") == "NO_WRAP":
        return []
    names = settings.get("transformer_cls_names_to_wrap")
    if names:
        return [name.strip() for name in names.split(",") if name.strip()]
    from .compat import no_split_modules

    return no_split_modules(model)


def check_model(args, model) -> None:
    """fsdp_config's transformer_layer_cls_to_wrap must name layer classes the model has; a tp_size needs a tp plan."""
    from .tensor_parallel import check_model as check_tp_model

    check_tp_model(args, model)
    if fsdp_settings(args) is None:
        return
    present = {type(module).__name__ for module in model.modules()}
    missing = [name for name in wrap_class_names(args, model) if name not in present]
    if missing:
        raise ValueError(
            f"TrainingArguments.fsdp_config['transformer_layer_cls_to_wrap'] names {missing}, which "
            f"{type(model).__name__} does not contain. Its layer classes include "
            f"{sorted(n for n in present if n.endswith(('Layer', 'Block')))}."
        )


def fsdp_strategy(args, model=None):
    """The Lightning strategy for `fsdp=`: FSDP2 on ModelParallelStrategy, every process one data-parallel shard, as
    many as Lightning's topology runs (a launcher's, or Lightning's own for `lightning_trainer_kwargs` devices);
    FSDP1 (fsdp_config version 1) Lightning's FSDPStrategy, which wraps `model`'s layer classes (CUDA only)."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    from . import launch

    if (fsdp_settings(args) or {}).get("fsdp_version", 2) == 1:
        from .gpu_strategies import fsdp1_strategy

        return fsdp1_strategy(args, model)
    found = launch.topology(_lightning_kwargs(args))
    # transformers refuses fsdp outside distributed training; a launcher's single process counts (torchrun -n 1)
    launched = not isinstance(launch.lightning_cluster_environment(), LightningEnvironment)
    if found.world_size <= 1 and not launched and "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "TrainingArguments.fsdp only works in distributed training (as with transformers): launch the script "
            "with `torchrun --nproc_per_node N script.py` (or accelerate launch), N >= 1, or let Lightning start "
            "the processes with lightning_trainer_kwargs={'devices': N}."
        )
    return model_parallel_strategy(args)


def model_parallel_strategy(args):
    """FSDP2 on ModelParallelStrategy, every process one data-parallel shard, as many as Lightning's topology runs:
    fsdp=True's strategy, and lightning_trainer_kwargs strategy="model_parallel"'s."""
    from datetime import timedelta

    from . import launch

    found = launch.topology(_lightning_kwargs(args))
    return FolderModelParallelStrategy(
        data_parallel_size=found.world_size, tensor_parallel_size=1, process_group_backend=args.ddp_backend,
        timeout=timedelta(seconds=args.ddp_timeout),
    )


def _model_parallel_strategy_class():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FolderModelParallelStrategy(_model_parallel_strategy_class()):
    """Lightning's ModelParallelStrategy, which also resumes `fit(ckpt_path=<checkpoint-N folder>)`.

    ModelParallelStrategy loads checkpoints itself (its `load_checkpoint` reads only its own DCP layout, bypassing
    the CheckpointIO, and its `load_*_state_dict` do nothing): a checkpoint-N folder goes through FolderCheckpointIO
    (weights into the shards, trainer state, RNG, scheduler) and the DCP optimizer folder into the optimizer here."""

    reads_checkpoint_folders = True  # configure_model refuses a folder to the strategies that cannot read one

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        if not is_checkpoint_folder(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return load_checkpoint_folder(self, checkpoint_path, weights_only, self.lightning_module.model)


def is_checkpoint_folder(path) -> bool:
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "trainer_state.json"))


def load_checkpoint_folder(strategy, checkpoint_path, weights_only, optimizer_model=None) -> dict:
    """A checkpoint-N folder through the strategy's FolderCheckpointIO (weights into the shards, trainer state, RNG,
    scheduler), then its DCP optimizer folder into the optimizer over `optimizer_model`'s parameter names (None: the
    CheckpointIO restored the optimizer with the weights, as DeepSpeed's engine does)."""
    path = os.fspath(checkpoint_path)
    checkpoint = strategy.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
    if optimizer_model is None:
        return checkpoint
    folder = os.path.join(path, OPTIMIZER_DIR)
    if not os.path.isdir(folder):
        raise ValueError(f"{path} holds no {OPTIMIZER_DIR}/ (the optimizer of a sharded run): resume it with "
                         "train(resume_from_checkpoint=...) or from a checkpoint written under fsdp.")
    load_optimizer(optimizer_model, strategy.optimizers[0], folder)
    return checkpoint


# ---------------------------------------------------------------------- sharding the model


def is_sharded(model) -> bool:
    """Whether `model` holds sharded (FSDP2 or tensor-parallel DTensor) parameters."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    # tensor parallel alone leaves no FSDPModule, only DTensor parameters: the same checkpoint path applies
    return isinstance(model, FSDPModule) or any(isinstance(p, DTensor) for p in model.parameters())


def _reads_own_checkpoints(strategy) -> bool:
    """Lightning's strategies whose load_checkpoint bypasses the CheckpointIO, unless hf_lightning's subclass."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (ModelParallelStrategy, DeepSpeedStrategy, FSDPStrategy)) and not getattr(
        strategy, "reads_checkpoint_folders", False)


def configure_model(module) -> None:
    """fully_shard the transformers model of `module` (a TransformersModule) under a ModelParallelStrategy."""
    strategy = module.trainer.strategy
    model = module.model
    ckpt_path = module.trainer.ckpt_path
    if ckpt_path and os.path.isdir(ckpt_path) and _reads_own_checkpoints(strategy):
        raise ValueError(  # its own load_checkpoint reads only Lightning's layout, past hf_lightning's CheckpointIO
            f"fit(ckpt_path={ckpt_path!r}) under the {type(strategy).__name__} given in lightning_trainer_kwargs "
            "cannot read a checkpoint-N folder: resume with trainer.train(resume_from_checkpoint=...), or use "
            "fsdp=True / deepspeed= (or the strategy's registry name) instead of the strategy object.")
    if not is_model_parallel(strategy):
        return
    if is_sharded(model):
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = strategy.device_mesh
    args = module.run_state.args
    if mesh["tensor_parallel"].size() != 1:
        from . import tensor_parallel

        if tensor_parallel.tp_size(args) != mesh["tensor_parallel"].size():
            raise ValueError(  # the loaders, token counts and loss scale follow parallelism_config's tp_size
                f"ModelParallelStrategy with tensor_parallel_size={mesh['tensor_parallel'].size()} in "
                "lightning_trainer_kwargs: ask for tensor parallelism with TrainingArguments(parallelism_config="
                "accelerate.ParallelismConfig(tp_size=N)) instead, or pass tensor_parallel_size=1."
            )
        tensor_parallel.apply(model, mesh)
        if mesh["data_parallel"].size() == 1:
            return
    settings = fsdp_settings(args) or {}
    if settings.get("activation_checkpointing"):
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(
                "TrainingArguments.fsdp_config['activation_checkpointing']=True needs a transformers model "
                f"(gradient_checkpointing_enable); {type(model).__name__} has none."
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rank0_weights = None
    if settings.get("cpu_ram_efficient_loading"):
        # Rank 0's weights are the run's (transformers loads them there only); the others receive them.
        rank0_weights = {k: v.detach().clone() for k, v in model.state_dict().items()} if strategy.global_rank == 0 else {}
    options: dict[str, Any] = {"mesh": mesh["data_parallel"],
                               "reshard_after_forward": bool(settings.get("reshard_after_forward", True))}
    if settings.get("cpu_offload"):
        options["offload_policy"] = CPUOffloadPolicy()
    classes = set(wrap_class_names(args, model))
    for sub in model.modules():
        if sub is not model and type(sub).__name__ in classes:
            fully_shard(sub, **options)
    fully_shard(model, **options)
    if rank0_weights is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, rank0_weights,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def finite_norm(grad_norm):
    """clip_grad_norm_ on DTensor gradients returns the (already reduced) total norm as a DTensor."""
    from torch.distributed.tensor import DTensor

    return grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm


def clip_grad_norm(model, max_norm: float):
    """The total gradient norm, clipped to `max_norm`. Gradients on different device meshes (tensor-parallel DTensors
    beside replicated tensors) cannot share one `clip_grad_norm_`: transformers' own mixed-mesh norm then (one norm per
    mesh, each reduced over its mesh, combined, every group clipped with it)."""
    from torch.distributed.tensor import DTensor

    meshes = {p.grad.device_mesh if isinstance(p.grad, DTensor) else None
              for p in model.parameters() if p.grad is not None}
    if len(meshes) <= 1:
        return finite_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    from .compat import mixed_mesh_grad_norm

    return mixed_mesh_grad_norm(model, max_norm)


# ---------------------------------------------------------------------- checkpoints


def full_state_dict(model) -> dict:
    """The consolidated weights of a sharded model on rank 0 (on CPU); {} on the others. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, state_dict: dict, strict: bool = False):
    """Consolidated weights (every rank holds them) into a sharded model; returns (missing, unexpected) keys."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    result = set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=strict))
    return result


def _renamed(state: dict, name) -> dict:
    """An optimizer state dict of torch's distributed state-dict functions (keyed by parameter names) with every
    name replaced by `name(old)`."""
    groups = [{**group, "params": [name(k) for k in group["params"]]} for group in state["param_groups"]]
    return {**state, "state": {name(k): v for k, v in state["state"].items()}, "param_groups": groups}


def _file_name(model):
    """`model`'s parameter name -> the name in the files: the transformers model's (gpu_checkpoints.optimizer_prefix),
    so that one folder resumes under FSDP1, FSDP2, DDP or one process."""
    from .gpu_checkpoints import optimizer_prefix

    prefix = optimizer_prefix(model)
    return lambda name: name[len(prefix):] if prefix and name.startswith(prefix) else name


def save_optimizer(model, optimizer, folder: str) -> None:
    """The optimizer state as a DCP folder (FQN-keyed, each rank its shard). Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({_DCP_KEY: _renamed(get_optimizer_state_dict(model, optimizer), _file_name(model))}, checkpoint_id=folder)


def load_optimizer(model, optimizer, folder: str) -> None:
    """A DCP optimizer folder into `optimizer`, resharded to this run's processes (sharded or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    own = get_optimizer_state_dict(model, optimizer)
    file_name = _file_name(model)
    own_name = {file_name(k): k for group in own["param_groups"] for k in group["params"]}
    state = {_DCP_KEY: _renamed(own, file_name)}
    try:
        dcp.load(state, checkpoint_id=folder)
    except Exception as err:  # noqa: BLE001 - re-raised with the folder named
        raise ValueError(f"Cannot read the optimizer state from {folder!r} ({type(err).__name__}: {err}). Resume "
                         "with the optimizer and model the checkpoint was written with.") from err
    set_optimizer_state_dict(model, optimizer, _renamed(state[_DCP_KEY], lambda k: own_name.get(k, k)))
