"""Tensor parallelism (`parallelism_config` tp_size=2, the model's own tp plan) on 2 CPU processes under torchrun,
compared with the same run in one process; and its bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import transformers
from accelerate import ParallelismConfig

import hf_lightning
from hf_lightning.training_args import FIELD_POLICY, LIGHTNING
from helpers import classification_dataset, lm_dataset, tiny_bert, tiny_llama
from test_sharding import JOB, torchrun, train_entries, weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    (root / "tp_stdout.txt").write_text(torchrun(2, "tp", root / "tp"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        os.path.abspath(hf_lightning.__file__))), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, JOB, "single", str(root / "single")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root


def test_tp2_trains_as_one_process(runs):
    assert "STRATEGY FolderModelParallelStrategy" in (runs / "tp_stdout.txt").read_text()
    tp, single = train_entries(runs / "tp"), train_entries(runs / "single")
    assert len(tp) == len(single) == 8
    for a, b in zip(tp, single):  # both TP ranks see the one batch the single process sees
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and a["grad_norm"] > 0.5  # clipped
        assert a["learning_rate"] == b["learning_rate"]
    # each rank holds about half of the parameters (and of the optimizer state): the TP shards
    numel = json.load(open(runs / "tp" / "numel_0.json"))
    assert numel["params"] < 0.6 * numel["full_params"] and numel["optimizer"] == 2 * numel["params"]


def test_tp2_checkpoints_hold_consolidated_weights(runs):
    a, b = weights(runs / "tp" / "final"), weights(runs / "single" / "final")
    assert a.keys() == b.keys()
    for key in a:  # the rowwise layers all-reduce partial sums: 5e-7 measured
        assert a[key].shape == b[key].shape and (a[key] - b[key]).abs().max() < 1e-5, key
    assert os.path.isdir(runs / "tp" / "checkpoint-8" / "optimizer_0")
    loaded = transformers.LlamaForCausalLM.from_pretrained(runs / "tp" / "checkpoint-8")
    assert loaded.model.layers[0].mlp.up_proj.weight.shape == tiny_llama().model.layers[0].mlp.up_proj.weight.shape


def test_tp2_evaluation_counts_each_row_once(runs):
    # the two TP ranks evaluate the same rows: gathering from both would hand compute_metrics 74
    tp, single = (json.load(open(runs / name / "eval.json")) for name in ("tp", "single"))
    assert tp["eval_rows"] == 37 and tp["eval_first_labels"] == single["eval_first_labels"]
    assert tp["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)


def test_tp2_resume_is_exact(runs, tmp_path):
    shutil.copytree(runs / "tp" / "checkpoint-4", tmp_path / "checkpoint-4")
    torchrun(2, "tp", tmp_path, "--resume")
    resumed, full = train_entries(tmp_path), train_entries(runs / "tp")
    assert [e["step"] for e in resumed] == list(range(1, 9))  # steps 1-4 from checkpoint-4's trainer_state.json
    for a, b in zip(resumed, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    a, b = weights(tmp_path / "final"), weights(runs / "tp" / "final")
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def test_parallelism_config_row():
    assert FIELD_POLICY["parallelism_config"][0] == LIGHTNING


def test_model_without_a_tp_plan_is_refused_naming_its_class(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), parallelism_config=ParallelismConfig(tp_size=2),
                                          use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="parallelism_config tp_size=2: BertForSequenceClassification carries no"):
        hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))


@pytest.mark.parametrize("config,match", [
    (dict(tp_size=2, cp_size=2), r"parallelism_config \{'cp_size': 2\} is not supported"),
    (dict(dp_shard_size=2), "dp_shard_size=2 without tp_size > 1"),
])
def test_unsupported_parallelism_config_is_refused(tmp_path, config, match):
    args = hf_lightning.TrainingArguments(str(tmp_path), parallelism_config=ParallelismConfig(**config),
                                          use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=match):
        hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(4))


def test_tp_size_that_does_not_fit_the_processes_is_refused(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), parallelism_config=ParallelismConfig(tp_size=2),
                                          use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"tp_size=2, dp_shard_size=1 does not fit the 1 process"):
        hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(4)).train()
