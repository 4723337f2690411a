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
* `galore_adafactor_layerwise`: transformers gives GaLoreAdafactor its fixed-lr settings (scale_parameter=False,
  relative_step=False) for `galore_adafactor` only, so the layer-wise form fails in its own lookup ("Cannot combine
  manual lr and relative_step=True"); `lookup_fixes` applies the same settings to the layer-wise form.
* Schedule-free optimizers are put in train() mode for training and eval() mode for evaluation and before weights
  are saved (see module.py and checkpoint.py).
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
import transformers
from transformers.trainer_pt_utils import LayerWiseDummyOptimizer


def is_lomo(optimizer) -> bool:
    """Called every micro-batch: no import attempt (a failing one costs a file-system search each time); an optimizer
    can only be a LOMO one once `lomo_optim` is imported."""
    module = sys.modules.get("lomo_optim")
    return module is not None and isinstance(optimizer, (module.Lomo, module.AdaLomo))


@contextlib.contextmanager
def _cuda_calls_stay_put():
    """AdaLomo allocates its state with `.cuda()`; without CUDA keep those tensors where they are."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


# Optimizers whose kernels exist for CUDA only (bitsandbytes' 8-bit GaLore).
CUDA_ONLY = ("galore_adamw_8bit", "galore_adamw_8bit_layerwise")


@contextlib.contextmanager
def lookup_fixes(args):
    """Around transformers' optimizer lookup: the fixes listed in the module docstring."""
    name = str(getattr(args.optim, "value", args.optim))
    if name in CUDA_ONLY and not torch.cuda.is_available():
        raise ValueError(
            f"TrainingArguments.optim={name!r} needs a CUDA GPU (bitsandbytes' 8-bit GaLore kernels); on this "
            "machine use 'galore_adamw' or 'adamw_bnb_8bit'."
        )
    if str(getattr(args.optim, "value", args.optim)) != "galore_adafactor_layerwise":
        yield
        return
    import galore_torch

    original = galore_torch.GaLoreAdafactor

    class GaLoreAdafactor(original):
        def __init__(self, params, scale_parameter=False, relative_step=False, **kwargs):
            super().__init__(params, scale_parameter=scale_parameter, relative_step=relative_step, **kwargs)

    galore_torch.GaLoreAdafactor = GaLoreAdafactor  # transformers imports it inside the lookup
    try:
        yield
    finally:
        galore_torch.GaLoreAdafactor = original


def optimizer_state_globals() -> list:
    """Classes that optimizer state may hold, allowed when loading optimizer.pt with weights_only=True."""
    import importlib

    allowed = []
    for module, name in (
        ("galore_torch.galore_projector", "GaLoreProjector"),
        ("apollo_torch.random_projector", "GradientProjector"),
        ("apollo_torch.svd_projector", "GaLoreProjector"),
    ):
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return allowed


def build_optimizer(optimizer_cls, params, optimizer_kwargs: dict):
    with _cuda_calls_stay_put():
        return optimizer_cls(params, **optimizer_kwargs)


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
