"""The rest of transformers.Trainer's public surface, applied to the facade as one table (`apply(Trainer)`).

Every public name of `transformers.Trainer` 5.24 and the protected hooks subclasses override exist on
`hf_lightning.Trainer` (tests/test_surface.py lists them). The facade defines what it runs; this module adds the rest:

* BORROWED — transformers' own functions, bound to the facade because they only read what it has (`args`, `model`,
  `state`, `optimizer`, `accelerator` ...). `transformers.trainer` imports accelerate's Accelerator, the hub and
  integrations, so it is imported on first use, not by `import hf_lightning`;
* properties and attributes whose values follow from Lightning running the loop (`model_wrapped`, no DeepSpeed/FSDP
  plugin), and the hub's checkpoint push with its failures logged (hub.py);
* REFUSED — what has no counterpart yet: `NotImplementedError` saying why and what to use instead;
* NOT_CALLED — transformers hooks that exist here (callable, as transformers') but that Lightning's loop does not
  call: a subclass overriding one is warned at construction, rather than having its override silently unused.
"""

from __future__ import annotations

import functools
import importlib
import warnings

from transformers import trainer_pt_utils

from . import checkpoint as ckpt
from . import hub

_LOG_SAVE_EVALUATE = (
    "log → evaluate → save runs inside Lightning's loop (hf_lightning/flow.py), driven by TrainerControl; "
    "react to it with a TrainerCallback (on_log, on_evaluate, on_save) or set control.should_log/"
    "should_evaluate/should_save from one"
)
_EVALUATION_LOOP = (
    "evaluation runs in Lightning's validation/test loop; call `trainer.evaluate(eval_dataset)` for metrics or "
    "`trainer.predict(dataset)` for predictions, label_ids and metrics"
)
_ACCELERATOR = (
    "there is no accelerate Accelerator to create: Lightning's Trainer owns devices, precision and strategy. "
    "Pass Lightning options through `TrainingArguments(lightning_trainer_kwargs={...})`; `trainer.accelerator` "
    "answers accelerate's calls from the Lightning strategy"
)

REFUSED: dict[str, str] = {
    "hyperparameter_search": (
        "hyperparameter search drives transformers' own loop through optuna/ray/wandb callbacks; until hf_lightning "
        "supports it (planned), run the search yourself, e.g. an optuna study whose objective builds "
        "`Trainer(model_init=..., args=...)` with the trial's values and returns `trainer.evaluate()[metric]`"
    ),
    "create_accelerator_and_postprocess": _ACCELERATOR,
    "evaluation_loop": _EVALUATION_LOOP,
    "_maybe_log_save_evaluate": _LOG_SAVE_EVALUATE,
}

# transformers hooks that hf_lightning defines but whose override Lightning's loop never calls, with what to use.
NOT_CALLED: dict[str, str] = {
    "_maybe_log_save_evaluate": _LOG_SAVE_EVALUATE,
    "_evaluate": "in-training evaluations run in Lightning's validation loop; override `evaluate` only for direct "
                 "calls, or use a TrainerCallback's on_evaluate",
    "evaluation_loop": _EVALUATION_LOOP,
    "_wrap_model": "Lightning's strategy wraps the model (DDP ...); choose it with "
                   "`lightning_trainer_kwargs={'strategy': ...}`",
    "_load_from_checkpoint": "resumes restore weights in hf_lightning/checkpoint.py",
    "get_batch_samples": "Lightning iterates gradient-accumulation windows built by hf_lightning/data.py",
    "set_initial_training_values": "hf_lightning/data.py's training_plan computes the run's numbers",
    "create_accelerator_and_postprocess": _ACCELERATOR,
}


@functools.cache
def _transformers_trainer():
    return importlib.import_module("transformers.trainer").Trainer


@functools.cache
def transformers_seq2seq_trainer():
    return importlib.import_module("transformers.trainer_seq2seq").Seq2SeqTrainer


class Borrowed:
    """transformers.Trainer's function of the same name (or `source()`'s, e.g. Seq2SeqTrainer's), looked up when
    first used."""

    def __init__(self, source=None):
        self.source = source or _transformers_trainer

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        function = vars(self.source())[self.name]
        if isinstance(function, staticmethod):
            return function.__func__
        return function if obj is None else function.__get__(obj, objtype)


BORROWED = (
    "create_model_card", "autocast_smart_context_manager", "get_batch_samples", "set_initial_training_values",
    "get_total_train_batch_size", "get_sp_size", "get_cp_size", "get_tp_size", "_evaluate", "_report_to_hp_search",
    "_load_callback_state", "push_to_hub", "init_hf_repo",
)

# Attributes transformers sets in __init__ whose value is fixed here: Lightning runs no DeepSpeed/FSDP plugin of
# transformers (refused by the field table), no hyperparameter search exists yet; `hub_model_id` until `init_hf_repo`
# sets the instance's (hub.py).
CONSTANTS = {
    "deepspeed": None, "is_deepspeed_enabled": False, "is_fsdp_enabled": False, "hub_model_id": None, "hp_name": None,
    "hp_search_backend": None,
    # transformers' values without `fsdp` (`args.fsdp and ...`): None, not False
    "is_fsdp_xla_enabled": None, "is_fsdp_xla_v1_enabled": None, "is_fsdp_xla_v2_enabled": None,
}


