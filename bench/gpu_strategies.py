"""Sharded strategies on the GPUs of one machine (run by bench/gpu_strategies.sh): Llama-125M from config, bf16,
16 x 1024 tokens per optimizer step, ~30 steps, through hf_lightning and through transformers.Trainer with the same
TrainingArguments: DDP, FSDP1, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

Each (framework, strategy) runs in its own `torchrun --nproc_per_node <GPUs>` with a timeout; a failing one prints
FAILED and its last error line, and the rest go on. Prints tokens/s, peak memory and the loss curve side by side.
No `datasets` (the data are tensors); DeepSpeed rows are skipped when the package is not installed.

    python bench/gpu_strategies.py [--steps 30] [--timeout 75] [--budget 450]
    python bench/gpu_strategies.py --worker hl zero2 --out result.json   # one row, inside torchrun

First, per strategy in RESUME_STRATEGIES (FSDP1, ZeRO-2, ZeRO-3; any number of GPUs, one included), a resume check
through hf_lightning on a small Llama: train RESUME_STEPS steps saving at half way, resume a new Trainer from that
checkpoint, compare the final loss and weights with the uninterrupted run, and from_pretrained the checkpoint's
model.safetensors; one line per strategy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

STRATEGIES = ["ddp", "fsdp1", "fsdp2", "zero2", "zero3"]
RESUME_STRATEGIES = ["fsdp1", "zero2", "zero3"]
RESUME_STEPS = 8
FRAMEWORKS = ["hl", "hf"]
TOKENS, SEQ = 16 * 1024, 1024


def strategy_arguments(strategy: str) -> dict:
    """The TrainingArguments fields a transformers user sets for each strategy (the same for both frameworks)."""
    layer = {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    zero = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}
    return {
        "ddp": {},
        "fsdp1": {"fsdp": "full_shard", "fsdp_config": {"version": 1, **layer}},
        "fsdp2": {"fsdp": "full_shard", "fsdp_config": {"version": 2, **layer}},
        "zero2": {"deepspeed": {**zero, "zero_optimization": {"stage": 2, "overlap_comm": True}}},
        "zero3": {"deepspeed": {**zero, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                              "stage3_prefetch_bucket_size": "auto",
                                                              "stage3_param_persistence_threshold": "auto"}}},
    }[strategy]


def worker(framework: str, strategy: str, steps: int, out: str) -> None:
    import torch
    import transformers

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = max(TOKENS // SEQ // world, 1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=SEQ)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 32000, (per_device * world * steps, SEQ), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": ids[i], "labels": ids[i]} for i in range(len(ids))]
    if framework == "hf":
        from transformers import Trainer, TrainerCallback, TrainingArguments
    else:
        from transformers import TrainerCallback

        from hf_lightning import Trainer, TrainingArguments
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            ends.append(time.time())

    args = TrainingArguments(os.path.join(tempfile.gettempdir(), f"gpu-strategies-{framework}-{strategy}"),
                             per_device_train_batch_size=per_device, max_steps=steps, bf16=True, logging_steps=1,
                             save_strategy="no", report_to="none", disable_tqdm=True, lr_scheduler_type="constant",
                             learning_rate=3e-4, seed=0, **strategy_arguments(strategy))
    trainer = Trainer(model, args=args, train_dataset=rows, callbacks=[Clock()])
    trainer.train()
    if trainer.is_world_process_zero():
        deltas = sorted(b - a for a, b in zip(ends[5:], ends[6:]))
        step_s = deltas[len(deltas) // 2] if deltas else float("nan")
        result = {"framework": framework, "strategy": strategy, "processes": world, "median_step_ms": 1000 * step_s,
                  "tokens_per_s": per_device * world * SEQ / step_s,
                  "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
                  "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}
        with open(out, "w") as f:
            json.dump(result, f)


def resume_worker(strategy: str, steps: int, out: str) -> None:
    """Uninterrupted run saving at steps/2 and steps, then a new Trainer resumed from checkpoint-<steps/2>."""
    import safetensors.torch
    import torch
    import transformers

    from hf_lightning import Trainer, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    seq, per_device = 256, max(8 // world, 1)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq)
    ids = torch.randint(0, 4096, (per_device * world * steps, seq), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": ids[i], "labels": ids[i]} for i in range(len(ids))]
    root = os.path.join(tempfile.gettempdir(), f"gpu-resume-{strategy}")

    def run(name: str, resume: str | None = None):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        args = TrainingArguments(os.path.join(root, name), per_device_train_batch_size=per_device, max_steps=steps,
                                 bf16=True, logging_steps=1, save_strategy="steps", save_steps=steps // 2,
                                 report_to="none", disable_tqdm=True, learning_rate=1e-3, seed=0,
                                 **strategy_arguments(strategy))
        trainer = Trainer(model, args=args, train_dataset=rows)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, [e["loss"] for e in trainer.state.log_history if "loss" in e]

    shutil.rmtree(root, ignore_errors=True)
    straight, losses = run("straight")
    half = os.path.join(root, "straight", f"checkpoint-{steps // 2}")
    resumed, resumed_losses = run("resumed", resume=half)
    if not straight.is_world_process_zero():
        return
    final = [safetensors.torch.load_file(os.path.join(root, name, f"checkpoint-{steps}", "model.safetensors"))
             for name in ("straight", "resumed")]
    weight_diff = max((final[0][k].float() - final[1][k].float()).abs().max().item() for k in final[0])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(half)
    half_weights = safetensors.torch.load_file(os.path.join(half, "model.safetensors"))
    loaded_ok = all(torch.equal(loaded.state_dict()[k].to(v.dtype), v) for k, v in half_weights.items())
    with open(out, "w") as f:
        json.dump({"strategy": strategy, "processes": world, "files": sorted(os.listdir(half)),
                   "loss": losses[-1], "resumed_loss": resumed_losses[-1], "weights_max_diff": weight_diff,
                   "from_pretrained": loaded_ok, "params": sum(v.numel() for v in half_weights.values())}, f)


def run_row(framework: str, strategy: str, steps: int, gpus: int, timeout: float) -> dict | str:
    """One row in its own torchrun; the result, or the reason it failed (its last error line)."""
    torchrun = shutil.which("torchrun") or shutil.which("torchrun", path=os.path.dirname(sys.executable))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        worker_args = ["--resume-worker", strategy] if framework == "resume" else ["--worker", framework, strategy]
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(gpus), os.path.abspath(__file__), *worker_args,
               "--steps", str(steps), "--out", out]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s"
        if proc.returncode != 0 or not os.path.isfile(out):
            lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
            errors = [line for line in lines if "Error" in line or "error" in line]
            return (errors or lines or [f"exit {proc.returncode}"])[-1].strip()[:300]
        with open(out) as f:
            return json.load(f)


def table(results: dict) -> None:
    marks = [0, 9, 19, -1]  # loss at steps 1, 10, 20 and the last one
    print("| strategy | framework | tokens/s | step (ms) | peak GB | loss @1 / @10 / @20 / last |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (strategy, framework), result in results.items():
        if isinstance(result, str):
            print(f"| {strategy} | {framework} | {result} | | | |")
            continue
        losses = result["losses"]
        curve = " / ".join(f"{losses[i]:.4f}" for i in marks if -len(losses) <= i < len(losses))
        print(f"| {strategy} | {framework} | {result['tokens_per_s']:,.0f} | {result['median_step_ms']:.1f} | "
              f"{result['peak_mem_gb']:.1f} | {curve} |")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=75, help="seconds per row")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all rows; later rows are skipped")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "STRATEGY"))
    parser.add_argument("--resume-worker", metavar="STRATEGY")
    parser.add_argument("--resume-budget", type=float, default=150, help="seconds for the resume checks (first)")
    parser.add_argument("--out")
    opts = parser.parse_args()
    if opts.worker:
        worker(*opts.worker, opts.steps, opts.out)
        return 0
    if opts.resume_worker:
        resume_worker(opts.resume_worker, opts.steps, opts.out)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("SKIP: bench/gpu_strategies needs CUDA GPUs and this machine has none (nothing was run).")
        return 0
    gpus = torch.cuda.device_count()
    print(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}; {opts.steps} steps per row, "
          f"{TOKENS} tokens per step, bf16")
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    start = time.time()
    for strategy in RESUME_STRATEGIES:
        if strategy.startswith("zero") and not has_deepspeed:
            print(f"resume {strategy}: skipped: deepspeed is not installed (WHEELS=dir with its wheel)")
            continue
        if time.time() - start > opts.resume_budget:
            print(f"resume {strategy}: skipped: the {opts.resume_budget:.0f} s budget is spent")
            continue
        r = run_row("resume", strategy, RESUME_STEPS, gpus, opts.timeout)
        if isinstance(r, str):
            print(f"resume {strategy}: FAILED: {r}")
            continue
        folder = "+".join(n for n in ("model.safetensors", "latest", "optimizer_0") if n in r["files"])
        print(f"resume {strategy} ({r['processes']} proc): checkpoint-{RESUME_STEPS // 2} holds {folder}; final loss "
              f"{r['loss']:.5f} straight vs {r['resumed_loss']:.5f} resumed (diff {abs(r['loss'] - r['resumed_loss']):.1e}),"
              f" weights max|diff| {r['weights_max_diff']:.1e}, from_pretrained "
              f"{'ok' if r['from_pretrained'] else 'MISMATCH'} ({r['params'] / 1e6:.1f}M)", flush=True)
    results: dict = {}
    for strategy in opts.strategies:
        for framework in FRAMEWORKS:
            if strategy.startswith("zero") and not has_deepspeed:
                results[strategy, framework] = "skipped: deepspeed is not installed (WHEELS=dir with its wheel)"
            elif time.time() - start > opts.budget:
                results[strategy, framework] = f"skipped: the {opts.budget:.0f} s budget is spent"
            else:
                result = run_row(framework, strategy, opts.steps, gpus, opts.timeout)
                if isinstance(result, str) and not result.startswith("skipped"):
                    result = f"FAILED: {result}"
                results[strategy, framework] = result
            shown = results[strategy, framework]
            print(json.dumps({"strategy": strategy, "framework": framework,
                              **(shown if isinstance(shown, dict) else {"result": shown})}), flush=True)
    table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
