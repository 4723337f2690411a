"""Launched by tests/test_sharding.py with `torchrun --nproc_per_node N` (CPU, gloo): FSDP2 through `fsdp=True`.

    torchrun --nproc_per_node N fsdp_job.py MODE OUTPUT_DIR [--kill-at S] [--resume] [--lora]
    python fsdp_job.py MODE OUTPUT_DIR --devices 2   # Lightning's own launcher starts the second process

MODE: fsdp (TrainingArguments(fsdp=True)), ddp (the same run without it), mp (a ModelParallelStrategy passed in
lightning_trainer_kwargs), tp (parallelism_config tp_size=2: the model's tp plan), single (one process
without a launcher: `python fsdp_job.py single OUT`), options (the legacy string "full_shard auto_wrap" and the other fsdp_config switches, rank 1
starting from other weights that cpu_ram_efficient_loading replaces by rank 0's). --kill-at S: rank 0 SIGKILLs itself at the end of step S, before that step's save
(torchrun then ends rank 1). --lora: a LoRA-wrapped model (frozen base, trainable adapters).
Writes history.json, final/ (save_model, called on every rank as with transformers under FSDP), eval.json
(tp and single: evaluate() of 37 rows) and numel_<rank>.json (this rank's local parameter and optimizer-state
element counts).
"""

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import transformers

import hf_lightning
from helpers import lm_dataset, tiny_llama

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["fsdp", "ddp", "mp", "mp_name", "options", "tp", "single"])
parser.add_argument("output_dir")
parser.add_argument("--kill-at", type=int)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--max-steps", type=int, default=8)
parser.add_argument("--dump-at-begin", action="store_true", help="write the resumed weights and optimizer state")
parser.add_argument("--lora", action="store_true")
parser.add_argument("--lightning-door", help="then fit(ckpt_path=THIS folder) and save_model to final_door/")
parser.add_argument("--devices", type=int, help="lightning_trainer_kwargs devices: Lightning launches the processes")
cli = parser.parse_args()
rank = int(os.environ.get("RANK", "0"))  # Lightning's launcher sets it in the processes it starts


class KillAt(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == cli.kill_at and rank == 0:  # before this step's save: the previous one resumes
            os.kill(os.getpid(), signal.SIGKILL)


class LocalNumel(transformers.TrainerCallback):
    """Elements this rank holds: its parameter shards and its optimizer state (after the first step)."""

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != 1:
            return
        local = lambda t: t.to_local().numel() if hasattr(t, "to_local") else t.numel()  # noqa: E731
        params = sum(local(p) for p in model.parameters())
        opt = sum(local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        with open(os.path.join(args.output_dir, f"numel_{rank}.json"), "w") as f:
            json.dump({"params": params, "optimizer": opt,
                       "full_params": sum(p.numel() for p in model.parameters())}, f)


class DumpAtBegin(transformers.TrainerCallback):
    """The full weights and optimizer state this run starts from (after a resume), as rank 0 sees them."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        optim = get_optimizer_state_dict(model, optimizer, options=options)
        if rank == 0:
            torch.save({"weights": weights, "optimizer": optim["state"]}, os.path.join(args.output_dir, "begin.pt"))


extra = {}
model = tiny_llama()
if cli.mode == "options":
    extra["fsdp"] = "full_shard auto_wrap"
    extra["fsdp_config"] = {"reshard_after_forward": False, "activation_checkpointing": True,
                            "cpu_ram_efficient_loading": True, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}
    if rank == 1:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
if cli.lora:
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
if cli.mode == "fsdp":
    extra["fsdp"] = True
elif cli.mode == "mp":
    from lightning.pytorch.strategies import ModelParallelStrategy

    world = int(os.environ["WORLD_SIZE"])
    extra["lightning_trainer_kwargs"] = {
        "strategy": ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)}
elif cli.mode == "mp_name":  # Lightning's way of naming it: FSDP2 as fsdp=True runs it
    extra["lightning_trainer_kwargs"] = {"strategy": "model_parallel"}
elif cli.mode == "tp":
    from accelerate import ParallelismConfig

    extra["parallelism_config"] = ParallelismConfig(tp_size=2)
elif cli.mode == "single":
    extra["ddp_backend"] = None  # transformers' TrainingArguments refuses a backend outside a launcher
if cli.devices:  # no ddp_backend: transformers' TrainingArguments fails with it outside a launcher (gloo on CPU anyway)
    extra.update(lightning_trainer_kwargs={**extra.get("lightning_trainer_kwargs", {}), "devices": cli.devices},
                 ddp_backend=None)
args = hf_lightning.TrainingArguments(
    cli.output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=cli.max_steps,
    logging_steps=1, learning_rate=5e-3, save_steps=2, report_to="none", disable_tqdm=True, use_cpu=True, seed=3,
    max_grad_norm=0.5, per_device_eval_batch_size=1, **({"ddp_backend": "gloo"} | extra),
)
os.makedirs(cli.output_dir, exist_ok=True)
callbacks = [LocalNumel()] + ([KillAt()] if cli.kill_at else []) + ([DumpAtBegin()] if cli.dump_at_begin else [])
evaluation = {}
if cli.mode in ("tp", "single"):  # 37 rows, one per batch: each TP rank evaluates them all, compute_metrics sees 37
    evaluation = dict(eval_dataset=lm_dataset(37, seed=1),
                      compute_metrics=lambda p: {"rows": len(p.label_ids), "first_labels": p.label_ids[:, 0].tolist()})
trainer = hf_lightning.Trainer(model, args=args, train_dataset=lm_dataset(40), callbacks=callbacks, **evaluation)
trainer.train(resume_from_checkpoint=True if cli.resume else None)
trainer.save_model(os.path.join(cli.output_dir, "final"))
if evaluation:
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        with open(os.path.join(cli.output_dir, "eval.json"), "w") as f:
            json.dump(metrics, f)
if cli.lightning_door:
    trainer.lightning_trainer.fit(trainer.lightning_module, ckpt_path=cli.lightning_door)
    trainer.save_model(os.path.join(cli.output_dir, "final_door"))
if trainer.is_world_process_zero():
    with open(os.path.join(cli.output_dir, "history.json"), "w") as f:
        json.dump(trainer.state.log_history, f)
    print("STRATEGY", type(trainer.lightning_trainer.strategy).__name__, flush=True)
    from torch.distributed.fsdp import FSDPModule

    sharded = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
    print("OPTIONS", model.is_activation_checkpointing, sharded, flush=True)
