"""`hf_lightning.Trainer`: transformers.Trainer's public API and overridable hooks, run by a `lightning.Trainer`.

The facade owns the *semantics* (what a step, a log entry, an evaluation mean, as transformers defines them) and the
hooks a subclass overrides; Lightning owns the *machinery* (the loop, devices, precision, strategies, progress bar,
loggers). The pieces:

* `training_args.py` – what happens to every TrainingArguments field (`translate_arguments`, `check_supported`);
* `data.py`          – transformers' DataLoaders, grouped into gradient-accumulation windows;
* `module.py`        – the LightningModule: one `training_step` = one optimizer step, evaluation steps;
* `flow.py`          – the Lightning callback that fires TrainerCallback events and runs log → evaluate → save;
* `checkpoint.py`    – checkpoint-N folders (+ lightning.ckpt), resume, best model;
* `loggers.py`       – report_to → Lightning loggers, log levels.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl  # at import time, before the user builds data: see README "Speed" (time to first step)
import numpy as np
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.trainer_callback import (
    DefaultFlowCallback,
    ExportableState,
    PrinterCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers.trainer_pt_utils import (
    LabelSmoother,
    LayerWiseDummyOptimizer,
    get_parameter_names,
    log_metrics,
    metrics_format,
    nested_detach,
    save_metrics,
    save_state,
)
from transformers.trainer_utils import (
    PredictionOutput,
    RemoveColumnsCollator,
    TrainOutput,
    enable_full_determinism,
    has_length,
    set_seed,
    speed_metrics,
)
from transformers.utils.generic import can_return_loss, find_labels

from . import checkpoint as ckpt
from . import data as hf_data
from . import optimizers as hf_optimizers
from .callbacks import CallbackHandler, split_callbacks
from .flow import TrainingFlow
from .loggers import apply_log_levels, make_loggers
from .module import TransformersModule
from .training_args import check_supported, translate_arguments

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger("hf_lightning")


def _destroy_process_group_at_exit() -> None:
    """Release the process group when the script ends, as Lightning does for NCCL only: a gloo group still alive while
    the interpreter shuts down aborts the process ("terminate called without an active exception") in about one
    torchrun job in three, after the work is done — transformers 5.24 does the same unless `trainer.end()` is called."""
    global _destroy_registered
    if not _destroy_registered and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
        _destroy_registered = True


_destroy_registered = False


_PLAIN_TRAIN = (nn.Module.train, PreTrainedModel.train)


def _train_mode(model: nn.Module) -> None:
    """`model.train()`, as transformers calls it before every micro-batch, skipped when every module is already in
    training mode and none overrides `train` (the call then changes nothing): on a 2-layer BERT the recursive call
    costs ~0.08 ms a step, this check ~0.01 ms (a plain walk over `_modules`: `model.modules()` builds every
    submodule's dotted name)."""
    stack = [model]
    while stack:
        module = stack.pop()
        if module is None:  # a submodule slot registered as None
            continue
        if not module.training or type(module).train not in _PLAIN_TRAIN:
            model.train()
            return
        stack.extend(module._modules.values())


def _is_datasets_dataset(dataset) -> bool:
    """isinstance(dataset, datasets.Dataset) without importing `datasets` (~0.3 s with pandas and pyarrow): an object
    of that class exists only once the module is imported."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(dataset, module.Dataset)


@functools.lru_cache(maxsize=None)
def _optimizer_lookup():
    """transformers.Trainer.get_optimizer_cls_and_kwargs without importing transformers.trainer (and accelerate) when
    the transformers release has the lookup in its own module (5.x's trainer_optimizer), which saves ~0.4 s of start."""
    try:
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS, OptimizerContext, _parse_optim_args
    except ImportError:
        return transformers.Trainer.get_optimizer_cls_and_kwargs

    def lookup(args, model=None):
        ctx = OptimizerContext(
            args=args,
            model=model,
            optimizer_kwargs={"lr": args.learning_rate},
            adam_kwargs={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
            optim_args=_parse_optim_args(args.optim_args),
        )
        handler = _OPTIMIZER_HANDLERS.get(args.optim)
        if handler is None:
            raise ValueError(f"TrainingArguments.optim={args.optim!r} is not an optimizer transformers knows.")
        return handler(ctx)

    return lookup


@functools.lru_cache(maxsize=None)
def _takes_num_items(compute_loss) -> bool:
    """Whether a compute_loss override has transformers 5's `num_items_in_batch` (cached: checked every step)."""
    params = inspect.signature(compute_loss).parameters
    return "num_items_in_batch" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


@contextlib.contextmanager
def _preserved_rng():
    """Checks that peek at data must not shift the random streams training will draw from."""
    import random

    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(states[0])
    np.random.set_state(states[1])


class Trainer:
    """Drop-in replacement for `transformers.Trainer` whose loop is a `lightning.Trainer`.

    Example::

        from hf_lightning import Trainer, TrainingArguments

        trainer = Trainer(model, args=TrainingArguments("out", eval_strategy="epoch"),
                          train_dataset=train, eval_dataset=test, compute_metrics=compute_metrics,
                          callbacks=[MyTrainerCallback(), lightning.pytorch.callbacks.LearningRateMonitor()])
        trainer.train()
    """

    # As in transformers: a subclass whose compute_loss returns a per-batch mean sets False (the loss is then divided
    # by the window's micro-batch count), one that normalises over the whole window sets True; None = decide.
    loss_is_scaled_for_ga: bool | None = None

    # transformers' helpers that are written as Trainer methods.
    log_metrics = log_metrics
    metrics_format = metrics_format
    save_metrics = save_metrics
    save_state = save_state

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: transformers.TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | datasets.Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | datasets.Dataset | None = None,
        processing_class: Any = None,
        model_init: Callable[..., PreTrainedModel] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        tokenizer: Any = None,
        callback: list | None = None,
    ):
        if args is None:
            from .training_args import TrainingArguments

            args = TrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, transformers.TrainingArguments):
            raise TypeError(
                f"`args` must be a TrainingArguments instance (hf_lightning's or transformers'), got {type(args).__name__}."
            )
        check_supported(args)
        self.args = args
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        apply_log_levels(args)

        # The guide's quickstart passes `tokenizer=` (transformers 5 renamed it processing_class).
        if tokenizer is not None:
            if processing_class is not None and processing_class is not tokenizer:
                raise ValueError("Pass either `processing_class` or `tokenizer`, not both.")
            processing_class = tokenizer
        # The guide's callback example passes `callback=[...]`.
        if callback is not None:
            if callbacks is not None:
                raise ValueError("Pass either `callbacks` or `callback`, not both.")
            callbacks = callback

        if model is None:
            if model_init is None:
                raise RuntimeError("`Trainer` requires either a `model` or a `model_init` argument.")
            self.model_init = model_init
            model = self.call_model_init()
        elif model_init is not None:
            raise ValueError("`Trainer` requires either a `model` or a `model_init` argument, but not both.")
        else:
            self.model_init = None
        self._check_model(model)
        self.model = model

        default_collator = (
            DataCollatorWithPadding(processing_class)
            if isinstance(processing_class, PreTrainedTokenizerBase)
            else default_data_collator
        )
        self.data_collator = data_collator if data_collator is not None else default_collator
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.processing_class = processing_class
        self.compute_loss_func = compute_loss_func
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.neftune_noise_alpha = args.neftune_noise_alpha
        self._validate_args()

        hf_callbacks, self._lightning_callbacks = split_callbacks(callbacks or [])
        self.callback_handler = CallbackHandler(
            [DefaultFlowCallback, *hf_callbacks, PrinterCallback],
            self.model,
            self.processing_class,
            self.optimizer,
            self.lr_scheduler,
        )
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)

        self.control = TrainerControl()
        self.state = self._fresh_state()
        self.is_in_train = False
        self.current_flos = 0
        self._signature_columns: list[str] | None = None
        self._train_batch_size = args.train_batch_size
        self.lightning_trainer = None  # the lightning.Trainer in use, created by train()/evaluate()/predict()
        self.lightning_module = None  # the LightningModule around self.model
        self._created_lr_scheduler = False
        self._initial_num_input_tokens_seen = 0
        self._model_prepared = False  # transformers reports model_preparation_time when evaluate() comes first
        self.model_preparation_time: float | None = None
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = self.args.use_cache

    # ------------------------------------------------------------------ setup checks

    def _check_model(self, model: nn.Module) -> None:
        base_model_names = {
            name for value in MODEL_MAPPING_NAMES.values() for name in (value if isinstance(value, tuple) else (value,))
        }
        if model.__class__.__name__ in base_model_names:
            raise ValueError(
                f"The model you have picked ({model.__class__.__name__}) cannot be used as is for training: it only "
                "computes hidden states and does not accept any labels. Choose a model with a head suitable for your "
                "task, like any of the `AutoModelForXxx` classes."
            )
        if hasattr(model, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = model.accepts_loss_kwargs
        else:
            forward_params = inspect.signature(model.forward).parameters
            self.model_accepts_loss_kwargs = any(
                p.kind == inspect.Parameter.VAR_KEYWORD for p in forward_params.values()
            )
        self.label_names = find_labels(model.__class__) if self.args.label_names is None else self.args.label_names
        self.can_return_loss = can_return_loss(model.__class__)
        self._loss_shifts_labels = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not getattr(
            getattr(model, "config", None), "is_encoder_decoder", False
        )
        self.label_smoother = (
            LabelSmoother(epsilon=self.args.label_smoothing_factor) if self.args.label_smoothing_factor != 0 else None
        )

    def _validate_args(self) -> None:
        args = self.args
        if args.eval_strategy != "no" and self.eval_dataset is None:
            raise ValueError(
                f"TrainingArguments.eval_strategy={args.eval_strategy.value!r} needs an evaluation dataset: pass "
                "`eval_dataset=` to the Trainer, or set eval_strategy='no'."
            )
        if self.train_dataset is not None and not has_length(self.train_dataset) and args.max_steps <= 0:
            raise ValueError(
                "The train_dataset has no length (an IterableDataset): set TrainingArguments.max_steps to the number "
                "of optimizer steps to run."
            )
        if isinstance(self.eval_dataset, dict) and not self.eval_dataset:
            raise ValueError("`eval_dataset` is an empty dict: pass at least one dataset.")
        known = {v.value for v in transformers.SchedulerType}
        if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) not in known:
            raise ValueError(
                f"TrainingArguments.lr_scheduler_type={args.lr_scheduler_type!r} is unknown; choose one of {sorted(known)}."
            )
        if self.optimizer is not None and self.optimizer_cls_and_kwargs is not None:
            raise RuntimeError("Pass either `optimizers` or `optimizer_cls_and_kwargs`, not both.")

    def _fresh_state(self) -> TrainerState:
        return TrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=[
                cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)
            ],
        )

    def call_model_init(self, trial=None) -> nn.Module:
        n_params = len(inspect.signature(self.model_init).parameters)
        model = self.model_init() if n_params == 0 else self.model_init(trial)
        if model is None:
            raise RuntimeError("`model_init` should not return None.")
        return model

    # ------------------------------------------------------------------ processes

    def is_local_process_zero(self) -> bool:
        return int(os.environ.get("LOCAL_RANK", "0")) == 0

    def is_world_process_zero(self) -> bool:
        return int(os.environ.get("RANK", os.environ.get("GLOBAL_RANK", "0"))) == 0

    # ------------------------------------------------------------------ callbacks

    def add_callback(self, callback) -> None:
        hf, lightning_cbs = split_callbacks([callback])
        for cb in hf:
            self.callback_handler.add_callback(cb)
        self._lightning_callbacks.extend(lightning_cbs)

    def pop_callback(self, callback):
        for cb in list(self._lightning_callbacks):
            if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
                self._lightning_callbacks.remove(cb)
                return cb
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.pop_callback(callback)

    # ------------------------------------------------------------------ data

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            signature = inspect.signature(self.model.forward)
            self._signature_columns = list(signature.parameters.keys())
            self._signature_columns += list(set(["label", "label_ids"] + self.label_names))

    def _remove_unused_columns(self, dataset: datasets.Dataset, description: str | None = None):
        if not self.args.remove_unused_columns:
            return dataset
        self._set_signature_columns_if_needed()
        columns = [k for k in self._signature_columns if k in dataset.column_names]
        ignored = sorted(set(dataset.column_names) - set(self._signature_columns))
        if not columns:
            raise ValueError(
                f"No column of the {description} dataset ({', '.join(dataset.column_names)}) is an argument of "
                f"{self.model.__class__.__name__}.forward ({', '.join(self._signature_columns)}). Tokenize the "
                "dataset into the model's inputs (e.g. input_ids, attention_mask, labels), or set "
                "`remove_unused_columns=False` if your data_collator builds them."
            )
        return dataset.remove_columns(ignored) if ignored else dataset

    def _collator_for(self, dataset, description: str):
        if _is_datasets_dataset(dataset) or not self.args.remove_unused_columns:
            return self.data_collator
        self._set_signature_columns_if_needed()
        return RemoveColumnsCollator(
            data_collator=self.data_collator,
            signature_columns=self._signature_columns,
            logger=logging.getLogger("transformers.trainer"),
            description=description,
            model_name=self.model.__class__.__name__,
        )

    def _get_dataloader(self, dataset, description: str, batch_size: int, is_training: bool) -> DataLoader:
        collator = self._collator_for(dataset, description)
        if _is_datasets_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description)
        sampler = (
            hf_data.train_sampler(self.args, dataset, self.processing_class)
            if is_training
            else hf_data.eval_sampler(self.args, dataset)
        )
        return hf_data.make_dataloader(self.args, dataset, collator, batch_size, sampler, is_training)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return self._get_dataloader(self.train_dataset, "training", self._train_batch_size, is_training=True)

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        elif eval_dataset is None:
            eval_dataset = self.eval_dataset
        return self._get_dataloader(eval_dataset, "evaluation", self.args.eval_batch_size, is_training=False)

    def get_test_dataloader(self, test_dataset: Dataset) -> DataLoader:
        return self._get_dataloader(test_dataset, "test", self.args.eval_batch_size, is_training=False)

    def num_examples(self, dataloader: DataLoader) -> int:
        try:
            return len(dataloader.dataset)
        except (AttributeError, TypeError):
            pass
        try:
            return len(dataloader) * self.args.per_device_train_batch_size
        except TypeError:
            return self.args.max_steps * self._train_batch_size * self.args.gradient_accumulation_steps

    def _check_batch_fits_model(self, dataloader: DataLoader, description: str) -> None:
        """Fail before training when the collated rows lack what the model's forward needs."""
        dataset = dataloader.dataset
        if isinstance(dataset, IterableDataset) or not has_length(dataset) or len(dataset) == 0:
            return  # a stream is never consumed ahead of training
        with _preserved_rng():
            batch = dataloader.collate_fn([dataset[0]])
        if not isinstance(batch, Mapping):
            return
        main_input = getattr(self.model, "main_input_name", "input_ids")
        accepted = set(inspect.signature(self.model.forward).parameters)
        if main_input in accepted and main_input not in batch and "inputs_embeds" not in batch:
            raise ValueError(
                f"The {description} batches have no `{main_input}`, which {self.model.__class__.__name__}.forward "
                f"needs; they hold: {', '.join(batch) or 'nothing'}. Tokenize the dataset (e.g. with "
                "`dataset.map(tokenize)`) so that every row has the model's inputs."
            )

    # ------------------------------------------------------------------ optimizer & scheduler

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
        return get_parameter_names(model, [nn.LayerNorm], forbidden)

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """transformers' optimizer lookup (`optim`, `optim_args`, `optim_target_modules` → class and kwargs)."""
        return _optimizer_lookup()(args, model)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = [
                {
                    "params": [p for n, p in opt_model.named_parameters() if n in decay and p.requires_grad],
                    "weight_decay": self.args.weight_decay,
                },
                {
                    "params": [p for n, p in opt_model.named_parameters() if n not in decay and p.requires_grad],
                    "weight_decay": 0.0,
                },
            ]
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                try:
                    with hf_optimizers.lookup_fixes(self.args):
                        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                except ImportError as err:
                    raise ImportError(
                        f"TrainingArguments.optim={self.args.optim!r} needs a package that is not installed: {err} "
                        "The optimizers of the transformers guide install with: pip install 'hf-lightning[optimizers]'."
                    ) from err
            optimizer_kwargs = dict(optimizer_kwargs)
            for key in ("params", "model", "optimizer_dict"):  # GaLore, LOMO and layer-wise optimizers
                if key in optimizer_kwargs:
                    groups = optimizer_kwargs.pop(key)
            self.optimizer = hf_optimizers.build_optimizer(optimizer_cls, groups, optimizer_kwargs)
        return hf_optimizers.adapt_for_lightning(self.optimizer)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        optimizer = self.optimizer if optimizer is None else optimizer
        if self.lr_scheduler is None and isinstance(optimizer, LayerWiseDummyOptimizer):
            self.lr_scheduler = hf_optimizers.layerwise_scheduler(self.args, optimizer, num_training_steps)
        if self.lr_scheduler is None:
            self._created_lr_scheduler = True  # rebuilt by the next train(), as transformers does
            self.lr_scheduler = transformers.get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self.create_optimizer()
        self.create_scheduler(num_training_steps=num_training_steps)

    def _get_learning_rate(self) -> float:
        scheduler = self.lr_scheduler
        module = self.lightning_module
        if module is not None and module._trainer is not None and module.trainer.lr_scheduler_configs:
            scheduler = module.trainer.lr_scheduler_configs[0].scheduler  # e.g. SWA's SWALR once it took over
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            lr = self.optimizer.param_groups[0]["lr"]
        else:
            lr = scheduler.get_last_lr()[0]
        return lr.item() if torch.is_tensor(lr) else lr

    # ------------------------------------------------------------------ the steps a subclass overrides

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Lightning has already moved the batch to the device; this only checks it is not empty."""
        if len(inputs) == 0:
            self._set_signature_columns_if_needed()
            raise ValueError(
                "The batch received was empty, your model won't be able to train on it. Double-check that your "
                f"training dataset contains keys expected by the model: {','.join(self._signature_columns)}."
            )
        return inputs

    def compute_loss_context_manager(self):
        return contextlib.nullcontext()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """transformers 5.x's compute_loss: the model's own loss, label smoothing, or compute_loss_func."""
        if (self.label_smoother is not None or self.compute_loss_func is not None) and "labels" in inputs:
            labels = inputs.pop("labels")
        else:
            labels = None
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif labels is not None:
            shift = model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            loss = self.label_smoother(outputs, labels, shift_labels=shift, num_items_in_batch=num_items_in_batch)
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
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            loss = loss * self.args.world_size
        return (loss, outputs) if return_outputs else loss

    def _call_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Call compute_loss with transformers 5's keyword, or without it for the guide's 4-argument override."""
        if self._compute_loss_takes_num_items():
            return self.compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return self.compute_loss(model, inputs, return_outputs=return_outputs)

    def _compute_loss_takes_num_items(self) -> bool:
        return _takes_num_items(type(self).compute_loss)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the detached loss (scaled as transformers does)."""
        _train_mode(model)
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self._call_compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        if (
            self.args.torch_empty_cache_steps is not None
            and self.state.global_step % self.args.torch_empty_cache_steps == 0
            and torch.cuda.is_available()
        ):
            torch.cuda.empty_cache()
        if self.loss_is_scaled_for_ga is not None:
            scaled_for_accumulation = self.loss_is_scaled_for_ga
        else:  # normalised by num_items_in_batch (by the model or compute_loss_func), or a per-batch mean
            scaled_for_accumulation = (
                self.model_accepts_loss_kwargs
                and num_items_in_batch is not None
                and self._compute_loss_takes_num_items()
            ) or self.compute_loss_func is not None
        if not scaled_for_accumulation:
            loss = loss / self.current_gradient_accumulation_steps
        if hf_optimizers.is_lomo(self.optimizer):  # LOMO/AdaLomo update the weights during backward
            self.optimizer.fused_backward(loss, self._get_learning_rate())
        else:
            self.lightning_module.manual_backward(loss)
        return loss.detach()

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        """transformers' prediction_step: (loss, logits, labels) of one evaluation batch."""
        has_labels = len(self.label_names) > 0 and all(inputs.get(k) is not None for k in self.label_names)
        return_loss = inputs.get("return_loss")
        if return_loss is None:
            return_loss = self.can_return_loss
        loss_without_labels = len(self.label_names) == 0 and return_loss
        inputs = self._prepare_inputs(inputs)
        if ignore_keys is None:
            ignore_keys = getattr(getattr(self.model, "config", None), "keys_to_ignore_at_inference", ["cache"]) or []
        labels = None
        if has_labels or loss_without_labels:
            labels = nested_detach(tuple(inputs.get(name) for name in self.label_names))
            if len(labels) == 1:
                labels = labels[0]
        with torch.no_grad():
            if has_labels or loss_without_labels:
                num_items = self._get_num_items_in_batch([inputs])
                with self.compute_loss_context_manager():
                    loss, outputs = self._call_compute_loss(
                        model, dict(inputs), return_outputs=True, num_items_in_batch=num_items
                    )
                loss = loss.detach().mean()
                if isinstance(outputs, dict):
                    logits = tuple(v for k, v in outputs.items() if k not in ignore_keys + ["loss"])
                else:
                    logits = outputs[1:]
            else:
                loss = None
                with self.compute_loss_context_manager():
                    outputs = model(**inputs)
                if isinstance(outputs, dict):
                    logits = tuple(v for k, v in outputs.items() if k not in ignore_keys)
                else:
                    logits = outputs
        if prediction_loss_only:
            return (loss, None, None)
        logits = nested_detach(logits)
        if len(logits) == 1:
            logits = logits[0]
        return (loss, logits, labels)

    def _get_num_items_in_batch(self, batch_samples: list):
        """transformers' count of label tokens over a window, summed over processes (average_tokens_across_devices)."""
        if not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return None
        num_items = hf_data.count_items(batch_samples, self._loss_shifts_labels)
        module = self.lightning_module
        if (
            num_items is not None
            and self.args.average_tokens_across_devices
            and module is not None
            and module._trainer is not None
            and module.trainer.world_size > 1
        ):
            num_items = module.all_gather(num_items).sum()
        if torch.is_tensor(num_items):
            # transformers divides by its tensor/context/sequence-parallel sizes (1 here), so the model and a
            # compute_loss_func receive a float tensor, as they do from transformers.Trainer.
            num_items = num_items / 1
        return num_items

    def end(self) -> None:
        """As transformers' Trainer.end(): release the process group once everything that needs it is done."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input in inputs and hasattr(self.model, "num_parameters"):
            return 6 * inputs[main_input].numel() * self._num_parameters_no_embeddings
        return 0

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Append to state.log_history, fire on_log, and hand the values to Lightning's loggers and monitors."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.args.include_num_input_tokens_seen != "no":
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            if start_time is not None:
                tokens = self.state.num_input_tokens_seen - self._initial_num_input_tokens_seen
                logs.update(speed_metrics("train", start_time, num_tokens=tokens))
        output = {**logs, "step": self.state.global_step}
        self.state.log_history.append(output)
        if self.lightning_module is not None:
            self.lightning_module.publish_metrics(logs, self.state.global_step)
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def store_flos(self) -> None:
        module = self.lightning_module
        if module is not None and module._trainer is not None and module.trainer.world_size > 1:
            self.state.total_flos += module.all_gather(torch.tensor(self.current_flos, dtype=torch.float64)).sum().item()
        else:
            self.state.total_flos += self.current_flos
        self.current_flos = 0

    # ------------------------------------------------------------------ the lightning.Trainer

    def _lightning_module(self):
        if self.lightning_module is None or self.lightning_module.model is not self.model:
            self.lightning_module = TransformersModule(self)
        return self.lightning_module

    def _new_lightning_trainer(self, flow=None, **loop_limits):
        kwargs = translate_arguments(self.args)
        callbacks = ([flow] if flow is not None else []) + list(self._lightning_callbacks)
        kwargs["callbacks"] = callbacks + list(kwargs.get("callbacks", []))
        kwargs.setdefault("logger", make_loggers(self.args))
        kwargs.update(loop_limits)
        self.lightning_trainer = pl.Trainer(**kwargs)
        return self.lightning_trainer

    # ------------------------------------------------------------------ train

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Train as transformers.Trainer.train does; returns a TrainOutput."""
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments: {', '.join(kwargs)}.")
        if trial is not None:
            raise ValueError("Hyperparameter search (`trial=`) is not supported by hf_lightning yet.")
        args = self.args
        self.is_in_train = True
        self._model_prepared = True
        if self.model_init is not None:
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            self.model = self.call_model_init()
            self._check_model(self.model)
            self.optimizer, self.lr_scheduler = None, None
        if self._created_lr_scheduler:  # a schedule this Trainer built ran to its end: a new train() gets a new one
            self.lr_scheduler, self._created_lr_scheduler = None, False
        if args.activation_checkpointing or args.gradient_checkpointing:
            # transformers' split: every_n_layers / offload select and place, the rest goes to torch.utils.checkpoint.
            gc_kwargs = dict(args.activation_checkpointing_kwargs or args.gradient_checkpointing_kwargs or {})
            options = {"every_n_layers": gc_kwargs.pop("every_n_layers", 1), "offload": gc_kwargs.pop("offload", False)}
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs or None, **options)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs or None, **options)
        if args.tf32 is not None and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = args.tf32
            torch.backends.cudnn.allow_tf32 = args.tf32

        resume_from_checkpoint = ckpt.resolve_resume_path(args, resume_from_checkpoint)

        micro_loader = self.get_train_dataloader()
        self._check_batch_fits_model(micro_loader, "training")
        windows = hf_data.AccumulationWindows(micro_loader, args.gradient_accumulation_steps)
        plan = self._training_plan(micro_loader)
        self.state = self._fresh_state()
        self.state.train_batch_size = self._train_batch_size
        self.state.compute_steps(args, plan["max_steps"])
        self.state.max_steps = plan["max_steps"]
        self.state.num_train_epochs = plan["num_train_epochs"]
        self._num_parameters_no_embeddings = (
            self.model.num_parameters(exclude_embeddings=True) if hasattr(self.model, "num_parameters") else 0
        )

        module = self._lightning_module()
        eval_loaders = self._eval_dataloaders() if self.eval_dataset is not None else None
        flow = TrainingFlow(self, windows, plan, resume_from_checkpoint, ignore_keys_for_eval,
                            [loader for _, loader in eval_loaders] if eval_loaders else None)
        lightning_trainer = self._new_lightning_trainer(
            flow,
            max_steps=plan["max_steps"],
            max_epochs=plan["num_train_epochs"] if plan["num_train_epochs"] < 2**31 else -1,
            # transformers' TrainerControl decides when to evaluate (see flow.py), not val_check_interval.
            check_val_every_n_epoch=None,
            val_check_interval=max(plan["max_steps"], 1),
            # eval_on_start is Lightning's sanity check over the whole eval set.
            num_sanity_val_steps=-1 if args.eval_on_start else 0,
        )
        neftune_handle = None
        if self.neftune_noise_alpha is not None:
            from transformers.integrations.neftune import activate_neftune

            neftune_handle = activate_neftune(self.model, self.neftune_noise_alpha)
        try:
            # Resumes are restored by TrainingFlow (checkpoint.py) from either format, not by Lightning's ckpt_path.
            lightning_trainer.fit(
                module,
                train_dataloaders=windows,
                val_dataloaders=[loader for _, loader in eval_loaders] if eval_loaders else None,
            )
        finally:
            self.is_in_train = False
            _destroy_process_group_at_exit()
            if neftune_handle is not None:  # also when training ended by an exception
                from transformers.integrations.neftune import deactivate_neftune

                deactivate_neftune(self.model, neftune_handle)
        return flow.train_output

    def _training_plan(self, micro_loader: DataLoader) -> dict[str, Any]:
        """transformers' `set_initial_training_values`: epochs, update steps per epoch, max_steps."""
        args = self.args
        ga = args.gradient_accumulation_steps
        total_batch_size = self._train_batch_size * ga * args.world_size
        if has_length(micro_loader):
            len_dl = len(micro_loader)
            if len_dl == 0:
                raise ValueError(
                    "The training DataLoader is empty: the train_dataset has fewer rows than one batch with "
                    "dataloader_drop_last=True. Use a larger dataset or a smaller per_device_train_batch_size."
                )
            updates_per_epoch = max(len_dl // ga + int(len_dl % ga > 0), 1)
            if args.max_steps > 0:
                max_steps = args.max_steps
                num_train_epochs = max_steps // updates_per_epoch + int(max_steps % updates_per_epoch > 0)
                num_train_samples = max_steps * total_batch_size
            else:
                max_steps = math.ceil(args.num_train_epochs * updates_per_epoch)
                num_train_epochs = math.ceil(args.num_train_epochs)
                num_train_samples = self.num_examples(micro_loader) * args.num_train_epochs
            steps_in_epoch = len_dl
        else:
            max_steps = args.max_steps
            num_train_epochs = 2**31
            updates_per_epoch = max_steps
            num_train_samples = max_steps * total_batch_size
            steps_in_epoch = max_steps * ga
        return {
            "max_steps": max_steps,
            "num_train_epochs": num_train_epochs,
            "updates_per_epoch": updates_per_epoch,
            "num_train_samples": num_train_samples,
            "steps_in_epoch": steps_in_epoch,
            "total_batch_size": total_batch_size,
        }

    # ------------------------------------------------------------------ evaluate / predict

    def _eval_dataloaders(self, eval_dataset=None) -> list[tuple[str, DataLoader]]:
        """[(metric prefix, loader)]: one per dataset; a dict of datasets prefixes metrics with its keys."""
        override = eval_dataset is not None
        dataset = eval_dataset if override else self.eval_dataset
        if isinstance(dataset, dict):
            return [
                (f"eval_{name}", self.get_eval_dataloader(ds if override else name)) for name, ds in dataset.items()
            ]
        return [("eval", self.get_eval_dataloader(dataset))]

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """Run Lightning's validation loop over the eval dataset(s); returns transformers' metrics dict."""
        if self.is_in_train:
            raise RuntimeError(
                "evaluate() was called during train(); in-training evaluations follow eval_strategy/eval_steps "
                "(or set control.should_evaluate=True in a callback)."
            )
        loaders = self._eval_dataloaders(eval_dataset)
        if metric_key_prefix != "eval":
            loaders = [(metric_key_prefix + prefix[len("eval") :], loader) for prefix, loader in loaders]
        module = self._lightning_module()
        module.begin_evaluation([p for p, _ in loaders], ignore_keys, description="Evaluation")
        self.callback_handler.eval_dataloader = loaders[0][1]
        trainer = self.lightning_trainer or self._new_lightning_trainer()
        trainer.validate(module, dataloaders=[loader for _, loader in loaders], verbose=False)
        metrics: dict[str, float] = {}
        for output in module.finished_evaluations:
            metrics.update(self._report_evaluation(output))
        module.end_evaluation()
        return metrics

    def _report_evaluation(self, output) -> dict[str, float]:
        """Speed metrics, log, on_evaluate: what transformers does after its evaluation loop."""
        metrics = output.metrics
        total_batch_size = self.args.eval_batch_size * self.args.world_size
        metrics.update(
            speed_metrics(
                output.prefix,
                output.start_time,
                num_samples=output.num_samples,
                num_steps=math.ceil(output.num_samples / total_batch_size),
            )
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(self, test_dataset: Dataset, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"):
        """Run Lightning's test loop over `test_dataset`; returns a PredictionOutput."""
        loader = self.get_test_dataloader(test_dataset)
        module = self._lightning_module()
        module.begin_evaluation([metric_key_prefix], ignore_keys, description="Prediction")
        self.callback_handler.eval_dataloader = loader
        trainer = self.lightning_trainer or self._new_lightning_trainer()
        trainer.test(module, dataloaders=loader, verbose=False)
        output = module.finished_evaluations[0]
        module.end_evaluation()
        metrics = output.metrics
        total_batch_size = self.args.eval_batch_size * self.args.world_size
        metrics.update(
            speed_metrics(
                metric_key_prefix,
                output.start_time,
                num_samples=output.num_samples,
                num_steps=math.ceil(output.num_samples / total_batch_size),
            )
        )
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)
        return PredictionOutput(predictions=output.predictions, label_ids=output.label_ids, metrics=metrics)

    # ------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write a folder that `AutoModel*.from_pretrained` (and the processing class) loads."""
        ckpt.save_model_folder(self, output_dir or self.args.output_dir)

    def _save_checkpoint(self, model=None, trial=None) -> None:
        ckpt.save_checkpoint(self)