def _model_wrapped(self):
    """The outermost model: what Lightning's strategy wraps (e.g. DistributedDataParallel around the LightningModule
    that holds `model`) while and after a `train()` that wrapped it, else `model` itself, as in transformers."""
    lightning_trainer, module = self.lightning_trainer, self.lightning_module
    if module is None or module.model is not self.model:
        return self.model
    wrapped = lightning_trainer.strategy.model if lightning_trainer is not None else None
    if wrapped is None or wrapped is module:  # not training now: the wrapper of the last train(), if any
        wrapped = getattr(module.flow, "model_wrapped", None)
    return self.model if wrapped is None or wrapped is module else wrapped


def _is_model_parallel(self) -> bool:
    """transformers' test: the model is spread over several devices by `device_map`."""
    device_map = getattr(self.model, "hf_device_map", None) or {}
    return len({d for d in device_map.values() if d not in ("cpu", "disk")}) > 1


def _place_model_on_device(self) -> bool:
    """Lightning's strategy moves the model to its device when a loop starts (not at construction)."""
    place = self.args.place_model_on_device
    return True if place is None else place


def _gather_function(self):
    """transformers' default, `accelerator.gather_for_metrics` with `eval_use_gather_object`."""
    return functools.partial(self.accelerator.gather_for_metrics, use_gather_object=self.args.eval_use_gather_object)


def _set_gather_function(self, value):
    raise NotImplementedError(
        "Trainer.gather_function cannot be replaced in hf_lightning: evaluation gathers predictions through the "
        "Lightning strategy. Gather yourself with `self.accelerator.gather(...)` in prediction_step or compute_metrics."
    )


def _wrap_model(self, model, training: bool = True, dataloader=None):
    """transformers' result on one process or under DDP (where accelerate, not this hook, wraps): `model` as it is.
    Lightning's strategy wraps the LightningModule when a loop starts; see `model_wrapped`."""
    return model


def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
    """Load a `checkpoint-N/` folder's weights into `model` (default: `self.model`), checked to fit it."""
    ckpt.load_checkpoint_weights(self.model if model is None else model, resume_from_checkpoint)


def _refused(name: str, message: str):
    def method(self, *args, **kwargs):
        raise NotImplementedError(f"Trainer.{name}() is not available in hf_lightning: {message}.")

    method.__name__ = name
    method.__doc__ = f"Not available in hf_lightning: {message}."
    return method


_facades: list[type] = []  # the class apply() completed (this module never imports the facade)


def check_overrides(trainer_class) -> None:
    """Warn for each transformers hook a subclass overrides that Lightning's loop will not call."""
    for name, advice in NOT_CALLED.items():
        owner = next((klass for klass in trainer_class.__mro__ if name in vars(klass)), None)
        if owner is not None and owner not in _facades:
            warnings.warn(
                f"{trainer_class.__name__} overrides Trainer.{name}, which hf_lightning's loop does not call: {advice}.",
                UserWarning, stacklevel=3,
            )


def apply(cls) -> None:
    """Give the facade class the rest of transformers.Trainer's surface (names it defines itself are kept)."""
    table = {
        # transformers' helpers that are written as Trainer methods (trainer_pt_utils is imported anyway)
        "log_metrics": trainer_pt_utils.log_metrics,
        "metrics_format": trainer_pt_utils.metrics_format,
        "save_metrics": trainer_pt_utils.save_metrics,
        "save_state": trainer_pt_utils.save_state,
        "get_learning_rates": trainer_pt_utils.get_learning_rates,
        "get_num_trainable_parameters": trainer_pt_utils.get_num_trainable_parameters,
        "get_optimizer_group": trainer_pt_utils.get_optimizer_group,
        "model_wrapped": property(_model_wrapped, doc=_model_wrapped.__doc__),
        "is_model_parallel": property(_is_model_parallel, doc=_is_model_parallel.__doc__),
        "is_distributed_loading_by_transformers": property(
            lambda self: getattr(self.model, "is_distributed_loading_by_transformers", False)
        ),
        "place_model_on_device": property(_place_model_on_device, doc=_place_model_on_device.__doc__),
        "gather_function": property(_gather_function, _set_gather_function, doc=_gather_function.__doc__),
        "_wrap_model": _wrap_model,
        "_load_from_checkpoint": _load_from_checkpoint,
        "_push_from_checkpoint": hub.push_from_checkpoint,
        "_finish_current_push": hub.finish_current_push,
        **CONSTANTS,
        **{name: _refused(name, message) for name, message in REFUSED.items()},
    }
    for name in BORROWED:
        borrowed = Borrowed()
        borrowed.__set_name__(cls, name)
        table[name] = borrowed
    for name, value in table.items():
        if name not in vars(cls):
            setattr(cls, name, value)
    _facades.append(cls)
