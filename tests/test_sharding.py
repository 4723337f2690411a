"""FSDP2 (`fsdp=True`, or a ModelParallelStrategy) on 2 CPU processes launched by torchrun, and its bad inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import hf_lightning
from hf_lightning.training_args import FIELD_POLICY, LIGHTNING
from helpers import lm_dataset, tiny_llama
from test_distributed import TORCHRUN, free_port

JOB = os.path.join(os.path.dirname(__file__), "jobs", "fsdp_job.py")


def torchrun(nproc, mode, out, *extra, killed=False):
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), JOB, mode,
                           str(out), *extra], capture_output=True, text=True, timeout=400)
    if killed:
        assert proc.returncode != 0 and not os.path.isfile(os.path.join(out, "history.json")), proc.stdout[-2000:]
        return proc.stdout
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr
    return proc.stdout


def weights(folder):
    return safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))


def train_entries(folder):
    return [e for e in json.load(open(os.path.join(folder, "history.json"))) if "loss" in e]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    (root / "fsdp_stdout.txt").write_text(torchrun(2, "fsdp", root / "fsdp"))
    torchrun(2, "ddp", root / "ddp")
    return root


def test_fsdp2_trains_as_ddp(runs):
    assert "STRATEGY FolderModelParallelStrategy" in (runs / "fsdp_stdout.txt").read_text()
    fsdp, ddp = train_entries(runs / "fsdp"), train_entries(runs / "ddp")
    assert len(fsdp) == len(ddp) == 8
    for a, b in zip(fsdp, ddp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # max_grad_norm=0.5 is below every norm here: clipping ran on the DTensor gradients, norm reduced over ranks
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and a["grad_norm"] > 0.5
    a, b = weights(runs / "fsdp" / "final"), weights(runs / "ddp" / "final")
    assert a.keys() == b.keys()
    for key in a:  # gloo's reduce-scatter sums in another order than DDP's all-reduce: 3e-8 measured
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_each_rank_holds_half_the_parameters_and_optimizer_state(runs):
    for rank in (0, 1):
        fsdp = json.load(open(runs / "fsdp" / f"numel_{rank}.json"))
        ddp = json.load(open(runs / "ddp" / f"numel_{rank}.json"))
        assert fsdp["full_params"] == ddp["params"]
        assert fsdp["params"] == pytest.approx(ddp["params"] / 2, rel=0.02)
        assert fsdp["optimizer"] == pytest.approx(ddp["optimizer"] / 2, rel=0.02)


def test_checkpoint_holds_consolidated_weights_and_a_dcp_optimizer(runs):
    folder = runs / "fsdp" / "checkpoint-8"
    names = set(os.listdir(folder))
    assert {"model.safetensors", "optimizer_0", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
            "trainer_state.json"} <= names and "optimizer.pt" not in names
    assert sorted(os.listdir(folder / "optimizer_0")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    model = type(tiny_llama()).from_pretrained(folder)  # save_pretrained-loadable, the plain class's name
    assert json.load(open(folder / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    for key, value in model.state_dict().items():
        if key in weights(folder):
            assert torch.equal(value, weights(folder)[key]), key
    assert weights(runs / "fsdp" / "final").keys() == weights(folder).keys()


def test_killed_and_resumed_equals_the_uninterrupted_run(runs, tmp_path):
    # Killed under a ModelParallelStrategy passed in lightning_trainer_kwargs, resumed under fsdp=True: one FSDP2.
    torchrun(2, "mp", tmp_path, "--kill-at", "5", killed=True)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    out = torchrun(2, "fsdp", tmp_path, "--resume")
    a, b = weights(runs / "fsdp" / "final"), weights(tmp_path / "final")
    assert all(torch.equal(a[key], b[key]) for key in a)  # bitwise
    assert train_entries(tmp_path)[-4:] == train_entries(runs / "fsdp")[-4:]
    assert sum(line.startswith("{'loss'") for line in out.splitlines()) == 4  # printed by rank 0 only


def test_fsdp_config_switches(runs, tmp_path):
    # "full_shard auto_wrap", reshard_after_forward=False, activation_checkpointing, cpu_ram_efficient_loading (rank 1
    # starts from other weights: rank 0's replace them) and a named layer class: the same training as plain fsdp=True.
    out = torchrun(2, "options", tmp_path)
    assert "OPTIONS True ['FSDPLlamaForCausalLM', 'FSDPLlamaDecoderLayer']" in out
    a, b = weights(runs / "fsdp" / "final"), weights(tmp_path / "final")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_on_one_process_reshards_the_optimizer(runs, tmp_path):
    shutil.copytree(runs / "fsdp" / "checkpoint-4", tmp_path / "checkpoint-4")
    torchrun(1, "fsdp", tmp_path, "--resume", "--dump-at-begin")
    begin = torch.load(tmp_path / "begin.pt", weights_only=True)
    saved = weights(runs / "fsdp" / "checkpoint-4")
    assert all(torch.equal(begin["weights"][key], saved[key]) for key in saved)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(runs / "fsdp" / "checkpoint-4" / "optimizer_0", tmp_path / "saved_optimizer.pt")
    saved_state = torch.load(tmp_path / "saved_optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert begin["optimizer"].keys() == saved_state.keys()
    for name, state in saved_state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(begin["optimizer"][name][key], state[key]), (name, key)
    one, two = train_entries(tmp_path), train_entries(runs / "fsdp")
    assert [e["step"] for e in one] == list(range(1, 9)) and one[:4] == two[:4]  # the first 4: the checkpoint's
    for a, b in zip(one[4:], two[4:]):  # other batches (one process draws half of them): close, not equal
        assert a["loss"] == pytest.approx(b["loss"], abs=0.15)


def test_fsdp2_through_lightnings_own_launcher(runs, tmp_path):
    """`python job.py` with fsdp=True and lightning_trainer_kwargs={"devices": 2}: Lightning starts the second
    process; the run is the torchrun run (same topology, same shards)."""
    proc = subprocess.run([sys.executable, JOB, "fsdp", str(tmp_path), "--devices", "2"], capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "STRATEGY FolderModelParallelStrategy" in proc.stdout
    assert train_entries(tmp_path) == train_entries(runs / "fsdp")
    a, b = weights(runs / "fsdp" / "final"), weights(tmp_path / "final")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert sorted(os.listdir(tmp_path / "checkpoint-8" / "optimizer_0")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_model_parallel_strategy_name_is_fsdp2_through_lightnings_launcher(runs, tmp_path):
    """lightning_trainer_kwargs={"strategy": "model_parallel", "devices": 2}: the fsdp=True run (FolderModelParallel-
    Strategy, so its checkpoint folders resume through fit(ckpt_path=...) as well), Lightning starting the processes."""
    proc = subprocess.run([sys.executable, JOB, "mp_name", str(tmp_path), "--devices", "2"], capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "STRATEGY FolderModelParallelStrategy" in proc.stdout
    assert train_entries(tmp_path) == train_entries(runs / "fsdp")
    assert sorted(os.listdir(tmp_path / "checkpoint-8" / "optimizer_0")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_lora_on_a_frozen_base_trains_as_ddp_and_resumes_through_both_doors(tmp_path):
    """LoRA under FSDP2 (frozen base and trainable adapters in the same fully_shard units): DDP's losses, grad norms
    and adapters; adapter-only checkpoints (rank 0 writes the consolidated adapters); train(resume_from_checkpoint=)
    and Lightning's fit(ckpt_path=<folder>) from checkpoint-4 both end bitwise equal to the uninterrupted run."""
    torchrun(2, "ddp", tmp_path / "ddp", "--lora")
    torchrun(2, "fsdp", tmp_path / "fsdp", "--lora")
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    out = torchrun(2, "fsdp", tmp_path / "resumed", "--lora", "--resume",
                   "--lightning-door", str(tmp_path / "fsdp" / "checkpoint-4"))
    fsdp, ddp = train_entries(tmp_path / "fsdp"), train_entries(tmp_path / "ddp")
    assert len(fsdp) == len(ddp) == 8
    for a, b in zip(fsdp, ddp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    adapter = lambda folder: safetensors.torch.load_file(folder / "adapter_model.safetensors")  # noqa: E731
    a, b = adapter(tmp_path / "fsdp" / "final"), adapter(tmp_path / "ddp" / "final")
    assert a.keys() == b.keys() and all("lora_" in key for key in a)
    assert all(torch.allclose(a[key], b[key], atol=1e-6) for key in a)
    fsdp_files, ddp_files = (set(os.listdir(tmp_path / run / "checkpoint-4")) for run in ("fsdp", "ddp"))
    assert fsdp_files - {"optimizer_0"} == ddp_files - {"optimizer.pt"}  # the same adapter files, no model.safetensors
    assert {"adapter_model.safetensors", "adapter_config.json"} <= fsdp_files and "model.safetensors" not in fsdp_files
    for final in ("final", "final_door"):
        resumed = adapter(tmp_path / "resumed" / final)
        assert all(torch.equal(a[key], resumed[key]) for key in a), final
    assert sum(line.startswith("{'loss'") for line in out.splitlines()) == 8  # 4 per door, by rank 0 only


# ---------------------------------------------------------------------- bad input, before any process starts


def test_fields_are_translated():
    assert FIELD_POLICY["fsdp"][0] == FIELD_POLICY["fsdp_config"][0] == LIGHTNING


def _trainer(tmp_path, **fields):
    args = hf_lightning.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", **fields)
    return hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(4))


