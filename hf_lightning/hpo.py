"""Hyperparameter search: transformers' `Trainer.hyperparameter_search`, each trial a full hf_lightning run.

transformers' own drivers run the search (`run_hp_search_optuna` / `run_hp_search_ray` of
transformers.integrations): they call `trainer.train(trial=...)`, read `trainer.objective` and evaluate when no
in-training evaluation set it, exactly as they drive transformers.Trainer. This module gives the facade what those
drivers and transformers' `train()` use, bound by `surface.apply` (SURFACE):

* `_hp_search_setup(trial)` — called by `train()` after `model_init(trial)`: the trial's values set on `args` (cast
  to each field's type, unknown names warned about, as transformers does), checked again by the field table, the
  train batch size re-read, and the trial's references for the next TrainerState (`trial_name`, `trial_params`,
  `is_hyper_param_search`);
* `_report_to_hp_search(trial, step, metrics)` — called by flow.py after each in-training evaluation: the objective;
  optuna's pruner is asked, and a pruned trial fires on_train_end and raises `optuna.TrialPruned` out of `train()`
  (before that step's save), as transformers does; Ray Tune receives the metrics, with a checkpoint when a save is due;
* `_get_output_dir(trial)` — `output_dir/run-{trial id}` (or `hp_name(trial)`): each trial's checkpoint folders.

Optuna is the embedded default (`pip install 'hf-lightning[hpo]'`); Ray Tune (`ray[tune]`) runs trials in its
workers, to which it sends the pickled Trainer. W&B sweeps are refused: they need the W&B server and report through
transformers' WandbCallback beside the Lightning logger that `report_to="wandb"` already creates.
"""

from __future__ import annotations

import importlib
import logging
import os

from transformers.trainer_utils import HPSearchBackend, number_of_arguments

from .training_args import check_supported

hf_logger = logging.getLogger("transformers.trainer")  # transformers' lines, on transformers' logger


def hyperparameter_search(self, hp_space=None, compute_objective=None, n_trials: int = 20,
                          direction: str | list[str] = "minimize", backend=None, hp_name=None, **kwargs):
    """transformers' `Trainer.hyperparameter_search` (optuna or Ray Tune): `model_init` builds each trial's model,
    each trial is a full `train()` (checkpoints in `output_dir/run-{id}`); returns transformers' `BestRun` (a list
    of them for a list of directions)."""
    from transformers.hyperparameter_search import default_hp_search_backend

    if backend is None:
        try:
            backend = default_hp_search_backend()
        except RuntimeError as err:
            raise RuntimeError(
                "Trainer.hyperparameter_search needs optuna (`pip install 'hf-lightning[hpo]'`) or Ray Tune "
                "(`pip install 'ray[tune]'`)."
            ) from err
        if HPSearchBackend(backend) == HPSearchBackend.WANDB:  # the only one installed
            raise RuntimeError(
                "Trainer.hyperparameter_search found only wandb installed; hf_lightning runs W&B sweeps' trials "
                "through optuna or Ray Tune instead: `pip install 'hf-lightning[hpo]'` (optuna) or "
                "`pip install 'ray[tune]'`."
            )
    if HPSearchBackend(backend) == HPSearchBackend.WANDB:
        raise NotImplementedError(
            "Trainer.hyperparameter_search(backend='wandb') is not available in hf_lightning: W&B sweeps need the W&B "
            "server and would report each trial twice (transformers' WandbCallback and the Lightning logger of "
            "report_to='wandb'). Use backend='optuna' or backend='ray'; report_to='wandb' still logs every trial."
        )
    if self.args.world_size > 1:
        raise NotImplementedError(
            "Trainer.hyperparameter_search runs its trials in one process in hf_lightning (the process group of a "
            f"launcher's {self.args.world_size} processes starts with each Lightning run, after the search would "
            "broadcast a trial). Launch the script without torchrun, or use backend='ray' with "
            "resources_per_trial to spread trials over devices."
        )
    search = vars(importlib.import_module("transformers.trainer").Trainer)["hyperparameter_search"]
    return search(self, hp_space=hp_space, compute_objective=compute_objective, n_trials=n_trials,
                  direction=direction, backend=backend, hp_name=hp_name, **kwargs)


def call_model_init(self, trial=None):
    """transformers' `call_model_init`: `model_init()` or `model_init(trial)`, by its number of arguments."""
    argument_count = number_of_arguments(self.model_init)
    if argument_count == 0:
        model = self.model_init()
    elif argument_count == 1:
        model = self.model_init(trial)
    else:
        raise RuntimeError("model_init should have 0 or 1 argument.")
    if model is None:
        raise RuntimeError("model_init should not return None.")
    return model


