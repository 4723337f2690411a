"""Launched by tests/test_gpu_checkpoints.py with `torchrun --nproc_per_node 2` (CPU, gloo): torch's FSDP1
(FullyShardedDataParallel) root as Lightning's FSDPStrategy builds it on GPUs (the LightningModule wrapped, decoder
layers auto-wrapped, use_orig_params=True, activation checkpointing applied after wrapping), held by a real
FSDPStrategy as its `model`; then the functions checkpoint.py calls for FSDP1 (gpu_checkpoints.py, sharding.py):

    python -m torch.distributed.run --nproc_per_node 2 fsdp1_job.py OUTPUT_DIR

Trains 2 steps, writes checkpoint-2/ (consolidated model.safetensors written by rank 0, optimizer_0/ DCP), resumes
a root built from other weights through checkpoint._load_weights and the DCP optimizer, takes the same next step on
both. Rank 0 prints one JSON line: what was written, the from_pretrained logits against the trained root's, the
losses of the next two steps on both roots.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist
import transformers
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from hf_lightning import checkpoint, gpu_checkpoints, sharding

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
    strategy = FSDPStrategy()
    strategy.model = root
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-2)
    return strategy, root, module.model, optimizer


def step(root, optimizer, ids):
    loss = root(ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


batches = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10 * i + rank)) for i in range(4)]
strategy, root, model, optimizer = strategy_for(0)
for ids in batches[:2]:
    step(root, optimizer, ids)

# what checkpoint.save_checkpoint / model_folder_writer do under FSDP1
weights = gpu_checkpoints.full_state_dict(strategy, model, folder)
sharding.save_optimizer(gpu_checkpoints.optimizer_root(strategy, model), optimizer,
                        os.path.join(folder, sharding.OPTIMIZER_DIR))
if rank == 0:
    model.save_pretrained(folder, state_dict=dict(weights))
dist.barrier()
probe = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(99))
with torch.no_grad(), FullyShardedDataParallel.summon_full_params(root, writeback=False):
    expected = model(input_ids=probe).logits
loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
with torch.no_grad():
    got = loaded(input_ids=probe).logits

resumed_strategy, resumed_root, resumed_model, resumed_optimizer = strategy_for(1)  # other weights: all come back
checkpoint._load_weights(resumed_model, folder, resumed_strategy)
sharding.load_optimizer(gpu_checkpoints.optimizer_root(resumed_strategy, resumed_model), resumed_optimizer,
                        os.path.join(folder, sharding.OPTIMIZER_DIR))
result = {
    "weight_keys": sorted(weights), "files": sorted(os.listdir(folder)),
    "from_pretrained_max_diff": (got - expected).abs().max().item(),
    "next": [step(root, optimizer, ids) for ids in batches[2:]],
    "resumed_next": [step(resumed_root, resumed_optimizer, ids) for ids in batches[2:]],
}
if rank == 0:
    print(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
