"""The guide's optimizers through `optim=`, NEFTune, and optimizer modes under Lightning."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import transformers

import hf_lightning
from differential import assert_same_history, assert_same_weights, run_pair, transformers_bug
from helpers import lm_dataset, tiny_llama

TARGETS = ["self_attn", "mlp"]
OPTIMS = {
    # name: (package needed, transformers runs it on CPU)
    "adamw_torch": (None, True),
    "adamw_torch_fused": (None, True),
    "adafactor": (None, True),
    "sgd": (None, True),
    "adagrad": (None, True),
    "rmsprop": (None, True),
    "galore_adamw": ("galore_torch", True),
    "galore_adafactor": ("galore_torch", True),
    "galore_adamw_layerwise": ("galore_torch", False),  # transformers never schedules the per-parameter lr
    "galore_adafactor_layerwise": ("galore_torch", False),  # and transformers' lookup fails it (relative_step)
    "lomo": ("lomo_optim", True),
    "adalomo": ("lomo_optim", False),  # transformers 5.24: "Torch not compiled with CUDA enabled"
    "grokadamw": ("grokadamw", True),
    "apollo_adamw": ("apollo_torch", True),
    "apollo_adamw_layerwise": ("apollo_torch", False),
    "adamw_bnb_8bit": ("bitsandbytes", True),
    "adamw_torch_4bit": ("torchao", True),
    "adamw_torch_8bit": ("torchao", True),
    "schedule_free_adamw": ("schedulefree", True),
    "schedule_free_sgd": ("schedulefree", True),
    "schedule_free_radam": ("schedulefree", True),
}


def _args(optim, **kw):
    base = dict(per_device_train_batch_size=4, max_steps=40, logging_steps=5, learning_rate=1e-2,
                lr_scheduler_type="constant", optim=optim, save_strategy="steps", save_steps=20,
                optim_target_modules=TARGETS if "galore" in optim or "apollo" in optim else None)
    base.update(kw)
    return base


@pytest.mark.parametrize("optim", sorted(OPTIMS))
def test_optimizer_trains_saves_and_resumes(tmp_path, optim):
    package, transformers_runs_it = OPTIMS[optim]
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed (pip install 'hf-lightning[optimizers]')")
    if optim == "lomo":  # plain SGD inside the backward: a larger step to see the loss fall within 40 steps
        kwargs = _args(optim, learning_rate=0.3)
    else:
        kwargs = _args(optim)
    if transformers_runs_it:
        results = run_pair(tmp_path, tiny_llama, lm_dataset(32), None, **kwargs)
        assert_same_history(results["hf"][0].state.log_history, results["hl"][0].state.log_history,
                            rel=1e-5, abs_=1e-6)
        trainer, _, model = results["hl"]
    else:
        model = tiny_llama()
        trainer = hf_lightning.Trainer(model, args=hf_lightning.TrainingArguments(
            str(tmp_path / "hl"), report_to="none", disable_tqdm=True, **kwargs), train_dataset=lm_dataset(32))
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    # Resume from the step-20 checkpoint in a fresh trainer and finish.
    resumed_model = tiny_llama(seed=1)
    resumed = hf_lightning.Trainer(resumed_model, args=hf_lightning.TrainingArguments(
        str(tmp_path / "resumed"), report_to="none", disable_tqdm=True, **kwargs), train_dataset=lm_dataset(32))
    resumed.train(resume_from_checkpoint=str(tmp_path / "hl" / "checkpoint-20"))
    assert resumed.state.global_step == 40
    if optim in ("adalomo", "grokadamw") or "layerwise" in optim:
        # Their state lives outside optimizer.state_dict() (AdaLomo's dicts, GrokAdamW's param_groups keyed by
        # Parameter objects, the per-parameter optimizers): transformers cannot restore it either.
        return
    assert_same_weights(model, resumed_model, atol=1e-6)


TRANSFORMERS_FAILS = {  # optim: the error transformers 5.24 stops with on CPU, and why
    "adalomo": (AssertionError, "Torch not compiled with CUDA", "transformers 5.24 builds lomo_optim's AdaLomo, "
                "whose constructor allocates its state with .cuda(), so it cannot run without a GPU"),
    "galore_adafactor_layerwise": (ValueError, "relative_step", "transformers 5.24 gives GaLoreAdafactor its fixed-lr "
                                   "settings (relative_step=False) for galore_adafactor only, so the layer-wise form "
                                   "fails in its own lookup"),
}


@pytest.mark.parametrize("optim", sorted(TRANSFORMERS_FAILS))
def test_optimizer_transformers_fails_on_matches_it(tmp_path, optim):
    """The transformers half of these optimizers (ours is test_optimizer_trains_saves_and_resumes): an expected
    failure while transformers stops with its known error, a differential test once it runs."""
    package = OPTIMS[optim][0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed (pip install 'hf-lightning[optimizers]')")
    error, match, why = TRANSFORMERS_FAILS[optim]
    with transformers_bug(error, match, why):
        results = run_pair(tmp_path, tiny_llama, lm_dataset(16), None, **_args(optim, max_steps=4, logging_steps=1,
                                                                                 save_strategy="no"))
    assert_same_history(results["hf"][0].state.log_history, results["hl"][0].state.log_history, rel=1e-5, abs_=1e-6)
    assert_same_weights(results["hf"][2], results["hl"][2])


def test_layerwise_refuses_gradient_accumulation_like_transformers(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), optim="galore_adamw_layerwise", optim_target_modules=TARGETS,
                                          gradient_accumulation_steps=2, max_steps=2, report_to="none")
    with pytest.raises(ValueError, match="gradient accumulation"):
        hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(8)).train()


def test_layerwise_schedules_each_parameter(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), optim="galore_adamw_layerwise", optim_target_modules=TARGETS,
                                          max_steps=4, report_to="none", save_strategy="no", learning_rate=1e-2)
    trainer = hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(16))
    trainer.train()
    lrs = {group["lr"] for opt in trainer.optimizer.optimizer_dict.values() for group in opt.param_groups}
    assert lrs == {0.0}  # linear decay reached 0 at max_steps on every parameter's optimizer


def test_layerwise_refuses_a_metric_driven_scheduler(tmp_path):
    pytest.importorskip("galore_torch")
    args = hf_lightning.TrainingArguments(str(tmp_path), optim="galore_adamw_layerwise", optim_target_modules=TARGETS,
                                          lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps",
                                          eval_steps=2, max_steps=2, report_to="none", save_strategy="no")
    trainer = hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(8), eval_dataset=lm_dataset(4))
    with pytest.raises(ValueError, match="reduce_lr_on_plateau.*step-based lr_scheduler_type"):
        trainer.train()


def test_missing_optimizer_package_names_the_extra(tmp_path, monkeypatch):
    import transformers.trainer_optimizer as lookup

    monkeypatch.setattr(lookup, "is_lomo_available", lambda: False)  # as on a machine without lomo-optim
    args = hf_lightning.TrainingArguments(str(tmp_path), optim="lomo", max_steps=1, report_to="none")
    with pytest.raises(ImportError, match=r"lomo.*pip install 'hf-lightning\[optimizers\]'"):
        hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(4)).train()


def test_schedule_free_modes_and_eval_before_save(tmp_path):
    pytest.importorskip("schedulefree")
    modes, at_save = [], {}

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            modes.append(("step", optimizer.param_groups[0]["train_mode"]))

        def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
            modes.append(("evaluate", optimizer.param_groups[0]["train_mode"]))

        def on_save(self, args, state, control, optimizer=None, model=None, **kwargs):
            modes.append(("save", optimizer.param_groups[0]["train_mode"]))
            at_save[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}

    args = hf_lightning.TrainingArguments(str(tmp_path), optim="schedule_free_adamw", max_steps=4, save_steps=3,
                                          eval_strategy="steps", eval_steps=2, report_to="none", learning_rate=1e-2)
    trainer = hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(16),
                                   eval_dataset=lm_dataset(4), callbacks=[Spy()])
    trainer.train()
    assert ("step", True) in modes and ("evaluate", False) in modes
    # The saved weights are the eval-mode (averaged) ones, not the training iterate (transformers 5.24 saves the latter).
    import safetensors.torch

    assert modes[:5] == [("step", True), ("step", True), ("evaluate", False), ("step", True), ("save", False)]
    assert modes[5] == ("step", True)  # training went on in train mode
    # checkpoint-3 holds the eval-mode (averaged) weights, not the training iterate.
    saved = safetensors.torch.load_file(os.path.join(tmp_path, "checkpoint-3", "model.safetensors"))
    for name, value in saved.items():
        assert torch.equal(value, at_save[3][name]), name
    # ... and resuming from it ends exactly where the uninterrupted run did.
    resumed = hf_lightning.Trainer(tiny_llama(seed=3), args=args, train_dataset=lm_dataset(16),
                                   eval_dataset=lm_dataset(4))
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-3"))
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_neftune_noise_only_in_training_and_removed_after(tmp_path):
    model = tiny_llama()
    embeddings = model.get_input_embeddings()
    seen = []

    class Probe(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            ids = torch.tensor([[1, 2, 3, 4]])
            model.train()
            noisy = model.get_input_embeddings()(ids)
            model.eval()
            clean = model.get_input_embeddings()(ids)
            seen.append(bool((noisy != clean).any()))
            model.train()

    args = hf_lightning.TrainingArguments(str(tmp_path), neftune_noise_alpha=5.0, max_steps=2, report_to="none",
                                          save_strategy="no")
    hf_lightning.Trainer(model, args=args, train_dataset=lm_dataset(8), callbacks=[Probe()]).train()
    assert seen == [True, True]
    assert not embeddings._forward_hooks  # removed when train() ended

    class Boom(transformers.TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hf_lightning.Trainer(model, args=args, train_dataset=lm_dataset(8), callbacks=[Boom()]).train()
    assert not embeddings._forward_hooks  # also removed when training ended by an exception


def test_gpu_only_optimizer_is_a_clear_error_on_cpu(tmp_path):
    pytest.importorskip("galore_torch")
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    args = hf_lightning.TrainingArguments(str(tmp_path), optim="galore_adamw_8bit", optim_target_modules=TARGETS,
                                          max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="galore_adamw_8bit.*GPU"):
        hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(4)).train()


def test_all_linear_target_modules(tmp_path):
    pytest.importorskip("galore_torch")
    results = run_pair(tmp_path, tiny_llama, lm_dataset(16), None, per_device_train_batch_size=4, max_steps=4,
                       logging_steps=1, optim="galore_adamw", optim_target_modules="all-linear", learning_rate=1e-2)
    assert_same_history(results["hf"][0].state.log_history, results["hl"][0].state.log_history, rel=1e-5)



METRIC_DRIVEN = {
    # kwargs chosen so that the lr moves within the run: plateau asking each evaluation to halve the best loss,
    # GreedyLR reacting at once (patience 0) in both directions
    "reduce_lr_on_plateau": {"patience": 0, "factor": 0.5, "threshold": 0.5},
    "greedy": {"patience": 0, "factor": 0.5, "min_lr": 1e-5},
}


@pytest.mark.parametrize("eval_strategy", ["steps", "epoch"])
@pytest.mark.parametrize("scheduler", sorted(METRIC_DRIVEN))
def test_metric_driven_scheduler_steps_on_eval_metric_like_transformers(tmp_path, scheduler, eval_strategy):
    """transformers steps ReduceLROnPlateau/GreedyLR on `metric_for_best_model` (eval_loss by default) after each
    in-training evaluation, never per optimizer step, and logs the optimizer's lr."""
    from helpers import classification_dataset, tiny_bert

    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(16), classification_dataset(8, seed=1),
        per_device_train_batch_size=4, num_train_epochs=3, logging_steps=1, learning_rate=1e-2,
        lr_scheduler_type=scheduler, lr_scheduler_kwargs=METRIC_DRIVEN[scheduler], eval_strategy=eval_strategy,
        eval_steps=2, eval_on_start=True,
    )
    history = results["hf"][0].state.log_history
    lrs = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert len(set(lrs)) > 1, lrs  # the metric moved the lr: the comparison below is not of constant schedules
    assert_same_history(history, results["hl"][0].state.log_history)
    assert_same_weights(results["hf"][2], results["hl"][2])
    assert type(results["hl"][0].lr_scheduler) is type(results["hf"][0].lr_scheduler)


def test_metric_driven_scheduler_names_a_missing_metric(tmp_path):
    from helpers import classification_dataset, tiny_bert

    args = hf_lightning.TrainingArguments(
        str(tmp_path), lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=2, max_steps=2,
        metric_for_best_model="accuracy", report_to="none", save_strategy="no", use_cpu=True,
    )
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(8),
                                   eval_dataset=classification_dataset(4, seed=1))
    with pytest.raises(KeyError, match="eval_accuracy.*compute_metrics"):
        trainer.train()
