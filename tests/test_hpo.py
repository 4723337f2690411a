"""Trainer.hyperparameter_search: transformers' own search drivers run hf_lightning trials (hf_lightning/hpo.py).

The differential runs one optuna study through transformers.Trainer and one through hf_lightning.Trainer (same
sampler seed, same pruner) and compares what the study and the trials' folders hold."""

from __future__ import annotations

import json
import os

import pytest
import transformers
from transformers import TrainerCallback
from transformers.trainer_utils import BestRun

import hf_lightning
from helpers import accuracy, classification_dataset, tiny_bert

optuna = pytest.importorskip("optuna", reason="hyperparameter search needs optuna: pip install 'hf-lightning[hpo]'")


class EndOfTrial(TrainerCallback):
    """What each trial's TrainerState says when it ends (pruned trials end too)."""

    def __init__(self):
        self.ends = []

    def on_train_end(self, args, state, control, **kwargs):
        self.ends.append({"trial_params": state.trial_params, "is_hyper_param_search": state.is_hyper_param_search,
                          "global_step": state.global_step, "learning_rate": args.learning_rate,
                          "batch_size": args.per_device_train_batch_size})


class PruneTrial(optuna.pruners.BasePruner):
    """Prunes trial `number` at its first report: the run must stop there, before that step's save."""

    def __init__(self, number: int):
        self.number = number

    def prune(self, study, trial) -> bool:
        return trial.number == self.number


def hp_space(trial):
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True),
        "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [4, 8]),
    }


def _trainer(trainer_cls, args_cls, out, callbacks=(), compute_metrics=None, **args):
    options = dict(max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                   logging_steps=2, report_to="none", use_cpu=True, disable_tqdm=True)
    options.update(args)
    return trainer_cls(model_init=lambda: tiny_bert(), args=args_cls(str(out), **options), callbacks=list(callbacks),
                       train_dataset=classification_dataset(16), eval_dataset=classification_dataset(8, seed=1),
                       compute_metrics=compute_metrics)


