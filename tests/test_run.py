"""The seam: one RunState shared explicitly, one place that fires TrainerCallback events, the facade on top.

These read the package's source, because what they pin is its shape: a refactor that lets a lower floor reach into
the facade, or fires an event from a second module, fails here before it becomes a runtime circle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
from transformers import TrainerCallback

import hf_lightning
from hf_lightning.run import RunState, TrainerHooks, TrainingPlan
from helpers import classification_dataset, tiny_bert

PACKAGE = pathlib.Path(hf_lightning.__file__).resolve().parent
HOOK_NAMES = set(TrainerHooks.__annotations__) | {
    name for name, value in vars(TrainerHooks).items() if callable(value) and not name.startswith("__")
}
LOWER_FLOORS = ("run.py", "module.py", "flow.py", "evaluation.py", "checkpoint.py", "data.py", "steps.py",
                "optimizers.py", "features.py", "compat.py", "accelerator.py", "callbacks.py", "loggers.py",
                "interrupts.py")


def _sources():
    return {path.name: path.read_text() for path in PACKAGE.glob("*.py")}


def test_trainer_callback_events_fire_from_run_py_only():
    firing = sorted(name for name, text in _sources().items()
                    if "callback_handler.on_" in text or ("call_event(" in text and name != "callbacks.py"))
    assert firing == ["run.py"]
    # ... and run.py has a method for each of transformers' 16 events.
    events = [name for name in vars(TrainerCallback) if name.startswith("on_")]
    assert len(events) == 16
    assert all(callable(getattr(RunState, event, None)) for event in events)


def test_lower_floors_never_import_the_facade():
    for name in LOWER_FLOORS:
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module != "trainer", f"{name} imports the facade"
                assert "trainer" not in [a.name for a in node.names], f"{name} imports the facade"


def test_lower_floors_use_the_facade_only_through_trainer_hooks():
    """module.py, flow.py, evaluation.py and checkpoint.py call `hooks.<name>` only for TrainerHooks' members."""
    allowed = HOOK_NAMES
    used = set()
    for name in ("module.py", "flow.py", "evaluation.py", "checkpoint.py"):
        for node in ast.walk(ast.parse((PACKAGE / name).read_text())):
            if isinstance(node, ast.Attribute):
                base = node.value
                if isinstance(base, ast.Name) and base.id == "hooks" or \
                        isinstance(base, ast.Attribute) and base.attr == "hooks":
                    used.add(node.attr)
    assert used, "the scan found no use of the hooks at all"
    assert used <= allowed, used - allowed


def test_the_facade_satisfies_trainer_hooks_and_shares_its_run_state(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), max_steps=2, report_to="none", use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(8))
    assert "training_step" in HOOK_NAMES and "model" in HOOK_NAMES
    for name in HOOK_NAMES:
        assert hasattr(trainer, name), name
    trainer.train()
    module = trainer.lightning_module
    assert module.run_state is trainer._run and module.hooks is trainer
    # transformers' names on the facade are the shared state's
    assert trainer.state is trainer._run.state and trainer.state.global_step == 2
    trainer.control.should_save = True
    assert trainer._run.control.should_save is True


def test_training_plan_is_frozen():
    plan = TrainingPlan(max_steps=4, num_train_epochs=2, updates_per_epoch=2, steps_in_epoch=4, num_train_samples=8,
                        total_batch_size=2, num_examples=4)
    with pytest.raises(Exception):
        plan.max_steps = 5
    assert plan.lightning_max_epochs == 2
    assert TrainingPlan(1, 2**31, 1, 1, 1, 1, 1).lightning_max_epochs == -1


def test_facade_is_wiring():
    assert len((PACKAGE / "trainer.py").read_text().splitlines()) < 500
