"""`hf_lightning.Trainer`: transformers.Trainer's public API and overridable hooks, run by a `lightning.Trainer`.

The facade is wiring: it holds what a transformers user passes in and the hooks a subclass overrides, and builds the
pieces that do the work (README, "Layout"), none of which imports it back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl  # at import time, before the user builds data: see bench/README.md (time to first step)
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers.modeling_utils import PreTrainedModel
from transformers.trainer_callback import DefaultFlowCallback, TrainerControl, TrainerState
from transformers.trainer_pt_utils import LayerWiseDummyOptimizer, get_parameter_names
from transformers.trainer_utils import PredictionOutput, enable_full_determinism, set_seed

from . import checkpoint as ckpt
from . import compat, evaluation, inputs, interrupts, launch, progress, steps, surface
from . import data as hf_data
from . import hub, sharding
from . import optimizers as hf_optimizers
from .accelerator import LightningAccelerator
from .callbacks import CallbackHandler, pop_lightning_callback, split_callbacks
from .features import release_process_group_at_exit
from .flow import TrainingFlow
from .loggers import apply_log_levels, make_loggers, quiet_lightning
from .module import TransformersModule, release
from .run import FacadeRef, RunState, shared_attribute
from .training_args import loop_arguments, translate_arguments

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger("hf_lightning")


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
    _keep_padded_eval_losses = False  # transformers' gather_for_metrics trims a short last batch (evaluation.py)

    # transformers' attributes of the run, kept in the shared RunState.
    state: TrainerState = shared_attribute("state", "transformers' TrainerState of the current run.")
    control: TrainerControl = shared_attribute("control", "transformers' TrainerControl.")
    callback_handler: CallbackHandler = shared_attribute("callback_handler", "The TrainerCallbacks' dispatcher.")
    current_flos: float = shared_attribute("current_flos", "Floating point operations not yet in state.total_flos.")
    current_gradient_accumulation_steps: int = shared_attribute(
        "current_gradient_accumulation_steps", "Micro-batches in the current accumulation window."
    )

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
        self.args = args = inputs.resolve_args(args)
        launch.adopt_topology(args)  # args.world_size, process_index, ... as Lightning's strategy runs them
        surface.check_overrides(type(self))
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        apply_log_levels(args)
        processing_class, callbacks = inputs.resolve_aliases(processing_class, tokenizer, callbacks, callback)
        inputs.check_model_or_init(model, model_init)
        self.model_init = model_init
        if model is None:
            model = self.call_model_init()
        self._check_model(model)
        self.model = model

        self.data_collator = data_collator if data_collator is not None else inputs.default_collator(processing_class)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.processing_class = processing_class
        self.compute_loss_func = compute_loss_func
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.neftune_noise_alpha = args.neftune_noise_alpha
        inputs.check_trainer_inputs(args, train_dataset, eval_dataset, self.optimizer, optimizer_cls_and_kwargs)

        hf_callbacks, self._lightning_callbacks = split_callbacks(callbacks or [])
        handler = CallbackHandler(
            [DefaultFlowCallback, *hf_callbacks], self.model, self.processing_class, self.optimizer, self.lr_scheduler
        )
        handler.add_callback(progress.default_progress_callback(args))  # after the user's, as transformers adds it
        self._run = RunState(args, handler)
        self._run.new_state(self.is_local_process_zero(), self.is_world_process_zero())
        hub.init_repo(self)  # push_to_hub: transformers' init_hf_repo creates the repository
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)
        self.is_in_train = False
        self._signature_columns: list[str] | None = None
        self._train_batch_size = args.train_batch_size
        self._num_parameters_no_embeddings = 0
        self.lightning_trainer: pl.Trainer | None = None  # created by train()/evaluate()/predict()
        self.lightning_module: TransformersModule | None = None  # the LightningModule around self.model
        self._created_lr_scheduler = False
        self._eval_counts: hf_data.CountsAhead | None = None  # the running evaluation's label-token counts
        # accelerate's Accelerator API answered by the Lightning strategy in use. As in transformers, its accumulation
        # is 1: training_step scales the loss itself.
        me = FacadeRef(self)  # no cycle through the accelerator: a dropped Trainer is freed at once (run.FacadeRef)
        self.accelerator = LightningAccelerator(lambda: me().lightning_trainer, lambda: me().lightning_module,
                                                gradient_accumulation_steps=1, cpu=args.use_cpu)
        self._run.on_init_end()
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = self.args.use_cache

    def __del__(self, _release=release):  # dropped: the optimizer is freed now, as transformers' (module.release)
        _release(self.__dict__.get("lightning_trainer"), None, self.__dict__.get("_run"))  # (bound: at exit too)

    # ------------------------------------------------------------------ setup checks

    def _check_model(self, model: nn.Module) -> None:
        """transformers' model checks; its traits become the Trainer attributes transformers sets."""
        traits = steps.inspect_model(model, self.args)
        sharding.check_model(self.args, model)  # fsdp's layer classes to wrap, before any process group
        for name in ("model_accepts_loss_kwargs", "label_names", "can_return_loss", "label_smoother"):
            setattr(self, name, getattr(traits, name))
        self._loss_shifts_labels = traits.loss_shifts_labels

    # ------------------------------------------------------------------ processes

    def is_local_process_zero(self) -> bool:
        """From the Lightning strategy once one runs; from the launcher's environment before."""
        lightning_trainer = getattr(self, "lightning_trainer", None)
        if lightning_trainer is not None:
            return lightning_trainer.local_rank == 0
        return self.args.local_process_index == 0

    def is_world_process_zero(self) -> bool:
        lightning_trainer = getattr(self, "lightning_trainer", None)
        if lightning_trainer is not None:
            return lightning_trainer.is_global_zero
        return self.args.process_index == 0

    # ------------------------------------------------------------------ callbacks

    def add_callback(self, callback) -> None:
        hf, lightning_cbs = split_callbacks([callback])
        for cb in hf:
            self.callback_handler.add_callback(cb)
        self._lightning_callbacks.extend(lightning_cbs)

    def pop_callback(self, callback):
        found = pop_lightning_callback(self._lightning_callbacks, callback)
        return found if found is not None else self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.pop_callback(callback)

    # ------------------------------------------------------------------ data (transformers' method names)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = hf_data.signature_columns(self.model, self.label_names)

    def _remove_unused_columns(self, dataset: datasets.Dataset, description: str | None = None):
        if not self.args.remove_unused_columns:
            return dataset
        self._set_signature_columns_if_needed()
        return hf_data.remove_unused_columns(dataset, self._signature_columns, description, type(self.model).__name__)

    def _get_collator_with_removed_columns(self, data_collator: Callable, description: str | None = None) -> Callable:
        if not self.args.remove_unused_columns:
            return data_collator
        self._set_signature_columns_if_needed()
        return hf_data.removing_collator(data_collator, self._signature_columns, description, type(self.model).__name__)

    def _get_train_sampler(self, train_dataset=None):
        return hf_data.train_sampler(self.args, train_dataset or self.train_dataset, self.processing_class)

    def _get_eval_sampler(self, eval_dataset):
        return hf_data.eval_sampler(self.args, eval_dataset)

    def _get_dataloader(self, dataset, description: str, batch_size: int, sampler_fn=None, is_training=False):
        if hf_data.is_datasets_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description)
            collator = self.data_collator
        else:
            collator = self._get_collator_with_removed_columns(self.data_collator, description)
        sampler = sampler_fn(dataset) if sampler_fn is not None and not isinstance(dataset, IterableDataset) else None
        return hf_data.make_dataloader(self.args, dataset, collator, batch_size, sampler, is_training)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return self._get_dataloader(
            self.train_dataset, "Training", self._train_batch_size, self._get_train_sampler, is_training=True
        )

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        elif eval_dataset is None:
            eval_dataset = self.eval_dataset
        return self._get_dataloader(eval_dataset, "Evaluation", self.args.eval_batch_size, self._get_eval_sampler)

    def get_test_dataloader(self, test_dataset: Dataset) -> DataLoader:
        return self._get_dataloader(test_dataset, "test", self.args.eval_batch_size, self._get_eval_sampler)

    def num_examples(self, dataloader: DataLoader) -> int:
        return hf_data.num_examples(dataloader, self.args, self._train_batch_size)

    # ------------------------------------------------------------------ optimizer & scheduler

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
        return get_parameter_names(model, [nn.LayerNorm], forbidden)

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """transformers' optimizer lookup (`optim`, `optim_args`, `optim_target_modules` → class and kwargs)."""
        return compat.optimizer_lookup()(args, model)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                lookup = self.get_optimizer_cls_and_kwargs
                optimizer_cls, optimizer_kwargs = hf_optimizers.look_up(lookup, self.args, opt_model)
            decay = set(self.get_decay_parameter_names(opt_model))
            self.optimizer = hf_optimizers.build_optimizer(optimizer_cls, opt_model, decay, self.args, optimizer_kwargs)
        return hf_optimizers.adapt_for_lightning(self.optimizer)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        optimizer = self.optimizer if optimizer is None else optimizer
        if self.lr_scheduler is None:
            self.lr_scheduler = hf_optimizers.build_scheduler(self.args, optimizer, num_training_steps)
            # rebuilt by the next train(), as transformers does (not the layer-wise one: its hooks stay registered)
            self._created_lr_scheduler = not isinstance(optimizer, LayerWiseDummyOptimizer)
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self.create_optimizer()
        self.create_scheduler(num_training_steps=num_training_steps)

    def _get_learning_rate(self) -> float:
        return hf_optimizers.current_learning_rate(self.optimizer, self.lr_scheduler, self.lightning_trainer)

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
        loss, outputs = steps.compute_loss(
            model, inputs, num_items_in_batch, label_smoother=self.label_smoother,
            compute_loss_func=self.compute_loss_func, model_accepts_loss_kwargs=self.model_accepts_loss_kwargs,
            args=self.args,
        )
        return (loss, outputs) if return_outputs else loss

    def _call_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Call compute_loss with transformers 5's keyword, or without it for the guide's 4-argument override."""
        if steps.takes_num_items(type(self).compute_loss):
            return self.compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return self.compute_loss(model, inputs, return_outputs=return_outputs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the detached loss (scaled as transformers does)."""
        steps.train_mode(model)
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self._call_compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # normalised by num_items_in_batch (by the model or compute_loss_func), or a batch mean
            scaled = self.compute_loss_func is not None or (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
                and steps.takes_num_items(type(self).compute_loss)
            )
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        self.accelerator.backward(loss)
        return loss.detach()

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        """transformers' prediction_step: (loss, logits, labels) of one evaluation batch."""
        inputs = self._prepare_inputs(inputs)

        def loss_fn(batch):
            # the collator's batch itself (a BatchEncoding keeps its attribute access), as transformers passes it
            with self.compute_loss_context_manager():
                counted = self._eval_counts.take(batch) if self._eval_counts is not None else None
                num_items = counted if counted is not None else self._get_num_items_in_batch([batch])
                return self._call_compute_loss(model, batch, return_outputs=True, num_items_in_batch=num_items)

        return steps.prediction_step(
            model, inputs, prediction_loss_only, ignore_keys, label_names=self.label_names,
            can_return_loss=self.can_return_loss, loss_fn=loss_fn,
        )

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device | None = None):
        """transformers' count of label tokens over a window, summed over processes (average_tokens_across_devices)."""
        if not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return None
        strategy = self.lightning_trainer.strategy if self.lightning_trainer is not None else None
        return hf_data.num_items_in_batch(batch_samples, self._loss_shifts_labels, self.args, strategy)

    def _eval_token_counter(self) -> hf_data.CountsAhead | None:
        """The label-token counts of the evaluation that starts, begun as each batch is fetched (data.CountsAhead);
        None where an override of _get_num_items_in_batch counts."""
        self._eval_counts = None
        if self.args.average_tokens_across_devices and (
            self.model_accepts_loss_kwargs or self.compute_loss_func is not None
        ) and type(self)._get_num_items_in_batch is Trainer._get_num_items_in_batch:
            self._eval_counts = hf_data.CountsAhead(self._loss_shifts_labels, self.args)
        return self._eval_counts

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input in inputs and hasattr(self.model, "num_parameters"):
            num_parameters = self._num_parameters_no_embeddings or self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main_input].numel() * num_parameters
        return 0

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Append to state.log_history, hand the values to Lightning's loggers and monitors, fire on_log."""
        module = self.lightning_module
        self._run.log(logs, start_time, publish=module.publish_metrics if module is not None else None)

    def store_flos(self) -> None:
        self._run.store_flos(self.lightning_trainer.strategy if self.lightning_trainer is not None else None)

    def end(self) -> None:
        """As transformers' Trainer.end(): release the process group once everything that needs it is done."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ the lightning.Trainer

    def _lightning_module(self) -> TransformersModule:
        if self.lightning_module is None or self.lightning_module.model is not self.model:
            self.lightning_module = TransformersModule(self, self._run)
        return self.lightning_module

    def _new_lightning_trainer(self, flow=None, **loop_limits) -> pl.Trainer:
        kwargs = translate_arguments(self.args, self.model)
        kwargs["callbacks"] = ([flow] if flow is not None else []) + list(self._lightning_callbacks) + kwargs["callbacks"]
        kwargs.setdefault("logger", make_loggers(self.args))
        progress.configure_progress(kwargs, self.callback_handler.callbacks, self.args)
        kwargs.update(loop_limits)
        release(self.lightning_trainer, self.lightning_module)  # the previous fit's references go now, not at a gc
        with quiet_lightning():
            self.lightning_trainer = pl.Trainer(**kwargs)
        launch.use_script_launcher(self.lightning_trainer)  # Lightning's own launcher (devices=N), launch.py
        return self.lightning_trainer

    # ------------------------------------------------------------------ train / evaluate / predict

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """Train as transformers.Trainer.train does; returns a TrainOutput."""
        args = self.args
        self._run.model_prepared = True
        if self.model_init is not None:
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            self.model = self.call_model_init(trial)
            self._check_model(self.model)
            self.optimizer, self.lr_scheduler = None, None
        self._hp_search_setup(trial)  # hpo.py: the trial's values on args (transformers: after model_init(trial))
        apply_log_levels(args)  # `datasets` may have been imported since __init__
        resume_from_checkpoint = ckpt.resolve_resume_path(args, resume_from_checkpoint)
        inner = hf_data.find_batch_size(self, self._inner_training_loop, resume_from_checkpoint)
        return inner(args=args, resume_from_checkpoint=resume_from_checkpoint, ignore_keys_for_eval=ignore_keys_for_eval)

    def _inner_training_loop(self, args, resume_from_checkpoint, ignore_keys_for_eval):  # at self._train_batch_size
        self.is_in_train = True
        if self._created_lr_scheduler:  # a schedule this Trainer built ran to its end: a new train() gets a new one
            self.lr_scheduler, self._created_lr_scheduler = None, False
        micro_loader = self.get_train_dataloader()
        hf_data.check_batch_fits_model(self.model, micro_loader, "training")
        windows = hf_data.AccumulationWindows(micro_loader, args.gradient_accumulation_steps)
        plan = hf_data.training_plan(args, micro_loader, self._train_batch_size, self.num_examples(micro_loader))
        self._run.begin_training(plan, self._train_batch_size, self.is_local_process_zero(), self.is_world_process_zero())
        self._num_parameters_no_embeddings = (
            self.model.num_parameters(exclude_embeddings=True) if hasattr(self.model, "num_parameters") else 0
        )

        module = self._lightning_module()
        eval_loaders = self._eval_dataloaders() if self.eval_dataset is not None else []
        flow = TrainingFlow(self, self._run, windows, plan, resume_from_checkpoint, ignore_keys_for_eval, eval_loaders)
        lightning_trainer = self._new_lightning_trainer(flow, **loop_arguments(args, plan))
        try:
            # Resumes are restored by TrainingFlow (checkpoint.py) from either format, not by Lightning's ckpt_path.
            with quiet_lightning(), interrupts.lightning_call(lightning_trainer):
                lightning_trainer.fit(module, train_dataloaders=windows, val_dataloaders=flow.eval_loaders or None)
        finally:
            self.is_in_train = False
            release_process_group_at_exit()
        return flow.train_output

    def _eval_dataloaders(self, eval_dataset=None) -> list[tuple[str, DataLoader]]:
        """[(metric prefix, loader)]: one per dataset; a dict of datasets prefixes metrics with its keys."""
        override = eval_dataset is not None
        dataset = eval_dataset if override else self.eval_dataset
        if isinstance(dataset, dict):
            return [
                (f"eval_{name}", self.get_eval_dataloader(ds if override else name)) for name, ds in dataset.items()
            ]
        return [("eval", self.get_eval_dataloader(dataset))]

    def _run_evaluation(self, loaders: list[tuple[str, DataLoader]], ignore_keys, description: str):
        """One Lightning validation (evaluate) or test (predict) loop over `loaders`; reported as transformers does."""
        module = self._lightning_module()
        module.begin_evaluation(loaders, ignore_keys, description)
        self.callback_handler.eval_dataloader = loaders[0][1]
        trainer = self.lightning_trainer or self._new_lightning_trainer()
        run_loop = trainer.validate if description == evaluation.EVALUATION else trainer.test
        with quiet_lightning(), interrupts.lightning_call(trainer):
            run_loop(module, dataloaders=[loader for _, loader in loaders], verbose=False)
        outputs = module.finished_evaluations
        module.end_evaluation()
        metrics: dict[str, float] = {}
        for output in outputs:
            metrics.update(evaluation.report(self, self._run, output))
        return outputs, metrics

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
        return self._run_evaluation(loaders, ignore_keys, evaluation.EVALUATION)[1]

    def predict(self, test_dataset: Dataset, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"):
        """Run Lightning's test loop over `test_dataset`; returns a PredictionOutput."""
        loaders = [(metric_key_prefix, self.get_test_dataloader(test_dataset))]
        (output,), metrics = self._run_evaluation(loaders, ignore_keys, evaluation.PREDICTION)
        return PredictionOutput(predictions=output.predictions, label_ids=output.label_ids, metrics=metrics)

    # ------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write a folder that `AutoModel*.from_pretrained` (and the processing class) loads."""
        ckpt.save_model_folder(self, output_dir or self.args.output_dir)
        hub.after_save_model(self, _internal_call)

    def _save_checkpoint(self, model=None, trial=None) -> None:
        ckpt.save_checkpoint(self, self._run, self.lightning_trainer, trial)


surface.apply(Trainer)
