"""What `import hf_lightning` and a first train() do to the process: the start-up savings keep the user's state."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import gc, json, os, sys
gc.disable() if sys.argv[1] == "gc-off" else None
import torch
import hf_lightning
report = {"gc_enabled_after_import": gc.isenabled(), "frozen_after_import": gc.get_freeze_count(),
          "datasets_after_import": "datasets" in sys.modules}

class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": torch.full((4,), float(i)), "labels": torch.tensor(i % 2)}

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

args = hf_lightning.TrainingArguments(sys.argv[2], max_steps=2, report_to="none", save_strategy="no", use_cpu=True,
                                      log_level="error", disable_tqdm=True)
hf_lightning.Trainer(Model(), args=args, train_dataset=Rows()).train()
report["datasets_after_train"] = "datasets" in sys.modules
report["datasets_verbosity"] = os.environ.get("DATASETS_VERBOSITY")
import datasets
report["datasets_level"] = datasets.utils.logging.get_verbosity()
print(json.dumps(report))
"""


def run(mode: str, tmp_path) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_restores_the_garbage_collector_and_leaves_datasets_unimported(tmp_path):
    report = run("gc-on", tmp_path)
    # The collector is paused only while hf_lightning's own imports run.
    assert report["gc_enabled_after_import"] is True
    # The import's long-lived objects (modules, classes) are in the permanent generation: collections skip them.
    assert report["frozen_after_import"] > 100_000
    # `datasets` (~0.3 s with pandas and pyarrow) is imported only by users whose data needs it ...
    assert report["datasets_after_import"] is False
    assert report["datasets_after_train"] is False
    # ... and still gets log_level when it is imported later.
    assert report["datasets_verbosity"] == "error"
    assert report["datasets_level"] == 40
    gc_off = run("gc-off", tmp_path)
    assert gc_off["gc_enabled_after_import"] is False  # a user's gc.disable() is kept
    assert gc_off["frozen_after_import"] == 0
