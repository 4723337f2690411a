"""What a script user reads: transformers' lines on transformers' loggers, and none of Lightning's noise."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import transformers
from helpers import classification_dataset, tiny_bert

import hf_lightning

RELEVANT = ("***** Running", "  Num ", "  Instantaneous", "  Total ", "  Gradient", "  Number of", "  Resuming",
            "  Fast-forwarding", "Saving model checkpoint", "Configuration saved", "Model weights saved", "Loading model",
            "max_steps is given", "Training completed", "Deleting older", "Warning: The following arguments")
COLUMNS = "The following columns"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _captured(lib, out_dir: str, resume=None, **overrides) -> list[str]:
    """The records of the `transformers` logger hierarchy during one Trainer's construction and train()."""
    handler = Records()
    root = logging.getLogger("transformers")
    verbosity = transformers.utils.logging.get_verbosity()
    root.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers says some things once per process; here, once per run
    try:
        kw = dict(report_to="none", use_cpu=True, disable_tqdm=True, log_level="info", per_device_train_batch_size=4,
                  max_steps=6, save_steps=3, eval_strategy="steps", eval_steps=3)
        kw.update(overrides)
        args = lib.TrainingArguments(out_dir, **kw)
        trainer = lib.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(16),
                              eval_dataset=classification_dataset(4))
        trainer.train(resume_from_checkpoint=resume)
    finally:
        root.removeHandler(handler)
        transformers.utils.logging.set_verbosity(verbosity)
    return [line.replace(out_dir, "OUT") for line in handler.lines]


def _relevant(lines):
    return [line for line in lines if line.strip("\n").startswith(RELEVANT)]


def test_transformers_lines_on_transformers_logger_as_transformers_writes_them(tmp_path):
    hf = _captured(transformers, str(tmp_path / "hf"))
    hl = _captured(hf_lightning, str(tmp_path / "hl"))
    assert _relevant(hl) == _relevant(hf)
    assert "Saving model checkpoint to OUT/checkpoint-3" in hl  # the final folder, not tmp-checkpoint-3
    assert not any("tmp-checkpoint" in line for line in hl)
    # transformers rebuilds the evaluation loader (and says so) at each evaluation; the notice reads the same
    assert {line for line in hl if line.startswith(COLUMNS)} == {line for line in hf if line.startswith(COLUMNS)}

    # resumed with another save_steps: the same resume lines and args-mismatch warning
    hf_resumed = _captured(transformers, str(tmp_path / "hf"), resume=str(tmp_path / "hf" / "checkpoint-3"),
                           save_steps=2)
    hl_resumed = _captured(hf_lightning, str(tmp_path / "hl"), resume=str(tmp_path / "hl" / "checkpoint-3"),
                           save_steps=2)
    assert _relevant(hl_resumed) == _relevant(hf_resumed)
    assert any("save_steps: 2 (from args) != 3 (from trainer_state.json)" in line for line in hl_resumed)
    assert any(line.startswith("  Fast-forwarding the dataloader past 0 epochs and 3 batches") for line in hl_resumed)


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from helpers import classification_dataset, tiny_bert
    if sys.argv[3] == "transformers":
        from transformers import Trainer, TrainingArguments
    else:
        from hf_lightning import Trainer, TrainingArguments

    def run(resume=None):
        args = TrainingArguments(sys.argv[1], report_to="none", use_cpu=True, log_level="info", max_steps=4,
                                 save_steps=2, per_device_train_batch_size=2)
        model = tiny_bert().eval()  # as from_pretrained returns it
        trainer = Trainer(model, args=args, train_dataset=classification_dataset(8))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    run()  # its Trainer dropped when run() returns
    kept = run(resume=sys.argv[1] + "/checkpoint-2")  # mid-epoch: 4 steps per epoch; kept until the interpreter exits
""")
NOISE = ("GPU available", "TPU available", "Tip:", "in eval mode", "weights_only", "LeafSpec", "bitsandbytes",
         "kernels-community", "across ranks is zero", "tmp-checkpoint", "Exception ignored", "Traceback")


def test_a_run_prints_transformers_lines_and_no_lightning_noise(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(hf_lightning.__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    printed = {}
    for framework in ("transformers", "hf_lightning"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / framework), os.path.dirname(__file__),
                              framework], capture_output=True, text=True, env=env, timeout=300)
        printed[framework] = out.stdout + out.stderr
        assert out.returncode == 0, printed[framework][-3000:]
    # What transformers' own run prints too is not hf_lightning's noise: with peft installed (the dev extra),
    # importing transformers.trainer_utils imports peft, which imports bitsandbytes, which prints its kernels notice.
    for noise in NOISE:
        if noise not in printed["transformers"]:
            assert noise not in printed["hf_lightning"], (noise, printed["hf_lightning"][-3000:])
    tmp_path = tmp_path / "hf_lightning"
    printed = printed["hf_lightning"]
    for line in ("***** Running training *****", f"Saving model checkpoint to {tmp_path}/checkpoint-2",
                 "Fast-forwarding the dataloader past 0 epochs and 2 batches", "{'train_runtime'"):
        assert line in printed, (line, printed[-3000:])
