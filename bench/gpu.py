"""GPU check and speed (run by bench/gpu.sh on one NVIDIA GPU): Llama-125M from config, bf16, batch 16 x 1024 tokens.

Measures tokens/s of a raw PyTorch loop, transformers.Trainer and hf_lightning.Trainer (each also with
use_liger_kernel=True where liger-kernel is installed) on the same model and data,
interleaved in one process per framework, and prints one JSON line per run plus a Markdown table. Also checks that
hf_lightning's loss curve matches transformers' under bf16 on the GPU.

    python bench/gpu.py [--steps 30] [--frameworks raw hf hl hf_liger hl_liger]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def worker(framework: str, steps: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(config)
    batch, seq = 16, 1024
    ids = torch.randint(0, 32000, (batch * steps, seq))
    rows = [{"input_ids": ids[i], "labels": ids[i]} for i in range(len(ids))]
    ends: list[float] = []
    if framework == "raw":
        model = model.cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
        loader = torch.utils.data.DataLoader(rows, batch_size=batch)
        losses = []
        for b in loader:
            b = {k: v.cuda(non_blocking=True) for k, v in b.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            ends.append(time.time())
            losses.append(loss.item())
    else:
        if framework.startswith("hf"):
            from transformers import Trainer, TrainerCallback, TrainingArguments
        else:
            from transformers import TrainerCallback

            from hf_lightning import Trainer, TrainingArguments

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                torch.cuda.synchronize()
                ends.append(time.time())

        args = TrainingArguments(f"/tmp/gpu-{framework}", per_device_train_batch_size=batch, max_steps=steps,
                                 bf16=True, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                                 lr_scheduler_type="constant", use_liger_kernel=framework.endswith("_liger"))
        trainer = Trainer(model, args=args, train_dataset=rows, callbacks=[Clock()])
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    deltas = sorted(b - a for a, b in zip(ends[5:], ends[6:]))
    step_s = deltas[len(deltas) // 2]
    return {"framework": framework, "median_step_ms": 1000 * step_s, "tokens_per_s": batch * seq / step_s,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "losses": losses[:5]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--frameworks", nargs="+", default=["raw", "hf", "hl", "hf_liger", "hl_liger"])
    parser.add_argument("--worker")
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts.worker, opts.steps)))
        return
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None and any(f.endswith("_liger") for f in opts.frameworks):
        print("skipping hf_liger / hl_liger: liger-kernel is not installed (WHEELS=dir with its wheel, see gpu.sh)")
        opts.frameworks = [f for f in opts.frameworks if not f.endswith("_liger")]
    results: dict[str, list] = {f: [] for f in opts.frameworks}
    for _ in range(opts.rounds):
        for framework in opts.frameworks:
            out = subprocess.run([sys.executable, __file__, "--worker", framework, "--steps", str(opts.steps)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{framework} failed:\n{out.stderr[-3000:]}")
                continue
            line = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(line))
            results[framework].append(line)
    print("| framework | median step (ms) | tokens/s | vs raw | peak memory (GB) |")
    print("| --- | --- | --- | --- | --- |")
    raw = statistics.median(r["tokens_per_s"] for r in results.get("raw", [])) if results.get("raw") else None
    for framework, runs in results.items():
        if not runs:
            continue
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        ms = statistics.median(r["median_step_ms"] for r in runs)
        mem = max(r["peak_mem_gb"] for r in runs)
        print(f"| {framework} | {ms:.1f} | {tps:,.0f} | {tps / raw if raw else float('nan'):.3f} | {mem:.1f} |")


if __name__ == "__main__":
    main()
