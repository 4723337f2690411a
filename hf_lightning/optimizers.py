"""Optimizers that break the `step()` contract, fitted to Lightning's manual optimization.

transformers' optimizer lookup (`Trainer.get_optimizer_cls_and_kwargs`) builds them; this module only adapts what
Lightning cannot run as is:

* LOMO / AdaLomo update the weights inside `fused_backward(loss, lr)` and have no `step()`: the facade's
  training_step calls `fused_backward` with the current learning rate, and `step()` only runs Lightning's closure
  (so `on_before_optimizer_step`, grad_norm and `on_pre_optimizer_step` still happen, as in transformers, where
  accelerate makes `step()` a no-op). AdaLomo's constructor hard-codes `.cuda()`; on a machine without CUDA its
  state is created on the parameters' device instead (transformers 5.24 fails there).
* Layer-wise GaLore (and every `*_layerwise` optim): each parameter is stepped in a post-accumulate-grad hook behind
  transformers' `LayerWiseDummyOptimizer`; its `step()` likewise only runs the closure. Each parameter's optimizer
  gets its own scheduler from `transformers.get_scheduler`, stepped in the same hook (transformers 5.24 builds those
  only when its scheduler sees the unwrapped dummy, which it never does, and `LayerWiseDummyScheduler` fails on
  torch >= 2.10's strict zip): the outer scheduler Lightning sees is a constant one.
* Schedule-free optimizers are put in train() mode for training and eval() mode for evaluation and before weights
  are saved.

`OptimizerQuirks` is the one interface the rest of the package sees: `train()`, `eval()` and `backward()`.
"""

from __future__ import annotations

import sys
import types

import torch
import transformers
from torch.overrides import TorchFunctionMode
from transformers.optimization import GreedyLR
from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

# Schedulers that transformers steps on the evaluation metric (`metric_for_best_model`) after each in-training
# evaluation, never per optimizer step.
METRIC_DRIVEN_SCHEDULERS = (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)


def steps_on_metric(scheduler) -> bool:
    return isinstance(scheduler, METRIC_DRIVEN_SCHEDULERS)


def is_lomo(optimizer) -> bool:
    """Called every micro-batch: no import attempt (a failing one costs a file-system search each time); an optimizer
    can only be a LOMO one once `lomo_optim` is imported."""
    module = sys.modules.get("lomo_optim")
    return module is not None and isinstance(optimizer, (module.Lomo, module.AdaLomo))


class _CudaCallsStayPut(TorchFunctionMode):
    """AdaLomo allocates its state with `.cuda()`; on a machine without CUDA, keep those tensors where they are.
    A torch function mode applies to the code run inside it on this thread only: nothing of torch is replaced."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **(kwargs or {}))


# Optimizers whose kernels exist for CUDA only (bitsandbytes' 8-bit GaLore).
CUDA_ONLY = ("galore_adamw_8bit", "galore_adamw_8bit_layerwise")


def look_up(lookup, args, model):
    """(optimizer class, kwargs) from transformers' lookup, refusing first what this machine cannot run, and naming
    the pip extra when the optimizer's package is missing."""
    name = str(getattr(args.optim, "value", args.optim))
    if name in CUDA_ONLY and not torch.cuda.is_available():
        raise ValueError(
            f"TrainingArguments.optim={name!r} needs a CUDA GPU (bitsandbytes' 8-bit GaLore kernels); on this "
            "machine use 'galore_adamw' or 'adamw_bnb_8bit'."
        )
    try:
        return lookup(args, model)
    except ImportError as err:
        raise ImportError(
            f"TrainingArguments.optim={args.optim!r} needs a package that is not installed: {err} "
            "The optimizers of the transformers guide install with: pip install 'hf-lightning[optimizers]'."
        ) from err


def optimizer_state_globals() -> list:
    """Classes that optimizer state may hold, allowed when loading optimizer.pt with weights_only=True.

    Only from packages already imported: state holding a GaLore/APOLLO projector loads into an optimizer of that
    package, built before the load. Importing them here would import bitsandbytes for a plain AdamW resume too, and
    its warnings with it."""
    allowed = []
    for module, name in (
        ("galore_torch.galore_projector", "GaLoreProjector"),
        ("apollo_torch.random_projector", "GradientProjector"),
        ("apollo_torch.svd_projector", "GaLoreProjector"),
    ):
        found = getattr(sys.modules.get(module), name, None)
        if found is not None:
            allowed.append(found)
    return allowed


