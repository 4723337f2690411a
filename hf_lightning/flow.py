"""`TrainingFlow`: the Lightning callback that gives a Lightning run transformers' semantics.

It fires the TrainerCallback events at the Lightning hooks that match them and runs transformers'
`_maybe_log_save_evaluate` (log → evaluate → save, in that order, inside the optimizer step that asked for it):

    HF event / action              Lightning place
    on_train_begin                 on_fit_start (optimizers exist; before eval_on_start, which is the sanity check)
    on_epoch_begin                 on_train_epoch_start
    on_step_begin ... on_step_end  TransformersModule.training_step / here in on_train_batch_end
    log                            on_train_batch_end, on the device-side loss sum read once per log
    evaluate                       Lightning's validation loop, run when TrainerControl.should_evaluate says so
    save                           after the evaluation (on_validation_end) or at once when no evaluation is due
    on_epoch_end                   after the step's log/eval/save, on the epoch's last window or when stopping
    on_train_end                   on_train_end, after the train summary log and best-model loading

Lightning decides *when* to validate from `val_check_interval`; here transformers' TrainerControl decides, so the
epoch loop's `_should_check_val_fx` is pointed at `should_validate_now` (the one private Lightning name this project
relies on, pinned by tests/test_callbacks.py's event-order test).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time

import lightning.pytorch as pl
import torch
from transformers.trainer_utils import SaveStrategy, TrainOutput, speed_metrics

from . import checkpoint as ckpt

logger = logging.getLogger("hf_lightning")


def add_filtered_loss(tr_loss: torch.Tensor, loss: torch.Tensor, steps_so_far: int, read_value: bool) -> None:
    """transformers' `logging_nan_inf_filter`: a nan/inf step loss counts as the mean of the window so far.

    On an accelerator this stays on the device (no host sync per step); on CPU (`read_value`) reading the value costs
    nothing, and one add instead of four tensor ops saves ~6 µs a micro-batch.
    """
    if read_value:
        tr_loss += loss if math.isfinite(loss.item()) else tr_loss / steps_so_far
    else:
        tr_loss += torch.where(torch.isfinite(loss), loss, tr_loss / steps_so_far)


class TrainingFlow(pl.Callback):
    """One training run's HF bookkeeping (created by `Trainer.train`)."""

    def __init__(self, hf_trainer, windows, plan: dict, resume_from_checkpoint: str | None, ignore_keys_for_eval,
                 eval_loaders=None):
        self.hf = hf_trainer
        self.windows = windows
        self.eval_loaders = eval_loaders or []
        self._rng_from_lightning_ckpt = None
        self.plan = plan
        self.resume_from_checkpoint = resume_from_checkpoint
        self.ignore_keys_for_eval = ignore_keys_for_eval
        self.train_output: TrainOutput | None = None
        self.grad_norm: torch.Tensor | None = None
        self.learning_rate: float | None = None
        self.micro_batches_in_epoch = 0
        self._eval_pending: str | None = None  # "start" | "step" | "epoch": where to continue after validating
        self._epoch_end_fired = False
        self._resume = None

    @property
    def state_key(self) -> str:
        return "hf_lightning.TrainingFlow"

    # ------------------------------------------------------------------ setup

    def setup(self, trainer, pl_module, stage):
        pl_module.flow = self
        # An empty epoch must end the run before Lightning asks the empty iterator for a batch.
        self.windows.on_empty_epoch = lambda: setattr(trainer, "should_stop", True)
        trainer.fit_loop.epoch_loop._should_check_val_fx = self.should_validate_now

    def should_validate_now(self, *_args) -> bool:
        return self._eval_pending is not None

    def epoch_should_stop(self) -> bool:
        return self.hf.control.should_epoch_stop

    def on_fit_start(self, trainer, pl_module):
        hf = self.hf
        self.tr_loss = torch.zeros((), device=pl_module.device)
        self.total_loss_scalar = 0.0
        handler = hf.callback_handler
        handler.model, handler.optimizer, handler.lr_scheduler = hf.model, hf.optimizer, hf.lr_scheduler
        handler.train_dataloader = self.windows.dataloader
        self._resume = None
        if self.resume_from_checkpoint is not None:
            self._resume = ckpt.restore_training_state(hf, trainer, self.resume_from_checkpoint, self.plan)
            self.windows.skip_windows = self._resume.windows_to_skip
        elif trainer.ckpt_path is not None:
            # A plain `lightning_trainer.fit(lightning_module, ckpt_path=...)`: Lightning restores weights, optimizer,
            # scheduler and its loops itself; TrainerState came back through load_state_dict below.
            self._resume = ckpt.resume_point(hf, self.plan, self._rng_from_lightning_ckpt)
            self.windows.skip_windows = self._resume.windows_to_skip
        self.initial_global_step = hf.state.global_step
        self.globalstep_last_logged = hf.state.global_step
        hf._initial_num_input_tokens_seen = hf.state.num_input_tokens_seen
        logger.info(
            "***** Running training ***** examples=%s epochs=%s update steps=%s total batch size=%s",
            hf.num_examples(self.windows.dataloader),
            self.plan["num_train_epochs"],
            self.plan["max_steps"],
            self.plan["total_batch_size"],
        )
        self.start_time = time.time()
        hf.control = handler.on_train_begin(hf.args, hf.state, hf.control)

    def on_sanity_check_start(self, trainer, pl_module):
        # eval_on_start runs as Lightning's sanity check over the whole eval set (num_sanity_val_steps=-1).
        self._begin_evaluation("start")

    # ------------------------------------------------------------------ epochs and steps

    def on_train_epoch_start(self, trainer, pl_module):
        hf = self.hf
        self._epoch_end_fired = False
        self.micro_batches_in_epoch = 0
        if self._resume is not None and trainer.current_epoch == self._resume.epochs_trained:
            self.micro_batches_in_epoch = self._resume.windows_to_skip * hf.args.gradient_accumulation_steps
        if self._resume is not None:
            self._resume.restore_rng_at_epoch_start(trainer.current_epoch)
        hf.control = hf.callback_handler.on_epoch_begin(hf.args, hf.state, hf.control)

    def add_micro_batch(self, loss: torch.Tensor, inputs) -> None:
        """Accumulate the step loss (transformers' nan/inf filter; on an accelerator without a host sync)."""
        hf = self.hf
        if hf.args.logging_nan_inf_filter:
            steps_so_far = 1 + hf.state.global_step - self.globalstep_last_logged
            add_filtered_loss(self.tr_loss, loss, steps_so_far, read_value=loss.device.type == "cpu")
        else:
            self.tr_loss += loss
        hf.current_flos += float(hf.floating_point_ops(inputs))
        if hf.args.include_num_input_tokens_seen != "no":
            tokens = _count_tokens(hf, inputs)
            if hf.lightning_module.trainer.world_size > 1:  # transformers counts every process's tokens
                tokens = int(hf.lightning_module.all_gather(torch.tensor(tokens)).sum())
            hf.state.num_input_tokens_seen += tokens
        self.micro_batches_in_epoch += 1

    def before_window(self) -> None:
        """Called by training_step before the window's first forward."""
        if self._resume is not None:
            self._resume.before_first_window()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        hf = self.hf
        hf.state.global_step = trainer.global_step
        hf.state.epoch = trainer.current_epoch + self.micro_batches_in_epoch / self.plan["steps_in_epoch"]
        hf.control = hf.callback_handler.on_step_end(hf.args, hf.state, hf.control)
        self._epoch_ends_here = (
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            or hf.control.should_training_stop
            or hf.control.should_epoch_stop
            or hf.state.global_step >= hf.state.max_steps
        )
        self._maybe_log_save_evaluate("step")

    def on_train_epoch_end(self, trainer, pl_module):
        # Reached when Lightning ended the epoch on its own (e.g. a Lightning EarlyStopping set trainer.should_stop).
        if not self._epoch_end_fired:
            hf = self.hf
            if self.micro_batches_in_epoch == 0:  # a stream that ran dry: transformers stops training here
                logger.warning(
                    "The training data yielded no batch this epoch: stopping at step %s (an IterableDataset with "
                    "fewer rows than max_steps needs).", hf.state.global_step
                )
                trainer.should_stop = True
            if trainer.should_stop:
                hf.control.should_training_stop = True
            self._fire_epoch_end()
            hf.control.should_evaluate = False
            self._maybe_log_save_evaluate("epoch")

    # ------------------------------------------------------------------ log → evaluate → save

    def _maybe_log_save_evaluate(self, stage: str) -> None:
        hf = self.hf
        if hf.control.should_log and hf.state.global_step > self.globalstep_last_logged:
            self._log_training_window()
        if hf.control.should_evaluate:
            if self._eval_pending is not None or self._validated_this_step(stage):
                logger.warning(
                    "An evaluation was requested twice in step %s (at the step and at the epoch end); "
                    "hf_lightning runs one.", hf.state.global_step
                )
                hf.control.should_evaluate = False
            else:
                self._begin_evaluation(stage)
                return  # Lightning's validation loop runs next; on_validation_end continues with the save
        self._save_if_requested()
        self._continue_after(stage)

    def _validated_this_step(self, stage: str) -> bool:
        return stage == "epoch" and getattr(self, "_last_validated_step", None) == self.hf.state.global_step

    def _continue_after(self, stage: str) -> None:
        hf = self.hf
        if stage == "step" and self._epoch_ends_here and not self._epoch_end_fired:
            self._fire_epoch_end()
            self._maybe_log_save_evaluate("epoch")
            return
        if hf.control.should_training_stop and hf.lightning_trainer is not None:
            hf.lightning_trainer.should_stop = True

    def _fire_epoch_end(self) -> None:
        hf = self.hf
        self._epoch_end_fired = True
        hf.control = hf.callback_handler.on_epoch_end(hf.args, hf.state, hf.control)

    def _log_training_window(self) -> None:
        hf = self.hf
        tr_loss = self._mean_over_processes(self.tr_loss).item()  # the one host sync, once per log
        self.tr_loss.zero_()
        logs = {"loss": tr_loss / (hf.state.global_step - self.globalstep_last_logged)}
        if self.grad_norm is not None:
            logs["grad_norm"] = self.grad_norm.item() if torch.is_tensor(self.grad_norm) else self.grad_norm
        logs["learning_rate"] = self.learning_rate if self.learning_rate is not None else hf._get_learning_rate()
        self.total_loss_scalar += tr_loss
        self.globalstep_last_logged = hf.state.global_step
        hf.store_flos()
        hf.log(logs, self.start_time)

    def _mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        module = self.hf.lightning_module
        if module.trainer.world_size > 1:
            return module.all_gather(value).float().mean()
        return value

    def _begin_evaluation(self, stage: str) -> None:
        hf = self.hf
        if hf.eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset (control.should_evaluate was set).")
        self._eval_pending = stage
        prefixes = (
            [f"eval_{name}" for name in hf.eval_dataset] if isinstance(hf.eval_dataset, dict) else ["eval"]
        )
        hf.lightning_module.begin_evaluation(prefixes, self.ignore_keys_for_eval, description="Evaluation")
        loaders = hf.lightning_trainer.val_dataloaders if hf.lightning_trainer is not None else None
        hf.callback_handler.eval_dataloader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders

    def on_validation_end(self, trainer, pl_module):
        if self._eval_pending is None:
            return
        hf = self.hf
        stage, self._eval_pending = self._eval_pending, None
        metrics: dict[str, float] = {}
        for output in pl_module.finished_evaluations:
            metrics.update(hf._report_evaluation(output))
        pl_module.end_evaluation()  # predictions are not kept alive for the rest of training
        if stage == "start":  # eval_on_start: no best-metric bookkeeping, no save, no scheduler step
            return
        self._last_validated_step = hf.state.global_step
        is_new_best = ckpt.determine_best_metric(hf, metrics)
        if isinstance(hf.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            hf.lr_scheduler.step(metrics[ckpt.metric_key(hf.args)])
        if hf.args.save_strategy == SaveStrategy.BEST:
            hf.control.should_save = is_new_best
        self._save_if_requested()
        self._continue_after(stage)

    def _save_if_requested(self) -> None:
        hf = self.hf
        if hf.control.should_save:
            hf._save_checkpoint(hf.model)
            hf.control = hf.callback_handler.on_save(hf.args, hf.state, hf.control)

    # ------------------------------------------------------------------ the end

    def on_train_end(self, trainer, pl_module):
        hf = self.hf
        self.total_loss_scalar += self._mean_over_processes(self.tr_loss).item()
        num_steps = hf.state.global_step - self.initial_global_step
        train_loss = self.total_loss_scalar / max(num_steps, 0.001)
        metrics = speed_metrics(
            "train",
            self.start_time,
            num_samples=self.plan["num_train_samples"] * num_steps / max(hf.state.max_steps, 1),
            num_steps=num_steps,
        )
        hf.store_flos()
        metrics["total_flos"] = hf.state.total_flos
        metrics["train_loss"] = train_loss
        hf.log(metrics)
        if hf.args.load_best_model_at_end and hf.state.best_model_checkpoint is not None:
            ckpt.load_best_model(hf)
        if hf.args.should_save and hf.state.best_model_checkpoint is not None and hf.args.save_total_limit == 1:
            for folder in ckpt.sorted_checkpoints(hf.args.output_dir):
                if not os.path.samefile(folder, hf.state.best_model_checkpoint):
                    shutil.rmtree(folder, ignore_errors=True)
        hf.control = hf.callback_handler.on_train_end(hf.args, hf.state, hf.control)
        self.train_output = TrainOutput(hf.state.global_step, train_loss, metrics)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Saved on an epoch's last window, the loop state reads "mid-epoch, last batch": Lightning's own restore
        # of that state starts one epoch late. Record it as the finished epoch it is.
        if getattr(self, "_epoch_ends_here", False) and "loops" in checkpoint:
            ckpt.mark_epoch_finished(checkpoint["loops"]["fit_loop"])

    # Lightning checkpoints (.ckpt) carry the HF state too: see checkpoint.py.
    def state_dict(self):
        return ckpt.flow_state_dict(self)

    def load_state_dict(self, state_dict):
        self._rng_from_lightning_ckpt = ckpt.load_flow_state_dict(self, state_dict)


def _count_tokens(hf, inputs) -> int:
    main_input_name = getattr(hf.model, "main_input_name", "input_ids")
    if main_input_name not in inputs:
        return 0
    if hf.args.include_num_input_tokens_seen == "non_padding" and "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return inputs[main_input_name].numel()
