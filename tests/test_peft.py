"""PEFT (LoRA) adapters: resuming an adapter checkpoint exactly as transformers.Trainer does (issue #16)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import safetensors.torch
import torch
import transformers

peft = pytest.importorskip("peft", reason="peft is optional: pip install 'hf_lightning[peft]' (or the dev extra)")

import hf_lightning  # noqa: E402
from tests.differential import assert_same_history  # noqa: E402
from tests.helpers import lm_dataset, tiny_llama  # noqa: E402
from test_checkpoint import job  # noqa: E402,F401 - the fixture running tests/jobs/train_job.py (real SIGKILLs)
from test_distributed import torchrun  # noqa: E402

ARGS = dict(report_to="none", disable_tqdm=True, use_cpu=True, max_steps=4, save_strategy="steps", save_steps=2,
            per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-2, seed=0)
CLASSES = {"hf": (transformers.Trainer, transformers.TrainingArguments),
           "hl": (hf_lightning.Trainer, hf_lightning.TrainingArguments)}


def lora_llama():
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def _trainer(kind: str, output_dir, model=None, **extra):
    trainer_cls, args_cls = CLASSES[kind]
    return trainer_cls(model if model is not None else lora_llama(),
                       args=args_cls(output_dir=str(output_dir), **ARGS, **extra), train_dataset=lm_dataset(n=16))


def _adapter(trainer) -> dict:
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(trainer.model).items()}


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Uninterrupted 4-step LoRA runs, saving checkpoint-2 and checkpoint-4, one per trainer (hf_lightning's exports
    lightning.ckpt too)."""
    root = tmp_path_factory.mktemp("peft")
    runs = {}
    for kind in ("hf", "hl"):
        trainer = _trainer(kind, root / kind, **({"save_lightning_checkpoint": True} if kind == "hl" else {}))
        trainer.train()
        runs[kind] = (trainer.state.log_history, _adapter(trainer), root / kind)
    return runs


def _assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (key, (a[key] - b[key]).abs().max().item())


