"""What each process holds under FSDP2 (`fsdp=True`) vs DDP: 2 CPU processes (torchrun, gloo), hf_lightning.Trainer.

A Llama from config (4 layers, hidden 256: 7.3M parameters) trains 2 steps with AdamW under each strategy. Reported per
rank: the elements of its local parameters (the shards under FSDP2) and of its optimizer state (exp_avg, exp_avg_sq),
summed over tensors after the first step. DDP replicates both on every rank; FSDP2 should hold about half of each.

    python bench/fsdp_memory.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

HERE = os.path.abspath(__file__)


def worker(mode: str, out: str) -> None:
    import torch
    import transformers
    from datasets import Dataset

    import hf_lightning

    rank = int(os.environ["RANK"])

    class LocalNumel(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step != 1:
                return
            local = lambda t: t.to_local().numel() if hasattr(t, "to_local") else t.numel()  # noqa: E731
            params = sum(local(p) for p in model.parameters())
            opt = sum(local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
            with open(os.path.join(out, f"{mode}_{rank}.json"), "w") as f:
                json.dump({"params": params, "optimizer": opt}, f)

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64))
    ids = torch.randint(0, 8000, (16, 32), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = hf_lightning.TrainingArguments(
        os.path.join(out, mode), per_device_train_batch_size=2, max_steps=2, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, ddp_backend="gloo", fsdp=(mode == "fsdp2") or None)
    hf_lightning.Trainer(model, args=args, train_dataset=data, callbacks=[LocalNumel()]).train()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tempfile.mkdtemp(prefix="fsdp_memory_")
    try:
        for mode in ("ddp", "fsdp2"):
            subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), HERE, "--worker",
                            mode, out], check=True, capture_output=True, text=True)
        rows = {mode: [json.load(open(os.path.join(out, f"{mode}_{rank}.json"))) for rank in (0, 1)]
                for mode in ("ddp", "fsdp2")}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print("| rank | DDP params | FSDP2 params | ratio | DDP optimizer state | FSDP2 optimizer state | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rank in (0, 1):
        ddp, fsdp = rows["ddp"][rank], rows["fsdp2"][rank]
        print(f"| {rank} | {ddp['params']:,} | {fsdp['params']:,} | {fsdp['params'] / ddp['params']:.3f} | "
              f"{ddp['optimizer']:,} | {fsdp['optimizer']:,} | {fsdp['optimizer'] / ddp['optimizer']:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
