"""The LightningModule around a transformers model.

One Lightning batch is one gradient-accumulation window (see data.py), so one `training_step` is one optimizer step
in transformers' order: on_step_begin → forward/backward per micro-batch (gradient sync only on the last one) →
clip → on_pre_optimizer_step → optimizer.step → on_optimizer_step → scheduler.step → zero_grad. Manual optimization
is what lets that order (and transformers' loss scaling) hold; Lightning still runs the loop, the precision plugin
(autocast, fp16 scaler), the strategy and the backward.

Evaluation batches go through the facade's `prediction_step`; predictions are kept with transformers'
`EvalLoopContainer` and turned into metrics at the end of Lightning's validation/test epoch.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.strategies import ParallelStrategy
from transformers.trainer_pt_utils import EvalLoopContainer, find_batch_size
from transformers.trainer_utils import EvalPrediction, denumpify_detensorize


# Evaluation is optional (no eval_dataset, eval_strategy="no"); Lightning warns about it on every fit.
warnings.filterwarnings("ignore", message=r".*defined a `validation_step` but have no `val_dataloader`.*")


@dataclass
class EvaluationOutput:
    """What one evaluation of one dataset produced (transformers' EvalLoopOutput plus its prefix and start time)."""

    prefix: str
    start_time: float
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: Any = None
    label_ids: Any = None
    num_samples: int = 0


class _EvaluationRun:
    """The containers of transformers' `evaluation_loop` for one dataset."""

    def __init__(self, hf_trainer, prefix: str, description: str):
        args = hf_trainer.args
        self.prefix = prefix
        self.description = description
        self.start_time = time.time()
        self.losses = EvalLoopContainer(args.eval_do_concat_batches, padding_index=-100)
        self.preds = EvalLoopContainer(args.eval_do_concat_batches, padding_index=-100)
        self.labels = EvalLoopContainer(args.eval_do_concat_batches, padding_index=-100)
        self.inputs = EvalLoopContainer(args.eval_do_concat_batches, padding_index=-100)
        self.observed = 0
        self.steps = 0
        self.batch_metrics = None


class TransformersModule(pl.LightningModule):
    """Wraps `hf_trainer.model`; every step calls the facade's overridable hooks."""

    def __init__(self, hf_trainer):
        super().__init__()
        self.automatic_optimization = False
        self.model = hf_trainer.model
        self.__dict__["_hf"] = hf_trainer  # a plain reference: not a submodule, not a hyperparameter
        hparams = {"training_args": hf_trainer.args.to_dict()}
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "to_dict"):  # enough to rebuild the model from the .ckpt alone
            hparams["model_class"] = type(self.model).__name__
            hparams["model_config"] = config.to_dict()
        self.save_hyperparameters(hparams)
        self._runs: list[_EvaluationRun] = []
        self._ignore_keys = None
        self.finished_evaluations: list[EvaluationOutput] = []
        self.flow = None  # the TrainingFlow callback, set while training

    def __setattr__(self, name, value):
        # Lightning sets `_current_fx_name` around each of its ~16 hook calls per step; nn.Module.__setattr__'s
        # checks for parameters, buffers and submodules (~1 µs each, ~30 µs a step) never apply to a string.
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def hf_trainer(self):
        """The hf_lightning.Trainer this module belongs to: its `state` (TrainerState), `control`, `args`."""
        return self._hf

    def train_dataloader(self):
        """The windows train() set up, so that a plain `lightning_trainer.fit(lightning_module, ckpt_path=...)`
        continues the same run."""
        if self.flow is None:
            raise RuntimeError("Call hf_lightning.Trainer.train() first: it sets up the data and the loop.")
        return self.flow.windows

    def val_dataloader(self):
        return [] if self.flow is None else self.flow.eval_loaders

    # ------------------------------------------------------------------ optimizers

    def configure_optimizers(self):
        hf = self._hf
        hf.create_optimizer_and_scheduler(num_training_steps=hf.state.max_steps)
        hf.callback_handler.optimizer = hf.optimizer
        hf.callback_handler.lr_scheduler = hf.lr_scheduler
        return {"optimizer": hf.optimizer, "lr_scheduler": {"scheduler": hf.lr_scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ training

    def on_train_batch_start(self, batch, batch_idx):
        # Only the LightningModule's return value can end an epoch early (TrainerControl.should_epoch_stop).
        if self.flow is not None and self.flow.epoch_should_stop():
            return -1
        return None

    def training_step(self, window: list, batch_idx: int):
        hf, flow = self._hf, self.flow
        args = hf.args
        flow.before_window()
        hf.control = hf.callback_handler.on_step_begin(args, hf.state, hf.control)
        hf.current_gradient_accumulation_steps = len(window)
        num_items = hf._get_num_items_in_batch(window)
        strategy = self.trainer.strategy
        for i, inputs in enumerate(window):
            last = i == len(window) - 1
            no_sync = strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) and not last else None
            with no_sync or contextlib.nullcontext():
                loss = hf.training_step(self.model, inputs, num_items)
            flow.add_micro_batch(loss, inputs)
            if not last:
                hf.control = hf.callback_handler.on_substep_end(args, hf.state, hf.control)
        optimizer = self.optimizers()
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale_before = scaler.get_scale() if scaler is not None else None
        optimizer.step()  # Lightning's precision plugin calls on_before_optimizer_step (below) first
        hf.control = hf.callback_handler.on_optimizer_step(args, hf.state, hf.control)
        flow.learning_rate = hf._get_learning_rate()
        # fp16: the scaler skips the step on inf/nan gradients and lowers its scale; transformers then keeps the lr.
        step_skipped = scaler is not None and scaler.get_scale() < scale_before
        # The scheduler Lightning holds: transformers' one (per step), unless a Lightning callback swapped in its own
        # (SWA's SWALR, stepped per epoch in on_train_epoch_end).
        config = self.trainer.lr_scheduler_configs[0]
        if not step_skipped and config.interval == "step" and not config.reduce_on_plateau:
            config.scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    # Lightning reads training_step's signature every step (`_build_kwargs`); a stored one spares `inspect` the
    # introspection of the code object (7 -> 2.5 µs).
    training_step.__signature__ = inspect.signature(training_step)

    def on_train_epoch_end(self):
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "epoch" and not config.reduce_on_plateau:
                config.scheduler.step()

    def on_before_optimizer_step(self, optimizer):
        """After unscaling (fp16) and before the step: transformers clips here, then fires on_pre_optimizer_step."""
        hf = self._hf
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Lightning leaves unscaling to optimizers that do it inside step() (fused AdamW, transformers' default);
            # the norm and the clipping must see the true gradients (torch's GradScaler.step accepts this).
            scaler.unscale_(optimizer)
        max_norm = hf.args.max_grad_norm if hf.args.max_grad_norm and hf.args.max_grad_norm > 0 else float("inf")
        wrapped = self.trainer.model
        if hasattr(wrapped, "clip_grad_norm_"):  # FSDP shards the gradients: it owns the norm
            grad_norm = wrapped.clip_grad_norm_(max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.flow is not None:
            self.flow.grad_norm = grad_norm
        hf.control = hf.callback_handler.on_pre_optimizer_step(hf.args, hf.state, hf.control)

    # ------------------------------------------------------------------ evaluation

    def begin_evaluation(self, prefixes: list[str], ignore_keys, description: str) -> None:
        self._runs = [_EvaluationRun(self._hf, prefix, description) for prefix in prefixes]
        self._ignore_keys = ignore_keys
        self.finished_evaluations = []

    def end_evaluation(self) -> None:
        """Drop the gathered predictions once they are reported."""
        self._runs = []
        self.finished_evaluations = []

    def on_validation_start(self):
        self._note_model_preparation()

    def on_test_start(self):
        self._note_model_preparation()

    def _note_model_preparation(self) -> None:
        # transformers reports `<prefix>_model_preparation_time` (from then on) when the first thing a Trainer does is
        # an evaluation: the time to prepare the model, here Lightning's strategy setup.
        hf = self._hf
        if not hf._model_prepared and self._runs:
            hf.model_preparation_time = round(time.time() - self._runs[0].start_time, 4)
        hf._model_prepared = True

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluation_step(batch, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluation_step(batch, dataloader_idx)

    def on_validation_model_eval(self):
        super().on_validation_model_eval()
        self._optimizer_eval()

    def on_test_model_eval(self):
        super().on_test_model_eval()
        self._optimizer_eval()

    def _optimizer_eval(self):
        optimizer = self._hf.optimizer
        if hasattr(optimizer, "eval") and callable(optimizer.eval):  # schedule-free optimizers
            optimizer.eval()

    def _evaluation_step(self, inputs, dataloader_idx: int) -> None:
        hf = self._hf
        args = hf.args
        run = self._runs[dataloader_idx]
        prediction_loss_only = True if hf.compute_metrics is None else args.prediction_loss_only
        if run.description == "Prediction":
            prediction_loss_only = args.prediction_loss_only
        batch_size = find_batch_size(inputs)
        run.observed += batch_size or 0
        main_input_name = getattr(self.model, "main_input_name", "input_ids")
        inputs_decode = inputs[main_input_name] if "inputs" in args.include_for_metrics else None
        losses, logits, labels = hf.prediction_step(self.model, inputs, prediction_loss_only, ignore_keys=self._ignore_keys)
        keep_all = not args.batch_eval_metrics or run.description == "Prediction"
        if losses is not None:
            losses = losses.repeat(batch_size or args.eval_batch_size)
            run.losses.add(losses)
        if inputs_decode is not None and keep_all:
            run.inputs.add(inputs_decode)
        if logits is not None:
            if hf.preprocess_logits_for_metrics is not None:
                logits = hf.preprocess_logits_for_metrics(logits, labels)
            if keep_all:
                run.preds.add(logits)
        if labels is not None and keep_all:
            run.labels.add(labels)
        run.steps += 1
        hf.control = hf.callback_handler.on_prediction_step(args, hf.state, hf.control)
        if args.batch_eval_metrics:
            if hf.compute_metrics is not None and logits is not None and labels is not None:
                is_last = run.steps == self._num_batches(dataloader_idx)
                run.batch_metrics = hf.compute_metrics(
                    EvalPrediction(
                        predictions=logits,
                        label_ids=labels,
                        losses=losses if "loss" in args.include_for_metrics else None,
                        inputs=inputs if "inputs" in args.include_for_metrics else None,
                    ),
                    compute_result=is_last,
                )
        elif args.eval_accumulation_steps is not None and run.steps % args.eval_accumulation_steps == 0:
            for container in (run.losses, run.preds, run.labels, run.inputs):
                container.to_cpu_and_numpy()

    def _num_batches(self, dataloader_idx: int) -> float:
        loop = self.trainer.test_loop if self.trainer.testing else self.trainer.validate_loop
        if self.trainer.state.fn == "fit":
            loop = self.trainer.fit_loop.epoch_loop.val_loop
        return loop.max_batches[dataloader_idx]

    def on_validation_epoch_end(self):
        self._finish_evaluation()

    def on_test_epoch_end(self):
        self._finish_evaluation()

    def _finish_evaluation(self) -> None:
        hf = self._hf
        args = hf.args
        outputs = []
        for idx, run in enumerate(self._runs):
            all_losses = run.losses.get_arrays()
            all_preds = run.preds.get_arrays()
            all_labels = run.labels.get_arrays()
            all_inputs = run.inputs.get_arrays()
            if hf.compute_metrics is not None and all_preds is not None and all_labels is not None and not args.batch_eval_metrics:
                metrics = hf.compute_metrics(
                    EvalPrediction(
                        predictions=all_preds,
                        label_ids=all_labels,
                        losses=all_losses if "loss" in args.include_for_metrics else None,
                        inputs=all_inputs if "inputs" in args.include_for_metrics else None,
                    )
                )
            else:
                metrics = run.batch_metrics or {}
            metrics = denumpify_detensorize(metrics)
            losses = np.concatenate(all_losses) if isinstance(all_losses, list) and all_losses else all_losses
            if isinstance(losses, np.ndarray):
                finite = np.isfinite(losses)
                if args.logging_nan_inf_filter and finite.any():
                    losses = losses[finite]
                metrics[f"{run.prefix}_loss"] = losses.mean().item()
            start_time = run.start_time
            if hf.model_preparation_time is not None:
                metrics[f"{run.prefix}_model_preparation_time"] = hf.model_preparation_time
                start_time += hf.model_preparation_time
            for key in list(metrics.keys()):
                if not key.startswith(f"{run.prefix}_"):
                    metrics[f"{run.prefix}_{key}"] = metrics.pop(key)
            dataset = getattr(self._eval_loader(idx), "dataset", None)
            try:
                num_samples = len(dataset)
            except TypeError:
                num_samples = run.observed
            if num_samples == 0 and run.observed > 0:
                num_samples = run.observed
            outputs.append(
                EvaluationOutput(run.prefix, start_time, metrics, all_preds, all_labels, num_samples)
            )
        self.finished_evaluations = outputs

    def _eval_loader(self, idx: int):
        loaders = self.trainer.test_dataloaders if self.trainer.testing else self.trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            return loaders[idx]
        return loaders

    # ------------------------------------------------------------------ metrics for Lightning

    def publish_metrics(self, logs: dict[str, Any], step: int) -> None:
        """Hand transformers' log entries to Lightning: monitors (EarlyStopping, ModelCheckpoint) read
        `callback_metrics`, loggers get the values at transformers' step."""
        trainer = self._trainer
        if trainer is None:
            return
        scalars = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in scalars.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for lightning_logger in trainer.loggers:
                lightning_logger.log_metrics(scalars, step=step)