def test_uninterrupted_lora_runs_match(full_runs):
    hf_log, hf_adapter, hf_dir = full_runs["hf"]
    hl_log, hl_adapter, hl_dir = full_runs["hl"]
    assert_same_history(hf_log, hl_log)
    _assert_same_adapter(hf_adapter, hl_adapter, atol=1e-6)
    assert (hl_dir / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (hl_dir / "checkpoint-2" / "model.safetensors").exists()


@pytest.mark.parametrize("source", ["hf", "hl"])
def test_resume_adapter_checkpoint_matches_transformers(full_runs, source, tmp_path):
    """Each trainer resumes checkpoint-2 of each trainer's run (cross-resume included): the log history and the final
    adapter weights are those of the uninterrupted run, in both trainers."""
    folder = str(full_runs[source][2] / "checkpoint-2")
    resumed = {}
    for kind in ("hf", "hl"):
        trainer = _trainer(kind, tmp_path / kind)
        trainer.train(resume_from_checkpoint=folder)
        resumed[kind] = trainer
    assert_same_history(resumed["hf"].state.log_history, resumed["hl"].state.log_history)
    _assert_same_adapter(_adapter(resumed["hf"]), _adapter(resumed["hl"]), atol=1e-6)
    # hf_lightning resuming its own checkpoint ends bitwise where its uninterrupted run did.
    _assert_same_adapter(_adapter(resumed["hl"]), full_runs["hl"][1], atol=0 if source == "hl" else 1e-6)
    # (train_loss, the last entry, averages only the steps this train() call ran, in both trainers.)
    assert_same_history(full_runs["hl"][0][:-1], resumed["hl"].state.log_history[:-1])


def test_resume_true_finds_the_adapter_checkpoint(full_runs, tmp_path):
    shutil.copytree(full_runs["hl"][2] / "checkpoint-2", tmp_path / "checkpoint-2")
    trainer = _trainer("hl", tmp_path)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    _assert_same_adapter(_adapter(trainer), full_runs["hl"][1], atol=0)


def test_num_trainable_parameters_match_transformers(tmp_path):
    counts = {kind: _trainer(kind, tmp_path / kind).get_num_trainable_parameters() for kind in ("hf", "hl")}
    assert counts["hf"] == counts["hl"] == lora_llama().get_nb_trainable_parameters()[0]


def test_adapter_checkpoint_into_plain_model_is_refused(full_runs, tmp_path):
    folder = str(full_runs["hl"][2] / "checkpoint-2")
    trainer = _trainer("hl", tmp_path, model=tiny_llama())
    with pytest.raises(ValueError, match=r"(?s)PEFT adapter weights.*peft_type='LORA', r=4.*plain LlamaForCausalLM"):
        trainer.train(resume_from_checkpoint=folder)


def test_adapter_checkpoint_into_other_adapter_config_is_refused(full_runs, tmp_path):
    folder = str(full_runs["hl"][2] / "checkpoint-2")
    other = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer = _trainer("hl", tmp_path, model=other)
    with pytest.raises(ValueError, match=r"(?s)r=4.*does not fit.*r=8"):
        trainer.train(resume_from_checkpoint=folder)


def test_adapter_checkpoint_into_other_target_modules_is_refused(full_runs, tmp_path):
    """Same rank, other target modules: no size mismatch for torch to catch, only the adapter's key names differ."""
    folder = str(full_runs["hl"][2] / "checkpoint-2")
    other = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["k_proj", "v_proj"]))
    trainer = _trainer("hl", tmp_path, model=other)
    with pytest.raises(ValueError, match=r"(?s)target_modules=.*does not fit.*k_proj.*missing.*k_proj.*unexpected.*q_proj"):
        trainer.train(resume_from_checkpoint=folder)


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    """load_best_model_at_end reads the best checkpoint's adapter weights (the same loader as resuming)."""
    runs = {}
    for kind in ("hf", "hl"):
        trainer_cls, args_cls = CLASSES[kind]
        args = args_cls(output_dir=str(tmp_path / kind), **{**ARGS, "learning_rate": 5e-2}, eval_strategy="steps",
                        eval_steps=2, load_best_model_at_end=True, save_total_limit=1,
                        greater_is_better=True)  # eval_loss falls: the best is then checkpoint-2, not the last one
        trainer = trainer_cls(lora_llama(), args=args, train_dataset=lm_dataset(n=16), eval_dataset=lm_dataset(n=8, seed=1))
        trainer.train()
        runs[kind] = trainer
    assert runs["hf"].state.best_model_checkpoint.endswith("checkpoint-2")
    assert runs["hl"].state.best_model_checkpoint.endswith("checkpoint-2")
    assert_same_history(runs["hf"].state.log_history, runs["hl"].state.log_history)
    _assert_same_adapter(_adapter(runs["hf"]), _adapter(runs["hl"]), atol=1e-6)


def _pair(tmp_path, make_model=lora_llama, eval_dataset_rows=0, **extra) -> dict:
    """Both trainers on fresh LoRA models with ARGS plus `extra`; {kind: trainer}, trained."""
    runs = {}
    for kind in ("hf", "hl"):
        trainer_cls, args_cls = CLASSES[kind]
        args = args_cls(output_dir=str(tmp_path / kind), **{**ARGS, "save_strategy": "no", **extra})
        eval_dataset = lm_dataset(n=eval_dataset_rows, seed=1) if eval_dataset_rows else None
        runs[kind] = trainer_cls(make_model(), args=args, train_dataset=lm_dataset(n=16), eval_dataset=eval_dataset)
        runs[kind].train()
    return runs


