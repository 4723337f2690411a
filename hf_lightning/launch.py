"""Which processes run, and the process topology that `TrainingArguments` reports, both from Lightning.

transformers reads the topology (`args.world_size`, `process_index`, `local_process_index`, hence `should_log`,
`should_save`, per-rank log levels, data sharding and `rng_state_{rank}.pth`) from accelerate's PartialState, which
reads `RANK`/`WORLD_SIZE` when the TrainingArguments is created. Lightning reads it from its ClusterEnvironment:
torchrun, SLURM (`SLURM_PROCID`, ...), LSF, MPI, or its own launcher. The two disagree wherever accelerate does not
look (SLURM, Lightning's launcher), so `adopt_topology` gives `args.distributed_state` the topology Lightning will run.

Lightning's own launcher: `lightning_trainer_kwargs={"devices": 2}` (or `--trainer.devices 2`) runs Lightning's "ddp"
strategy with its subprocess launcher, which re-runs the script in each other process, exactly as torchrun runs it in
every process. That fits transformers scripts as they are written: top-level code or an `if __name__ == "__main__"`
block alike (ddp_spawn would pickle the Trainer, its datasets and lambdas, and re-import an unguarded script), so
spawn/fork strategies are refused. Lightning's launcher gives the children `LOCAL_RANK`, `WORLD_SIZE`, `NODE_RANK`
only; accelerate, in the child's TrainingArguments, needs `RANK` too (without it every child claims rank 0), so
`ScriptLauncher` adds `RANK` and `LOCAL_WORLD_SIZE`. As with Lightning's launcher, code that synchronises processes
before the first train()/evaluate() (e.g. `args.main_process_first()`) needs a real launcher (torchrun).
"""

from __future__ import annotations

import atexit
import os
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType

from . import compat

# Lightning's accelerator connector tries these in this order; LightningEnvironment otherwise.
_LOCAL_WORLD_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE")
_PROCESS_STARTING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook", "spawn", "fork")


