"""push_to_hub and the hub_* fields against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py), with the real
huggingface_hub client, and against transformers.Trainer pushing the same run to the same server.

huggingface_hub reads HF_ENDPOINT once, at import (this test process imported it long ago, with HF_HUB_OFFLINE=1 from
conftest.py), so the runs happen in real subprocesses (tests/jobs/hub_job.py) with HF_ENDPOINT, HF_TOKEN and HF_HOME
set as a user sets them. The three jobs start together (the "down" one mostly waits on huggingface_hub's retries)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hub_server import HubServer

pytest.importorskip("huggingface_hub")

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "hf_alice_write"


class Job:
    def __init__(self, name, server, root):
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
        env.update(HF_ENDPOINT=server.url, HF_TOKEN=TOKEN, HF_HOME=str(root / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
                   PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")]))
        self.out = root / name
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "jobs", "hub_job.py"), name, str(self.out)],
                                     env=env, cwd=str(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._result = None

    def result(self):
        if self._result is None:
            stdout, stderr = self.proc.communicate(timeout=400)
            assert self.proc.returncode == 0, stderr[-4000:]
            self._result = (json.loads(stdout.strip().splitlines()[-1]), stderr)
        return self._result


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    server = HubServer(root / "server", tokens={TOKEN: "alice"}).start()
    server.fail_writes["alice/revoked"] = 401
    server.fail_writes["alice/down"] = "down"
    jobs = {name: Job(name, server, root) for name in ("down", "pair", "strategies")}
    yield server, jobs
    for job in jobs.values():
        if job.proc.poll() is None:
            job.proc.kill()
    server.stop()


def paths(commits):
    return [(message, sorted(files)) for message, files in commits]


def test_same_pushes_as_transformers(hub):
    """Both trainers, hub_strategy="checkpoint" + hub_always_push, stopped after step 2, push_to_hub() then
    save_model(): the same commits (messages and files, in order), private repos named after hub_model_id."""
    server, jobs = hub
    result, _ = jobs["pair"].result()
    assert result["hl_hub_model_id"] == "alice/hl-run" and result["hf_hub_model_id"] == "alice/hf-run"
    hl, hf = paths(server.commits("alice/hl-run")), paths(server.commits("alice/hf-run"))
    assert hl == hf
    checkpoint_files = ["config.json", "model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt",
                        "trainer_state.json", "training_args.bin"]
    assert hl == [
        ("initial commit", []),
        ("Training in progress, step 2", ["config.json", "model.safetensors", "training_args.bin"]),
        ("Training in progress, step 2, checkpoint", [f"last-checkpoint/{name}" for name in checkpoint_files]),
        ("End of training", ["README.md"]),  # the model card; the weights were already there (save_model: no change)
    ]
    assert server.repos["alice/hl-run"]["private"] and server.repos["alice/hf-run"]["private"]
    assert b"hl-run" in server.read("alice/hl-run", "README.md")  # transformers' model card, named after the repo
    assert result["hl_local"] == result["hf_local"]  # checkpoint-2/ kept locally, as transformers


def test_round_trip_and_resume_from_last_checkpoint(hub):
    """snapshot_download gets what was pushed, hf_hub_download the same weights as written; training resumes with
    `resume_from_checkpoint="last-checkpoint"` in the downloaded folder and ends as the uninterrupted run."""
    server, jobs = hub
    result, _ = jobs["pair"].result()
    assert result["downloaded"] == sorted(server.files("alice/hl-run"))
    assert result["weights_round_trip"] is True
    assert result["resumed_step"] == 4
    assert result["max_weight_diff"] == 0.0


def test_wrong_token_is_a_clear_error_at_construction(hub):
    _, jobs = hub
    message = jobs["strategies"].result()[0]["wrong_token"]
    assert message is not None, "Trainer(...) accepted a token the Hub refuses"
    assert "hub_token" in message and "401" in message and "Invalid credentials" in message


def test_token_refused_during_training_is_logged_and_training_goes_on(hub):
    server, jobs = hub
    result, stderr = jobs["strategies"].result()
    assert result["revoked_step"] == 4
    assert {"checkpoint-2", "checkpoint-4"} <= set(result["revoked_local"])
    for step in (2, 4):
        assert f"Pushing checkpoint-{step} to the Hub repository alice/revoked failed" in stderr
    assert "401 Unauthorized" in stderr
    assert paths(server.commits("alice/revoked")) == [("initial commit", [])]


def test_hub_revision_end_and_all_checkpoints(hub):
    server, jobs = hub
    jobs["strategies"].result()
    # hub_revision: pushes go to that branch, main untouched
    assert [m for m, _ in server.commits("alice/on-dev", "dev")] == [
        "initial commit", "Training in progress, step 2"]
    assert [m for m, _ in server.commits("alice/on-dev")] == ["initial commit"]
    # "end": nothing during training, everything at push_to_hub()
    assert paths(server.commits("alice/at-end")) == [
        ("initial commit", []),
        ("End of training", ["README.md", "config.json", "model.safetensors", "training_args.bin"])]
    # "all_checkpoints": each checkpoint in its own folder
    assert {path.split("/")[0] for path in server.files("alice/all") if "/" in path} == {"checkpoint-2",
                                                                                        "checkpoint-4"}


def test_server_down_during_training(hub):
    """The server stops answering uploads: the push of step 2 retries in the background while training goes on,
    the push of step 4 is skipped (hub_always_push=False) while it runs, the end waits for it, the failure is logged
    with the reason and both checkpoints stay."""
    server, jobs = hub
    result, stderr = jobs["down"].result()
    assert result["step"] == 4
    assert {"checkpoint-2", "checkpoint-4"} <= set(result["local"])
    assert "Push of checkpoint-4 to the Hub skipped: the previous push is still running" in stderr
    assert "Pushing checkpoint-2 to the Hub repository alice/down failed" in stderr
    assert "Server disconnected without sending a response" in stderr
    assert paths(server.commits("alice/down")) == [("initial commit", [])]
