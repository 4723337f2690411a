"""transformers.Trainer's whole public surface on hf_lightning.Trainer: each name exists, and either behaves as
transformers' (pinned here against a real transformers.Trainer) or raises NotImplementedError naming what to use."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers

import hf_lightning
from hf_lightning import surface
from differential import VOLATILE, run_pair
from helpers import classification_dataset, tiny_bert

# The protected hooks that subclasses (TRL's among them) override or call.
PROTECTED_HOOKS = ("_prepare_inputs", "_evaluate", "_maybe_log_save_evaluate", "_save_checkpoint",
                   "_load_from_checkpoint", "_load_callback_state", "_get_learning_rate", "_wrap_model",
                   "_get_eval_sampler", "_get_train_sampler")

# Each refusal names the alternative to use.
ALTERNATIVES = {
    "hyperparameter_search": "model_init",
    "create_accelerator_and_postprocess": "lightning_trainer_kwargs",
    "evaluation_loop": "trainer.evaluate",
    "_maybe_log_save_evaluate": "TrainerCallback",
}


def _args(cls, out, **kw):
    options = dict(report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", max_steps=2,
                   per_device_train_batch_size=4)
    options.update(kw)
    return cls(str(out), **options)


def observe(trainer) -> dict:
    """What the borrowed and derived members answer after a 2-step run (transformers' Trainer must be asked before
    another TrainingArguments resets accelerate's state)."""
    loader, eval_loader = trainer.get_train_dataloader(), trainer.get_eval_dataloader()
    batch = next(iter(loader))
    samples, items = trainer.get_batch_samples(iter(loader), 2, torch.device("cpu"))
    stable = {k: v for k, v in trainer._evaluate(None, None).items() if not any(s in k for s in VOLATILE)}
    return {
        "trainable": trainer.get_num_trainable_parameters(),
        "lrs": trainer.get_learning_rates(),
        "groups": len(trainer.get_optimizer_group()),
        "total_batch": trainer.get_total_train_batch_size(trainer.args),
        "parallel_sizes": (trainer.get_sp_size(), trainer.get_cp_size(), trainer.get_tp_size()),
        "initial_values": trainer.set_initial_training_values(trainer.args, loader),
        "num_examples": trainer.num_examples(loader),
        # what accelerate's prepared loaders expose
        "loaders": [(dl.total_batch_size, dl.total_dataset_length) for dl in (loader, eval_loader)],
        "flos": trainer.floating_point_ops(batch),
        "batch_samples": (len(samples), float(items)),
        "autocast": type(trainer.autocast_smart_context_manager()),
        "model_wrapped_is_model": trainer.model_wrapped is trainer.model,  # one process: nothing wraps it
        "_evaluate": stable,
        **{name: getattr(trainer, name) for name in (*surface.CONSTANTS, "is_model_parallel", "place_model_on_device",
                                                     "is_distributed_loading_by_transformers")},
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A trained transformers.Trainer and hf_lightning.Trainer on the same seed, model and data."""
    root = tmp_path_factory.mktemp("surface")
    return run_pair(root, tiny_bert, train_dataset=classification_dataset(16),
                    eval_dataset=classification_dataset(8, seed=1), per_device_train_batch_size=4, max_steps=2,
                    logging_steps=1, after=observe)


def transformers_public_names(trainer: transformers.Trainer) -> set[str]:
    names = {n for n in dir(transformers.Trainer) if not n.startswith("_")}
    names |= {n for n in vars(trainer) if not n.startswith("_")}  # the attributes its __init__ sets
    return names | set(PROTECTED_HOOKS)


def test_every_public_name_of_transformers_trainer_exists(pair):
    names = transformers_public_names(pair["hf"][0])
    assert len(names) > 80 and {"model_wrapped", "accelerator", "create_model_card"} <= names
    missing = sorted(name for name in names if not hasattr(pair["hl"][0], name))
    assert not missing, f"hf_lightning.Trainer lacks {missing}"


@pytest.mark.parametrize("name", sorted(surface.REFUSED))
def test_refused_names_say_why_and_what_to_use(pair, name):
    with pytest.raises(NotImplementedError, match=ALTERNATIVES[name]):
        getattr(pair["hl"][0], name)()


def test_gather_function_is_transformers_default_and_not_replaceable(pair):
    hl = pair["hl"][0]
    assert hl.gather_function.func == hl.accelerator.gather_for_metrics
    assert hl.gather_function(torch.arange(3)).tolist() == [0, 1, 2]
    with pytest.raises(NotImplementedError, match="accelerator.gather"):
        hl.gather_function = hl.accelerator.gather


def test_borrowed_and_derived_values_match_transformers(pair):
    hf, hl = pair["hf_after"], pair["hl_after"]
    assert hl.keys() == hf.keys()
    for name in hf:
        assert hl[name] == pytest.approx(hf[name]) if name in ("lrs", "_evaluate") else hl[name] == hf[name], name
    assert hl["trainable"] > 0 and hl["flos"] > 0 and hl["total_batch"] == 4 and hl["_evaluate"]["eval_loss"] > 0
    assert hl["autocast"] is contextlib.nullcontext and hl["model_wrapped_is_model"]
    trainer = pair["hl"][0]
    assert trainer.get_optimizer_group(next(iter(trainer.model.parameters()))) in trainer.optimizer.param_groups
    assert trainer._wrap_model(trainer.model) is trainer.model


def test_floating_point_ops_before_training_matches_transformers(tmp_path):
    batch = {"input_ids": torch.ones(2, 8, dtype=torch.long)}
    hl = hf_lightning.Trainer(tiny_bert(), args=_args(hf_lightning.TrainingArguments, tmp_path / "hl"))
    hf = transformers.Trainer(tiny_bert(), args=_args(transformers.TrainingArguments, tmp_path / "hf"))
    assert hl.floating_point_ops(batch) == hf.floating_point_ops(batch) > 0


def test_load_from_checkpoint_loads_the_folders_weights(tmp_path):
    args = _args(hf_lightning.TrainingArguments, tmp_path, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(16))
    trainer.train()
    fresh = tiny_bert()
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint-2"), model=fresh)
    for (name, a), b in zip(trainer.model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_subclass_overriding_a_hook_the_loop_does_not_call_is_warned(tmp_path):
    class Custom(hf_lightning.Trainer):
        def _maybe_log_save_evaluate(self, *args, **kwargs):
            pass

    with pytest.warns(UserWarning, match="Custom overrides Trainer._maybe_log_save_evaluate.*TrainerCallback"):
        Custom(tiny_bert(), args=_args(hf_lightning.TrainingArguments, tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        type("Plain", (hf_lightning.Trainer,), {"compute_loss": hf_lightning.Trainer.compute_loss})(
            tiny_bert(), args=_args(hf_lightning.TrainingArguments, tmp_path))


def test_create_model_card_writes_transformers_readme_offline(pair):
    (hf, _, _), (hl, _, _) = pair["hf"], pair["hl"]
    for trainer in (hf, hl):
        trainer.create_model_card(model_name="tiny", language="en")
    card = open(os.path.join(hl.args.output_dir, "README.md")).read()
    assert "library_name: transformers" in card and "tiny" in card and "learning_rate: 5e-05" in card
    hf_card = open(os.path.join(hf.args.output_dir, "README.md")).read()
    section = lambda text: text[text.index("### Training hyperparameters"):text.index("### Framework")]  # noqa: E731
    assert section(card) == section(hf_card)


# ---------------------------------------------------------------------- transformers' checks, its messages


def test_best_save_strategy_without_a_metric_is_refused_as_transformers_does(tmp_path):
    message = "`args.metric_for_best_model` must be provided when using 'best' save_strategy"
    for trainer_cls, args_cls in ((transformers.Trainer, transformers.TrainingArguments),
                                  (hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        args = _args(args_cls, tmp_path, save_strategy="best", eval_strategy="steps", eval_steps=1)
        with pytest.raises(ValueError, match=message):
            trainer_cls(tiny_bert(), args=args, eval_dataset=classification_dataset(4))


def test_label_smoothing_is_switched_off_for_multi_label_models(tmp_path):
    model = tiny_bert()
    model.config.problem_type = "multi_label_classification"
    args = _args(hf_lightning.TrainingArguments, tmp_path, label_smoothing_factor=0.1)
    with pytest.warns(UserWarning, match="Label smoothing is not compatible with multi-label classification"):
        trainer = hf_lightning.Trainer(model, args=args)
    assert trainer.label_smoother is None
    assert hf_lightning.Trainer(tiny_bert(), args=args).label_smoother is not None


def test_a_bad_resume_path_gets_transformers_message(tmp_path):
    trainer = hf_lightning.Trainer(tiny_bert(), args=_args(hf_lightning.TrainingArguments, tmp_path),
                                   train_dataset=classification_dataset(8))
    with pytest.raises(ValueError, match="Can't find a valid checkpoint at .*nope"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Can't find a valid checkpoint at .*empty"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"No valid checkpoint found in output directory"):
        trainer.train(resume_from_checkpoint=True)


# ---------------------------------------------------------------------- data loaders


class NoDatasetLoader:
    """An iterable of batches without `.dataset` (a wrapper a subclass's get_train_dataloader may return)."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


def test_an_overridden_train_dataloader_without_dataset_trains_as_transformers(tmp_path):
    data = classification_dataset(8, extra_column=False)

    def override(base):
        class Custom(base):
            def get_train_dataloader(self):
                return NoDatasetLoader(torch.utils.data.DataLoader(
                    data, batch_size=4, collate_fn=transformers.default_data_collator))
        return Custom

    results = run_pair(tmp_path, tiny_bert, train_dataset=data, hf_cls=override(transformers.Trainer),
                       hl_cls=override(hf_lightning.Trainer), max_steps=3, logging_steps=1)
    losses = {key: [e["loss"] for e in results[key][0].state.log_history if "loss" in e] for key in ("hf", "hl")}
    assert len(losses["hl"]) == 3 and losses["hl"] == pytest.approx(losses["hf"], rel=1e-6)


# ---------------------------------------------------------------------- a transformers example script

SCRIPT = textwrap.dedent('''
    """Written the way transformers' examples are; only the import line differs between the two runs."""
    import json, os, sys
    from dataclasses import dataclass, field
    sys.path.insert(0, {tests!r})
    from {framework} import Trainer, TrainingArguments, HfArgumentParser
    from helpers import accuracy, classification_dataset, tiny_bert

    @dataclass
    class DataArguments:
        train_rows: int = field(default=16, metadata={{"help": "training rows"}})

    parser = HfArgumentParser((DataArguments, TrainingArguments))
    data_args, training_args = parser.parse_args_into_dataclasses()
    trainer = Trainer(model=tiny_bert(), args=training_args, train_dataset=classification_dataset(data_args.train_rows),
                      eval_dataset=classification_dataset(8, seed=1), compute_metrics=accuracy)
    train_result = trainer.train()
    metrics = train_result.metrics
    metrics["train_samples"] = data_args.train_rows
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.create_model_card(model_name="tiny-bert", tasks="text-classification")
''')


def test_a_transformers_example_script_runs_with_only_the_import_changed(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    procs = {}
    for framework in ("transformers", "hf_lightning"):  # both at once: most of each run is importing
        script = tmp_path / f"run_{framework}.py"
        script.write_text(SCRIPT.format(tests=tests, framework=framework))
        procs[framework] = subprocess.Popen(
            [sys.executable, str(script), "--output_dir", str(tmp_path / framework), "--max_steps", "3",
             "--logging_steps", "1", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu",
             "--disable_tqdm", "true", "--save_strategy", "no", "--train_rows", "12"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.path.dirname(tests)},
        )
    results = {}
    for framework, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out = tmp_path / framework
        assert os.path.isfile(out / "README.md") and os.path.isfile(out / "trainer_state.json")
        results[framework] = {name: json.load(open(out / f"{name}_results.json")) for name in ("train", "eval", "all")}
    stable = lambda metrics: {k: v for k, v in metrics.items() if not any(s in k for s in VOLATILE)}  # noqa: E731
    for name in ("train", "eval", "all"):
        hf, hl = stable(results["transformers"][name]), stable(results["hf_lightning"][name])
        assert hl.keys() == hf.keys(), name
        assert hl == pytest.approx(hf, rel=1e-5), name
