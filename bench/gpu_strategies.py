"""Sharded strategies on the GPUs of one machine (run by bench/gpu_strategies.sh): Llama-125M from config, bf16,
16 x 1024 tokens per optimizer step, ~30 steps, through hf_lightning and through transformers.Trainer with the same
TrainingArguments: DDP, FSDP1, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

Each (framework, strategy) runs in its own `torchrun --nproc_per_node <GPUs>` with a timeout; a failing one prints
FAILED and its last error line, and the rest go on. Prints tokens/s, peak memory and the loss curve side by side.
No `datasets` (the data are tensors); DeepSpeed rows are skipped when the package is not installed.

    python bench/gpu_strategies.py [--steps 30] [--timeout 75] [--budget 450]
    python bench/gpu_strategies.py --worker hl zero2 --out result.json   # one row, inside torchrun
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


def run_row(framework: str, strategy: str, steps: int, gpus: int, timeout: float) -> dict | str:
    """One row in its own torchrun; the result, or the reason it failed (its last error line)."""
    torchrun = shutil.which("torchrun") or shutil.which("torchrun", path=os.path.dirname(sys.executable))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(gpus), os.path.abspath(__file__),
               "--worker", framework, strategy, "--steps", str(steps), "--out", out]
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
    parser.add_argument("--out")
    opts = parser.parse_args()
    if opts.worker:
        worker(*opts.worker, opts.steps, opts.out)
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
