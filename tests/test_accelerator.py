"""`hf_lightning.accelerator.LightningAccelerator`: accelerate's Accelerator API answered by a real Lightning run.

In one process: before any Lightning Trainer, beside a real `accelerate.Accelerator(cpu=True)`, and inside a real
`lightning.pytorch.Trainer` fit (fp16 precision plugin on CPU: the loss scaling of `backward` is visible). In two
processes: a DDP run over gloo launched by torchrun, whose training_step calls the collectives.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
import types

import lightning.pytorch as pl
import pytest
import torch
from accelerate.utils import AutocastKwargs, DistributedType
from lightning.pytorch.plugins.precision import MixedPrecision

from hf_lightning.accelerator import LightningAccelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process_env(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)


def quiet_trainer(**kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, max_steps=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    options.update(kwargs)
    return pl.Trainer(**options)


# ---------------------------------------------------------------------------------------------- one process


def test_before_a_lightning_trainer(single_process_env, tmp_path, capsys):
    acc = LightningAccelerator(lambda: None, lambda: None, cpu=True)
    assert acc.device == torch.device("cpu")
    assert (acc.process_index, acc.local_process_index, acc.num_processes) == (0, 0, 1)
    assert acc.is_main_process and acc.is_local_main_process and acc.is_last_process
    assert acc.distributed_type == DistributedType.NO and acc.mixed_precision == "no"
    assert acc.sync_gradients is True and acc.gradient_accumulation_steps == 1
    assert acc.state.distributed_type == DistributedType.NO and acc.state.fsdp_plugin is None

    x = torch.arange(3.0)
    assert acc.gather(x) is x
    reduced = acc.reduce({"a": x}, reduction="mean")
    assert torch.equal(reduced["a"], x) and reduced["a"] is not x
    assert acc.gather_for_metrics(["a", "b"]) == ["a", "b"]
    with acc.split_between_processes([1, 2, 3]) as part:
        assert part == [1, 2, 3]
    with acc.main_process_first():
        pass
    acc.wait_for_everyone()
    acc.print("printed", 1)
    assert capsys.readouterr().out == "printed 1\n"
    acc.save({"k": 1}, tmp_path / "obj.pt")
    assert torch.load(tmp_path / "obj.pt") == {"k": 1}

    # No Lightning run: backward is the loss's own (divided by gradient_accumulation_steps, as accelerate does).
    w = torch.ones(2, requires_grad=True)
    acc.gradient_accumulation_steps = 2
    acc.backward((w * 3).sum())
    assert torch.equal(w.grad, torch.full((2,), 1.5))

    assert copy.deepcopy({"acc": acc})["acc"] is acc  # as accelerate's: a Trainer's deepcopy keeps the same object


def test_not_implemented_names_what_to_use(single_process_env):
    acc = LightningAccelerator(lambda: None)
    with pytest.raises(NotImplementedError, match="model_wrapped"):
        acc.prepare(torch.nn.Linear(1, 1))
    with pytest.raises(NotImplementedError, match="gradient_accumulation_steps"):
        acc.accumulate(torch.nn.Linear(1, 1))
    with pytest.raises(NotImplementedError, match="max_grad_norm"):
        acc.clip_grad_norm_([], 1.0)
    with pytest.raises(AttributeError, match="sync_gradients"):
        acc.gradient_state  # noqa: B018
    assert getattr(acc, "even_batches", None) is None  # AttributeError, so getattr defaults still work
    with pytest.raises(AttributeError, match="no attribute 'not_an_accelerate_name'"):
        acc.not_an_accelerate_name  # noqa: B018


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's state is a process-wide singleton: start from none and leave none behind."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def test_same_answers_as_accelerate_in_one_process(single_process_env, fresh_accelerate_state):
    from accelerate import Accelerator

    trainer = quiet_trainer()
    ours_before = LightningAccelerator(lambda: None, cpu=True)
    ours = LightningAccelerator(lambda: trainer)
    real = Accelerator(cpu=True)
    for acc in (ours_before, ours):
        for name in ("device", "num_processes", "process_index", "local_process_index", "distributed_type",
                     "mixed_precision", "is_main_process", "is_local_main_process", "is_last_process",
                     "sync_gradients", "gradient_accumulation_steps", "use_distributed"):
            assert getattr(acc, name) == getattr(real, name), name

    data = {"logits": torch.randn(3, 2), "labels": (torch.tensor([1, 0, 1]), torch.tensor(5))}
    for op in (ours.gather, real.gather, ours.gather_for_metrics, real.gather_for_metrics):
        out = op(data)
        assert torch.equal(out["logits"], data["logits"]) and torch.equal(out["labels"][1], torch.tensor(5))
    for reduction in ("sum", "mean", "max"):
        assert torch.equal(ours.reduce(data["logits"], reduction), real.reduce(data["logits"], reduction))
    assert torch.equal(ours.pad_across_processes(data["logits"], dim=1, pad_index=-1),
                       real.pad_across_processes(data["logits"], dim=1, pad_index=-1))
    assert ours.gather_for_metrics([{"a": 1}], use_gather_object=True) == real.gather_for_metrics(
        [{"a": 1}], use_gather_object=True)
    with ours.split_between_processes(list("abc"), apply_padding=True) as a, real.split_between_processes(
            list("abc"), apply_padding=True) as b:
        assert a == b

    net = torch.nn.Linear(2, 2)
    compiled = torch.compile(net)  # wrapping only, never called
    assert ours.unwrap_model(compiled, keep_torch_compile=False) is real.unwrap_model(
        compiled, keep_torch_compile=False) is net
    assert ours.unwrap_model(compiled) is real.unwrap_model(compiled) is compiled
    assert ours.get_state_dict(net).keys() == real.get_state_dict(net).keys()


@pytest.mark.parametrize(("precision", "expected"), [
    ("32-true", "no"), ("64-true", "no"), ("bf16-mixed", "bf16"), ("bf16-true", "bf16"), ("16-true", "fp16"),
])
def test_mixed_precision_from_the_precision_plugin(single_process_env, precision, expected):
    trainer = quiet_trainer(precision=precision)
    assert LightningAccelerator(lambda: trainer).mixed_precision == expected


def test_distributed_type_from_the_strategy(single_process_env):
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    # A real DDP Trainer for 2 processes, not launched: its ranks, and no collective before the process group.
    ddp_trainer = quiet_trainer(devices=2, strategy="ddp")
    ddp = LightningAccelerator(lambda: ddp_trainer)
    assert (ddp.distributed_type, ddp.num_processes, ddp.is_main_process) == (DistributedType.MULTI_CPU, 2, True)
    with pytest.raises(RuntimeError, match="no process group yet"):
        ddp.reduce(torch.ones(1))

    def sharded(strategy_cls):  # the strategy's type is what counts (DeepSpeed's needs deepspeed to be built)
        trainer = types.SimpleNamespace(strategy=strategy_cls.__new__(strategy_cls), world_size=2, global_rank=0,
                                        local_rank=0)
        return LightningAccelerator(lambda: trainer)

    assert sharded(FSDPStrategy).distributed_type == DistributedType.FSDP and not sharded(FSDPStrategy).is_fsdp2
    assert sharded(ModelParallelStrategy).distributed_type == DistributedType.FSDP
    assert sharded(ModelParallelStrategy).is_fsdp2
    assert sharded(DeepSpeedStrategy).distributed_type == DistributedType.DEEPSPEED


class RecordingModule(pl.LightningModule):
    """Manual optimization, as hf_lightning's module: training_step calls the accelerator and records."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)
        self.accelerator = None
        self.records = {}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def training_step(self, batch, batch_idx):
        acc, rec = self.accelerator, self.records
        rec["attributes"] = {name: getattr(acc, name) for name in (
            "device", "process_index", "num_processes", "distributed_type", "mixed_precision", "is_main_process")}
        rec["unwrapped"] = acc.unwrap_model(self.trainer.model) is self.model
        rec["state_dict_keys"] = sorted(acc.get_state_dict(self.trainer.model))

        reference = copy.deepcopy(self.model)
        with torch.autocast("cpu", dtype=torch.float16):
            reference(batch).float().pow(2).mean().backward()

        with acc.autocast():
            out = self.model(batch)
            with acc.autocast(AutocastKwargs(enabled=False)):
                rec["autocast_off_dtype"] = self.model(batch).dtype
        rec["autocast_dtype"] = out.dtype
        acc.backward(out.float().pow(2).mean())  # through manual_backward: the fp16 scaler scales the loss
        rec["scale"] = acc.scaler.get_scale()
        rec["grad"], rec["reference_grad"] = self.model.weight.grad.clone(), reference.weight.grad.clone()

        self.model.zero_grad()
        acc.gradient_accumulation_steps = 2
        with acc.autocast():
            loss = self.model(batch).float().pow(2).mean()
        acc.backward(loss)
        rec["grad_ga2"] = self.model.weight.grad.clone()
        self.optimizers().step()  # a manual-optimization step counts only when the optimizer steps
        self.optimizers().zero_grad()


