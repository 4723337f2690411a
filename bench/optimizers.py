"""Peak memory and step time of the guide's memory-saving optimizers on a ~100M-parameter Llama (from config),
transformers.Trainer vs hf_lightning.Trainer, each run in its own process (peak RSS on CPU; on a GPU run it with
--device cuda for peak GPU memory).

    python bench/optimizers.py [--steps 4] [--optims adamw_torch galore_adamw galore_adamw_layerwise lomo adalomo]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(framework: str, optim: str, steps: int) -> dict:
    import torch
    import transformers

    import hf_lightning

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=8, num_attention_heads=10,
        num_key_value_heads=10, max_position_embeddings=128))
    ids = torch.randint(0, 32000, (2 * steps, 128))
    data = [{"input_ids": row, "labels": row} for row in ids]
    ends = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.time())

    trainer_cls = transformers.Trainer if framework == "hf" else hf_lightning.Trainer
    args_cls = transformers.TrainingArguments if framework == "hf" else hf_lightning.TrainingArguments
    args = args_cls("/tmp/bench-optim", per_device_train_batch_size=2, max_steps=steps, optim=optim,
                    optim_target_modules=[r".*.attn.*", r".*.mlp.*"] if "galore" in optim else None,
                    save_strategy="no", report_to="none", disable_tqdm=True, log_level="error", learning_rate=1e-4)
    trainer = trainer_cls(model, args=args, train_dataset=data, callbacks=[Clock()])
    try:
        trainer.train()
    except Exception as err:  # noqa: BLE001 - reported, e.g. transformers' AdaLomo on a CPU-only machine
        return {"error": f"{type(err).__name__}: {str(err)[:80]}"}
    deltas = sorted(b - a for a, b in zip(ends, ends[1:]))
    return {"step_s": deltas[len(deltas) // 2] if deltas else float("nan"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--optims", nargs="+",
                        default=["adamw_torch", "galore_adamw", "galore_adamw_layerwise", "lomo", "adalomo"])
    parser.add_argument("--worker", nargs=2)
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts.worker[0], opts.worker[1], opts.steps)))
        return
    print("| optim | framework | median step (s) | peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    for optim in opts.optims:
        for framework, name in (("hf", "transformers.Trainer"), ("hl", "hf_lightning.Trainer")):
            out = subprocess.run([sys.executable, __file__, "--worker", framework, optim, "--steps", str(opts.steps)],
                                 capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
                "error": out.stderr.strip().splitlines()[-1][:80]}
            if "error" in result:
                print(f"| {optim} | {name} | fails: {result['error']} | |")
            else:
                print(f"| {optim} | {name} | {result['step_s']:.2f} | {result['peak_rss_mb']:.0f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