FEATURES = {  # each changes the losses of the plain LoRA run (checked), so a feature left off cannot pass
    "activation_checkpointing": dict(gradient_checkpointing=True, lora_dropout=0.5),
    "neftune": dict(neftune_noise_alpha=5.0),
    "label_smoothing": dict(label_smoothing_factor=0.1),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_lora_with_a_training_feature_matches_transformers(full_runs, feature, tmp_path):
    extra = dict(FEATURES[feature])
    dropout = extra.pop("lora_dropout", 0.0)  # inside checkpointed layers: the recomputed forward draws the same masks
    runs = _pair(tmp_path, make_model=lambda: peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=dropout)), **extra)
    assert_same_history(runs["hf"].state.log_history, runs["hl"].state.log_history)
    _assert_same_adapter(_adapter(runs["hf"]), _adapter(runs["hl"]), atol=1e-6)
    plain_losses = [e["loss"] for e in full_runs["hl"][0] if "loss" in e]
    assert [e["loss"] for e in runs["hl"].state.log_history if "loss" in e] != plain_losses
    if feature == "activation_checkpointing":
        # As transformers arranges it for a frozen base: the embeddings' output requires grad (a forward hook on
        # the base model's input embeddings), so that the checkpointed layers pass gradients to the adapters.
        for kind in ("hf", "hl"):
            base = runs[kind].model.get_base_model()
            assert base.model.layers[0].gradient_checkpointing, kind
            assert hasattr(base, "_require_grads_hook"), kind
            assert base(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states[0].requires_grad


def test_trainable_parameter_count_logged_as_transformers(tmp_path):
    """The "Number of trainable parameters" line at train start counts the adapters only, as transformers' does."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    trainer_logger = logging.getLogger("transformers.trainer")
    old_level = trainer_logger.level
    trainer_logger.addHandler(handler)
    trainer_logger.setLevel(logging.INFO)
    try:
        runs = _pair(tmp_path, max_steps=1)
    finally:
        trainer_logger.removeHandler(handler)
        trainer_logger.setLevel(old_level)
    counted = [line for line in lines if "Number of trainable parameters" in line]
    expected = f"  Number of trainable parameters = {lora_llama().get_nb_trainable_parameters()[0]:,}"
    assert counted == [expected, expected]  # one line per trainer, the same
    assert runs["hl"].get_num_trainable_parameters() == runs["hf"].get_num_trainable_parameters()


def _listing(folder) -> dict:
    """{subfolder: its files} of an output_dir."""
    return {name: sorted(os.listdir(folder / name)) for name in sorted(os.listdir(folder)) if (folder / name).is_dir()}


def test_adapter_only_saves_and_rotation_match_transformers(tmp_path):
    """save_only_model checkpoints and save_model() hold the adapter files only (adapter_config.json,
    adapter_model.safetensors, README.md, as peft's save_pretrained writes them); save_total_limit rotates the same
    folders, keeping the best one (checkpoint-1: eval_loss falls, greater_is_better=True)."""
    runs = _pair(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                 save_total_limit=2, save_only_model=True, load_best_model_at_end=True, greater_is_better=True,
                 learning_rate=5e-2, eval_dataset_rows=8)
    listings = {}
    for kind, trainer in runs.items():
        trainer.save_model(str(tmp_path / kind / "final"))
        listings[kind] = _listing(tmp_path / kind)
    adapter_files = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert listings["hl"] == listings["hf"]
    assert listings["hl"] == {"checkpoint-1": adapter_files + ["trainer_state.json", "training_args.bin"],
                              "checkpoint-4": adapter_files + ["trainer_state.json", "training_args.bin"],
                              "final": adapter_files + ["training_args.bin"]}
    assert runs["hl"].state.best_model_checkpoint == str(tmp_path / "hl" / "checkpoint-1")
    config = lambda kind: json.loads((tmp_path / kind / "final" / "adapter_config.json").read_text())  # noqa: E731
    assert config("hl") == config("hf")


def test_lightning_checkpoint_holds_only_the_adapters_and_resumes_exactly(full_runs, tmp_path):
    """lightning.ckpt of a LoRA run keeps the trainable weights and their optimizer state, not the frozen base; both
    doors resume it (train() and Lightning's fit(ckpt_path=), also from the checkpoint-N folder) bitwise."""
    folder = full_runs["hl"][2] / "checkpoint-2"
    ckpt = torch.load(folder / "lightning.ckpt", weights_only=True)
    model = lora_llama()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert set(ckpt["state_dict"]) == {"model." + name for name in trainable}
    assert len(ckpt["optimizer_states"][0]["state"]) == len(trainable)
    # Its size against the same export holding the whole model: smaller by (about) the frozen base's bytes.
    whole = tmp_path / "whole.ckpt"
    torch.save({**ckpt, "state_dict": {"model." + k: v for k, v in model.state_dict().items()}}, whole)
    frozen_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in trainable)
    saved = os.path.getsize(whole) - os.path.getsize(folder / "lightning.ckpt")
    assert saved > 0.9 * frozen_bytes, (saved, frozen_bytes)

    resumed = _trainer("hl", tmp_path / "train")
    resumed.train(resume_from_checkpoint=str(folder / "lightning.ckpt"))
    _assert_same_adapter(_adapter(resumed), full_runs["hl"][1], atol=0)
    for path in (folder / "lightning.ckpt", folder):
        other = _trainer("hl", tmp_path / "fit", model=peft.get_peft_model(
            tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)))
        other.train()  # sets up the run; then continue it the Lightning way from checkpoint-2 of the full run
        other.lightning_trainer.fit(other.lightning_module, ckpt_path=str(path))
        assert other.state.global_step == 4
        _assert_same_adapter(_adapter(other), full_runs["hl"][1], atol=0)


def test_model_rebuilt_from_an_adapter_lightning_checkpoint(full_runs, tmp_path):
    path = str(full_runs["hl"][2] / "checkpoint-4" / "lightning.ckpt")
    expected = full_runs["hl"][1]
    with pytest.raises(ValueError, match=r"holds the adapters of a PEFT model on a LlamaForCausalLM.*base_model="):
        hf_lightning.model_from_lightning_checkpoint(path)
    with pytest.raises(ValueError, match=r"base_model must be that model without adapters, not a PeftModel"):
        hf_lightning.model_from_lightning_checkpoint(path, base_model=lora_llama())
    model = hf_lightning.model_from_lightning_checkpoint(path, base_model=tiny_llama())
    assert isinstance(model, peft.PeftModel) and model.peft_config["default"].r == 4
    _assert_same_adapter(peft.get_peft_model_state_dict(model), expected, atol=0)
    reference = lora_llama()  # the same base (the one passed in, untouched) with the trained adapter
    peft.set_peft_model_state_dict(reference, expected)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    # A base model loaded from a folder is named in the adapter config: the checkpoint alone then rebuilds it.
    tiny_llama().save_pretrained(tmp_path / "base")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    trainer = _trainer("hl", tmp_path / "run", model=peft.get_peft_model(base, peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"])), save_lightning_checkpoint=True)
    trainer.train()
    rebuilt = hf_lightning.model_from_lightning_checkpoint(str(tmp_path / "run" / "checkpoint-4" / "lightning.ckpt"))
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name


def test_sigkill_then_resume_with_adapters_is_bitwise_exact(job, tmp_path):
    """A LoRA run (tests/jobs/train_job.py --lora: dropout in the base and the adapters, 2 micro-batches a step,
    hf_lightning exporting lightning.ckpt too) killed inside step 7's accumulation window, resumed with
    resume_from_checkpoint=True, ends bitwise where the uninterrupted run ended, with the same folders. (Resuming
    the adapter-only lightning.ckpt: test_lightning_checkpoint_holds_only_the_adapters_and_resumes_exactly.)"""
    final = lambda out: safetensors.torch.load_file(out / "final" / "adapter_model.safetensors")  # noqa: E731
    reference, out = tmp_path / "reference", tmp_path / "run"
    job("hl", reference, "--lora")
    job("hl", out, "--lora", "--kill", "substep@6", killed_at="substep@6")
    assert "RESUMED_AT 6" in job("hl", out, "--lora", "--resume", "latest")
    _assert_same_adapter(final(out), final(reference), atol=0)
    assert _listing(out) == _listing(reference)


def test_lora_under_ddp_matches_transformers(tmp_path):
    """2 processes (gloo) under torchrun, as tests/test_distributed.py runs them: the same losses, grad norms and
    final adapters as transformers' DDP run, and the same adapter-only checkpoint files (an RNG file per rank)."""
    for kind in ("hf", "hl"):
        torchrun(kind, tmp_path / kind, "lora")
    train = lambda kind: [e for e in json.load(open(tmp_path / kind / "history.json")) if "eval_loss" not in e]  # noqa: E731
    assert_same_history(train("hf"), train("hl"))
    adapters = {kind: safetensors.torch.load_file(tmp_path / kind / "final" / "adapter_model.safetensors")
                for kind in ("hf", "hl")}
    _assert_same_adapter(adapters["hf"], adapters["hl"], atol=1e-6)
    assert _listing(tmp_path / "hl") == _listing(tmp_path / "hf")
    assert {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= set(_listing(tmp_path / "hl")["checkpoint-6"])
