"""What a Trainer is given: transformers' constructor checks, and the spellings the transformers guide uses.

The guide's quickstart passes `tokenizer=` (transformers 5 renamed it `processing_class`) and its callback example
passes `callback=[...]`; transformers 5.24 fails on both, hf_lightning accepts them.
"""

from __future__ import annotations

import logging
import warnings

import transformers
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator
from transformers.trainer_pt_utils import LabelSmoother
from transformers.trainer_utils import SaveStrategy, has_length

from .gpu_strategies import apply_launcher_fsdp
from .training_args import apply_accelerator_config, check_supported


def resolve_args(args):
    """transformers' default arguments (output_dir="tmp_trainer"), type-checked, with every field's policy applied."""
    if args is None:
        from .training_args import TrainingArguments

        args = TrainingArguments(output_dir="tmp_trainer")
    if not isinstance(args, transformers.TrainingArguments):
        raise TypeError(
            f"`args` must be a TrainingArguments instance (hf_lightning's or transformers'), got {type(args).__name__}."
        )
    apply_launcher_fsdp(args)  # accelerate launch --use_fsdp: its settings become fsdp / fsdp_config
    check_supported(args)
    apply_accelerator_config(args)
    return args


def resolve_aliases(processing_class, tokenizer, callbacks, callback):
    """(processing_class, callbacks) from the guide's `tokenizer=` / `callback=` spellings."""
    if tokenizer is not None:
        if processing_class is not None and processing_class is not tokenizer:
            raise ValueError("Pass either `processing_class` or `tokenizer`, not both.")
        processing_class = tokenizer
    if callback is not None:
        if callbacks is not None:
            raise ValueError("Pass either `callbacks` or `callback`, not both.")
        callbacks = callback
    return processing_class, callbacks


def check_model_or_init(model, model_init) -> None:
    if model is None and model_init is None:
        raise RuntimeError("`Trainer` requires either a `model` or a `model_init` argument.")
    if model is not None and model_init is not None:
        raise ValueError("`Trainer` requires either a `model` or a `model_init` argument, but not both.")


def default_collator(processing_class):
    """transformers' default: padding with a tokenizer, else `default_data_collator`."""
    if isinstance(processing_class, PreTrainedTokenizerBase):
        return DataCollatorWithPadding(processing_class)
    return default_data_collator


def check_trainer_inputs(args, train_dataset, eval_dataset, optimizer, optimizer_cls_and_kwargs) -> None:
    """The checks transformers' Trainer makes of what it is given, with errors that name what to change."""
    if args.eval_strategy != "no" and eval_dataset is None:
        raise ValueError(
            f"TrainingArguments.eval_strategy={args.eval_strategy.value!r} needs an evaluation dataset: pass "
            "`eval_dataset=` to the Trainer, or set eval_strategy='no'."
        )
    if args.max_steps > 0 and args.num_train_epochs > 0:
        hf_logger = logging.getLogger("transformers.trainer")  # transformers' line, on its logger
        hf_logger.info("max_steps is given, it will override any value given in num_train_epochs")
    if train_dataset is not None and not has_length(train_dataset) and args.max_steps <= 0:
        raise ValueError(
            "The train_dataset has no length (an IterableDataset): set TrainingArguments.max_steps to the number "
            "of optimizer steps to run."
        )
    if isinstance(eval_dataset, dict) and not eval_dataset:
        raise ValueError("`eval_dataset` is an empty dict: pass at least one dataset.")
    known = {v.value for v in transformers.SchedulerType}
    if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) not in known:
        raise ValueError(
            f"TrainingArguments.lr_scheduler_type={args.lr_scheduler_type!r} is unknown; choose one of {sorted(known)}."
        )
    if optimizer is not None and optimizer_cls_and_kwargs is not None:
        raise RuntimeError("Pass either `optimizers` or `optimizer_cls_and_kwargs`, not both.")
    if (args.save_strategy == SaveStrategy.BEST or args.load_best_model_at_end) and args.metric_for_best_model is None:
        raise ValueError(  # transformers' message (its _validate_args)
            "`args.metric_for_best_model` must be provided when using 'best' save_strategy or if "
            "`args.load_best_model_at_end` is set to `True`."
        )


def label_smoother(model, args) -> LabelSmoother | None:
    """transformers' LabelSmoother for `label_smoothing_factor`, switched off with its warning for a multi-label
    model (label smoothing assumes one class per row)."""
    if args.label_smoothing_factor == 0:
        return None
    if getattr(getattr(model, "config", None), "problem_type", None) == "multi_label_classification":
        warnings.warn(
            "Label smoothing is not compatible with multi-label classification. "
            "Disabling label smoothing for this training run.",
            UserWarning,
        )
        return None
    return LabelSmoother(epsilon=args.label_smoothing_factor)