@pytest.mark.parametrize("fields,fragment", [
    ({"fsdp_config": {"transformer_layer_cls_to_wrap": ["BertLayer"]}},
     r"fsdp_config\['transformer_layer_cls_to_wrap'\] names \['BertLayer'\].*LlamaDecoderLayer"),
    ({"optim": "galore_adamw_layerwise", "optim_target_modules": ["mlp"]}, "optim='galore_adamw_layerwise'"),
    ({"optim": "adalomo"}, "optim='adalomo'"),
    pytest.param({"deepspeed": {"zero_optimization": {"stage": 2}}}, "TrainingArguments.deepspeed and fsdp are both set",
                 marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason=(
                     "transformers' TrainingArguments(deepspeed=...) itself requires the deepspeed package "
                     "(pip install 'hf-lightning[deepspeed]'); without it transformers refuses first"))),
    ({"lightning_trainer_kwargs": {"strategy": "ddp"}}, "fsdp is set but lightning_trainer_kwargs strategy='ddp'"),
    ({"fsdp_config": {"version": 1}}, r"fsdp_config version 1 \(FSDP1\) needs CUDA"),
    ({"fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}}, "state_dict_type"),
    ({"fsdp_config": {"auto_wrap_policy": "SIZE_BASED_WRAP"}}, "auto_wrap_policy"),
    ({"fsdp_config": {"cpu_offload": True}}, r"fsdp_config\['cpu_offload'\].*trains on the CPU"),
    ({"fsdp_config": {"activation_checkpointing": True}, "activation_checkpointing": True},
     r"fsdp_config\['activation_checkpointing'\] and TrainingArguments.activation_checkpointing"),
])
def test_bad_fsdp_input_is_one_clear_error(tmp_path, fields, fragment):
    with pytest.raises(ValueError, match=fragment) as err:
        _trainer(tmp_path, fsdp=True, **fields)
    assert "\n" not in str(err.value)


def test_lightning_fsdp1_strategy_on_cpu_and_layerwise_under_model_parallel(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    if torch.cuda.is_available():
        pytest.skip("FSDP1 runs where CUDA is")
    with pytest.raises(ValueError, match="FSDPStrategy \\(FSDP1\\), which needs CUDA.*fsdp=True"):
        _trainer(tmp_path, lightning_trainer_kwargs={"strategy": "fsdp"})
    with pytest.raises(ValueError, match="optim='lomo'"):
        _trainer(tmp_path, optim="lomo", lightning_trainer_kwargs={"strategy": ModelParallelStrategy()})


def test_fsdp_without_a_launcher_says_how_to_launch(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trainer = _trainer(tmp_path, fsdp=True)  # transformers refuses it in its Trainer: here train() says it
    with pytest.raises(ValueError, match="fsdp only works in distributed training.*torchrun"):
        trainer.train()
