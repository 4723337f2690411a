"""Multi-node, on one machine: two `torchrun --nnodes 2 --nproc_per_node 1` "nodes" on 127.0.0.1, and a simulated
2-task SLURM job (two plain processes with the SLURM_* variables srun sets, read by Lightning's SLURMEnvironment).

transformers.Trainer is run the same way (torchrun; accelerate does not read SLURM's variables) and is the oracle for
log_on_each_node, save_on_each_node and log_level_replica: who writes which files, who logs at which level.
"""

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

from differential import assert_same_history

JOB = os.path.join(os.path.dirname(__file__), "jobs", "multinode_job.py")
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(framework, out, on_each_node, slurm=False) -> list[str]:
    """Start both nodes' processes at once, wait for both; returns each node's stdout."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    procs = []
    for node in (0, 1):
        job = [JOB, framework, str(out), str(node), "1" if on_each_node else "0"]
        if slurm:  # what srun sets for task N of `sbatch --nodes 2 --ntasks-per-node 1`
            node_env = {**env, "SLURM_NTASKS": "2", "SLURM_PROCID": str(node), "SLURM_LOCALID": "0",
                        "SLURM_NODEID": str(node), "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
                        "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            command = [sys.executable, *job]
        else:
            node_env = env
            command = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                       "--master_addr", "127.0.0.1", "--master_port", str(port), *job]
        procs.append(subprocess.Popen(command, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [proc.communicate(timeout=400) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        finished = os.path.isfile(os.path.join(out, "history.json"))
        if framework == "hf" and finished and "terminate called without an active exception" in stderr:
            continue  # transformers 5.24's gloo exit abort, after its results are written (test_distributed.py)
        assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
        assert "terminate called" not in stderr
    return [stdout for stdout, _ in outputs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    printed = {}
    for name, framework, on_each_node, slurm in [("hf", "hf", True, False), ("hl", "hl", True, False),
                                                 ("slurm", "hl", False, True)]:
        printed[name] = launch(framework, root / name, on_each_node, slurm)
    return root, printed


def seen(root, rank):
    return json.load(open(root / f"seen_{rank}.json"))


def files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def loss_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("{'loss'")]


def train_entries(history):
    # transformers 5.24's DDP eval_loss depends on the world size (see test_distributed.py); training must agree
    return [entry for entry in history if "eval_loss" not in entry]


def test_two_nodes_under_torchrun_as_transformers(runs):
    root, printed = runs
    hf, hl = root / "hf", root / "hl"
    assert_same_history(train_entries(json.load(open(hf / "history.json"))),
                        train_entries(json.load(open(hl / "history.json"))))
    a = safetensors.torch.load_file(hf / "node0" / "final" / "model.safetensors")
    b = safetensors.torch.load_file(hl / "node0" / "final" / "model.safetensors")
    assert all(torch.allclose(a[key], b[key], atol=1e-6) for key in a)
    for rank in (0, 1):
        mine, theirs = seen(hl, rank), seen(hf, rank)
        assert mine["levels"]["transformers"] == theirs["levels"]["transformers"]
        assert {k: v for k, v in mine.items() if k != "levels"} == {k: v for k, v in theirs.items() if k != "levels"}
        # each node's output_dir holds the same files as transformers' (save_on_each_node)
        assert files(hl / f"node{rank}") == files(hf / f"node{rank}")
        # transformers' PrinterCallback prints on each node's local main process, whatever log_on_each_node says
        assert len(loss_lines(printed["hl"][rank])) == len(loss_lines(printed["hf"][rank])) == 6


def test_log_and_save_on_each_node(runs):
    """Rank 1 is node 1's main process: it logs at log_level (not log_level_replica) and writes its own checkpoints —
    all but the weights, which transformers 5.24's save_pretrained writes on global rank 0 only."""
    root, _ = runs
    node1 = seen(root / "hl", 1)
    assert (node1["world_size"], node1["process_index"], node1["local_process_index"]) == (2, 1, 0)
    assert node1["should_log"] and node1["should_save"]
    assert set(node1["levels"].values()) == {logging.INFO}
    assert files(root / "hl" / "node1" / "checkpoint-6") == [
        "optimizer.pt", "rng_state_1.pth", "scheduler.pt", "trainer_state.json", "training_args.bin"]
    assert "model.safetensors" in files(root / "hl" / "node0" / "checkpoint-6")


def test_simulated_slurm_run_equals_the_torchrun_run(runs):
    """SLURM_PROCID/SLURM_NODEID reach args through Lightning's SLURMEnvironment (accelerate does not read them);
    with log_on_each_node/save_on_each_node off, rank 1 is a replica that writes only its RNG file."""
    root, printed = runs
    slurm = root / "slurm"
    for rank in (0, 1):
        topology = seen(slurm, rank)
        assert (topology["world_size"], topology["process_index"], topology["local_process_index"]) == (2, rank, 0)
        assert topology["should_log"] == topology["should_save"] == (rank == 0)
        assert set(topology["levels"].values()) == {logging.INFO if rank == 0 else logging.ERROR}
    assert_same_history(json.load(open(root / "hl" / "history.json")), json.load(open(slurm / "history.json")))
    a = safetensors.torch.load_file(root / "hl" / "node0" / "final" / "model.safetensors")
    b = safetensors.torch.load_file(slurm / "final" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    # one folder: rank 0's files and both RNG states, as transformers writes them under a single-node launch
    assert files(slurm / "checkpoint-6") == sorted(files(root / "hl" / "node0" / "checkpoint-6") + ["rng_state_1.pth"])
    assert not os.path.exists(slurm / "node1")
