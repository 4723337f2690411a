"""Real multi-process runs: 2 CPU processes (gloo) launched by torchrun, as transformers users launch them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import hf_lightning
from helpers import lm_dataset, tiny_llama
from differential import assert_same_history

JOB = os.path.join(os.path.dirname(__file__), "jobs", "ddp_job.py")
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def free_port() -> int:
    import socket

    with socket.socket() as sock:  # a fresh port per launch: a reused one may still be in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(framework, out, *extra):
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
                           JOB, framework, str(out), *extra], capture_output=True, text=True, timeout=400)
    finished = os.path.isfile(os.path.join(out, "history.json"))
    if framework == "hf" and finished and "terminate called without an active exception" in proc.stderr:
        # transformers 5.24's gloo run sometimes aborts while the process exits, after the job has finished and
        # written its results: the oracle's numbers are complete.
        return proc.stdout
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr  # the process group is released before the interpreter exits
    return proc.stdout


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    torchrun("hf", root / "hf")
    (root / "hl_stdout.txt").write_text(torchrun("hl", root / "hl"))
    return root


def test_ddp_training_matches_transformers(ddp_runs):
    hf = json.load(open(ddp_runs / "hf" / "history.json"))
    hl = json.load(open(ddp_runs / "hl" / "history.json"))
    train = lambda history: [e for e in history if "eval_loss" not in e]  # noqa: E731
    assert_same_history(train(hf), train(hl))
    a = safetensors.torch.load_file(ddp_runs / "hf" / "final" / "model.safetensors")
    b = safetensors.torch.load_file(ddp_runs / "hl" / "final" / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    # Both processes wrote their RNG state into each checkpoint; only rank 0 wrote the rest.
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(ddp_runs / "hl" / "checkpoint-6"))
    assert sorted(os.listdir(ddp_runs / "hl" / "checkpoint-6")) == sorted(os.listdir(ddp_runs / "hf" / "checkpoint-6"))


def test_lightning_launcher_run_equals_the_torchrun_run(ddp_runs):
    """`python job.py` with lightning_trainer_kwargs={"devices": 2}: Lightning's launcher re-runs the script for rank
    1; topology (sharding, RNG files, who logs and saves, per-rank log levels) as under torchrun."""
    out = ddp_runs / "lightning"
    proc = subprocess.run([sys.executable, JOB, "hl", str(out), "lightning_launch"], capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr
    assert_same_history(json.load(open(ddp_runs / "hl" / "history.json")), json.load(open(out / "history.json")))
    a = safetensors.torch.load_file(ddp_runs / "hl" / "final" / "model.safetensors")
    b = safetensors.torch.load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert sorted(os.listdir(out / "checkpoint-6")) == sorted(os.listdir(ddp_runs / "hl" / "checkpoint-6"))
    for rank in (0, 1):  # the child's own RNG file and log levels: it ran as rank 1
        assert json.load(open(out / f"levels_{rank}.json")) == json.load(open(ddp_runs / "hl" / f"levels_{rank}.json"))
        assert torch.equal(torch.load(out / "checkpoint-6" / f"rng_state_{rank}.pth", weights_only=False)["cpu"],
                           torch.load(ddp_runs / "hl" / "checkpoint-6" / f"rng_state_{rank}.pth",
                                      weights_only=False)["cpu"])
    assert len([line for line in proc.stdout.splitlines() if line.startswith("{'loss'")]) == 6


def test_ddp_eval_loss_is_transformers_ddp_value(ddp_runs):
    """Each process evaluates its shard (accelerate's BatchSamplerShard: the 6 rows fill one batch of 8 per process by
    wrapping around) and the losses are gathered with gather_for_metrics, so eval_loss is transformers' DDP value,
    which weighs the wrapped rows and differs from the single-process one: compared with transformers' DDP run."""
    evals = lambda path: [e for e in json.load(open(path)) if "eval_loss" in e]  # noqa: E731
    hf, hl = evals(ddp_runs / "hf" / "history.json"), evals(ddp_runs / "hl" / "history.json")
    assert len(hl) == 2
    assert_same_history(hf, hl, rel=1e-5)


