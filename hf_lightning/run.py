"""The run state that the facade, the LightningModule, the flow callback and the checkpoint code share.

Floors: this module imports nothing else of hf_lightning; `module.py`, `flow.py`, `evaluation.py` and
`checkpoint.py` import it; `trainer.py` (the facade) imports them all and is imported by none of them. What crosses a
floor is explicit:

* `RunState` — args, TrainerState, TrainerControl, the callback handler and a few run counters; it is also **the one
  place that fires TrainerCallback events** (`run.on_step_begin()` ...), so `control` is reassigned here only;
* `TrainerHooks` — what the lower floors may call on the facade: the hooks a transformers subclass overrides, and
  the attributes transformers documents (`model`, `optimizer`, ...);
* `TrainingPlan` — the numbers transformers' `set_initial_training_values` derives, fixed for one `train()`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers.trainer_callback import CallbackHandler, ExportableState, TrainerControl, TrainerState
from transformers.trainer_utils import TrainerMemoryTracker, speed_metrics


@dataclass(frozen=True)
class TrainingPlan:
    """What one `train()` will do, as transformers computes it before its loop."""

    max_steps: int  # optimizer steps
    num_train_epochs: int  # epochs Lightning may start (2**31 for a stream)
    updates_per_epoch: int  # optimizer steps per epoch (the last window of an epoch may be short)
    steps_in_epoch: int  # micro-batches per epoch (TrainerState.epoch's denominator)
    num_train_samples: float  # for train_samples_per_second
    total_batch_size: int  # batch size x accumulation x processes
    num_examples: int  # rows per epoch, for the "Running training" line

    @property
    def lightning_max_epochs(self) -> int:
        return self.num_train_epochs if self.num_train_epochs < 2**31 else -1


class TrainerHooks(Protocol):
    """The part of `hf_lightning.Trainer` that the LightningModule, the flow and the checkpoint code use: transformers'
    documented attributes and the methods a transformers subclass overrides. Nothing else of the facade is reached."""

    args: Any
    model: nn.Module
    accelerator: Any  # accelerator.LightningAccelerator: accelerate's API on the Lightning strategy
    processing_class: Any
    optimizer: torch.optim.Optimizer | None
    lr_scheduler: Any
    compute_metrics: Any
    preprocess_logits_for_metrics: Any
    eval_dataset: Any
    _train_batch_size: int  # per-device train batch size of this attempt (auto_find_batch_size lowers it)
    hp_search_backend: Any  # set while hyperparameter_search runs (hpo.py)
    _trial: Any  # the hyperparameter-search trial of the current train(), or None
    _keep_padded_eval_losses: bool  # Seq2SeqTrainer: a short last eval batch's loss counts eval_batch_size times

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None: ...

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor: ...

    def prediction_step(self, model: nn.Module, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None): ...

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any: ...

    def _eval_token_counter(self) -> Any: ...

    def _get_learning_rate(self) -> float: ...

    def floating_point_ops(self, inputs: Any) -> int: ...

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None: ...

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None: ...

    def _save_checkpoint(self, model: nn.Module, trial: Any = None) -> None: ...

    def _report_to_hp_search(self, trial: Any, step: int, metrics: dict[str, float]) -> None: ...

    def _get_output_dir(self, trial: Any) -> str: ...

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None: ...

    def _finish_current_push(self) -> None: ...


class FacadeRef:
    """How the Lightning side (the LightningModule, the flow callback, trainer.accelerator) reaches the facade: a weak
    reference. Lightning's trainer, its LightningModule and its callbacks refer to each other; were the facade in
    that cycle, a Trainer its user drops would wait for the garbage collector with its optimizer state, where
    transformers.Trainer is freed at once (a sweep building one Trainer after another on a GPU runs out of memory)."""

    __slots__ = ("_ref",)

    def __init__(self, hooks: TrainerHooks):
        self._ref = weakref.ref(hooks)

    def __reduce__(self):  # a pickled Trainer (a Ray Tune trial's) refers to its own copy
        return FacadeRef, (self(),)

    def __call__(self) -> TrainerHooks:
        hooks = self._ref()
        if hooks is None:
            raise RuntimeError("the hf_lightning.Trainer of this Lightning trainer was deleted: keep a reference to "
                               "the hf_lightning.Trainer while you use its lightning_trainer or lightning_module")
        return hooks


class MemoryMetrics(TrainerMemoryTracker):
    """transformers' memory metrics (`skip_memory_metrics=False`) with the stage named by the caller.

    transformers' tracker names the stage after the function that calls it (`train`, `evaluate`, ...), which here are
    Lightning hooks; everything else (what is measured, nesting, the metric names) is transformers'.
    """

    def __init__(self, skip_memory_metrics: bool):
        super().__init__(skip_memory_metrics)
        self._stage: str | None = None

    def derive_stage(self) -> str:
        return self._stage

    def start_stage(self, stage: str) -> None:
        """Begin `stage` ("init", "train", "eval", "test"); ignored while another stage (or this one) is measured."""
        if self.skip_memory_metrics or self.cur_stage is not None:
            return
        self._stage = stage
        self.start()

    def stop_stage(self, stage: str, metrics: dict | None = None) -> None:
        """End `stage` and add its metrics (with init's, the first time) to `metrics`; ignored for a nested stage."""
        if self.skip_memory_metrics or self.cur_stage != stage:
            return
        self._stage = stage
        self.stop_and_update_metrics(metrics)

    def abandon(self) -> None:
        """A stage ended by an exception: stop the peak-sampling thread, report nothing."""
        if not self.skip_memory_metrics and self.cur_stage is not None:
            self.stop(self.cur_stage)


@dataclass
class RunState:
    """One Trainer's progress and event dispatch (TrainerState is replaced at each `train()`, the rest lives on)."""

    args: Any
    callback_handler: CallbackHandler
    state: TrainerState = field(default_factory=TrainerState)
    control: TrainerControl = field(default_factory=TrainerControl)
    # transformers' Trainer attributes of the same names, for the current run
    current_flos: float = 0.0
    current_gradient_accumulation_steps: int = 1
    initial_num_input_tokens_seen: int = 0
    # transformers reports `<prefix>_model_preparation_time` when a Trainer's first act is an evaluation
    model_prepared: bool = False
    model_preparation_time: float | None = None
    # TrainerState's trial fields for the next train() (hpo.py; transformers' init_training_references)
    trial_references: dict = field(default_factory=dict)
    memory: MemoryMetrics = field(init=False)

    def __post_init__(self) -> None:
        # transformers measures its __init__ from here to on_init_end and reports it with the first train/eval/test
        self.memory = MemoryMetrics(self.args.skip_memory_metrics)
        self.memory.start_stage("init")

    def new_state(self, is_local_process_zero: bool, is_world_process_zero: bool) -> TrainerState:
        self.state = TrainerState(
            is_local_process_zero=is_local_process_zero,
            is_world_process_zero=is_world_process_zero,
            stateful_callbacks=self.stateful_callbacks(),
        )
        return self.state

    def begin_training(self, plan: TrainingPlan, train_batch_size: int, is_local_process_zero: bool,
                       is_world_process_zero: bool) -> TrainerState:
        """A fresh TrainerState for a `train()`, with the plan's numbers and the logging/eval/save cadences."""
        self.memory.start_stage("train")  # once per train(): an auto_find_batch_size retry keeps measuring
        state = self.new_state(is_local_process_zero, is_world_process_zero)
        state.train_batch_size = train_batch_size
        state.compute_steps(self.args, plan.max_steps)
        state.max_steps = plan.max_steps
        state.num_train_epochs = plan.num_train_epochs
        for name, value in self.trial_references.items():
            setattr(state, name, value)
        return state

    def log(self, logs: dict[str, float], start_time: float | None = None, publish=None) -> None:
        """transformers' `Trainer.log`: epoch and token counts added, the entry appended to log_history, handed to
        `publish(logs, step)` (Lightning's loggers and monitors), then on_log."""
        state = self.state
        if state.epoch is not None:
            logs["epoch"] = state.epoch
        if self.args.include_num_input_tokens_seen != "no":
            logs["num_input_tokens_seen"] = state.num_input_tokens_seen
            if start_time is not None:
                tokens = state.num_input_tokens_seen - self.initial_num_input_tokens_seen
                logs.update(speed_metrics("train", start_time, num_tokens=tokens))
        state.log_history.append({**logs, "step": state.global_step})
        if publish is not None:
            publish(logs, state.global_step)
        self.on_log(logs)

    def store_flos(self, strategy=None) -> None:
        """transformers' `store_flos`: this run's floating point operations, summed over the processes of a Lightning
        strategy, move into TrainerState.total_flos."""
        flos = self.current_flos
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            flos = strategy.reduce(torch.tensor(flos, dtype=torch.float64, device=strategy.root_device), reduce_op="sum")
            flos = float(flos)
        self.state.total_flos += flos
        self.current_flos = 0.0

    def stateful_callbacks(self) -> list:
        """The callbacks (and the control) whose state a checkpoint carries, as transformers lists them."""
        return [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]

    def load_callback_state(self) -> list[str]:
        """transformers' `_load_callback_state` on the resumed `state.stateful_callbacks`: each saved entry rebuilds
        its callback from the saved constructor `args`, then sets the saved `attributes`; several saved instances of
        one class go, in order, to this run's instances of that class; the restored callbacks replace those
        instances (moving to the end of the list) and a saved TrainerControl replaces `control`. Returns the names
        of saved callbacks this run does not have (transformers warns and ignores them)."""
        handler = self.callback_handler
        current = handler.callbacks + [self.control]
        not_found, restored_callbacks = [], []
        for name, saved in (self.state.stateful_callbacks or {}).items():
            entries = saved if isinstance(saved, list) else [saved]
            same_class = [cb for cb in current if cb.__class__.__name__ == name]
            if not same_class:
                not_found.append(name)
                continue
            for callback, entry in zip(same_class, entries):
                restored = type(callback)(**entry.get("args", {}))
                for attribute, value in entry.get("attributes", {}).items():
                    setattr(restored, attribute, value)
                if isinstance(callback, TrainerControl):
                    self.control = restored
                else:
                    restored_callbacks.append(restored)
                handler.remove_callback(type(restored))
        for callback in restored_callbacks:
            handler.add_callback(callback)
        return not_found

    # ------------------------------------------------------------------ the 16 TrainerCallback events

    def on_init_end(self) -> None:
        self.memory.stop_stage("init")
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    def on_train_begin(self) -> None:
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)

    def on_train_end(self) -> None:
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)

    def on_epoch_begin(self) -> None:
        self.control = self.callback_handler.on_epoch_begin(self.args, self.state, self.control)

    def on_epoch_end(self) -> None:
        self.control = self.callback_handler.on_epoch_end(self.args, self.state, self.control)

    def on_step_begin(self) -> None:
        self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)

    def on_pre_optimizer_step(self) -> None:
        self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)

    def on_optimizer_step(self) -> None:
        self.control = self.callback_handler.on_optimizer_step(self.args, self.state, self.control)

    def on_substep_end(self) -> None:
        self.control = self.callback_handler.on_substep_end(self.args, self.state, self.control)

    def on_step_end(self) -> None:
        self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)

    def on_evaluate(self, metrics: dict[str, float]) -> None:
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)

    def on_predict(self, metrics: dict[str, float]) -> None:
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)

    def on_save(self) -> None:
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def on_log(self, logs: dict[str, float]) -> None:
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def on_prediction_step(self) -> None:
        self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)

    def on_push_begin(self) -> None:
        self.control = self.callback_handler.on_push_begin(self.args, self.state, self.control)


def shared_attribute(name: str, doc: str) -> property:
    """A facade attribute of transformers' name (`trainer.state`, `trainer.control`, ...) that lives in its RunState."""

    def get(self):
        return getattr(self._run, name)

    def set_(self, value):
        setattr(self._run, name, value)

    return property(get, set_, doc=doc)
