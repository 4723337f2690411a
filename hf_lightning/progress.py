"""Progress display: transformers' default callback list, with the bar drawn once, by Lightning.

transformers adds `ProgressCallback` (a tqdm bar over optimizer steps, and each log line written above it) unless
`disable_tqdm`, else `PrinterCallback` (each log printed). Here the bar is Lightning's (`StepProgressBar`, counting
what transformers' bar counts); the `ProgressCallback` in the callback list is `LightningProgressCallback`, which
draws nothing and writes the log lines as ProgressCallback does. So the list reads as transformers' does, and
`trainer.remove_callback(ProgressCallback)` switches the display off, Lightning's bar included. A ProgressCallback
of the user's own (transformers' class or a subclass) draws its own bar, and Lightning's is left off: one bar.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from tqdm.auto import tqdm
from transformers.trainer_callback import PrinterCallback, ProgressCallback


class _LogWriter:
    """Stands for ProgressCallback's `training_bar` where it only writes lines (tqdm.write keeps Lightning's bar
    intact below them)."""

    def write(self, line: str) -> None:
        tqdm.write(line)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class LightningProgressCallback(ProgressCallback):
    """transformers' ProgressCallback whose bars Lightning draws; `on_log` is ProgressCallback's (the shared logs dict
    is left whole: `total_flos` stays in `train().metrics`, as with transformers' tqdm on)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.training_bar = _LogWriter() if state.is_world_process_zero else None
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        pass

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass

    def on_train_end(self, args, state, control, **kwargs):
        self.training_bar = None


def default_progress_callback(args) -> type:
    """What transformers adds to every Trainer's callbacks after the user's."""
    return PrinterCallback if args.disable_tqdm else LightningProgressCallback


def lightning_draws_progress(trainer_callbacks: list) -> bool:
    """Lightning's bar is on while the list holds the default ProgressCallback and no other that draws its own."""
    progress = [cb for cb in trainer_callbacks if isinstance(cb, ProgressCallback)]
    return bool(progress) and all(isinstance(cb, LightningProgressCallback) for cb in progress)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting what transformers' does: optimizer steps of the whole run, up to max_steps (not
    the batches of the current epoch, which stop short when max_steps ends an epoch early)."""

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps is not None and max_steps > 0 else super().total_train_batches

    def on_train_epoch_start(self, trainer, *rest: Any) -> None:
        super().on_train_epoch_start(trainer, *rest)
        self._show(trainer.global_step)  # a resumed or later epoch starts where the run is

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            self._show(trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def _show(self, n: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = n
            bar.refresh()


def configure_progress(kwargs: dict, trainer_callbacks: list, args) -> None:
    """Set `enable_progress_bar` in the lightning.Trainer kwargs from the callback list (unless the user set it in
    lightning_trainer_kwargs), adding StepProgressBar unless a Lightning progress bar of the user's is there."""
    callbacks = kwargs["callbacks"]
    user_set = getattr(args, "lightning_trainer_kwargs", None) or {}
    has_user_bar = any(isinstance(cb, ProgressBar) for cb in callbacks)
    enabled = user_set.get("enable_progress_bar", has_user_bar or lightning_draws_progress(trainer_callbacks))
    kwargs["enable_progress_bar"] = enabled
    if enabled and not has_user_bar:
        callbacks.append(StepProgressBar())
