"""`TrainingFlow`: the Lightning callback that gives a Lightning run transformers' semantics.

It runs transformers' `_maybe_log_save_evaluate` (log → evaluate → save, in that order, inside the optimizer step
that asked for it) and asks the run state to fire the TrainerCallback events at the Lightning hooks that match them:

    HF event / action              Lightning place
    on_train_begin                 on_fit_start (optimizers exist; before eval_on_start, which is the sanity check)
    on_epoch_begin                 on_train_epoch_start
    on_step_begin ... on_step_end  TransformersModule.training_step / here in on_train_batch_end
    log                            on_train_batch_end, on the device-side loss sum read once per log
    evaluate                       Lightning's validation loop, run when TrainerControl.should_evaluate says so
    save                           after the evaluation (on_validation_end) or at once when no evaluation is due
    JIT checkpoint (SIGTERM)       on_train_batch_end once Lightning saw the signal, else on_exception
    on_epoch_end                   after the step's log/eval/save, on the epoch's last window or when stopping
    on_train_end                   on_train_end, after the train summary log and best-model loading

Lightning decides *when* to validate from `val_check_interval`; here TrainerControl decides (compat.py points the
epoch loop at `should_validate_now`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time

import lightning.pytorch as pl
import torch
from transformers.trainer_pt_utils import get_model_param_count
from lightning.pytorch.utilities.exceptions import SIGTERMException
from transformers.trainer_utils import SaveStrategy, TrainOutput, speed_metrics

from . import checkpoint as ckpt
from . import compat
from . import evaluation
from .optimizers import steps_on_metric
from .run import FacadeRef, RunState, TrainerHooks, TrainingPlan

logger = logging.getLogger("hf_lightning")
hf_logger = logging.getLogger("transformers.trainer")  # where transformers logs these lines (users' config sees them)


def add_filtered_loss(tr_loss: torch.Tensor, loss: torch.Tensor, steps_so_far: int, read_value: bool) -> None:
    """transformers' `logging_nan_inf_filter`: a nan/inf step loss counts as the mean of the window so far.

    On an accelerator this stays on the device (no host sync per step); on CPU (`read_value`) the value is read.
    """
    if read_value:
        tr_loss += loss if math.isfinite(loss.item()) else tr_loss / steps_so_far
    else:
        tr_loss += torch.where(torch.isfinite(loss), loss, tr_loss / steps_so_far)


class TrainingFlow(pl.Callback):
    """One `train()`'s HF bookkeeping: created by the facade with everything it needs, passed explicitly.

    Args:
        hooks: the facade, seen through `TrainerHooks` (log, _save_checkpoint, _get_learning_rate, ...).
        run: the shared `RunState` (args, TrainerState, TrainerControl, events).
        windows: the gradient-accumulation windows Lightning iterates (data.AccumulationWindows).
        plan: the `TrainingPlan` of this run.
        resume_from_checkpoint: a checkpoint folder or .ckpt file to continue from, or None.
        ignore_keys_for_eval: passed to prediction_step during in-training evaluations.
        eval_loaders: [(metric prefix, DataLoader)] for in-training evaluations.
    """

    def __init__(self, hooks: TrainerHooks, run: RunState, windows, plan: TrainingPlan,
                 resume_from_checkpoint: str | None, ignore_keys_for_eval, eval_loaders=()):
        self._hooks = FacadeRef(hooks)  # weak: the Trainer is freed when its user drops it (run.FacadeRef)
        self.run = run
        self.windows = windows
        self.plan = plan
        self.resume_from_checkpoint = resume_from_checkpoint
        self.ignore_keys_for_eval = ignore_keys_for_eval
        self.eval_prefixes = [prefix for prefix, _ in eval_loaders]
        self.eval_loaders = [loader for _, loader in eval_loaders]
        self.train_output: TrainOutput | None = None
        self.grad_norm: torch.Tensor | None = None
        self.learning_rate: float | None = None
        self.micro_batches_in_epoch = 0
        self._eval_pending: str | None = None  # "start" | "step" | "epoch": where to continue after validating
        self._epoch_end_fired = False
        self._epoch_ends_here = False
        self._last_validated_step: int | None = None
        self._last_saved_step: int | None = None
        self._rng_from_lightning_ckpt = None
        self._resume = None
        self._trainer: pl.Trainer | None = None

    @property
    def hooks(self) -> TrainerHooks:
        return self._hooks()

    @property
    def state_key(self) -> str:
        return ckpt.FLOW_KEY

    # ------------------------------------------------------------------ setup

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer
        if isinstance(trainer.strategy.checkpoint_io, ckpt.FolderCheckpointIO):
            trainer.strategy.checkpoint_io.module = pl_module  # fit(ckpt_path=<checkpoint-N folder>) loads into it
        pl_module.flow = self
        # An empty epoch must end the run before Lightning asks the empty iterator for a batch.
        self.windows.on_empty_epoch = lambda: setattr(trainer, "should_stop", True)
        compat.let_control_decide_validation(trainer, self.should_validate_now)

    def should_validate_now(self, *_args) -> bool:
        return self._eval_pending is not None

    def epoch_should_stop(self) -> bool:
        return self.run.control.should_epoch_stop

    def on_fit_start(self, trainer, pl_module):
        hooks, run = self.hooks, self.run
        # transformers' training_step calls model.train() before every forward; done here already, Lightning does not
        # warn that a from_pretrained model (eval mode) is "in eval mode at the start of training".
        pl_module.train()
        self.tr_loss = torch.zeros((), device=pl_module.device)
        self.total_loss_scalar = 0.0
        handler = run.callback_handler
        handler.model, handler.optimizer, handler.lr_scheduler = hooks.model, hooks.optimizer, hooks.lr_scheduler
        handler.train_dataloader = self.windows.dataloader
        self._resume = None
        if self.resume_from_checkpoint is not None:
            self._resume = ckpt.restore_training_state(hooks, run, trainer, self.resume_from_checkpoint, self.plan)
            self.windows.skip_windows = self._resume.windows_to_skip
        elif trainer.ckpt_path is not None:
            # A plain `lightning_trainer.fit(lightning_module, ckpt_path=...)`: Lightning restores weights, optimizer,
            # scheduler and its loops itself; TrainerState came back through load_state_dict below.
            ckpt.load_callback_states(run)
            self._resume = ckpt.resume_point(run, self.plan, self._rng_from_lightning_ckpt)
            self.windows.skip_windows = self._resume.windows_to_skip
            if os.path.isdir(trainer.ckpt_path):  # a checkpoint-N folder carries no Lightning loop state
                compat.move_fit_loop_to(trainer, run.state.global_step, self._resume.epochs_trained)
        self.initial_global_step = run.state.global_step
        self.globalstep_last_logged = run.state.global_step
        run.initial_num_input_tokens_seen = run.state.num_input_tokens_seen
        announce_training(run.args, self.plan, run.state, hooks.model,
                          self._resume if self.resume_from_checkpoint is not None else None)
        self.start_time = time.time()
        run.on_train_begin()

    def on_train_start(self, trainer, pl_module):
        # transformers' `model_wrapped` stays the wrapper after training; Lightning's strategy drops it at teardown.
        self.model_wrapped = trainer.strategy.model

    def on_sanity_check_start(self, trainer, pl_module):
        # eval_on_start runs as Lightning's sanity check over the whole eval set (num_sanity_val_steps=-1).
        self._begin_evaluation("start")

    # ------------------------------------------------------------------ epochs and steps

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_end_fired = False
        self.micro_batches_in_epoch = 0
        if self._resume is not None and trainer.current_epoch == self._resume.epochs_trained:
            self.micro_batches_in_epoch = self._resume.windows_to_skip * self.run.args.gradient_accumulation_steps
        if self._resume is not None:
            self._resume.restore_rng_at_epoch_start(trainer.current_epoch)
        self.run.on_epoch_begin()

    def add_micro_batch(self, loss: torch.Tensor, inputs) -> None:
        """Accumulate the step loss (transformers' nan/inf filter; on an accelerator without a host sync)."""
        run, args = self.run, self.run.args
        if args.logging_nan_inf_filter:
            steps_so_far = 1 + run.state.global_step - self.globalstep_last_logged
            add_filtered_loss(self.tr_loss, loss, steps_so_far, read_value=loss.device.type == "cpu")
        else:
            self.tr_loss += loss
        run.current_flos += float(self.hooks.floating_point_ops(inputs))
        if args.include_num_input_tokens_seen != "no":
            tokens = _count_tokens(self.hooks.model, args, inputs)
            if self._trainer.world_size > 1:  # transformers counts every process's tokens
                tokens = int(self._trainer.strategy.reduce(torch.tensor(tokens), reduce_op="sum"))
            run.state.num_input_tokens_seen += tokens
        self.micro_batches_in_epoch += 1

    def before_window(self) -> None:
        """Called by training_step before the window's first forward."""
        if self._resume is not None:
            self._resume.before_first_window()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        run = self.run
        run.state.global_step = trainer.global_step
        run.state.epoch = trainer.current_epoch + self.micro_batches_in_epoch / self.plan.steps_in_epoch
        run.on_step_end()
        if self._jit_checkpoint_due(trainer):  # as transformers' JITCheckpointCallback.on_step_end: this save only
            run.control.should_save = False
            self._save_jit_checkpoint()
        control = run.control
        self._epoch_ends_here = (
            compat.is_last_batch(trainer)
            or control.should_training_stop
            or control.should_epoch_stop
            or run.state.global_step >= run.state.max_steps
        )
        self._maybe_log_save_evaluate("step")

    def on_train_epoch_end(self, trainer, pl_module):
        # Reached when Lightning ended the epoch on its own (e.g. a Lightning EarlyStopping set trainer.should_stop).
        if not self._epoch_end_fired:
            run = self.run
            if self.micro_batches_in_epoch == 0:  # a stream that ran dry: transformers stops training here
                logger.warning(
                    "The training data yielded no batch this epoch: stopping at step %s (an IterableDataset with "
                    "fewer rows than max_steps needs).", run.state.global_step
                )
                trainer.should_stop = True
            if trainer.should_stop:
                run.control.should_training_stop = True
            self._fire_epoch_end()
            run.control.should_evaluate = False
            self._maybe_log_save_evaluate("epoch")

    # ------------------------------------------------------------------ log → evaluate → save

    def _maybe_log_save_evaluate(self, stage: str) -> None:
        run = self.run
        if run.control.should_log and run.state.global_step > self.globalstep_last_logged:
            self._log_training_window()
        if run.control.should_evaluate:
            if self._eval_pending is not None or (stage == "epoch" and self._last_validated_step == run.state.global_step):
                logger.warning(
                    "An evaluation was requested twice in step %s (at the step and at the epoch end); "
                    "hf_lightning runs one.", run.state.global_step
                )
                run.control.should_evaluate = False
            else:
                self._begin_evaluation(stage)
                return  # Lightning's validation loop runs next; on_validation_end continues with the save
        self._save_if_requested()
        self._continue_after(stage)

    def _continue_after(self, stage: str) -> None:
        if stage == "step" and self._epoch_ends_here and not self._epoch_end_fired:
            self._fire_epoch_end()
            self._maybe_log_save_evaluate("epoch")
            return
        if self.run.control.should_training_stop:
            self._trainer.should_stop = True

    def _fire_epoch_end(self) -> None:
        self._epoch_end_fired = True
        self.run.on_epoch_end()

    def _log_training_window(self) -> None:
        run = self.run
        tr_loss = self._mean_over_processes(self.tr_loss).item()  # the one host sync, once per log
        self.tr_loss.zero_()
        logs = {"loss": tr_loss / (run.state.global_step - self.globalstep_last_logged)}
        if self.grad_norm is not None:
            logs["grad_norm"] = self.grad_norm.item() if torch.is_tensor(self.grad_norm) else self.grad_norm
        logs["learning_rate"] = self.learning_rate if self.learning_rate is not None else self.hooks._get_learning_rate()
        self.total_loss_scalar += tr_loss
        self.globalstep_last_logged = run.state.global_step
        run.store_flos(self._trainer.strategy)
        self.hooks.log(logs, self.start_time)

    def _mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        if self._trainer.world_size > 1:
            # a copy: the strategy reduces in place
            return self._trainer.strategy.reduce(value.detach().float().clone(), reduce_op="mean")
        return value

    def _begin_evaluation(self, stage: str) -> None:
        if not self.eval_loaders:
            raise ValueError("Trainer: evaluation requires an eval_dataset (control.should_evaluate was set).")
        self._eval_pending = stage
        self._trainer.lightning_module.begin_evaluation(
            list(zip(self.eval_prefixes, self.eval_loaders)), self.ignore_keys_for_eval, evaluation.EVALUATION
        )
        self.run.callback_handler.eval_dataloader = self.eval_loaders[0]

    def on_validation_end(self, trainer, pl_module):
        if self._eval_pending is None:
            return
        run = self.run
        stage, self._eval_pending = self._eval_pending, None
        metrics: dict[str, float] = {}
        for output in pl_module.finished_evaluations:
            metrics.update(evaluation.report(self.hooks, run, output))
        pl_module.end_evaluation()  # predictions are not kept alive for the rest of training
        # transformers' _evaluate: the search's objective (a pruned trial raises optuna.TrialPruned here)
        self.hooks._report_to_hp_search(self.hooks._trial, run.state.global_step, metrics)
        if stage == "start":  # eval_on_start: no best-metric bookkeeping, no save, no scheduler step
            return
        self._last_validated_step = run.state.global_step
        self._step_scheduler_on_metric(metrics)
        is_new_best = ckpt.determine_best_metric(run, metrics)
        if run.args.save_strategy == SaveStrategy.BEST:
            run.control.should_save = is_new_best
        self._save_if_requested()
        self._continue_after(stage)

    def _step_scheduler_on_metric(self, metrics: dict) -> None:
        """transformers' `_evaluate`: a ReduceLROnPlateau/GreedyLR steps on `metric_for_best_model` after each
        in-training evaluation (not after eval_on_start's), so the next optimizer step sees the new lr."""
        scheduler = self.hooks.lr_scheduler
        if not steps_on_metric(scheduler):
            return
        key = ckpt.metric_key(self.run.args)
        if key not in metrics:
            raise KeyError(
                f"TrainingArguments.metric_for_best_model={self.run.args.metric_for_best_model!r}: '{key}' is not "
                f"among the evaluation metrics {sorted(metrics)}, and lr_scheduler_type="
                f"{str(getattr(self.run.args.lr_scheduler_type, 'value', self.run.args.lr_scheduler_type))!r} "
                "steps on it. Return it from compute_metrics or change metric_for_best_model."
            )
        scheduler.step(metrics[key])

    def _save_if_requested(self) -> None:
        if self.run.control.should_save:
            self.hooks._save_checkpoint(self.hooks.model, self.hooks._trial)
            self._last_saved_step = self.run.state.global_step
            self.run.on_save()

    # ------------------------------------------------------------------ SIGTERM (interrupts.py)

    def _jit_checkpoint_due(self, trainer) -> bool:
        """transformers' `enable_jit_checkpoint`: the process got SIGTERM and the last finished step is not saved yet.

        transformers waits 3 s after the signal before asking for the save, so that a SIGKILL right behind it does
        not leave a partial folder; saves here are atomic (checkpoint.py), so the save starts at the step's end."""
        return (self.run.args.enable_jit_checkpoint and trainer.received_sigterm
                and self._last_saved_step != self.run.state.global_step)

    def _save_jit_checkpoint(self) -> None:
        logger.info("SIGTERM received: saving the checkpoint of step %s before exiting", self.run.state.global_step)
        self.hooks._save_checkpoint(self.hooks.model)  # no on_save, as transformers' execute_jit_checkpoint
        self._last_saved_step = self.run.state.global_step

    def on_exception(self, trainer, pl_module, exception):
        self.run.memory.abandon()  # no peak-sampling thread left running after a failed (or retried) train()
        # The signal came during an in-training evaluation or at an epoch's end, after the step's save point.
        if isinstance(exception, SIGTERMException) and self._jit_checkpoint_due(trainer):
            self._save_jit_checkpoint()

    # ------------------------------------------------------------------ the end

    def on_train_end(self, trainer, pl_module):
        hooks, run = self.hooks, self.run
        state = run.state
        ckpt.wait_for_saves(trainer)  # async_save: the last checkpoint is in place before the best one is loaded
        hf_logger.info("\n\nTraining completed. Do not forget to share your model on huggingface.co/models =)\n\n")
        self.total_loss_scalar += self._mean_over_processes(self.tr_loss).item()
        num_steps = state.global_step - self.initial_global_step
        train_loss = self.total_loss_scalar / max(num_steps, 0.001)
        metrics = speed_metrics(
            "train",
            self.start_time,
            num_samples=self.plan.num_train_samples * num_steps / max(state.max_steps, 1),
            num_steps=num_steps,
        )
        run.store_flos(trainer.strategy)
        metrics["total_flos"] = state.total_flos
        metrics["train_loss"] = train_loss
        run.memory.stop_stage("train", metrics)  # skip_memory_metrics=False: transformers' memory metrics
        hooks.log(metrics)
        if run.args.load_best_model_at_end and state.best_model_checkpoint is not None:
            ckpt.load_best_model(hooks.model, state, trainer.strategy)
        if run.args.should_save and state.best_model_checkpoint is not None and run.args.save_total_limit == 1:
            for folder in ckpt.sorted_checkpoints(hooks._get_output_dir(hooks._trial)):
                if not os.path.samefile(folder, state.best_model_checkpoint):
                    hf_logger.info(f"Deleting older checkpoint [{folder}] due to args.save_total_limit")
                    shutil.rmtree(folder, ignore_errors=True)
        run.on_train_end()
        hooks._finish_current_push()  # as transformers: train() returns once the last checkpoint push is done
        self.train_output = TrainOutput(state.global_step, train_loss, metrics)

    def on_fit_end(self, trainer, pl_module):
        # Lightning skips its fit loop, on_train_end included, when nothing is left to train (num_train_epochs=0, a
        # resume at or past max_steps); transformers still ends the run: summary log, on_train_end, a TrainOutput.
        if self.train_output is None:
            self.on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Saved on an epoch's last window, the loop state reads "mid-epoch, last batch": Lightning's own restore
        # of that state starts one epoch late. Record it as the finished epoch it is.
        if self._epoch_ends_here and "loops" in checkpoint:
            compat.mark_epoch_finished(checkpoint)

    # Lightning checkpoints (.ckpt) carry the HF state too: see checkpoint.py.
    def state_dict(self):
        return ckpt.flow_state_dict(self.run)

    def load_state_dict(self, state_dict):
        self._rng_from_lightning_ckpt = ckpt.load_flow_state_dict(self.run, state_dict)


def announce_training(args, plan: TrainingPlan, state, model, resume) -> None:
    """transformers' "***** Running training *****" block, on transformers' logger, line for line."""
    hf_logger.info("***** Running training *****")
    hf_logger.info(f"  Num examples = {plan.num_examples:,}")
    hf_logger.info(f"  Num Epochs = {plan.num_train_epochs:,}")
    hf_logger.info(f"  Num update steps per epoch = {plan.updates_per_epoch:,}")
    hf_logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size:,}")
    if args.per_device_train_batch_size != state.train_batch_size:
        hf_logger.info(f"  Training with DataParallel so batch size has been adjusted to: {state.train_batch_size:,}")
    hf_logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {plan.total_batch_size:,}")
    hf_logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    hf_logger.info(f"  Total optimization steps = {plan.max_steps:,}")
    hf_logger.info(f"  Number of trainable parameters = {get_model_param_count(model, trainable_only=True):,}")
    if resume is not None:
        hf_logger.info(
            f"  Resuming training from checkpoint with epoch {resume.epochs_trained} and global step {state.global_step}"
        )
        if not args.ignore_data_skip:
            hf_logger.info(
                f"  Fast-forwarding the dataloader past {resume.epochs_trained} epochs and"
                f" {resume.windows_to_skip * args.gradient_accumulation_steps} batches to resume from the exact"
                " training state."
            )


def _count_tokens(model, args, inputs) -> int:
    main_input_name = getattr(model, "main_input_name", "input_ids")
    if main_input_name not in inputs:
        return 0
    if args.include_num_input_tokens_seen == "non_padding" and "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return inputs[main_input_name].numel()
