"""What `import hf_lightning` and a first train() do to the process: nothing process-wide is left behind."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import gc, json, os, sys, warnings
gc.disable() if sys.argv[1] == "gc-off" else None
import torch
import accelerate, lightning.pytorch, transformers  # dependencies: their imports set a variable (lightning.fabric)
# and a warnings filter (accelerate.scheduler) of their own
environ, filters, tensor_cuda = dict(os.environ), list(warnings.filters), torch.Tensor.cuda
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
trainer = hf_lightning.Trainer(Model(), args=args, train_dataset=Rows())
report["datasets_after_train"] = "datasets" in sys.modules
import datasets  # imported by the user after the Trainer was built: train() still gives it log_level
trainer.train()
report["datasets_level"] = datasets.utils.logging.get_verbosity()
report["environ_changed"] = sorted(k for k in set(environ) | set(os.environ) if environ.get(k) != os.environ.get(k))
report["warning_filters_changed"] = list(warnings.filters) != filters
report["tensor_cuda_replaced"] = torch.Tensor.cuda is not tensor_cuda
print(json.dumps(report))
"""


def run(mode: str, tmp_path) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_and_train_leave_nothing_process_wide(tmp_path):
    report = run("gc-on", tmp_path)
    # The collector is paused only while hf_lightning's own imports run, and nothing is frozen.
    assert report["gc_enabled_after_import"] is True
    assert report["frozen_after_import"] == 0
    # No environment variable, warnings filter or torch attribute is changed by the import or by a train().
    assert report["environ_changed"] == []
    assert report["warning_filters_changed"] is False
    assert report["tensor_cuda_replaced"] is False
    # `datasets` (~0.3 s with pandas and pyarrow) is imported only by users whose data needs it ...
    assert report["datasets_after_import"] is False
    assert report["datasets_after_train"] is False
    # ... and still gets log_level when the user imported it before train().
    assert report["datasets_level"] == 40
    gc_off = run("gc-off", tmp_path)
    assert gc_off["gc_enabled_after_import"] is False  # a user's gc.disable() is kept
    assert gc_off["frozen_after_import"] == 0
