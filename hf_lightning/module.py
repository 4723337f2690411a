"""The LightningModule around a transformers model.

One Lightning batch is one gradient-accumulation window (see data.py), so one `training_step` is one optimizer step
in transformers' order: on_step_begin → forward/backward per micro-batch (gradient sync only on the last one) →
clip → on_pre_optimizer_step → optimizer.step → on_optimizer_step → scheduler.step → zero_grad. Manual optimization
is what lets that order (and transformers' loss scaling) hold; Lightning still runs the loop, the precision plugin
(autocast, fp16 scaler), the strategy and the backward.

The module reaches the facade only through `TrainerHooks` (training_step, prediction_step,
create_optimizer_and_scheduler, ... — the methods a transformers subclass overrides) and shares the `RunState`.
Evaluation batches go through `evaluation.EvaluationRun`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ParallelStrategy

from . import adapters, compat, sharding
from . import data as hf_data
from .gpu_strategies import engine_grad_norm, is_deepspeed, micro_batch_sync
from .evaluation import EvaluationOutput, EvaluationRun, announce_evaluation, memory_stage
from .optimizers import OptimizerQuirks, steps_on_metric
from .run import FacadeRef, RunState, TrainerHooks


class TransformersModule(pl.LightningModule):
    """Wraps `hooks.model`; every step calls the facade's overridable hooks.

    Args:
        hooks: the hf_lightning.Trainer, seen through `TrainerHooks`.
        run: the Trainer's `RunState` (args, TrainerState, TrainerControl, events).
    """

    def __init__(self, hooks: TrainerHooks, run: RunState):
        super().__init__()
        self.automatic_optimization = False
        self.model = hooks.model
        self._hooks = FacadeRef(hooks)  # weak: the Trainer is freed when its user drops it (run.FacadeRef)
        self.run_state = run
        # enough to rebuild the model from the .ckpt alone (a PEFT model's frozen base: from the user, see adapters)
        hparams = {"training_args": run.args.to_dict(), **adapters.model_hparams(self.model)}
        # frame= given: Lightning's own inspect.currentframe() would keep its frame (and so this one, with the
        # Trainer in its locals) in a reference cycle until the garbage collector runs
        self.save_hyperparameters(hparams, frame=inspect.currentframe())
        self.quirks = OptimizerQuirks(None)  # the optimizer's, once configure_optimizers built it
        self.flow = None  # the TrainingFlow callback, set while training
        self._runs: list[EvaluationRun] = []
        self.finished_evaluations: list[EvaluationOutput] = []
        self._fetch_hooked: list = []  # the evaluation's loaders, whose fetches start label-token counts
        self._counts = None  # data.CountsAhead of the running evaluation

    @property
    def hooks(self) -> TrainerHooks:
        return self._hooks()

    @property
    def hf_trainer(self):
        """The hf_lightning.Trainer this module belongs to (its `state`, `control`, `args`), for Lightning callbacks."""
        return self.hooks

    def forward(self, *args, **kwargs):
        """The model's forward: what the strategy's wrapper (`trainer.model_wrapped`, e.g. DDP) runs when called."""
        return self.model(*args, **kwargs)

    def train_dataloader(self):
        """The windows train() set up, so that a plain `lightning_trainer.fit(lightning_module, ckpt_path=...)`
        continues the same run."""
        if self.flow is None:
            raise RuntimeError("Call hf_lightning.Trainer.train() first: it sets up the data and the loop.")
        return self.flow.windows

    def val_dataloader(self):
        return [] if self.flow is None else self.flow.eval_loaders

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Lightning's restore (`fit(ckpt_path=...)`) loads the weights through the model's own `load_state_dict`, as
        a resume from a checkpoint folder does (an override may resize buffers or rename keys)."""
        prefix = "model."
        if not state_dict or not all(key.startswith(prefix) for key in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        weights = {key[len(prefix):]: value for key, value in state_dict.items()}
        if adapters.peft_model(self.model) is not None and strict:  # the .ckpt holds the trainable weights only
            return adapters.load_trainable(self.model, weights, "The Lightning checkpoint's state_dict")
        return self.model.load_state_dict(weights, strict=strict, assign=assign)

    def configure_model(self):
        """Under a ModelParallelStrategy (fsdp=, or one in lightning_trainer_kwargs): FSDP2's fully_shard, once."""
        sharding.configure_model(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A PEFT model's lightning.ckpt keeps only what training changes (see adapters.py)."""
        checkpoint["state_dict"] = adapters.keep_trainable_only(self.model, checkpoint["state_dict"])

    # ------------------------------------------------------------------ optimizers

    def configure_optimizers(self):
        hooks, run = self.hooks, self.run_state
        hooks.create_optimizer_and_scheduler(num_training_steps=run.state.max_steps)
        run.callback_handler.optimizer = hooks.optimizer
        run.callback_handler.lr_scheduler = hooks.lr_scheduler
        self.quirks = OptimizerQuirks(hooks.optimizer)
        return {"optimizer": hooks.optimizer, "lr_scheduler": {"scheduler": hooks.lr_scheduler, "interval": "step"}}

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Lightning's backward (precision scaling, strategy hooks), or the optimizer's own fused backward (LOMO)."""
        self.quirks.backward(
            loss, lambda value: super(TransformersModule, self).manual_backward(value, *args, **kwargs),
            self.hooks._get_learning_rate,
        )

    # ------------------------------------------------------------------ training

    def on_train_batch_start(self, batch, batch_idx):
        # Only the LightningModule's return value can end an epoch early (TrainerControl.should_epoch_stop).
        if self.flow is not None and self.flow.epoch_should_stop():
            return -1
        self.quirks.train()
        return None

    def training_step(self, window: list, batch_idx: int):
        hooks, run, flow = self.hooks, self.run_state, self.flow
        flow.before_window()
        run.on_step_begin()
        run.current_gradient_accumulation_steps = len(window)
        num_items = hooks._get_num_items_in_batch(window, self.device)
        strategy = self.trainer.strategy
        accelerator = hooks.accelerator
        # accelerator_config.gradient_accumulation_kwargs["sync_each_batch"]: gradients synced on every micro-batch
        ga_kwargs = getattr(getattr(run.args, "accelerator_config", None), "gradient_accumulation_kwargs", None) or {}
        sync_each = bool(ga_kwargs.get("sync_each_batch"))
        try:
            for i, inputs in enumerate(window):
                last = i == len(window) - 1
                accelerator.sync_gradients = last  # as accelerate's accumulate() tells user code
                skip_sync = isinstance(strategy, ParallelStrategy) and not last and not sync_each
                no_sync = micro_batch_sync(strategy, last, skip_sync)
                with no_sync or contextlib.nullcontext():
                    loss = hooks.training_step(self.model, inputs, num_items)
                flow.add_micro_batch(loss, inputs)
                if not last:
                    run.on_substep_end()
        finally:
            accelerator.sync_gradients = True
        optimizer = self.optimizers()
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale_before = scaler.get_scale() if scaler is not None else None
        optimizer.step()  # Lightning's precision plugin calls on_before_optimizer_step (below) first
        run.on_optimizer_step()
        flow.learning_rate = hooks._get_learning_rate()
        # fp16: the scaler skips the step on inf/nan gradients and lowers its scale; transformers then keeps the lr.
        step_skipped = scaler is not None and scaler.get_scale() < scale_before
        # The scheduler Lightning holds: transformers' one (per step), unless a Lightning callback swapped in its own
        # (SWA's SWALR, stepped per epoch in on_train_epoch_end). A metric-driven one (ReduceLROnPlateau, GreedyLR)
        # waits for the evaluation: flow.py steps it there, as transformers' `_evaluate` does.
        config = self.trainer.lr_scheduler_configs[0]
        if not step_skipped and config.interval == "step" and not steps_on_metric(config.scheduler):
            config.scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def on_train_epoch_end(self):
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "epoch" and not steps_on_metric(config.scheduler):
                config.scheduler.step()

    def on_before_optimizer_step(self, optimizer):
        """After unscaling (fp16) and before the step: transformers clips here, then fires on_pre_optimizer_step."""
        args = self.run_state.args
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and compat.unscales_in_step(optimizer):
            # Lightning leaves unscaling to optimizers that do it inside step() (fused AdamW, transformers' default);
            # the norm and the clipping must see the true gradients (torch's GradScaler.step accepts this).
            scaler.unscale_(optimizer)
        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else float("inf")
        wrapped = self.trainer.model
        if is_deepspeed(self.trainer.strategy):  # the engine clips in its step (config gradient_clipping)
            grad_norm = engine_grad_norm(self.trainer.strategy)
        elif hasattr(wrapped, "clip_grad_norm_"):  # FSDP shards the gradients: it owns the norm
            grad_norm = wrapped.clip_grad_norm_(max_norm)
        else:  # FSDP2's DTensor gradients included: the total norm is reduced across ranks
            grad_norm = sharding.clip_grad_norm(self.model, max_norm)
        if self.flow is not None:
            self.flow.grad_norm = grad_norm
        self.run_state.on_pre_optimizer_step()

    # ------------------------------------------------------------------ evaluation

    def begin_evaluation(self, loaders: list, ignore_keys, description: str) -> None:
        """`loaders`: [(metric prefix, DataLoader)] of the evaluation Lightning is about to run."""
        self.run_state.memory.start_stage(memory_stage(description))  # nested in "train": ignored, as transformers
        self._runs = [EvaluationRun(self.run_state.args, prefix, description, ignore_keys) for prefix, _ in loaders]
        self.finished_evaluations = []
        counts = self.hooks._eval_token_counter()
        self._fetch_hooked = [loader for _, loader in loaders if isinstance(loader, hf_data.TrainerDataLoader)]
        for loader in self._fetch_hooked:  # label-token counts start as the batches are fetched
            loader.fetch_wrapper = None if counts is None else counts.wrap
        self._counts = counts

    def end_evaluation(self) -> None:
        """Drop the gathered predictions once they are reported."""
        self._runs = []
        self.finished_evaluations = []
        for loader in self._fetch_hooked:
            loader.fetch_wrapper = None
        self._fetch_hooked = []
        if self._counts is not None:
            self._counts.close()

    def on_validation_start(self):
        self._note_model_preparation()

    def on_test_start(self):
        self._note_model_preparation()

    def _note_model_preparation(self) -> None:
        # transformers reports `<prefix>_model_preparation_time` (from then on) when the first thing a Trainer does is
        # an evaluation: the time to prepare the model, here Lightning's strategy setup.
        run = self.run_state
        if not run.model_prepared and self._runs:
            run.model_preparation_time = round(time.time() - self._runs[0].start_time, 4)
        run.model_prepared = True

    def on_validation_model_eval(self):
        super().on_validation_model_eval()
        self.quirks.eval()

    def on_test_model_eval(self):
        super().on_test_model_eval()
        self.quirks.eval()

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluation_step(batch, dataloader_idx, self.trainer.num_val_batches, self.trainer.val_dataloaders)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluation_step(batch, dataloader_idx, self.trainer.num_test_batches, self.trainer.test_dataloaders)

    def _evaluation_step(self, inputs, dataloader_idx: int, num_batches: list, loaders=None) -> None:
        run = self._runs[dataloader_idx]
        if run.steps == 0:  # transformers announces each dataset's evaluation loop as it starts
            loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
            announce_evaluation(run.description, loader, self.run_state.args)
            run.remainder = hf_data.remainder(loader)
        run.step(self.hooks, self.model, inputs, num_batches[dataloader_idx])
        self.run_state.on_prediction_step()

    def on_validation_epoch_end(self):
        self._finish_evaluation(self.trainer.val_dataloaders)

    def on_test_epoch_end(self):
        self._finish_evaluation(self.trainer.test_dataloaders)

    def _finish_evaluation(self, loaders) -> None:
        if not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        self.finished_evaluations = [
            run.finish(self.hooks, self.run_state, getattr(loader, "dataset", None))
            for run, loader in zip(self._runs, loaders)
        ]

    # ------------------------------------------------------------------ metrics for Lightning

    def publish_metrics(self, logs: dict, step: int) -> None:
        """Hand transformers' log entries to Lightning: monitors (EarlyStopping, ModelCheckpoint) read
        `callback_metrics`, loggers get the values at transformers' step."""
        trainer = compat.attached_trainer(self)
        if trainer is None:
            return
        scalars = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in scalars.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for lightning_logger in trainer.loggers:
                lightning_logger.log_metrics(scalars, step=step)


def release(lightning_trainer, current: TransformersModule | None = None, run: RunState | None = None,
            _finalizing=sys.is_finalizing) -> None:
    """Drop the Lightning side's references to the optimizer, the schedulers and (unless it is `current`'s) the model
    of a lightning.Trainer that is done with. Lightning's trainer, its LightningModule and its callbacks refer to each
    other, so without this they would wait for the garbage collector, where transformers.Trainer frees them at once.
    Called when train() replaces the lightning.Trainer (a search trial's model_init: the last trial's model goes) and
    when a Trainer is dropped by its user (with its RunState). Not at interpreter exit, where module globals may
    already be gone and everything is freed anyway."""
    if _finalizing():
        return
    if lightning_trainer is not None:
        module = lightning_trainer.lightning_module
        if isinstance(module, TransformersModule):
            module.quirks = OptimizerQuirks(None)
            if module is not current:
                module.model = None
        lightning_trainer.strategy.optimizers = []
        lightning_trainer.strategy.lr_scheduler_configs = []
    if run is not None:
        handler = run.callback_handler
        handler.optimizer = handler.lr_scheduler = handler.model = None
