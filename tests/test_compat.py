"""Every private name of Lightning, torch and transformers that hf_lightning uses lives in compat.py; each is pinned
here against the real library, so that an upgrade that moves one fails in this file."""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch.utils.data import DataLoader, TensorDataset

from hf_lightning import compat

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "hf_lightning"


class Tiny(pl.LightningModule):
    """A real LightningModule with manual optimization, as hf_lightning's."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 1)
        self.validations = 0

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        self.manual_backward(self.layer(batch[0]).sum())
        optimizer.step()
        optimizer.zero_grad()

    def validation_step(self, batch, batch_idx):
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n=4):
    return DataLoader(TensorDataset(torch.randn(n, 2)), batch_size=1)


def lightning_trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path))
    return pl.Trainer(**{**defaults, **kwargs})


def test_attached_trainer(tmp_path):
    module = Tiny()
    assert compat.attached_trainer(module) is None
    trainer = lightning_trainer(tmp_path, max_steps=1)
    trainer.fit(module, loader())
    assert compat.attached_trainer(module) is trainer


def test_control_decides_validation_and_last_batch_is_known(tmp_path):
    seen = []

    class Watch(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            compat.let_control_decide_validation(trainer, lambda *a: trainer.global_step == 2)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(compat.is_last_batch(trainer))

    module = Tiny()
    trainer = lightning_trainer(tmp_path, max_epochs=1, callbacks=[Watch()], num_sanity_val_steps=0)
    trainer.fit(module, loader(4), loader(3))
    assert module.validations == 3  # one validation over 3 batches, after step 2 only (not at the epoch's end)
    assert seen == [False, False, False, True]


def test_move_fit_loop_to_starts_at_the_resumed_step(tmp_path):
    steps = []

    class Move(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            compat.move_fit_loop_to(trainer, global_step=5, epochs_trained=1)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append((trainer.current_epoch, trainer.global_step))

    trainer = lightning_trainer(tmp_path, max_steps=7, callbacks=[Move()])
    trainer.fit(Tiny(), loader(4))
    assert steps == [(1, 5), (1, 6)]


def test_mark_epoch_finished_resumes_at_the_next_epoch(tmp_path):
    path = tmp_path / "last.ckpt"

    class SaveOnLastBatch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 0 and compat.is_last_batch(trainer):
                trainer.save_checkpoint(path)

    lightning_trainer(tmp_path, max_epochs=1, callbacks=[SaveOnLastBatch()]).fit(Tiny(), loader(4))
    checkpoint = torch.load(path, weights_only=False)
    compat.mark_epoch_finished(checkpoint)
    torch.save(checkpoint, path)

    starts = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts.append((trainer.current_epoch, batch_idx, trainer.global_step))

    lightning_trainer(tmp_path, max_epochs=2, callbacks=[Record()]).fit(Tiny(), loader(4), ckpt_path=str(path))
    assert starts[0] == (1, 0, 4)  # the second epoch from its first batch, not a replay of the finished one
    assert len(starts) == 4


def test_unscales_in_step():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert compat.unscales_in_step(torch.optim.AdamW(params, fused=True)) is True
    assert compat.unscales_in_step(torch.optim.AdamW(params)) is False


def test_transformers_hub_push_methods():
    """hub.py borrows these two: a checkpoint push (trainer, folder) and the wait for it (trainer)."""
    import inspect

    push, finish = compat.transformers_push_from_checkpoint(), compat.transformers_finish_current_push()
    assert list(inspect.signature(push).parameters) == ["self", "checkpoint_folder"]
    assert list(inspect.signature(finish).parameters) == ["self"]
    trainer = type("Trainer", (), {})()  # before init_hf_repo: nothing to wait for
    assert finish(trainer) is None


def test_tied_weight_keys():
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    keys = compat.tied_weight_keys(transformers.LlamaForCausalLM(config))
    assert any("lm_head" in key for key in keys)


def test_optimizer_lookup_matches_transformers():
    args = transformers.TrainingArguments("unused", optim="adamw_torch", learning_rate=3e-4, report_to="none")
    cls, kwargs = compat.optimizer_lookup()(args)
    expected_cls, expected_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is expected_cls and kwargs == expected_kwargs


def test_optimizer_lookup_gives_layerwise_galore_adafactor_its_fixed_lr():
    pytest.importorskip("galore_torch")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    args = transformers.TrainingArguments("unused", optim="galore_adafactor_layerwise", optim_target_modules=["0"],
                                          report_to="none")
    cls, kwargs = compat.optimizer_lookup()(args, model)
    # transformers' own lookup fails here ("Cannot combine manual lr and relative_step=True").
    assert kwargs["optimizer_dict"]


def test_private_names_of_other_libraries_appear_in_compat_only():
    """Outside compat.py, an attribute with a leading underscore is only ever our own (`self._x`) or one of the
    transformers hooks a subclass overrides (TrainerHooks' `_get_num_items_in_batch`, ...)."""
    from hf_lightning.run import TrainerHooks

    members = set(vars(TrainerHooks)) | set(TrainerHooks.__annotations__)  # methods and annotated attributes
    hooks = {name for name in members if name.startswith("_") and not name.startswith("__")}
    found = []
    for path in PACKAGE.glob("*.py"):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                if owner not in ("self", "cls") and node.attr not in hooks:
                    found.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                found += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names if a.name.startswith("_")]
            # getattr(x, "_name") / x["_name"]: the same reach, spelled as a string
            names = []
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) > 1 \
                    and node.func.id in ("getattr", "hasattr", "setattr"):
                names.append(node.args[1])
            if isinstance(node, ast.Subscript):
                names.append(node.slice)
            found += [f"{path.name}:{node.lineno} '{n.value}'" for n in names if isinstance(n, ast.Constant)
                      and isinstance(n.value, str) and n.value.startswith("_") and not n.value.startswith("__")]
    assert found == []