@pytest.fixture(scope="module")
def eval37_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval37")
    for framework in ("hf", "hl"):
        torchrun(framework, root / framework, "eval37")
    return {framework: json.load(open(root / framework / "eval37.json")) for framework in ("hf", "hl")}


def test_sharded_evaluation_of_37_samples(eval37_runs, tmp_path):
    """evaluate() and predict() of 37 rows on 2 processes (batches of 4: the last one of process 1 wraps around to
    rows 0-2): compute_metrics gets exactly 37 predictions in dataset order, with eval_do_concat_batches=False and
    eval_accumulation_steps too. eval_loss is transformers' DDP value (it weighs the last batches as transformers
    does: not the single-process value); the prediction-based metrics and the predictions are the single-process run's."""
    from helpers import classification_dataset, tiny_bert

    dataset = classification_dataset(37, seed=7)
    single = hf_lightning.Trainer(tiny_bert(), args=hf_lightning.TrainingArguments(
        str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True, include_for_metrics=["inputs"]),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    expected = single.predict(dataset)
    numbers = lambda metrics: {k: v for k, v in metrics.items() if "time" not in k and "per_second" not in k}  # noqa: E731
    assert eval37_runs["hl"].keys() == {"concat", "accumulation", "batches", "ragged"}
    for name, hl in eval37_runs["hl"].items():
        if name == "ragged":
            continue
        hf = eval37_runs["hf"][name]
        for prefix, split in (("eval", "eval"), ("test", "predict")):
            assert hl[split][f"{prefix}_rows"] == 37
            first_tokens = hl[split].pop(f"{prefix}_first_tokens")
            assert first_tokens == hf[split].pop(f"{prefix}_first_tokens") == [row[0] for row in dataset["input_ids"]]
            assert numbers(hl[split]) == pytest.approx(numbers(hf[split]), rel=1e-5)  # eval_loss included
            assert hl[split][f"{prefix}_accuracy"] == pytest.approx(expected.metrics["test_accuracy"])
        assert hl["eval"]["eval_loss"] != pytest.approx(expected.metrics["test_loss"], rel=1e-5)
        assert torch.allclose(torch.tensor(hl["predictions"]), torch.from_numpy(expected.predictions), atol=1e-5)
        assert hl["label_ids"] == expected.label_ids.tolist()
    # rows of 3-12 tokens (eval_accumulation_steps=2): each process's batch is padded to its longest row, each gathered
    # batch across the processes with -100, as transformers does: the same arrays, every row once, in order
    hl, hf = eval37_runs["hl"]["ragged"], eval37_runs["hf"]["ragged"]
    assert hl["label_ids"] == hf["label_ids"]
    assert [labels[: len(row)] for labels, row in zip(hl["label_ids"], hl["rows"])] == hl["rows"]
    longest = [max(map(len, hl["rows"][start : start + 4])) for start in range(0, 37, 4)]  # batch by batch
    assert longest[0::2][:4] != longest[1::2][:4]  # process 0's batch and process 1's: padded to each other
    assert torch.allclose(torch.tensor(hl["predictions"]), torch.tensor(hf["predictions"]), atol=1e-5)
    hl["predict"].pop("test_first_tokens"), hf["predict"].pop("test_first_tokens")
    # gathered per eval_accumulation_steps window (3 windows x losses, inputs, logits, labels), not per batch (5 x 7)
    assert hl["gathers"] == 3 * 4
    # each of a process's 5 batches had its label tokens counted over the processes as it was fetched (one
    # asynchronous all_reduce per chunk of batches), none again in prediction_step: test_loss, which divides by those
    # counts, is transformers' own (below)
    assert hl["counts"] == {"ahead": 5, "again": 0}
    assert numbers(hl["predict"]) == pytest.approx(numbers(hf["predict"]), rel=1e-5)


def test_log_level_and_replica_level(ddp_runs):
    main = json.load(open(ddp_runs / "hl" / "levels_0.json"))
    replica = json.load(open(ddp_runs / "hl" / "levels_1.json"))
    assert set(main.values()) == {logging.INFO}
    assert set(replica.values()) == {logging.ERROR}


def test_passive_log_level_leaves_levels_alone(tmp_path):
    logging.getLogger("transformers").setLevel(logging.CRITICAL)
    try:
        hf_lightning.Trainer(tiny_llama(), args=hf_lightning.TrainingArguments(str(tmp_path), log_level="passive"))
        assert logging.getLogger("transformers").level == logging.CRITICAL
        hf_lightning.Trainer(tiny_llama(), args=hf_lightning.TrainingArguments(str(tmp_path), log_level="debug"))
        assert logging.getLogger("transformers").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("hf_lightning").level == logging.DEBUG
    finally:
        import transformers

        transformers.utils.logging.set_verbosity_warning()
        logging.getLogger("hf_lightning").setLevel(logging.NOTSET)


def test_log_lines_printed_by_the_main_process_only(ddp_runs):
    printed = [line for line in (ddp_runs / "hl_stdout.txt").read_text().splitlines() if line.startswith("{'loss'")]
    assert len(printed) == 6  # one line per logged step, not one per process


def test_layerwise_optimizer_refused_under_ddp(tmp_path):
    out = torchrun("hl", tmp_path / "lw", "layerwise")
    assert out.count("REFUSED:") == 2 and "does not support DDP" in out


def test_neftune_on_a_ddp_wrapped_model(tmp_path):
    out = torchrun("hl", tmp_path / "neftune", "neftune")
    # On both ranks: the NEFTune hook was on the embeddings during training, removed after, under DDPStrategy.
    assert out.count("NEFTUNE True True DDPStrategy") == 2, out[-2000:]
    assert out.count("WRAPPED True True True True True") == 2, out[-2000:]



def test_a_subclass_on_the_accelerator_under_ddp(tmp_path):
    """training_step calling self.accelerator.backward trains as on transformers under DDP. Its prediction_step
    gathers with gather_for_metrics, and the loop gathers again: as with accelerate, each gather drops the rows that
    the sharded last batch repeated, so compute_metrics sees the 6 rows once (as a single process does), and
    eval_loss is transformers' DDP value (each process evaluated its shard): compared with transformers' DDP run."""
    torchrun("hf", tmp_path / "hf", "accelerate_style")
    torchrun("hl", tmp_path / "hl", "accelerate_style")
    hf = json.load(open(tmp_path / "hf" / "history.json"))
    hl = json.load(open(tmp_path / "hl" / "history.json"))
    assert_same_history(hf, hl, rel=1e-5)  # training and evaluation entries
    assert [e["eval_rows"] for e in hl if "eval_rows" in e] == [6.0, 6.0]  # not 12: gathered once, not per process


ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))


def test_accelerate_launch_trains_as_the_torchrun_run(ddp_runs, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (the guide's other launcher) starts the same DDP run: topology
    from the environment it sets, the same steps, losses and checkpoint files as under torchrun. (With `--cpu`
    accelerate runs its simple launcher: one process, whatever --num_processes says; the job itself asks for CPU.)"""
    out = tmp_path / "accelerate"
    proc = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                           JOB, "hl", str(out)], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    torchrun_run = json.load(open(ddp_runs / "hl" / "history.json"))
    accelerate_run = json.load(open(out / "history.json"))
    assert_same_history(torchrun_run, accelerate_run)
    assert sorted(os.listdir(out / "checkpoint-6")) == sorted(os.listdir(ddp_runs / "hl" / "checkpoint-6"))
