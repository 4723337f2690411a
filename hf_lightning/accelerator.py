"""`trainer.accelerator`: the part of accelerate's `Accelerator` that user code calls, backed by Lightning's strategy.

transformers' Trainer owns an `accelerate.Accelerator`, and user code and Trainer subclasses (TRL's among them) call
it: `self.accelerator.backward(loss)`, `gather_for_metrics`, `is_main_process`, `unwrap_model`, `print` ...
hf_lightning has no accelerate process group, no accelerate-prepared model and no accelerate state: Lightning's
strategy owns the processes, the devices, the wrappers and the precision. `LightningAccelerator` answers the same calls
from the `lightning.pytorch.Trainer` that is running (its strategy, precision plugin and LightningModule):

- ranks, device, `distributed_type` and `mixed_precision` are read from the Lightning Trainer;
- collectives go through the strategy (`all_gather`, `reduce`, `barrier`, `broadcast`); gathering picklable objects,
  which Lightning has no call for, uses `torch.distributed.all_gather_object` on the process group Lightning started;
- `backward` goes through `LightningModule.manual_backward`, so the precision plugin scales the loss (fp16) and the
  strategy runs its pre/post-backward hooks;
- `autocast` is the precision plugin's `forward_context`.

Before a Lightning Trainer exists (right after `hf_lightning.Trainer(...)`), values come from the launcher's
environment (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`) or from `torch.distributed` if a process group is already up;
collectives then work only in one process or on that process group.

What accelerate does with objects it prepared (`prepare`, `accumulate`, `clip_grad_norm_`, `save_state`, trackers ...)
belongs to Lightning here: those methods raise `NotImplementedError` naming what to use instead, and accelerate's
configuration attributes (`gradient_state`, `even_batches`, `project_dir` ...) raise `AttributeError` the same way.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping
from functools import partial
from typing import Any, Callable

import torch
from accelerate.utils import AutocastKwargs, DistributedType
from accelerate.utils.memory import release_memory
from accelerate.utils.operations import honor_type, recursively_apply
from accelerate.utils.other import clean_state_dict_for_safetensors, extract_model_from_parallel
from torch import nn

__all__ = ["LightningAccelerator", "LightningAcceleratorState"]

# Lightning's precision strings -> accelerate's `mixed_precision`. True half precision ("16-true", "bf16-true") reports
# the dtype the computation runs in, as accelerate's DeepSpeed/FSDP half precision does.
_MIXED_PRECISION = {
    "16-mixed": "fp16",
    "16-true": "fp16",
    "16": "fp16",
    "bf16-mixed": "bf16",
    "bf16-true": "bf16",
    "bf16": "bf16",
    "transformer-engine": "fp8",
    "transformer-engine-float16": "fp8",
}

# Device type -> accelerate's multi-process type for a plain data-parallel strategy.
_MULTI_DEVICE = {
    "cuda": DistributedType.MULTI_GPU,
    "cpu": DistributedType.MULTI_CPU,
    "xpu": DistributedType.MULTI_XPU,
    "npu": DistributedType.MULTI_NPU,
    "hpu": DistributedType.MULTI_HPU,
    "mlu": DistributedType.MULTI_MLU,
    "musa": DistributedType.MULTI_MUSA,
}

_PREPARED = (
    "hf_lightning's Lightning strategy prepares the model, optimizer and data (device placement, DDP/FSDP wrapping, "
    "distributed sampling); use trainer.model_wrapped, trainer.optimizer and trainer.get_train_dataloader()"
)

# accelerate methods that have no counterpart here, and what to use instead.
_NOT_IMPLEMENTED_METHODS = {
    "prepare": _PREPARED,
    "prepare_model": _PREPARED,
    "prepare_optimizer": _PREPARED,
    "prepare_scheduler": _PREPARED,
    "prepare_data_loader": _PREPARED,
    "accumulate": (
        "hf_lightning's loop accumulates gradients (TrainingArguments.gradient_accumulation_steps: one Lightning batch "
        "is one accumulation window, synced on its last micro-batch); read accelerator.sync_gradients"
    ),
    "clip_grad_norm_": (
        "hf_lightning clips after unscaling, before each optimizer step (TrainingArguments.max_grad_norm); to clip "
        "differently, override the LightningModule's on_before_optimizer_step or use a Lightning callback"
    ),
    "clip_grad_value_": (
        "hf_lightning clips by norm before each optimizer step (TrainingArguments.max_grad_norm); to clip by value, "
        "override the LightningModule's on_before_optimizer_step"
    ),
    "unscale_gradients": (
        "Lightning's precision plugin unscales fp16 gradients before the optimizer step (trainer.lightning_trainer."
        "precision_plugin.scaler), where hf_lightning clips them"
    ),
    "join_uneven_inputs": "hf_lightning shards the data evenly across processes; there is no uneven-input join",
    "skip_first_batches": "trainer.train(resume_from_checkpoint=...) skips the batches already seen",
    "save_state": (
        "hf_lightning writes checkpoint-N folders (TrainingArguments.save_strategy); use trainer.save_model() or "
        "trainer.lightning_trainer.save_checkpoint(path)"
    ),
    "load_state": "use trainer.train(resume_from_checkpoint=...) or hf_lightning.model_from_lightning_checkpoint",
    "save_model": "use trainer.save_model(output_dir) (save_pretrained on the main process)",
    "register_for_checkpointing": "hf_lightning's checkpoints hold the model, optimizer, scheduler, RNG and state",
    "register_save_state_pre_hook": "use a Lightning callback's on_save_checkpoint or a TrainerCallback's on_save",
    "register_load_state_pre_hook": "use a Lightning callback's on_load_checkpoint",
    "init_trackers": "use TrainingArguments.report_to or Lightning loggers (lightning_trainer_kwargs={'logger': ...})",
    "get_tracker": "use trainer.lightning_trainer.loggers",
    "log": "use trainer.log(logs) (transformers' log history, callbacks and Lightning loggers)",
    "end_training": "hf_lightning ends the Lightning run and releases the process group itself",
    "profile": "use Lightning's profiler (TrainingArguments.lightning_trainer_kwargs={'profiler': 'pytorch'})",
    "maybe_context_parallel": "context parallelism is not available; use a Lightning ModelParallelStrategy",
    "deepspeed_ulysses_dl_adapter": "DeepSpeed sequence parallelism is not available in hf_lightning",
    "verify_device_map": "hf_lightning places the model with Lightning's strategy, not a big-model device_map",
    "lomo_backward": "call accelerator.backward(loss, learning_rate=lr): a LOMO optimizer's fused backward runs there",
}

# accelerate attributes (configuration and accelerate-owned objects) that have no counterpart here.
_MISSING_ATTRIBUTES = {
    "gradient_state": "read accelerator.sync_gradients and accelerator.gradient_accumulation_steps",
    "optimizer_step_was_skipped": (
        "Lightning's precision plugin owns the fp16 scaler: compare trainer.lightning_trainer.scaler.get_scale() "
        "before and after the step"
    ),
    "split_batches": "hf_lightning's dataloaders yield per-process batches (per_device_train_batch_size)",
    "dispatch_batches": "each process reads its own shard (Lightning's distributed sampling)",
    "even_batches": "hf_lightning's sampler shards the data evenly",
    "use_seedable_sampler": "the sampler is transformers' (TrainingArguments.seed / data_seed)",
    "non_blocking": "Lightning moves batches to the device",
    "use_stateful_dataloader": "resuming is hf_lightning's (trainer.train(resume_from_checkpoint=...))",
    "dataloader_config": "hf_lightning builds the dataloaders (TrainingArguments dataloader_* fields)",
    "project_configuration": "checkpoints go to TrainingArguments.output_dir",
    "project_dir": "checkpoints go to TrainingArguments.output_dir",
    "logging_dir": "loggers write under TrainingArguments.output_dir / logging_dir",
    "save_iteration": "checkpoints are named checkpoint-<global_step>",
    "trackers": "use trainer.lightning_trainer.loggers",
    "deepspeed_engine_wrapped": "use trainer.lightning_trainer.model (Lightning's DeepSpeedStrategy wraps the model)",
    "deepspeed_config": "use trainer.lightning_trainer.strategy.config (Lightning's DeepSpeedStrategy)",
    "parallelism_config": "read trainer.args.parallelism_config (applied by hf_lightning/tensor_parallel.py)",
    "torch_device_mesh": "use trainer.lightning_trainer.strategy.device_mesh (Lightning's ModelParallelStrategy)",
    "autocast_handler": "pass an AutocastKwargs to accelerator.autocast(...)",
    "native_amp": "read accelerator.mixed_precision",
    "fp8_backend": "use Lightning's TransformerEnginePrecision plugin",
    "step": "read trainer.state.global_step",
}


def _nested_map(func: Callable, data: Any) -> Any:
    """`func` on every tensor of a nested list/tuple/dict (accelerate's helper, refusing other leaves as accelerate)."""
    return recursively_apply(func, data, error_on_other_type=True)


class LightningAcceleratorState:
    """What `accelerator.state` answers (accelerate's `AcceleratorState` fields that code reads), from the accelerator.

    There are no accelerate plugins: `deepspeed_plugin`, `fsdp_plugin`, `megatron_lm_plugin` and `torch_tp_plugin` are
    None, so `getattr(accelerator.state, "fsdp_plugin", None) is not None` (transformers' test) is False even under a
    Lightning FSDP or DeepSpeed strategy; `distributed_type` names the strategy.
    """

    deepspeed_plugin = None
    deepspeed_plugins = None
    fsdp_plugin = None
    megatron_lm_plugin = None
    torch_tp_plugin = None
    dynamo_plugin = None
    parallelism_config = None
    debug = False
    initialized = True

    def __init__(self, accelerator: LightningAccelerator):
        self._accelerator = accelerator

    device = property(lambda self: self._accelerator.device)
    distributed_type = property(lambda self: self._accelerator.distributed_type)
    num_processes = property(lambda self: self._accelerator.num_processes)
    process_index = property(lambda self: self._accelerator.process_index)
    local_process_index = property(lambda self: self._accelerator.local_process_index)
    is_main_process = property(lambda self: self._accelerator.is_main_process)
    is_local_main_process = property(lambda self: self._accelerator.is_local_main_process)
    is_last_process = property(lambda self: self._accelerator.is_last_process)
    mixed_precision = property(lambda self: self._accelerator.mixed_precision)
    use_distributed = property(lambda self: self._accelerator.use_distributed)
    is_fsdp2 = property(lambda self: self._accelerator.is_fsdp2)

    @property
    def backend(self) -> str | None:
        """The torch.distributed backend of the process group ("gloo", "nccl"), None without one."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_backend()
        return None

    def wait_for_everyone(self) -> None:
        self._accelerator.wait_for_everyone()

    def print(self, *args, **kwargs) -> None:
        self._accelerator.print(*args, **kwargs)

    def main_process_first(self):
        return self._accelerator.main_process_first()

    def local_main_process_first(self):
        return self._accelerator.local_main_process_first()

    def split_between_processes(self, inputs, apply_padding: bool = False):
        return self._accelerator.split_between_processes(inputs, apply_padding=apply_padding)

    def __repr__(self) -> str:
        a = self._accelerator
        return (
            f"Distributed environment: {a.distributed_type.value} (Lightning)\nNum processes: {a.num_processes}\n"
            f"Process index: {a.process_index}\nLocal process index: {a.local_process_index}\nDevice: {a.device}\n"
            f"Mixed precision type: {a.mixed_precision}\n"
        )


class LightningAccelerator:
    """accelerate's `Accelerator` API (the part user code calls) answered by the running `lightning.pytorch.Trainer`.

    Args:
        lightning_trainer: a zero-argument callable returning the current `lightning.pytorch.Trainer`, or None before
            one exists. Read on every call, so a new Lightning Trainer per train()/evaluate() is picked up.
        lightning_module: a zero-argument callable returning the LightningModule whose `manual_backward` `backward`
            uses (None before it exists); its `model` attribute is what `unwrap_model` returns for it.
        gradient_accumulation_steps: what `backward` divides the loss by, as accelerate does. transformers' Trainer
            creates its Accelerator with 1 (it divides the loss itself), so a Trainer facade passes 1.
        cpu: before a Lightning Trainer exists, report the CPU as the device even where CUDA is available
            (TrainingArguments.use_cpu).

    `sync_gradients` is a plain attribute (True by default): the owner of the loop sets it False for the micro-batches
    of an accumulation window whose gradients are not synchronised, and back to True for the last one.
    `end_of_dataloader` and `remainder` are accelerate's `GradientState` fields that `gather_for_metrics` reads: the
    owner of an evaluation loop sets them per batch (True on the last batch; the real samples of the last batch over
    all processes, -1 when unknown) and resets them after it.
    """

    def __init__(
        self,
        lightning_trainer: Callable[[], Any],
        lightning_module: Callable[[], Any] | None = None,
        gradient_accumulation_steps: int = 1,
        cpu: bool = False,
    ):
        if not callable(lightning_trainer):
            raise TypeError("`lightning_trainer` must be a zero-argument callable returning the Lightning Trainer/None")
        if lightning_module is not None and not callable(lightning_module):
            raise TypeError("`lightning_module` must be a zero-argument callable returning the LightningModule/None")
        self._get_trainer = lightning_trainer
        self._get_module = lightning_module if lightning_module is not None else (lambda: None)
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.sync_gradients = True
        self.end_of_dataloader = False
        self.remainder = -1
        self.cpu = cpu
        self.flag_tensor: torch.Tensor | None = None
        self.state = LightningAcceleratorState(self)

    # ------------------------------------------------------------------ where we are

    @property
    def lightning_trainer(self):
        """The `lightning.pytorch.Trainer` answering the calls (None before one exists)."""
        return self._get_trainer()

    @property
    def device(self) -> torch.device:
        trainer = self._get_trainer()
        if trainer is not None:
            return trainer.strategy.root_device
        if not self.cpu and torch.cuda.is_available():
            return torch.device("cuda", self.local_process_index % max(torch.cuda.device_count(), 1))
        if not self.cpu and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

    @property
    def process_index(self) -> int:
        trainer = self._get_trainer()
        if trainer is not None:
            return trainer.global_rank
        if _dist_ready():
            return torch.distributed.get_rank()
        return int(os.environ.get("RANK", 0))

    @property
    def local_process_index(self) -> int:
        trainer = self._get_trainer()
        if trainer is not None:
            return trainer.local_rank
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def num_processes(self) -> int:
        trainer = self._get_trainer()
        if trainer is not None:
            return trainer.world_size
        if _dist_ready():
            return torch.distributed.get_world_size()
        return int(os.environ.get("WORLD_SIZE", 1))

    @property
    def is_main_process(self) -> bool:
        """True for one process only."""
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        """True for one process per machine."""
        return self.local_process_index == 0

    @property
    def is_last_process(self) -> bool:
        return self.process_index == self.num_processes - 1

    @property
    def use_distributed(self) -> bool:
        return self.num_processes > 1

    @property
    def distributed_type(self) -> DistributedType:
        """DEEPSPEED / FSDP from Lightning's DeepSpeed, FSDP or ModelParallel strategy (any number of processes, as
        accelerate reports them), XLA from an XLA strategy; otherwise MULTI_GPU / MULTI_CPU / ... by the device type
        when there are several processes, NO for one."""
        trainer = self._get_trainer()
        if trainer is not None:
            from lightning.pytorch.strategies import (
                DeepSpeedStrategy,
                FSDPStrategy,
                ModelParallelStrategy,
                SingleDeviceXLAStrategy,
                XLAStrategy,
            )

            strategy = trainer.strategy
            if isinstance(strategy, DeepSpeedStrategy):
                return DistributedType.DEEPSPEED
            if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
                return DistributedType.FSDP
            if isinstance(strategy, (XLAStrategy, SingleDeviceXLAStrategy)):
                return DistributedType.XLA
        if self.num_processes <= 1:
            return DistributedType.NO
        return _MULTI_DEVICE.get(self.device.type, DistributedType.MULTI_GPU)

    @property
    def is_fsdp2(self) -> bool:
        """True under Lightning's ModelParallelStrategy (FSDP2's fully_shard), False under FSDPStrategy (FSDP1)."""
        trainer = self._get_trainer()
        if trainer is None:
            return False
        from lightning.pytorch.strategies import ModelParallelStrategy

        return isinstance(trainer.strategy, ModelParallelStrategy)

    @property
    def multi_device(self) -> bool:
        return self.use_distributed and self.distributed_type not in (
            DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.DEEPSPEED, DistributedType.FSDP,
            DistributedType.XLA, DistributedType.MEGATRON_LM,
        )

    @property
    def mixed_precision(self) -> str:
        """"no", "fp16", "bf16" (or "fp8" for Transformer Engine) from the Lightning Trainer's precision."""
        trainer = self._get_trainer()
        if trainer is None:
            return "no"
        return _MIXED_PRECISION.get(str(trainer.precision), "no")

    @property
    def scaler(self):
        """The fp16 gradient scaler of Lightning's precision plugin (None without one)."""
        trainer = self._get_trainer()
        return None if trainer is None else getattr(trainer.precision_plugin, "scaler", None)

    @property
    def deepspeed_plugin(self):
        """None: there are no accelerate plugins (see `distributed_type` for Lightning's DeepSpeed strategy)."""
        return None

    # ------------------------------------------------------------------ backward and precision

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """accelerate's `backward`: divides by `gradient_accumulation_steps` (except under DeepSpeed, which scales
        itself), then `LightningModule.manual_backward`, so the precision plugin's loss scaling and the strategy's
        backward hooks apply. `learning_rate=` runs a LOMO optimizer's fused backward, as in accelerate."""
        learning_rate = kwargs.pop("learning_rate", None)
        if self.gradient_accumulation_steps != 1 and self.distributed_type != DistributedType.DEEPSPEED:
            loss = loss / self.gradient_accumulation_steps
        if learning_rate is not None:
            for optimizer in self._attached_optimizers():
                if hasattr(optimizer, "fused_backward"):  # LOMO / AdaLomo update the weights during backward
                    optimizer.fused_backward(loss, learning_rate)
                    return
        module = self._attached_module()
        if module is not None:
            module.manual_backward(loss, **kwargs)
        else:  # no Lightning run: no precision plugin, no strategy
            loss.backward(**kwargs)

    @contextlib.contextmanager
    def autocast(self, autocast_handler: AutocastKwargs | None = None):
        """The precision plugin's forward context (autocast for "16-mixed"/"bf16-mixed", the default dtype for true
        half precision). An `AutocastKwargs(enabled=False)` turns autocast off inside the block, as in accelerate."""
        trainer = self._get_trainer()
        if autocast_handler is not None:
            options = autocast_handler.to_kwargs()
            if not options.pop("enabled", True):
                with torch.autocast(device_type=self.device.type, enabled=False):
                    yield
                return
            mixed = None if trainer is None else str(trainer.precision)
            if mixed in ("16-mixed", "bf16-mixed"):
                dtype = torch.bfloat16 if mixed == "bf16-mixed" else torch.float16
                with torch.autocast(device_type=self.device.type, dtype=dtype, **options):
                    yield
                return
        context = contextlib.nullcontext() if trainer is None else trainer.precision_plugin.forward_context()
        with context:
            yield

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module | None = None):
        """No gradient synchronisation inside the block: the model's own `no_sync` (a DDP module), otherwise the
        strategy's `block_backward_sync` (Lightning's DDP-wrapped LightningModule)."""
        context = contextlib.nullcontext()
        if self.use_distributed:
            if model is not None and hasattr(model, "no_sync"):
                context = model.no_sync()
            else:
                trainer = self._get_trainer()
                if trainer is not None and hasattr(trainer.strategy, "block_backward_sync"):
                    context = trainer.strategy.block_backward_sync()
        with context:
            yield

    # ------------------------------------------------------------------ collectives

    def gather(self, tensor):
        """Gather the tensors of a nested list/tuple/dict from all processes, concatenated on dim 0 in rank order (a
        0-dim tensor becomes one element per process). Every process gets the result; shapes must match (use
        `pad_across_processes` first for ragged ones)."""
        return self._gather(tensor, None)

    def _gather(self, tensor, group):
        """`gather` over the processes of `group` (a torch.distributed group; None: all)."""
        processes = self.num_processes if group is None else torch.distributed.get_world_size(group)
        if processes == 1:
            return tensor
        strategy = self._strategy_for_collectives()

        def _gather_one(t: torch.Tensor) -> torch.Tensor:
            if t.ndim == 0:
                t = t[None]
            if strategy is not None:
                gathered = strategy.all_gather(t, group=group)  # (processes, *t.shape)
            else:
                parts = [torch.empty_like(t) for _ in range(processes)]
                torch.distributed.all_gather(parts, t.contiguous(), group=group)
                gathered = torch.stack(parts)
            return gathered.reshape(-1, *t.shape[1:])

        return _nested_map(_gather_one, tensor)

    def gather_data_parallel(self, tensor):
        """hf_lightning's own (accelerate has none): `gather` over the data-parallel ranks only. Under tensor
        parallelism the ranks of one TP group evaluate the same samples; gathering from all of them would count each
        sample tp_size times. Without tensor parallelism: `gather`."""
        return self._gather(tensor, self._data_parallel_group())

    def gather_object_data_parallel(self, obj: Any) -> list | Any:
        """hf_lightning's own: `gather_object` over the data-parallel ranks only (see `gather_data_parallel`)."""
        return self._gather_object(obj, self._data_parallel_group())

    def _data_parallel_group(self):
        """The process group of this rank's data-parallel peers under a ModelParallelStrategy with tensor parallelism
        (its mesh's "data_parallel" dimension), None otherwise (all processes are data-parallel peers)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        trainer = self._get_trainer()
        strategy = getattr(trainer, "strategy", None)
        if not isinstance(strategy, ModelParallelStrategy) or not _dist_ready():
            return None
        mesh = strategy.device_mesh
        return mesh["data_parallel"].get_group() if mesh["tensor_parallel"].size() > 1 else None

    def gather_object(self, obj: Any) -> list | Any:
        """All processes' picklable objects in rank order, as accelerate's `gather_object`: lists and tuples are
        concatenated, a tensor contributes its rows; any other object is one entry per process. One process: `obj`
        as it is."""
        return self._gather_object(obj, None)

    def _gather_object(self, obj: Any, group) -> list | Any:
        """`gather_object` over the processes of `group` (a torch.distributed group; None: all)."""
        processes = self.num_processes if group is None else torch.distributed.get_world_size(group)
        if processes == 1:
            return obj
        strategy = self._strategy_for_collectives()
        if _dist_ready():
            gathered = [None] * processes
            torch.distributed.all_gather_object(gathered, obj, group=group)
        else:  # a strategy without a torch.distributed group (XLA): one broadcast per process
            gathered = [strategy.broadcast(obj, src=rank) for rank in range(self.num_processes)]
        result = []
        for item in gathered:
            if isinstance(item, (list, tuple)) or (isinstance(item, torch.Tensor) and item.ndim > 0):
                result.extend(item)  # as accelerate: one entry per element (per row of a tensor)
            else:
                result.append(item)  # accelerate would iterate it (a dict's keys, a string's characters)
        return result

    def gather_for_metrics(self, input_data, use_gather_object: bool = False):
        """`gather` (tensors) or `gather_object` (anything else, or `use_gather_object=True`), then, as accelerate,
        on the last batch of an evaluation only its first `remainder` rows: the samples that the sharded loader
        repeated to give every process a full last batch are dropped. Under tensor parallelism only the
        data-parallel ranks are gathered (the ranks of one TP group hold the same samples): each sample once."""
        try:
            recursively_apply(lambda x: x, input_data, error_on_other_type=True)
            all_tensors = True
        except TypeError:
            all_tensors = False
        use_gather_object = use_gather_object or not all_tensors
        group = self._data_parallel_group()
        data = self._gather_object(input_data, group) if use_gather_object else self._gather(input_data, group)
        if not self.end_of_dataloader or self.remainder <= 0:
            return data
        try:
            if use_gather_object:
                return data[: self.remainder]
            return recursively_apply(lambda tensor: tensor[: self.remainder], data)
        except TypeError:  # as accelerate: what cannot be sliced is returned whole
            return data

    def pad_across_processes(self, tensor, dim: int = 0, pad_index=0, pad_first: bool = False):
        """Pad the tensors of a nested list/tuple/dict along `dim` to the largest size over all processes (with
        `pad_index`, at the end or with `pad_first` at the start), so that they can be gathered."""

        def _pad_one(t: torch.Tensor) -> torch.Tensor:
            if getattr(t, "is_nested", False) or dim >= t.ndim or dim < -t.ndim:
                return t
            d = dim % t.ndim
            sizes = self.gather(torch.tensor(t.shape, device=t.device)[None]).cpu()
            max_size = int(sizes[:, d].max())
            if max_size == t.shape[d]:
                return t
            new_shape = list(t.shape)
            new_shape[d] = max_size
            padded = t.new_zeros(new_shape) + pad_index
            start = max_size - t.shape[d] if pad_first else 0
            index = tuple(slice(start, start + t.shape[d]) if i == d else slice(None) for i in range(t.ndim))
            padded[index] = t
            return padded

        return _nested_map(_pad_one, tensor)

    def reduce(self, tensor, reduction: str = "sum", scale: float = 1.0):
        """Reduce the tensors of a nested list/tuple/dict over all processes: "sum", "mean", "max", or "none" (a copy,
        as accelerate documents). Every process gets the result; the input is left unchanged. `scale` only matters on
        XLA in accelerate and is ignored."""
        if reduction not in ("sum", "mean", "max", "none"):
            raise ValueError(f"reduction must be 'sum', 'mean', 'max' or 'none', got {reduction!r}.")
        world = self.num_processes
        strategy = self._strategy_for_collectives() if world > 1 and reduction != "none" else None

        def _reduce_one(t: torch.Tensor) -> torch.Tensor:
            result = t.clone()  # Lightning's reduce is in place
            if world == 1 or reduction == "none":
                return result
            op = "max" if reduction == "max" else "sum"
            if strategy is not None:
                result = strategy.reduce(result, reduce_op=op)
            else:
                reduce_op = torch.distributed.ReduceOp
                torch.distributed.all_reduce(result, reduce_op.MAX if op == "max" else reduce_op.SUM)
            if reduction == "mean":
                result = result.div_(world) if result.is_floating_point() else result / world
            return result

        return _nested_map(_reduce_one, tensor)

    def wait_for_everyone(self) -> None:
        """Block until every process gets here (the strategy's barrier)."""
        trainer = self._get_trainer()
        if trainer is not None:
            trainer.strategy.barrier()
        elif _dist_ready():
            torch.distributed.barrier()

    def set_trigger(self) -> None:
        """Mark this process; a later `check_trigger` on every process sees it (accelerate's breakpoint API)."""
        self.flag_tensor = torch.tensor(1, device=self.device)

    def check_trigger(self) -> bool:
        """True on every process if any process called `set_trigger` (then reset). Call it on every process."""
        if self.flag_tensor is None:
            self.flag_tensor = torch.tensor(0, device=self.device)
        if self.reduce(self.flag_tensor).item() >= 1:
            self.flag_tensor = torch.tensor(0, device=self.device)
            return True
        return False

    # ------------------------------------------------------------------ per-process control

    @contextlib.contextmanager
    def split_between_processes(self, inputs, apply_padding: bool = False):
        """This process's contiguous share of a list, tuple, tensor, dict of those, or datasets.Dataset (the first
        processes get one more when it does not divide). `apply_padding` repeats the last element so that every
        process gets the same count (drop those after gathering). As accelerate's, without communication."""
        world, rank = self.num_processes, self.process_index
        if world == 1:
            yield inputs
            return
        length = len(inputs)
        if isinstance(inputs, Mapping):
            lengths = {len(v) for v in inputs.values()}
            if len(lengths) > 1:
                raise ValueError("All values in the dictionary must have the same length")
            length = lengths.pop() if lengths else 0
        per_process, extras = divmod(length, world)
        start = rank * per_process + min(rank, extras)
        end = start + per_process + (1 if rank < extras else 0)
        target = per_process + (1 if extras > 0 else 0)

        def _split(values):
            if isinstance(values, (list, tuple, torch.Tensor)):
                part = values[start:end]
                if apply_padding and len(values) and len(part) < target:
                    missing = target - len(part)
                    if isinstance(part, torch.Tensor):
                        part = torch.cat([part, values[-1:].expand(missing, *values.shape[1:])])
                    else:
                        part = honor_type(part, list(part) + [values[-1]] * missing)
                return part
            if isinstance(values, Mapping):
                return type(values)({key: _split(value) for key, value in values.items()})
            datasets = sys.modules.get("datasets")
            if datasets is not None and isinstance(values, datasets.Dataset):
                indices = list(range(min(start, len(values)), min(end, len(values))))
                if apply_padding and len(values):
                    indices += [len(values) - 1] * (target - len(indices))
                return values.select(indices)
            return values

        yield _split(inputs)

    def _goes_first(self, is_first: bool):
        if not is_first:
            self.wait_for_everyone()
        yield
        if is_first:
            self.wait_for_everyone()

    @contextlib.contextmanager
    def main_process_first(self):
        """The main process runs the block first; the others enter it once the main process has left it."""
        yield from self._goes_first(self.is_main_process)

    @contextlib.contextmanager
    def local_main_process_first(self):
        """The main process of each machine runs the block first, then the others of that machine."""
        yield from self._goes_first(self.is_local_main_process)

    def print(self, *args, **kwargs) -> None:
        """`print` once per machine (on the local main process), as accelerate's."""
        if self.is_local_main_process:
            print(*args, **kwargs)

    def on_main_process(self, function: Callable | None = None):
        """Decorator: run `function` on the main process only (others get None)."""
        return self._on(function, lambda: self.is_main_process)

    def on_local_main_process(self, function: Callable | None = None):
        """Decorator: run `function` on the main process of each machine only."""
        return self._on(function, lambda: self.is_local_main_process)

    def on_last_process(self, function: Callable):
        """Decorator: run `function` on the last process only."""
        return self._on(function, lambda: self.is_last_process)

    def on_process(self, function: Callable | None = None, process_index: int | None = None):
        """Decorator: run `function` on the process of index `process_index` only."""
        if function is None:
            return partial(self.on_process, process_index=process_index)
        return self._on(function, lambda: self.process_index == process_index)

    def on_local_process(self, function: Callable | None = None, local_process_index: int | None = None):
        """Decorator: run `function` on the process of local index `local_process_index` only."""
        if function is None:
            return partial(self.on_local_process, local_process_index=local_process_index)
        return self._on(function, lambda: self.local_process_index == local_process_index)

    def _on(self, function: Callable | None, runs_here: Callable[[], bool]):
        if function is None:
            raise ValueError("Use the decorator on a function: @accelerator.on_main_process")

        def _inner(*args, **kwargs):
            return function(*args, **kwargs) if runs_here() else None

        _inner.__wrapped__ = function
        return _inner

    # ------------------------------------------------------------------ models and saving

    def unwrap_model(
        self, model: nn.Module, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True
    ) -> nn.Module:
        """The model without its DDP / FSDP / DeepSpeed containers (and without torch.compile's wrapper when
        `keep_torch_compile=False`), as accelerate's. The LightningModule of this accelerator (what Lightning's
        strategy wraps) unwraps further, to its `model`: the transformers model."""
        module = self._get_module()
        if module is not None and isinstance(getattr(module, "model", None), nn.Module):
            if extract_model_from_parallel(model, keep_fp32_wrapper, keep_torch_compile=False) is module:
                model = module.model
        return extract_model_from_parallel(model, keep_fp32_wrapper, keep_torch_compile)

    def get_state_dict(self, model: nn.Module, unwrap: bool = True) -> dict:
        """The model's full state dict. Under FSDP it is gathered (on every process: call it on all) through
        torch's `get_model_state_dict`, offloaded to CPU; under DeepSpeed ZeRO-3 use Lightning's checkpoint instead."""
        distributed_type = self.distributed_type
        if distributed_type == DistributedType.FSDP:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        strategy = None if self._get_trainer() is None else self._get_trainer().strategy
        if distributed_type == DistributedType.DEEPSPEED and getattr(strategy, "zero_stage_3", False):
            raise NotImplementedError(
                "get_state_dict under DeepSpeed ZeRO-3: save a checkpoint (trainer.lightning_trainer.save_checkpoint) "
                "and convert it with lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict."
            )
        if unwrap:
            model = self.unwrap_model(model)
        return model.state_dict()

    def save(self, obj: Any, f, safe_serialization: bool = False) -> None:
        """`torch.save` (or safetensors' `save_file` with `safe_serialization`) on the main process only."""
        if not self.is_main_process:
            return
        if safe_serialization:
            from safetensors.torch import save_file

            if isinstance(obj, OrderedDict):
                obj = clean_state_dict_for_safetensors(obj)
            save_file(obj, f, metadata={"format": "pt"})
        else:
            torch.save(obj, f)

    def free_memory(self, *objects):
        """Drop the references to `objects` (returned as Nones to reassign), collect garbage, empty the device cache."""
        return release_memory(*objects)

    def clear(self, *objects):
        return self.free_memory(*objects)

    # ------------------------------------------------------------------ internals

    def _attached_module(self):
        """The LightningModule if a Lightning Trainer runs it (manual_backward needs that), else None."""
        module = self._get_module()
        trainer = self._get_trainer()
        if module is None or trainer is None or trainer.lightning_module is not module:
            return None
        return module

    def _attached_optimizers(self) -> list:
        trainer = self._get_trainer()
        return [] if trainer is None else list(trainer.optimizers)

    def _strategy_for_collectives(self):
        """The Lightning strategy to communicate with, or None to use torch.distributed directly (no Lightning
        Trainer yet, but a process group is up). Refuses when several processes have no process group yet."""
        trainer = self._get_trainer()
        if self.num_processes > 1 and not _dist_ready() and self.distributed_type != DistributedType.XLA:
            raise RuntimeError(
                f"{self.num_processes} processes but no process group yet: hf_lightning's Lightning strategy starts it "
                "when train(), evaluate() or predict() runs. Call collective operations (gather, reduce, "
                "pad_across_processes, wait_for_everyone ...) from inside those, e.g. in a callback or compute_loss."
            )
        return None if trainer is None else trainer.strategy

    def __deepcopy__(self, memo):
        # As accelerate's Accelerator: a deep copy (of a Trainer's attributes, say) points to the same object.
        return self

    def __getattr__(self, name: str):
        # Only called for names the class does not define.
        if name in _MISSING_ATTRIBUTES:
            raise AttributeError(
                f"accelerator.{name} is accelerate's, with no counterpart in hf_lightning: {_MISSING_ATTRIBUTES[name]}."
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(distributed_type={self.distributed_type.value}, "
            f"num_processes={self.num_processes}, "
            f"process_index={self.process_index}, device={self.device}, mixed_precision={self.mixed_precision!r})"
        )


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _not_implemented(name: str, message: str):
    def method(self, *args, **kwargs):
        raise NotImplementedError(f"accelerator.{name}() is accelerate's, not available in hf_lightning: {message}.")

    method.__name__ = name
    method.__qualname__ = f"LightningAccelerator.{name}"
    method.__doc__ = f"Not available: {message}."
    return method


for _name, _message in _NOT_IMPLEMENTED_METHODS.items():
    setattr(LightningAccelerator, _name, _not_implemented(_name, _message))
del _name, _message