def build_optimizer(optimizer_cls, model, decay: set[str], args, optimizer_kwargs: dict):
    """transformers' `create_optimizer`: two parameter groups (weight decay / none) of the trainable parameters, unless
    the optimizer takes the parameters or the model itself (GaLore, LOMO, layer-wise optimizers)."""
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
            "weight_decay": args.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad],
            "weight_decay": 0.0,
        },
    ]
    groups = _split_by_mesh(groups)
    optimizer_kwargs = dict(optimizer_kwargs)
    for key in ("params", "model", "optimizer_dict"):
        if key in optimizer_kwargs:
            groups = optimizer_kwargs.pop(key)
    if torch.cuda.is_available():
        return optimizer_cls(groups, **optimizer_kwargs)
    with _CudaCallsStayPut():
        return optimizer_cls(groups, **optimizer_kwargs)


def _split_by_mesh(groups: list[dict]) -> list[dict]:
    """transformers' create_optimizer: parameters on different device meshes (tensor parallel beside replicated ones)
    cannot share one foreach/fused kernel call, so each mesh gets its own parameter group."""
    from transformers.trainer_optimizer import has_mixed_dtensor

    if not has_mixed_dtensor(p for group in groups for p in group["params"]):
        return groups
    from torch.distributed.tensor import DTensor

    split = []
    for group in groups:
        by_mesh: dict = {}
        for p in group["params"]:
            by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        split.extend({**group, "params": params} for params in by_mesh.values())
    return split


def build_scheduler(args, optimizer, num_training_steps: int):
    """transformers' `create_scheduler` (`get_scheduler` with the warmup and kwargs of `args`); for a layer-wise
    optimizer, the per-parameter schedules and a constant outer one."""
    if isinstance(optimizer, LayerWiseDummyOptimizer):
        return layerwise_scheduler(args, optimizer, num_training_steps)
    return transformers.get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )


def _closure_only_step(self, closure=None):
    # The update already happened (fused backward / per-parameter hooks): run Lightning's closure only.
    return closure() if closure is not None else None


def adapt_for_lightning(optimizer):
    """Make `step()` safe to call through Lightning for optimizers that update elsewhere."""
    if is_lomo(optimizer) or isinstance(optimizer, LayerWiseDummyOptimizer):
        optimizer.step = types.MethodType(_closure_only_step, optimizer)
    return optimizer


def layerwise_scheduler(args, optimizer: LayerWiseDummyOptimizer, num_training_steps: int):
    """Per-parameter schedulers stepped in the per-parameter hooks; a constant outer scheduler for Lightning."""
    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if kind in ("reduce_lr_on_plateau", "greedy"):
        # The per-parameter hooks run inside the backward, where no evaluation metric exists.
        raise ValueError(
            f"TrainingArguments.lr_scheduler_type={kind!r} steps on the evaluation metric and cannot drive the "
            f"per-parameter schedules of optim={args.optim!r}; use a step-based lr_scheduler_type or a non-layer-wise "
            "optimizer."
        )
    schedulers = {
        param: transformers.get_scheduler(
            args.lr_scheduler_type,
            optimizer=param_optimizer,
            num_warmup_steps=args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
        for param, param_optimizer in optimizer.optimizer_dict.items()
    }

    def step_scheduler(param):
        schedulers[param].step()

    for param in schedulers:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(step_scheduler)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class OptimizerQuirks:
    """How one optimizer departs from torch's `step()` contract, as the loop needs to know it.

    * `backward(loss, default_backward, learning_rate)`: LOMO/AdaLomo update the weights inside their fused backward;
      every other optimizer leaves the backward to Lightning (`default_backward`, the module's manual_backward);
    * `train()` / `eval()`: schedule-free optimizers keep two sets of weights and must be told which one to use
      (train before a training step, eval before an evaluation or a save); a no-op for the others.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.updates_in_backward = is_lomo(optimizer)
        self.has_modes = callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))

    def backward(self, loss, default_backward, learning_rate) -> None:
        if self.updates_in_backward:
            self.optimizer.fused_backward(loss, learning_rate())
        else:
            default_backward(loss)

    def train(self) -> None:
        if self.has_modes:
            self.optimizer.train()

    def eval(self) -> None:
        if self.has_modes:
            self.optimizer.eval()


def current_learning_rate(optimizer, lr_scheduler, lightning_trainer=None) -> float:
    """transformers' `_get_learning_rate`: the scheduler's last lr (the optimizer's for a metric-driven scheduler).
    The scheduler Lightning holds wins: a Lightning callback may have swapped in its own (SWA's SWALR)."""
    scheduler = lr_scheduler
    if lightning_trainer is not None and lightning_trainer.lr_scheduler_configs:
        scheduler = lightning_trainer.lr_scheduler_configs[0].scheduler
    if steps_on_metric(scheduler):
        lr = optimizer.param_groups[0]["lr"]
    else:
        lr = scheduler.get_last_lr()[0]
    return lr.item() if torch.is_tensor(lr) else lr