def lightning_cluster_environment():
    """The ClusterEnvironment lightning.Trainer will detect in this process (its connector's order)."""
    from lightning.fabric.plugins.environments import (
        LightningEnvironment,
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for env_type in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if env_type.detect():
            return env_type()
    return LightningEnvironment()


@dataclass(frozen=True)
class Topology:
    """This process's place among the processes of a run, as Lightning's strategy will run them."""

    world_size: int = 1
    process_index: int = 0
    local_process_index: int = 0
    local_world_size: int = 1
    launches_here: bool = False  # Lightning's launcher starts this node's other processes from this one

    @property
    def num_nodes(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)


def count_devices(devices: Any) -> int:
    """How many processes per node `devices` asks Lightning for (the count Lightning's device parsing gives)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices in (-1, "-1", "auto", None):  # all devices: several only where there are several GPUs
        return max(torch.cuda.device_count(), 1)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    return int(devices) if str(devices).lstrip("-").isdigit() else 1


def topology(extra: dict | None = None) -> Topology:
    """The topology of this process: from the launcher's environment as Lightning reads it, or, when Lightning's own
    launcher will start the processes (`lightning_trainer_kwargs` devices/num_nodes), from those."""
    extra = extra or {}
    env = lightning_cluster_environment()
    if type(env).__name__ != "LightningEnvironment":  # torchrun, SLURM, LSF, MPI started every process
        world = env.world_size()
        local_world = next((int(os.environ[v]) for v in _LOCAL_WORLD_SIZE_VARIABLES if v in os.environ), world)
        return Topology(world, env.global_rank(), env.local_rank(), local_world)
    local_world = count_devices(extra.get("devices", 1))
    num_nodes = int(extra.get("num_nodes", 1) or 1)
    if env.creates_processes_externally:  # a child of Lightning's launcher, or a hand-set LOCAL_RANK
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_world))
        world = int(os.environ.get("WORLD_SIZE", local_world * num_nodes))
        rank = int(os.environ.get("RANK", env.node_rank() * local_world + env.local_rank()))
        return Topology(world, rank, env.local_rank(), local_world)
    world = local_world * num_nodes
    return Topology(world, env.node_rank() * local_world, 0, local_world, launches_here=local_world > 1)


def check_strategy(extra: dict) -> None:
    """Refuse the strategies whose processes start inside fit(): transformers' data, plan and RNG files are set up
    per process before it."""
    strategy = extra.get("strategy")
    if isinstance(strategy, str) and strategy in _PROCESS_STARTING_STRATEGIES:
        raise ValueError(
            f"lightning_trainer_kwargs strategy={strategy!r} starts its processes inside fit(), after hf_lightning "
            "has sharded the data for this process. Use strategy='ddp' (Lightning's launcher re-runs the script in "
            "each process, as torchrun does) or launch with torchrun."
        )


class LightningDistributedState:
    """accelerate's PartialState as TrainingArguments reads it, with the topology Lightning runs.

    `num_processes`, `process_index`, `local_process_index` (so `args.world_size`, `should_log`, `should_save`, ...)
    come from the Topology; everything else (device, backend, ...) from accelerate's state underneath. Pickled (in
    training_args.bin) as that accelerate state, so the file loads without hf_lightning."""

    def __init__(self, topology: Topology, accelerate_state):
        self.topology = topology
        self.accelerate_state = accelerate_state

    num_processes = property(lambda self: self.topology.world_size)
    process_index = property(lambda self: self.topology.process_index)
    local_process_index = property(lambda self: self.topology.local_process_index)
    is_main_process = property(lambda self: self.topology.process_index == 0)
    is_local_main_process = property(lambda self: self.topology.local_process_index == 0)
    is_last_process = property(lambda self: self.topology.process_index == self.topology.world_size - 1)

    @property
    def distributed_type(self):
        own = getattr(self.accelerate_state, "distributed_type", DistributedType.NO)
        if own != DistributedType.NO or self.topology.world_size <= 1:
            return own
        return DistributedType.MULTI_GPU if torch.cuda.is_available() else DistributedType.MULTI_CPU

    def wait_for_everyone(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def __getattr__(self, name: str):
        if name in ("topology", "accelerate_state"):  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.accelerate_state, name)

    def __reduce_ex__(self, protocol):
        # protocol 1's form (a reconstructor call): protocol 2's __newobj__ would insist on this class
        return self.accelerate_state.__reduce_ex__(1)

    def __repr__(self) -> str:
        return f"LightningDistributedState({self.topology})"


def adopt_topology(args) -> Topology:
    """Give `args` the topology Lightning will run (see the module docstring); returns it."""
    extra = dict(getattr(args, "lightning_trainer_kwargs", None) or {})
    check_strategy(extra)
    found = topology(extra)
    _ = args.device  # transformers' own device setup first: it would replace distributed_state later otherwise
    state = args.distributed_state
    base = state.accelerate_state if isinstance(state, LightningDistributedState) else state
    if found.world_size > 1 or isinstance(state, LightningDistributedState):
        args.distributed_state = LightningDistributedState(found, base)
    return found


def use_script_launcher(trainer) -> None:
    """Swap Lightning's subprocess launcher of `trainer`'s strategy for `ScriptLauncher` (same launch, full env)."""
    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    if type(launcher) is compat.subprocess_script_launcher():
        compat.set_launcher(strategy, ScriptLauncher(launcher.cluster_environment, launcher.num_processes,
                                                     launcher.num_nodes))


class ScriptLauncher(compat.subprocess_script_launcher()):
    """Lightning's subprocess launcher; each child also gets `RANK` and `LOCAL_WORLD_SIZE`, so that accelerate (in
    the child's TrainingArguments) sees the rank Lightning gives it, and the script ends when all of them have."""

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        # what Lightning's launcher writes into the launching process (its LightningEnvironment reads it back)
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        for local_rank in range(1, self.num_processes):
            child = {**os.environ, "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(self.num_processes),
                     "RANK": str(env.node_rank() * self.num_processes + local_rank)}
            self.procs.append(subprocess.Popen(compat.script_command(), env=child))
        atexit.register(_wait_for, list(self.procs))


def _wait_for(procs: list) -> None:
    for proc in procs:
        proc.wait()