def test_compiled_call_is_what_module_compile_installs_and_clearing_it_runs_eager():
    layer = torch.nn.Linear(2, 1)
    assert compat.compiled_call(layer) is None
    layer.compile(backend="eager")
    assert compat.compiled_call(layer) is not None
    traced = []
    layer.register_forward_pre_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    layer(torch.ones(1, 2))
    compat.set_compiled_call(layer, None)
    layer(torch.ones(1, 2))
    assert traced == [True, False] and list(layer.state_dict()) == ["weight", "bias"]


def test_no_split_modules_are_the_layer_classes_of_a_transformers_model():
    from helpers import tiny_bert, tiny_llama

    assert compat.no_split_modules(tiny_llama()) == ["LlamaDecoderLayer"]
    assert "BertLayer" in compat.no_split_modules(tiny_bert())
    assert compat.no_split_modules(torch.nn.Linear(2, 2)) == []


def test_resolved_tp_plan_expands_the_models_plan_to_concrete_names():
    from helpers import tiny_llama

    plan = compat.resolved_tp_plan(tiny_llama(), 2)
    assert plan["model.layers.0.self_attn.q_proj.weight"] == "colwise"
    assert plan["model.layers.0.mlp.down_proj"] == "rowwise" and not any("*" in name for name in plan)


def test_settle_generation_config_marks_it_and_fills_generate_defaults():
    config = transformers.T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    assert model.generation_config._from_model_config is True
    assert model.generation_config.max_length is None and model.generation_config.num_beams is None
    model.generation_config.num_beams = 3  # a value already set stays
    settled = compat.settle_generation_config(model)
    assert settled is model.generation_config and settled._from_model_config is False
    assert settled.max_length == 20 and settled.num_beams == 3 and settled.do_sample is False


def test_ddp_strategy_launches_with_the_subprocess_script_launcher_and_takes_another():
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    launcher = trainer.strategy.launcher
    assert type(launcher) is compat.subprocess_script_launcher()
    other = compat.subprocess_script_launcher()(launcher.cluster_environment, 2, 1)
    compat.set_launcher(trainer.strategy, other)
    assert trainer.strategy.launcher is other


def test_script_command_reruns_this_script():
    import os
    import sys

    command = compat.script_command()  # pytest runs as `python -m pytest` or as its own script
    assert command in ([sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]],
                       [sys.executable, "-m", "pytest.__main__", *sys.argv[1:]])


def test_mixed_mesh_grad_norm_norms_and_clips_what_it_is_given():
    """sharding.clip_grad_norm's tensor-parallel path borrows transformers.Trainer._mixed_mesh_grad_norm (self unused):
    with plain gradients (one mesh: None) it is the total norm, and it clips to max_norm."""
    layer = torch.nn.Linear(3, 2)
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    expected = torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()])
    assert torch.allclose(compat.mixed_mesh_grad_norm(layer, float("inf")), expected)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in layer.parameters())
    compat.mixed_mesh_grad_norm(layer, 0.5)
    assert torch.allclose(torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()]), torch.tensor(0.5),
                          atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the `deepspeed` extra is not installed")
def test_zero3_consolidated_state_dict_is_the_engines_gathering_method():
    """The method exists with the keyword compat passes; what it returns (the whole weights, from_pretrained-loadable)
    is tested on a real ZeRO-3 engine in tests/test_gpu_checkpoints.py."""
    import inspect

    import deepspeed

    method = deepspeed.DeepSpeedEngine._zero3_consolidated_16bit_state_dict
    assert "exclude_frozen_parameters" in inspect.signature(method).parameters


TINY_MODELS = {  # a tied head (Llama, BERT's MLM decoder, T5's shared embeddings), a weight conversion (Mixtral)
    "llama-tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        tie_word_embeddings=True)),
    "bert-mlm": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8)),
}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_save_pretrained_weights_are_the_tensors_save_pretrained_writes(tmp_path, name):
    """compat.save_pretrained_weights of the model's weights (copied as async_save copies them), written by
    DirectWriter, is save_pretrained's model.safetensors byte for byte; a model save_pretrained treats otherwise (here:
    quantized) and a class with a save_pretrained of its own get None."""
    from hf_lightning.background_save import DirectWriter, SnapshotBuffers

    torch.manual_seed(0)
    model = TINY_MODELS[name]()
    model.save_pretrained(tmp_path / "theirs")
    tensors = compat.save_pretrained_weights(model, SnapshotBuffers().take(model.state_dict(), ("model",)))
    if name == "mixtral":  # the fused experts are written per expert, as in Mixtral's checkpoints
        assert set(tensors) != set(model.state_dict())
    else:  # the tied copies are left out
        assert set(tensors) < set(model.state_dict())
    DirectWriter().write_safetensors(str(tmp_path / "ours.safetensors"), tensors, {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs" / "model.safetensors").read_bytes()
    model.hf_quantizer = object()
    assert compat.save_pretrained_weights(model, model.state_dict()) is None
    del model.hf_quantizer
    own = type("OwnSave", (type(model),), {"save_pretrained": lambda self, *args, **kwargs: None})
    model.__class__ = own  # a subclass that writes its folder its own way
    assert compat.save_pretrained_weights(model, model.state_dict()) is None