def _tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def _search_pair(tmp_path, trainer_options=None, **search):
    """{key: (trainer, best, study, EndOfTrial)} for transformers ("hf") and hf_lightning ("hl")."""
    results = {}
    for key, trainer_cls, args_cls in (("hf", transformers.Trainer, transformers.TrainingArguments),
                                       ("hl", hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        recorder = EndOfTrial()
        trainer = _trainer(trainer_cls, args_cls, tmp_path / key, callbacks=[recorder], **(trainer_options or {}))
        storage = optuna.storages.InMemoryStorage()
        best = trainer.hyperparameter_search(
            **search, backend="optuna", storage=storage, study_name=key, sampler=optuna.samplers.TPESampler(seed=0),
        )
        results[key] = (trainer, best, optuna.load_study(study_name=key, storage=storage), recorder.ends)
    return results


def _trials(study) -> list[tuple]:
    return [(t.number, t.state, t.params, t.intermediate_values, t.value if t.values is None or len(t.values) == 1
             else t.values) for t in study.trials]


def test_optuna_search_matches_transformers_trial_for_trial_with_pruning(tmp_path):
    results = _search_pair(tmp_path, hp_space=hp_space, n_trials=3, direction="minimize", pruner=PruneTrial(1))
    (_, hf_best, hf_study, hf_ends), (hl_trainer, hl_best, hl_study, hl_ends) = results["hf"], results["hl"]

    # the same hyperparameters, the same eval-loss objectives per reported step, the same states and BestRun
    hf_trials, hl_trials = _trials(hf_study), _trials(hl_study)
    assert [t[:3] for t in hl_trials] == [t[:3] for t in hf_trials]
    assert [t[1] for t in hl_trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                         optuna.trial.TrialState.COMPLETE]
    for hf_trial, hl_trial in zip(hf_trials, hl_trials):
        assert hl_trial[3] == pytest.approx(hf_trial[3], rel=1e-5)
        assert (hl_trial[4] is None) == (hf_trial[4] is None)
        assert hl_trial[4] == pytest.approx(hf_trial[4], rel=1e-5)
    assert isinstance(hl_best, BestRun) and hl_best.run_id == hf_best.run_id
    assert hl_best.objective == pytest.approx(hf_best.objective, rel=1e-5)
    assert hl_best.hyperparameters == hf_best.hyperparameters
    # the objective is transformers' default: the eval loss of the last evaluation
    assert hl_best.objective == hl_study.trials[int(hl_best.run_id)].intermediate_values[4]

    # each trial trained with its own values; the pruned one stopped at its first evaluation (step 2 of 4)
    assert hl_ends == hf_ends
    assert [end["global_step"] for end in hl_ends] == [4, 2, 4]
    assert [end["trial_params"] for end in hl_ends] == [t.params for t in hl_study.trials]
    assert all(end["is_hyper_param_search"] for end in hl_ends)
    assert [end["learning_rate"] for end in hl_ends] == [t.params["learning_rate"] for t in hl_study.trials]

    # per-trial folders: output_dir/run-{number}/checkpoint-N, none for the pruned trial (pruned before its save)
    hf_tree, hl_tree = _tree(tmp_path / "hf"), _tree(tmp_path / "hl")
    assert hl_tree == hf_tree
    assert {path.split(os.sep)[0] for path in hl_tree} == {"run-0", "run-2"}
    assert {os.path.dirname(p) for p in hl_tree} == {f"run-{n}/checkpoint-{s}" for n in (0, 2) for s in (2, 4)}
    for folder in ("run-0/checkpoint-4", "run-2/checkpoint-2"):
        hf_state = json.loads((tmp_path / "hf" / folder / "trainer_state.json").read_text())
        hl_state = json.loads((tmp_path / "hl" / folder / "trainer_state.json").read_text())
        for key in ("trial_params", "is_hyper_param_search", "trial_name", "global_step", "best_model_checkpoint",
                    "total_flos"):
            assert hl_state[key] == hf_state[key], key
        assert hl_state["best_model_checkpoint"] is None or "/run-" in hl_state["best_model_checkpoint"]

    # after the search, as transformers: no backend, the last trial's model released
    assert hl_trainer.hp_search_backend is None and hl_trainer.model is None


def test_multi_objective_search_with_hp_name_returns_transformers_best_runs(tmp_path):
    """A list of directions: objectives from an evaluation after training (no in-training evaluation), no pruning;
    hp_name names the trials' folders and TrainerState.trial_name."""
    def objectives(metrics):
        return [metrics["eval_loss"], metrics["eval_accuracy"]]

    results = _search_pair(tmp_path, hp_space=hp_space, n_trials=2, direction=["minimize", "maximize"],
                           compute_objective=objectives, hp_name=lambda trial: f"trial-{trial.number}",
                           trainer_options=dict(max_steps=2, eval_strategy="no", compute_metrics=accuracy))
    (_, hf_best, hf_study, _), (_, hl_best, hl_study, hl_ends) = results["hf"], results["hl"]
    assert [t[:3] for t in _trials(hl_study)] == [t[:3] for t in _trials(hf_study)]
    assert isinstance(hl_best, list) and all(isinstance(run, BestRun) for run in hl_best)
    assert [(run.run_id, run.hyperparameters) for run in hl_best] == [(r.run_id, r.hyperparameters) for r in hf_best]
    for hl_run, hf_run in zip(hl_best, hf_best):
        assert len(hl_run.objective) == 2 and hl_run.objective == pytest.approx(hf_run.objective, rel=1e-5)
    assert [end["global_step"] for end in hl_ends] == [2, 2]
    assert _tree(tmp_path / "hl") == _tree(tmp_path / "hf")
    assert {os.path.dirname(p) for p in _tree(tmp_path / "hl")} == {"trial-0/checkpoint-2", "trial-1/checkpoint-2"}
    state = json.loads((tmp_path / "hl" / "trial-1" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["trial_name"] == "trial-1" and state["trial_params"] == hl_study.trials[1].params


def test_search_without_model_init_is_refused_as_in_transformers(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(8))
    with pytest.raises(RuntimeError, match="model_init"):
        trainer.hyperparameter_search(hp_space=hp_space, n_trials=1)
    with pytest.raises(NotImplementedError, match="backend='optuna' or backend='ray'"):
        trainer.hyperparameter_search(hp_space=hp_space, n_trials=1, backend="wandb")


def test_a_trial_value_the_field_table_refuses_is_refused(tmp_path):
    trainer = _trainer(hf_lightning.Trainer, hf_lightning.TrainingArguments, tmp_path, max_steps=1,
                       eval_strategy="no", save_strategy="no")
    with pytest.raises(ValueError, match="deepspeed"):
        trainer.hyperparameter_search(hp_space=lambda trial: {"deepspeed": "ds.json"}, n_trials=1)


def test_ray_tune_search_runs_hf_lightning_trials_on_a_local_cluster(tmp_path):
    """backend="ray": transformers' run_hp_search_ray sends the pickled Trainer to Ray Tune's workers (a local
    2-CPU cluster); each trial reports its evaluations to Tune and saves into output_dir/run-{trial id}."""
    ray = pytest.importorskip("ray", reason="backend='ray' needs Ray Tune: pip install 'ray[tune]'")
    from ray import tune

    here = os.path.dirname(os.path.abspath(__file__))
    # the workers import hf_lightning and the test helpers that model_init uses
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}})
    try:
        trainer = _trainer(hf_lightning.Trainer, hf_lightning.TrainingArguments, tmp_path / "hl", max_steps=2,
                           eval_steps=1, save_steps=2, logging_steps=1)
        best = trainer.hyperparameter_search(
            hp_space=lambda _: {"learning_rate": tune.grid_search([1e-3, 1e-2])}, n_trials=1, backend="ray",
            storage_path=str(tmp_path / "ray_results"), verbose=0,
        )
    finally:
        ray.shutdown()
    results = {trial.config["learning_rate"]: (trial.trial_id, trial.last_result["objective"])
               for trial in best.run_summary.trials}
    assert sorted(results) == [1e-3, 1e-2]
    assert isinstance(best, BestRun) and (best.run_id, best.objective) == min(results.values(), key=lambda r: r[1])
    assert best.hyperparameters == {"learning_rate": next(lr for lr, r in results.items() if r[0] == best.run_id)}
    # each trial's objective is the eval loss transformers.Trainer reaches with that learning rate
    for learning_rate, (trial_id, objective) in results.items():
        reference = _trainer(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", max_steps=2,
                             eval_strategy="no", save_strategy="no", learning_rate=learning_rate)
        reference.train()
        assert objective == pytest.approx(reference.evaluate()["eval_loss"], rel=1e-5)
        assert sorted(os.listdir(tmp_path / "hl" / f"run-{trial_id}")) == ["checkpoint-2"]
