"""Tensor parallelism: `parallelism_config` (accelerate's ParallelismConfig) on Lightning's `ModelParallelStrategy`.

transformers hands `args.parallelism_config` to accelerate, which builds a (dp_replicate, dp_shard, cp, tp) device
mesh; the model's own plan (`model.tp_plan`: the class plan plus `config.base_model_tp_plan`) shards it. Here:

* `strategy(args)` – `ModelParallelStrategy(data_parallel_size=dp_shard_size, tensor_parallel_size=tp_size)`; its
  device mesh is (data_parallel, tensor_parallel), process rank = dp_index * tp_size + tp_index.
* `apply(model, mesh)` – called from sharding.configure_model: transformers' `apply_tensor_parallelism` with the
  model's resolved plan on `mesh["tensor_parallel"]` (DTensor parameters); sharding.py then `fully_shard`s over
  `mesh["data_parallel"]` when dp_shard_size > 1 (2D parallelism, as Lightning's ModelParallelStrategy documents).
* `data_parallel(args)` – (processes, index) the data loaders shard over: the ranks of one TP group see the same
  batches, as accelerate's loaders give them; transformers' token counts and loss scale divide by tp_size likewise.

Gradients of TP (DTensor) parameters are complete on every rank; checkpoints consolidate through sharding.py (its
`get_model_state_dict(full_state_dict=True)` gathers DTensors) and the optimizer goes to a DCP folder.
"""

from __future__ import annotations

import os


def tp_size(args) -> int:
    """The tensor-parallel size asked for by `parallelism_config` (1 without it)."""
    config = getattr(args, "parallelism_config", None)
    return int(getattr(config, "tp_size", None) or 1) if config is not None else 1


def data_parallel(args) -> tuple[int, int]:
    """(number of data-parallel shards, this process's shard): the processes of one TP group share their batches."""
    tp = tp_size(args)
    return max(args.world_size // tp, 1), args.process_index // tp


def check_arguments(args) -> None:
    """The parallelism_config settings hf_lightning cannot run, each refused naming the field (before any process)."""
    config = getattr(args, "parallelism_config", None)
    if config is None:
        return
    unsupported = {name: getattr(config, name, 1) for name in ("dp_replicate_size", "cp_size", "sp_size")}
    unsupported = {name: size for name, size in unsupported.items() if (size or 1) > 1}
    if unsupported:
        raise ValueError(
            f"TrainingArguments.parallelism_config {unsupported} is not supported by hf_lightning: only tp_size "
            "(tensor parallel) and dp_shard_size (FSDP2 over the data-parallel ranks) map to Lightning's "
            "ModelParallelStrategy; set the others to 1."
        )
    if tp_size(args) == 1:
        if (config.dp_shard_size or 1) > 1:
            raise ValueError(
                f"TrainingArguments.parallelism_config dp_shard_size={config.dp_shard_size} without tp_size > 1: "
                "for FSDP2 alone use TrainingArguments(fsdp=True)."
            )
        return
    if getattr(args, "fsdp", None):
        raise ValueError(
            "TrainingArguments.parallelism_config (tp_size > 1) and TrainingArguments.fsdp are both set: remove fsdp "
            "and shard the data-parallel ranks with parallelism_config dp_shard_size instead."
        )
    if getattr(args, "deepspeed", None):
        raise ValueError(
            "TrainingArguments.parallelism_config (tp_size > 1) and TrainingArguments.deepspeed are both set: "
            "remove one of them."
        )
    extra = dict(getattr(args, "lightning_trainer_kwargs", None) or {}).get("strategy")
    if extra is not None:
        raise ValueError(
            f"TrainingArguments.parallelism_config (tp_size > 1) and lightning_trainer_kwargs strategy={extra!r} "
            "are both set: parallelism_config builds the ModelParallelStrategy; remove one of them."
        )
    optim = str(getattr(args.optim, "value", args.optim))
    if optim.endswith("_layerwise") or "lomo" in optim:
        raise ValueError(
            f"TrainingArguments.optim={optim!r} steps each parameter in its own backward hook, which tensor "
            "parallelism (parallelism_config tp_size > 1) cannot do on sharded gradients. Use e.g. optim='adamw_torch'."
        )


def check_model(args, model) -> None:
    """A tp_size > 1 needs a model that carries a tensor-parallel plan (`base_model_tp_plan` in its config)."""
    if tp_size(args) == 1:
        return
    if not getattr(model, "tp_plan", None):
        raise ValueError(
            f"TrainingArguments.parallelism_config tp_size={tp_size(args)}: {type(model).__name__} carries no "
            "tensor-parallel plan (no `base_model_tp_plan` in its config, no `_tp_plan`); use tp_size=1 (e.g. "
            "fsdp=True) or a model with a plan."
        )


def strategy(args):
    """The ModelParallelStrategy for `parallelism_config`: world = dp_shard_size * tp_size processes."""
    from datetime import timedelta

    from . import launch
    from .sharding import FolderModelParallelStrategy

    tp = tp_size(args)
    world = launch.topology(dict(getattr(args, "lightning_trainer_kwargs", None) or {})).world_size
    if world == 1 and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
    dp = args.parallelism_config.dp_shard_size or 1
    if world % tp or (dp > 1 and dp * tp != world):
        raise ValueError(
            f"TrainingArguments.parallelism_config tp_size={tp}, dp_shard_size={dp} does not fit the {world} "
            f"process(es) this run has: launch dp_shard_size * tp_size processes (e.g. `torchrun --nproc_per_node "
            f"{max(dp, 1) * tp}`)."
        )
    return FolderModelParallelStrategy(
        data_parallel_size=world // tp, tensor_parallel_size=tp, process_group_backend=args.ddp_backend,
        timeout=timedelta(seconds=args.ddp_timeout),
    )


def apply(model, mesh) -> None:
    """The model's own tensor-parallel plan on `mesh["tensor_parallel"]`, with transformers' functions."""
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    from .compat import resolved_tp_plan

    tp_mesh = mesh["tensor_parallel"]
    if not getattr(model, "tp_plan", None):
        raise ValueError(
            f"ModelParallelStrategy with tensor_parallel_size={tp_mesh.size()}: {type(model).__name__} carries no "
            "tensor-parallel plan (no `base_model_tp_plan` in its config); use tensor_parallel_size=1."
        )
    apply_tensor_parallelism(model, tp_mesh, resolved_tp_plan(model, tp_mesh.size()))
