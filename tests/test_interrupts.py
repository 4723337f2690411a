"""interrupts.py: a training process told to stop ends as with transformers, in a real process of its own.

SIGTERM exits 143 (what a shell reports for a process the signal killed; transformers' process dies of it), after
the checkpoint of the last finished step when `enable_jit_checkpoint` is set, and the run resumes from it exactly.
Ctrl-C reaches the script's `except KeyboardInterrupt:`. The job sends the signal to itself at the end of a known
step (tests/jobs/train_job.py --signal); the job is 12 steps with a checkpoint every 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from hf_lightning.interrupts import EXIT_SIGTERM

JOB = os.path.join(os.path.dirname(__file__), "jobs", "train_job.py")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """job(framework, output_dir, *options) -> (exit status as subprocess gives it, output), each job a process of
    its own forked from a server that did the imports once (train_job.py serve)."""
    server = subprocess.Popen([sys.executable, JOB, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    logs = tmp_path_factory.mktemp("job_logs")

    def run(framework, out, *extra):
        log = logs / f"{len(os.listdir(logs))}.log"
        server.stdin.write(json.dumps({"argv": [framework, str(out), *map(str, extra)], "log": str(log)}) + "\n")
        server.stdin.flush()
        reply = server.stdout.readline()
        assert reply, "the job server died"
        return json.loads(reply)["returncode"], log.read_text()

    yield run
    server.stdin.close()
    server.wait(timeout=60)


def weights(folder):
    return safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))


def test_sigterm_with_jit_checkpoint_saves_the_step_exits_143_and_resumes_exactly(job, tmp_path):
    reference = tmp_path / "reference"
    code, output = job("hl", reference)
    assert code == 0, output[-3000:]
    out = tmp_path / "run"
    code, output = job("hl", out, "--jit", "--signal", "TERM@3")
    assert code == EXIT_SIGTERM == 143, output[-3000:]
    assert "SIGNAL HANDLERS RESTORED" in output
    # checkpoint-3 is not a save step (save_steps=2): the SIGTERM saved it, then training stopped.
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    code, output = job("hl", out, "--resume", "latest")
    assert code == 0, output[-3000:]
    assert "RESUMED_AT 3" in output
    expected, actual = weights(reference / "final"), weights(out / "final")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


@pytest.mark.parametrize("framework", ["hf", "hl"])
def test_sigterm_without_jit_checkpoint_exits_as_killed(job, tmp_path, framework):
    code, output = job(framework, tmp_path, "--signal", "TERM@3")
    # transformers' process dies of the signal (-15 here, 143 in a shell); ours exits 143 after Lightning's teardown
    assert code == (-signal.SIGTERM if framework == "hf" else EXIT_SIGTERM), output[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]


@pytest.mark.parametrize("framework", ["hf", "hl"])
def test_ctrl_c_reaches_the_scripts_except_keyboard_interrupt(job, tmp_path, framework):
    code, output = job(framework, tmp_path, "--signal", "INT@3")
    assert code == 130, output[-3000:]
    assert "KeyboardInterrupt at step 3" in output
    assert "SIGNAL HANDLERS RESTORED" in output
