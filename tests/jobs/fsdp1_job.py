"""Launched by tests/test_gpu_checkpoints.py with `torchrun --nproc_per_node 2` (CPU, gloo): torch's FSDP1
(FullyShardedDataParallel) root as Lightning's FSDPStrategy builds it on GPUs (the LightningModule wrapped, decoder
layers auto-wrapped, use_orig_params=True, activation checkpointing applied after wrapping), held by a real
FSDPStrategy (hf_lightning's FolderFSDPStrategy) as its `model`; then the functions checkpoint.py calls for FSDP1
(gpu_checkpoints.py, sharding.py):

    python -m torch.distributed.run --nproc_per_node 2 fsdp1_job.py OUTPUT_DIR

Trains 2 steps, writes checkpoint-2/ (consolidated model.safetensors written by rank 0, optimizer_0/ DCP, the
training-state files), then moves the optimizer folder between FSDP1 and unsharded runs (its names are the
transformers model's, as under FSDP2 and DDP):

* FSDP1 -> DDP: each rank a plain model whose optimizer reads optimizer_0/; its moments against the FSDP1 root's
  (gathered whole). That optimizer writes the folder again (DDP's checkpoint);
* DDP -> FSDP1: a root built from other weights resumes the folder as FolderFSDPStrategy.load_checkpoint does
  (sharding.load_checkpoint_folder through FolderCheckpointIO), then takes the same next two steps as the trained one;
* FSDP1 -> one process: after the process group is gone, rank 0 reads the FSDP1-written folder into a plain model.

Rank 0 prints one JSON line: what was written, the from_pretrained logits against the trained root's, the next two
losses on both roots, per unsharded run the names whose optimizer state differs from the trained root's, the entries
of the checkpoint dict the FSDP1 resume built, which strategies get a "state_dict" entry there.
"""

import json
import os
import shutil
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist
import transformers
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from hf_lightning import checkpoint, gpu_checkpoints, sharding
from hf_lightning.gpu_strategies import FolderFSDPStrategy

folder = os.path.join(sys.argv[1], "checkpoint-2")
dist.init_process_group("gloo")
rank = dist.get_rank()


def tied_llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


class Module(torch.nn.Module):  # the LightningModule's shape: the transformers model as `model`
    def __init__(self, seed):
        super().__init__()
        self.model = tied_llama(seed)

    def forward(self, ids):
        return self.model(input_ids=ids, labels=ids).loss


def strategy_for(seed):
    module = Module(seed)
    layer = type(module.model.model.layers[0])
    root = FullyShardedDataParallel(module, auto_wrap_policy=ModuleWrapPolicy({layer}), use_orig_params=True,
                                    device_id=torch.device("cpu"))
    apply_activation_checkpointing(root, check_fn=lambda sub: isinstance(sub, layer))  # as Lightning, after wrapping
    strategy = FolderFSDPStrategy()
    strategy.model = root
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-2)
    strategy.optimizers = [optimizer]
    module.trainer = SimpleNamespace(strategy=strategy)  # what lightning_checkpoint_from_folder reads of the module
    return strategy, root, module, optimizer


def step(root, optimizer, ids):
    loss = root(ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def moments(state: dict, prefix: str = "") -> dict:
    """The Adam state of an FQN-keyed optimizer state dict, by the transformers model's names."""
    return {k[len(prefix):]: s for k, s in state["state"].items()}


def differing(got: dict, expected: dict) -> list:
    """The parameter names whose optimizer state (step, exp_avg, exp_avg_sq) is not exactly `expected`'s, or absent."""
    return sorted(k for k in set(got) | set(expected) if k not in got or k not in expected or got[k].keys() !=
                  expected[k].keys() or not all(torch.equal(got[k][n], expected[k][n]) for n in got[k]))


def plain_optimizer(folder: str):
    """A plain model's optimizer (DDP or one process) resumed from the DCP folder, and its Adam state."""
    plain = tied_llama(2)
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    sharding.load_optimizer(plain, adamw, folder)
    return plain, adamw, moments(get_optimizer_state_dict(plain, adamw))


batches = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10 * i + rank)) for i in range(4)]
strategy, root, module, optimizer = strategy_for(0)
model = module.model
for ids in batches[:2]:
    step(root, optimizer, ids)

# what checkpoint.save_checkpoint / model_folder_writer do under FSDP1
weights = gpu_checkpoints.full_state_dict(strategy, model, folder)
sharding.save_optimizer(gpu_checkpoints.optimizer_root(strategy, model), optimizer,
                        os.path.join(folder, sharding.OPTIMIZER_DIR))
torch.save(checkpoint.rng_state(), os.path.join(folder, f"rng_state_{rank}.pth"))
if rank == 0:
    model.save_pretrained(folder, state_dict=dict(weights))
    transformers.TrainerState(global_step=2).save_to_json(os.path.join(folder, checkpoint.TRAINER_STATE_NAME))
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), lambda _: 1.0)
    torch.save(scheduler.state_dict(), os.path.join(folder, checkpoint.SCHEDULER_NAME))
# gathered whole on every rank (offloading a root that computes on the CPU reads freed memory, gpu_checkpoints.py)
trained = moments(get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True)),
                  gpu_checkpoints.PREFIX)
dist.barrier()
probe = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(99))
with torch.no_grad(), FullyShardedDataParallel.summon_full_params(root, writeback=False):
    expected = model(input_ids=probe).logits
loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
with torch.no_grad():
    got = loaded(input_ids=probe).logits

# FSDP1 -> DDP, then DDP's own checkpoint of that optimizer in place of FSDP1's
fsdp1_optimizer = os.path.join(sys.argv[1], "optimizer-fsdp1")
ddp_model, ddp_optimizer, ddp_moments = plain_optimizer(os.path.join(folder, sharding.OPTIMIZER_DIR))
dist.barrier()
if rank == 0:
    shutil.move(os.path.join(folder, sharding.OPTIMIZER_DIR), fsdp1_optimizer)
dist.barrier()
sharding.save_optimizer(ddp_model, ddp_optimizer, os.path.join(folder, sharding.OPTIMIZER_DIR))

# DDP -> FSDP1: other weights, everything comes back through the folder
resumed_strategy, resumed_root, resumed_module, resumed_optimizer = strategy_for(1)
resumed_strategy.checkpoint_io = checkpoint.FolderCheckpointIO(SimpleNamespace(world_size=2, process_index=rank))
resumed_strategy.checkpoint_io.module = resumed_module
resumed = sharding.load_checkpoint_folder(resumed_strategy, folder, None, optimizer_model=resumed_root)
result = {
    "weight_keys": sorted(weights), "files": sorted(os.listdir(folder)),
    "from_pretrained_max_diff": (got - expected).abs().max().item(),
    "next": [step(root, optimizer, ids) for ids in batches[2:]],
    "resumed_next": [step(resumed_root, resumed_optimizer, ids) for ids in batches[2:]],
    "resumed_entries": sorted(resumed), "trained_moments": sorted(trained),
    "trained_steps": sorted({int(v["step"]) for v in trained.values()}),
    "ddp_differing": differing(ddp_moments, trained),
    "restores_state_dict_entry": {type(s).__name__: gpu_checkpoints.restores_state_dict_entry(s) for s in (
        FSDPStrategy(), ModelParallelStrategy(), DDPStrategy(), SingleDeviceStrategy("cpu"))},
}
dist.barrier()
dist.destroy_process_group()
if rank == 0:  # FSDP1 -> one process, no process group
    result["one_process_differing"] = differing(plain_optimizer(fsdp1_optimizer)[2], trained)
    print(json.dumps(result))