def _hp_search_setup(self, trial) -> None:
    """transformers' `_hp_search_setup`, minus the accelerate Accelerator it rebuilds: the next Lightning run reads
    the changed `args` itself."""
    self._trial = trial
    if self.hp_search_backend is not None and trial is not None:
        backend = HPSearchBackend(self.hp_search_backend)
        if backend == HPSearchBackend.OPTUNA:
            params = self.hp_space(trial)
        else:
            params = trial
            params.pop("wandb", None)
        for key, value in params.items():
            if not hasattr(self.args, key):
                hf_logger.warning(
                    f"Trying to set {key} in the hyperparameter search but there is no corresponding field in"
                    " `TrainingArguments`."
                )
                continue
            old_attr = getattr(self.args, key, None)
            if old_attr is not None:
                value = type(old_attr)(value)
            setattr(self.args, key, value)
        check_supported(self.args)  # a value the field table refuses is refused for a trial too
        if backend == HPSearchBackend.OPTUNA:
            hf_logger.info(f"Trial: {trial.params}")
        self._train_batch_size = self.args.train_batch_size
    self._run.trial_references = trial_references(self, trial)


def trial_references(trainer, trial) -> dict:
    """What transformers' `TrainerState.init_training_references` records about the trial."""
    references = {"is_hyper_param_search": trial is not None, "trial_params": None}
    if trainer.hp_name is not None and trial is not None:
        references["trial_name"] = trainer.hp_name(trial)
    if trial is not None:
        from transformers.integrations import hp_params

        references["trial_params"] = hp_params(trial)
    return references


def _report_to_hp_search(self, trial, step: int, metrics: dict[str, float]) -> None:
    """transformers' `_report_to_hp_search`, its on_train_end fired through the run state."""
    if self.hp_search_backend is None or trial is None:
        return
    metrics = metrics.copy()
    self.objective = self.compute_objective(metrics)
    backend = HPSearchBackend(self.hp_search_backend)
    if backend == HPSearchBackend.OPTUNA:
        import optuna

        if hasattr(trial, "study") and len(trial.study.directions) == 1:  # optuna prunes single objectives only
            trial.report(self.objective, step)
            if trial.should_prune():
                self._run.on_train_end()
                raise optuna.TrialPruned()
    elif backend == HPSearchBackend.RAY:
        import tempfile

        import ray.tune

        with tempfile.TemporaryDirectory() as temp_checkpoint_dir:
            checkpoint = None
            if self.control.should_save:
                self._tune_save_checkpoint(checkpoint_dir=temp_checkpoint_dir)
                checkpoint = ray.tune.Checkpoint.from_directory(temp_checkpoint_dir)
            metrics["objective"] = self.objective
            ray.tune.report(metrics, checkpoint=checkpoint)


def _get_output_dir(self, trial) -> str:
    """transformers' `_get_output_dir`: a trial's checkpoints go to `output_dir/run-{id}` (or `hp_name(trial)`)."""
    if self.hp_search_backend is None or trial is None:
        return self.args.output_dir
    backend = HPSearchBackend(self.hp_search_backend)
    if backend == HPSearchBackend.OPTUNA:
        run_id = trial.number
    else:
        import ray.tune

        run_id = ray.tune.get_context().get_trial_id()
    run_name = self.hp_name(trial) if self.hp_name is not None else f"run-{run_id}"
    return os.path.join(self.args.output_dir, run_name)


def _memory_tracker_get(self):
    return self._run.memory


def _memory_tracker_set(self, tracker) -> None:
    # run_hp_search_ray swaps in a skipping tracker (the measuring one does not pickle); keep the run state's kind
    from .run import MemoryMetrics

    self._run.memory = MemoryMetrics(tracker.skip_memory_metrics)


# Bound to the facade by surface.apply (names the facade defines itself are kept).
SURFACE = {
    "hyperparameter_search": hyperparameter_search,
    "call_model_init": call_model_init,
    "_hp_search_setup": _hp_search_setup,
    "_report_to_hp_search": _report_to_hp_search,
    "_get_output_dir": _get_output_dir,
    # transformers' Trainer.__init__ values; hyperparameter_search sets them for its duration
    "hp_search_backend": None,
    "hp_name": None,
    "_trial": None,
    "objective": None,
    "_memory_tracker": property(_memory_tracker_get, _memory_tracker_set,
                                doc="transformers' memory tracker: the run state's (skip_memory_metrics=False)."),
}
