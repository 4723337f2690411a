"""What one training or prediction step computes, as transformers 5.x computes it.

The facade's overridable hooks (`compute_loss`, `training_step`, `prediction_step`, `_get_num_items_in_batch`)
call these functions with everything they need passed in, so that a subclass that overrides one hook still gets
transformers' behaviour from the others.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.trainer_pt_utils import LabelSmoother, nested_detach
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils.generic import can_return_loss, find_labels

from . import compat, inputs


@dataclass(frozen=True)
class ModelTraits:
    """What transformers' Trainer reads off a model once (its attributes of the same names)."""

    model_accepts_loss_kwargs: bool  # forward takes num_items_in_batch
    label_names: list[str]
    can_return_loss: bool
    loss_shifts_labels: bool  # a causal-LM loss: label tokens are counted from position 1
    label_smoother: LabelSmoother | None


def inspect_model(model: nn.Module, args) -> ModelTraits:
    """transformers' checks and introspection of the model given to the Trainer."""
    base_model_names = {
        name for value in MODEL_MAPPING_NAMES.values() for name in (value if isinstance(value, tuple) else (value,))
    }
    if model.__class__.__name__ in base_model_names:
        raise ValueError(
            f"The model you have picked ({model.__class__.__name__}) cannot be used as is for training: it only "
            "computes hidden states and does not accept any labels. Choose a model with a head suitable for your "
            "task, like any of the `AutoModelForXxx` classes."
        )
    # A PEFT model's forward takes *args/**kwargs: transformers reads the traits off its base model.
    inner = unwrap_peft_model(model)
    if hasattr(inner, "accepts_loss_kwargs"):
        accepts_loss_kwargs = inner.accepts_loss_kwargs
    else:
        forward_params = inspect.signature(inner.forward).parameters
        accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in forward_params.values())
    config = getattr(inner, "config", None)
    return ModelTraits(
        model_accepts_loss_kwargs=accepts_loss_kwargs,
        label_names=find_labels(inner.__class__) if args.label_names is None else args.label_names,
        can_return_loss=can_return_loss(inner.__class__),
        loss_shifts_labels=LOSS_MAPPING.get(getattr(inner, "loss_type", None)) is ForCausalLMLoss
        and not getattr(config, "is_encoder_decoder", False),
        label_smoother=inputs.label_smoother(model, args),
    )


def train_mode(model: nn.Module) -> None:
    """`model.train()`, as transformers calls it before every micro-batch, skipped when every module already trains
    and none overrides `train` (the recursive call would change nothing)."""
    plain = (nn.Module.train, PreTrainedModel.train)
    stack = [model]
    while stack:
        module = stack.pop()
        if not module.training or type(module).train not in plain:
            model.train()
            return
        stack.extend(module.children())


@functools.lru_cache(maxsize=None)
def takes_num_items(compute_loss) -> bool:
    """Whether a compute_loss override has transformers 5's `num_items_in_batch` (the guide's 4-argument one does not)."""
    params = inspect.signature(compute_loss).parameters
    return "num_items_in_batch" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def compute_loss(model, inputs, num_items_in_batch, *, label_smoother, compute_loss_func, model_accepts_loss_kwargs,
                 args) -> tuple[torch.Tensor, Any]:
    """transformers 5.x's compute_loss: the model's own loss, label smoothing, or compute_loss_func; (loss, outputs)."""
    if (label_smoother is not None or compute_loss_func is not None) and "labels" in inputs:
        labels = inputs.pop("labels")
    else:
        labels = None
    if model_accepts_loss_kwargs and num_items_in_batch is not None:
        inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
    outputs = model(**inputs)
    if compute_loss_func is not None:
        loss = compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
    elif labels is not None:
        # A PEFT wrapper's class names no task: transformers asks its base model whether it is a causal LM.
        shift = type(unwrap_peft_model(model)).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        loss = label_smoother(outputs, labels, shift_labels=shift, num_items_in_batch=num_items_in_batch)
    else:
        if isinstance(outputs, dict) and "loss" not in outputs:
            raise ValueError(
                f"{model.__class__.__name__} did not return a loss; it returned only: {','.join(outputs.keys())}. "
                f"Its inputs were: {','.join(inputs.keys())}. Add the labels to the dataset (a `labels` column), "
                "or pass `compute_loss_func=` / override `compute_loss`."
            )
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if loss is None:
            raise ValueError(
                f"{model.__class__.__name__} returned loss=None: the batch has no labels "
                f"(it holds {', '.join(inputs.keys())}). Add a `labels` column or set `label_names`."
            )
    if args.average_tokens_across_devices and (model_accepts_loss_kwargs or compute_loss_func) and num_items_in_batch is not None:
        from .tensor_parallel import data_parallel

        loss = loss * data_parallel(args)[0]  # transformers: num_processes // tp_size
    return loss, outputs


