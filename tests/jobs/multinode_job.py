"""Launched by tests/test_multinode.py as one process per "node" on this machine (CPU, gloo):

    torchrun --nnodes 2 --nproc_per_node 1 --node_rank N --master_addr 127.0.0.1 --master_port P \
        multinode_job.py FRAMEWORK OUTPUT_DIR N ON_EACH_NODE
    SLURM_NTASKS=2 SLURM_PROCID=N ... python multinode_job.py hl OUTPUT_DIR N ON_EACH_NODE   # simulated srun task

ON_EACH_NODE ("1"/"0") sets log_on_each_node and save_on_each_node; with "1" every node writes its own
checkpoints, so each node gets its own folder OUTPUT_DIR/nodeN (as on real nodes with local disks).
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers

import hf_lightning
from helpers import lm_dataset, tiny_llama

framework, root, node, on_each_node = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
output_dir = os.path.join(root, f"node{node}") if on_each_node else root
args_cls = transformers.TrainingArguments if framework == "hf" else hf_lightning.TrainingArguments
trainer_cls = transformers.Trainer if framework == "hf" else hf_lightning.Trainer
# ddp_backend only where a launcher set RANK: transformers' TrainingArguments asks accelerate for a gloo group,
# which it cannot create without it (under SLURM, Lightning's strategy creates the group).
backend = {"ddp_backend": "gloo"} if "RANK" in os.environ else {}
args = args_cls(
    output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2, logging_steps=1,
    learning_rate=5e-3, eval_strategy="epoch", save_strategy="epoch", report_to="none", disable_tqdm=True,
    use_cpu=True, seed=3, log_level="info", log_level_replica="error", log_on_each_node=on_each_node,
    save_on_each_node=on_each_node, **backend,
)
trainer = trainer_cls(tiny_llama(), args=args, train_dataset=lm_dataset(22), eval_dataset=lm_dataset(6, seed=5))
trainer.train()
trainer.save_model(os.path.join(output_dir, "final"))  # written where args.should_save
a = trainer.args
seen = {
    "world_size": a.world_size, "process_index": a.process_index, "local_process_index": a.local_process_index,
    "should_log": a.should_log, "should_save": a.should_save,
    "levels": {name: logging.getLogger(name).getEffectiveLevel() for name in ("transformers", "hf_lightning")},
}
with open(os.path.join(root, f"seen_{a.process_index}.json"), "w") as f:
    json.dump(seen, f)
if trainer.is_world_process_zero():
    with open(os.path.join(root, "history.json"), "w") as f:
        json.dump(trainer.state.log_history, f)
if framework == "hf":  # transformers 5.24 may abort at exit without it (see ddp_job.py)
    trainer.end()