def test_inside_a_lightning_run(single_process_env):
    module = RecordingModule()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = quiet_trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    module.accelerator = LightningAccelerator(lambda: trainer, lambda: module)
    assert module.accelerator.mixed_precision == "fp16"  # a Lightning Trainer, not running yet
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(4, 3), batch_size=4))

    rec = module.records
    assert rec["attributes"] == {"device": torch.device("cpu"), "process_index": 0, "num_processes": 1,
                                 "distributed_type": DistributedType.NO, "mixed_precision": "fp16",
                                 "is_main_process": True}
    assert rec["unwrapped"] and rec["state_dict_keys"] == ["bias", "weight"]
    assert rec["autocast_dtype"] == torch.float16 and rec["autocast_off_dtype"] == torch.float32
    assert rec["scale"] == 1024.0
    assert torch.allclose(rec["grad"], rec["reference_grad"] * 1024.0, rtol=1e-3)
    assert torch.allclose(rec["grad_ga2"], rec["grad"] / 2, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- two processes

JOB = textwrap.dedent('''
    import json, os, sys, time
    import torch
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
    from hf_lightning.accelerator import LightningAccelerator

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    rec = {}
    before = LightningAccelerator(lambda: None, cpu=True)
    rec["before"] = [before.process_index, before.num_processes, before.is_main_process, before.distributed_type.value]
    try:
        before.gather(torch.tensor([rank]))
    except RuntimeError as err:
        rec["before_gather"] = str(err)

    def listed(data):
        if isinstance(data, torch.Tensor):
            return data.tolist()
        if isinstance(data, dict):
            return {k: listed(v) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            return [listed(v) for v in data]
        return data

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.model = torch.nn.Linear(2, 1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def training_step(self, batch, batch_idx):
            acc, r = self.accelerator, rank
            rec["attributes"] = [acc.process_index, acc.local_process_index, acc.num_processes, acc.is_main_process,
                                 acc.is_local_main_process, acc.is_last_process, acc.distributed_type.value,
                                 str(acc.device), acc.mixed_precision]
            rec["gather"] = listed(acc.gather(torch.tensor([r])))
            rec["gather_scalar"] = listed(acc.gather(torch.tensor(float(r))))
            rec["gather_nested"] = listed(acc.gather({"a": torch.tensor([[r, r]]), "b": (torch.tensor([10.0 * r]),)}))
            rec["metrics"] = listed(acc.gather_for_metrics(torch.tensor([r, r])))
            rec["metrics_objects"] = acc.gather_for_metrics([f"r{r}-a", f"r{r}-b"])
            rec["metrics_ragged"] = listed(acc.gather_for_metrics(torch.arange(r + 1), use_gather_object=True))
            ragged = torch.arange(1 + 2 * r)
            rec["pad"] = listed(acc.pad_across_processes(ragged))
            rec["pad_first"] = listed(acc.pad_across_processes(ragged, pad_index=-1, pad_first=True))
            rec["pad_dim1"] = list(acc.pad_across_processes({"x": torch.ones(2, 1 + r)}, dim=1)["x"].shape)
            rec["pad_gather"] = listed(acc.gather(acc.pad_across_processes(ragged, pad_index=-1)))
            value = torch.tensor([r + 1.0])
            rec["reduce"] = {k: listed(acc.reduce(value, k)) for k in ("sum", "mean", "max")}
            rec["reduce_input_kept"] = value.tolist()
            rec["reduce_int_mean"] = listed(acc.reduce({"n": torch.tensor([r + 1])}, "mean"))
            with acc.split_between_processes(list(range(5))) as part:
                rec["split"] = part
            with acc.split_between_processes(list(range(5)), apply_padding=True) as part:
                rec["split_padded"] = part
            with acc.split_between_processes({"t": torch.arange(5), "s": list("abcde")}, apply_padding=True) as part:
                rec["split_dict"] = listed(part)
            with acc.main_process_first():
                with open(os.path.join(out, "order.txt"), "a") as f:
                    f.write(f"enter {r}\\n")
                    f.flush()
                    time.sleep(0.3)
                    f.write(f"exit {r}\\n")
            acc.print(f"ACCPRINT from {r}")
            if r == 1:
                time.sleep(0.5)
            start = time.time()
            acc.wait_for_everyone()
            rec["barrier_wait"] = time.time() - start
            if r == 1:
                acc.set_trigger()
            rec["trigger"] = [acc.check_trigger(), acc.check_trigger()]
            rec["on_main"] = acc.on_main_process(lambda: r)()
            rec["unwrapped"] = [type(self.trainer.model).__name__, acc.unwrap_model(self.trainer.model) is self.model]
            rec["state_dict_keys"] = sorted(acc.get_state_dict(self.trainer.model))
            acc.save({"rank": r}, os.path.join(out, "saved.pt"))

            # backward inside no_sync (the owner of the loop sets sync_gradients = False there): this process's own
            # gradient ...
            x = batch * (r + 1)
            with acc.no_sync():
                acc.sync_gradients = False
                rec["sync_gradients"] = acc.sync_gradients
                acc.backward(self.model(x).sum())
            acc.sync_gradients = True
            rec["grad_no_sync"] = listed(acc.gather(self.model.weight.grad.clone()))
            self.model.zero_grad(set_to_none=True)
            # ... then through Lightning's DDP: the mean of both processes' gradients, on both
            acc.backward(self.model(x).sum())
            rec["grad"] = listed(acc.gather(self.model.weight.grad.clone()))
            rec["grad_expected"] = (batch.sum(0) * 1.5).tolist()
            self.optimizers().step()
            self.optimizers().zero_grad()

    module = Module()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                         max_epochs=1, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    module.accelerator = LightningAccelerator(lambda: trainer, lambda: module)
    trainer.fit(module, torch.utils.data.DataLoader(torch.arange(4.0).reshape(2, 2), batch_size=2))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(rec, f)
    torch.distributed.destroy_process_group()
''')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator_ddp")
    script = out / "job.py"
    script.write_text(JOB)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, ranks, proc.stdout


def test_two_processes_ranks_and_types(two_processes):
    _, (r0, r1), _ = two_processes
    assert r0["attributes"] == [0, 0, 2, True, True, False, "MULTI_CPU", "cpu", "no"]
    assert r1["attributes"] == [1, 1, 2, False, False, True, "MULTI_CPU", "cpu", "no"]
    # Before the Lightning Trainer: the launcher's environment, and no collective without a process group.
    assert r0["before"] == [0, 2, True, "MULTI_CPU"] and r1["before"] == [1, 2, False, "MULTI_CPU"]
    assert "no process group yet" in r0["before_gather"]


def test_two_processes_gather_and_pad(two_processes):
    _, ranks, _ = two_processes
    for rec in ranks:  # every process gets the same, in rank order
        assert rec["gather"] == [0, 1]
        assert rec["gather_scalar"] == [0.0, 1.0]
        assert rec["gather_nested"] == {"a": [[0, 0], [1, 1]], "b": [[0.0, 10.0]]}
        assert rec["metrics"] == [0, 0, 1, 1]
        assert rec["metrics_objects"] == ["r0-a", "r0-b", "r1-a", "r1-b"]
        assert rec["metrics_ragged"] == [0, 0, 1]  # gather_object: one entry per row, as accelerate
        assert rec["pad_dim1"] == [2, 2]
        assert rec["pad_gather"] == [0, -1, -1, 0, 1, 2]
    assert ranks[0]["pad"] == [0, 0, 0] and ranks[1]["pad"] == [0, 1, 2]
    assert ranks[0]["pad_first"] == [-1, -1, 0] and ranks[1]["pad_first"] == [0, 1, 2]


def test_two_processes_reduce(two_processes):
    _, ranks, _ = two_processes
    for r, rec in enumerate(ranks):
        assert rec["reduce"] == {"sum": [3.0], "mean": [1.5], "max": [2.0]}
        assert rec["reduce_input_kept"] == [r + 1.0]
        assert rec["reduce_int_mean"] == {"n": [1.5]}
        assert rec["trigger"] == [True, False]


def test_two_processes_split_and_ordering(two_processes):
    out, (r0, r1), stdout = two_processes
    assert r0["split"] == [0, 1, 2] and r1["split"] == [3, 4]
    assert r0["split_padded"] == [0, 1, 2] and r1["split_padded"] == [3, 4, 4]
    assert r1["split_dict"] == {"t": [3, 4, 4], "s": ["d", "e", "e"]}
    assert (out / "order.txt").read_text().split("\n")[:4] == ["enter 0", "exit 0", "enter 1", "exit 1"]
    assert r0["barrier_wait"] > 0.3  # rank 0 waited for rank 1 at wait_for_everyone
    assert "ACCPRINT from 0" in stdout and "ACCPRINT from 1" not in stdout
    assert r0["on_main"] == 0 and r1["on_main"] is None
    assert torch.load(out / "saved.pt") == {"rank": 0}


def test_two_processes_backward_and_model(two_processes):
    _, ranks, _ = two_processes
    for rec in ranks:
        assert rec["unwrapped"] == ["DistributedDataParallel", True]
        assert rec["state_dict_keys"] == ["bias", "weight"]
        # DDP averaged the gradients of both processes: equal everywhere, the mean of the two.
        assert rec["grad"] == [rec["grad_expected"], rec["grad_expected"]]
        assert rec["sync_gradients"] is False
        # Inside no_sync each process kept its own gradient (process r's inputs are scaled by r + 1).
        own = [v / 1.5 for v in rec["grad_expected"]]
        assert rec["grad_no_sync"] == [own, [2 * v for v in own]]


# ---------------------------------------------------------------------- wired into hf_lightning.Trainer


def _accelerate_style(trainer_cls):
    """A TRL-style subclass: its own training_step calls `self.accelerator.backward`, its evaluation gathers with
    `self.accelerator.gather_for_metrics` and records `sync_gradients` per micro-batch."""

    class AccelerateStyle(trainer_cls):
        sync_flags: list = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()
            type(self).sync_flags.append(self.accelerator.sync_gradients)
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            loss = loss / self.current_gradient_accumulation_steps
            self.accelerator.backward(loss)
            return loss.detach()

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            gathered = self.accelerator.gather_for_metrics((logits, labels))
            return loss, gathered[0], gathered[1]

    return AccelerateStyle


def test_a_subclass_on_the_accelerator_trains_and_evaluates_as_on_transformers(single_process_env, tmp_path):
    import transformers
    from differential import assert_same_run, run_pair
    from helpers import accuracy, classification_dataset, tiny_bert

    import hf_lightning

    hf_cls, hl_cls = _accelerate_style(transformers.Trainer), _accelerate_style(hf_lightning.Trainer)
    hf_cls.sync_flags, hl_cls.sync_flags = [], []
    results = run_pair(tmp_path, tiny_bert, classification_dataset(10), classification_dataset(6, seed=1),
                       hf_cls=hf_cls, hl_cls=hl_cls, trainer_kwargs={"compute_metrics": accuracy},
                       gradient_accumulation_steps=2, per_device_train_batch_size=2, logging_steps=1,
                       eval_strategy="epoch", num_train_epochs=2, learning_rate=1e-3)
    assert_same_run(results)
    assert hl_cls.sync_flags == hf_cls.sync_flags == [False, True, False, True, True] * 2
    assert "eval_accuracy" in results["hl"][0].state.log_history[-2]
    assert results["hl"][0].accelerator.num_processes == 1 and results["hl"][0].accelerator.is_main_process