def prediction_step(model, inputs, prediction_loss_only: bool, ignore_keys, *, label_names, can_return_loss,
                    loss_fn) -> tuple:
    """transformers' prediction_step: (loss, logits, labels) of one evaluation batch; `loss_fn(inputs)` returns
    (loss, outputs) through the facade's compute_loss."""
    has_labels = len(label_names) > 0 and all(inputs.get(k) is not None for k in label_names)
    return_loss = inputs.get("return_loss")
    if return_loss is None:
        return_loss = can_return_loss
    loss_without_labels = len(label_names) == 0 and return_loss
    if ignore_keys is None:
        ignore_keys = getattr(getattr(model, "config", None), "keys_to_ignore_at_inference", ["cache"]) or []
    labels = None
    if has_labels or loss_without_labels:
        labels = nested_detach(tuple(inputs.get(name) for name in label_names))
        if len(labels) == 1:
            labels = labels[0]
    with torch.no_grad():
        if has_labels or loss_without_labels:
            loss, outputs = loss_fn(inputs)
            loss = loss.detach().mean()
            skip = ignore_keys + ["loss"]
            logits = tuple(v for k, v in outputs.items() if k not in skip) if isinstance(outputs, dict) else outputs[1:]
        else:
            loss = None
            outputs = model(**inputs)
            logits = tuple(v for k, v in outputs.items() if k not in ignore_keys) if isinstance(outputs, dict) else outputs
    if prediction_loss_only:
        return (loss, None, None)
    logits = nested_detach(logits)
    if len(logits) == 1:
        logits = logits[0]
    return (loss, logits, labels)


def generation_step(model, inputs, gen_kwargs: dict, *, generating_model, label_smoother, pad, loss_context,
                    prediction_loss_only: bool, partitioned: bool = False) -> tuple:
    """transformers' Seq2SeqTrainer.prediction_step with `predict_with_generate`: (loss, generated ids, labels) of one
    evaluation batch. `generating_model` (the unwrapped model) generates with `gen_kwargs`, `model` computes the loss
    as transformers does there (the model's own loss or the label smoother, not compute_loss); generated ids and
    labels are padded by `pad(tensor, length)` to the generation config's length. `partitioned`: the run's strategy
    partitions the parameters (ZeRO-3), also where no transformers DeepSpeed config says so (a DeepSpeedStrategy
    given in lightning_trainer_kwargs): every rank must then run as many forwards (synced_gpus), as transformers."""
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    has_labels = "labels" in inputs
    gen_kwargs = dict(gen_kwargs)
    for name in ("num_beams", "max_length"):  # None means "the generation config's value"
        if name in gen_kwargs and gen_kwargs[name] is None:
            gen_kwargs.pop(name)
    gen_kwargs["synced_gpus"] = gen_kwargs.get(
        "synced_gpus", partitioned or is_deepspeed_zero3_enabled() or is_fsdp_managed_module(generating_model)
    )
    generation_inputs = inputs
    # decoder_input_ids built from the labels (DataCollatorForSeq2Seq(model=...)) would make generate continue them
    if (
        "labels" in inputs
        and "decoder_input_ids" in inputs
        and inputs["labels"].shape == inputs["decoder_input_ids"].shape
    ):
        generation_inputs = {k: v for k, v in inputs.items() if k not in ("decoder_input_ids", "decoder_attention_mask")}
    generated_tokens = generating_model.generate(**generation_inputs, **gen_kwargs)

    gen_config = compat.settle_generation_config(generating_model)
    generated_tokens = _pad_to_generation_length(generated_tokens, gen_config, pad)

    with torch.no_grad():
        if has_labels:
            with loss_context():
                outputs = model(**inputs)
            if label_smoother is not None:
                loss = label_smoother(outputs, inputs["labels"]).detach().mean()
            else:
                loss = (outputs["loss"] if isinstance(outputs, dict) else outputs[0]).detach().mean()
        else:
            loss = None
    if prediction_loss_only:
        return loss, None, None
    labels = _pad_to_generation_length(inputs["labels"], gen_config, pad) if has_labels else None
    return loss, generated_tokens, labels


def _pad_to_generation_length(tensor: torch.Tensor, gen_config, pad) -> torch.Tensor:
    """transformers' rule: pad to max_length, or to max_new_tokens + 1 when that is what bounds the output."""
    if tensor.shape[-1] < gen_config.max_length:
        return pad(tensor, gen_config.max_length)
    if gen_config.max_new_tokens is not None and tensor.shape[-1] < gen_config.max_new_tokens + 1:
        return pad(tensor, gen_config.max_new_tokens + 1)
    return tensor
