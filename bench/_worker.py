"""One timed training run (a subprocess of bench/speed.py): prints one JSON line.

    python bench/_worker.py MODEL FRAMEWORK STEPS SPAWN_TIME [--phases] [--compile] [--losses]

FRAMEWORK is raw, hf, hl or hl-baseline. hl-baseline runs the same code as hl; bench/speed.py starts it with an older
checkout first on PYTHONPATH, so that `import hf_lightning` resolves there. For both, the JSON line records
`hf_lightning_file` (the `hf_lightning.__file__` that ran), which speed.py checks.

--phases also splits each step into the model's forward, the backward, the gradient clipping, the optimizer step and
the rest (data loading and everything the framework does around them), by timing those four calls (nested time is
counted once, in the innermost call): the rest is what a framework adds, without the run-to-run noise of the compute.

MODEL is mlp, bert, llama (speed.py's) or llama-s (the same Llama at batch 4 x 32 tokens, for bench/compile.py).

For the trainers (bench/compile.py): --compile sets `torch_compile=True`; --losses logs every step and records the
losses. Their JSON line also has `first_step_compute_s`, the first step from its on_step_begin to its on_step_end
(where torch.compile compiles).
"""

import time

T_START = time.time()

import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

model_name, framework, steps, spawn_time = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
PHASES = "--phases" in sys.argv
COMPILE, LOSSES = "--compile" in sys.argv, "--losses" in sys.argv
if framework == "raw" and (COMPILE or LOSSES):
    sys.exit("--compile and --losses are for the trainers (hf, hl), not the raw loop")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.manual_seed(0)
BATCH = {"mlp": 32, "bert": 16, "llama": 8, "llama-s": 4}[model_name]
SEQ = {"bert": 64, "llama": 128, "llama-s": 32}.get(model_name)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        if model_name == "mlp":
            self.rows = [{"x": torch.randn(32, generator=g), "labels": torch.tensor(i % 2)} for i in range(n)]
        else:
            ids = torch.randint(1, 1000, (n, SEQ), generator=g)
            labels = ids.clone() if model_name.startswith("llama") else torch.arange(n) % 2
            self.rows = [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                          "labels": labels[i]} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def build_model():
    model = _build_model()
    if PHASES:
        model.forward = timed("forward", model.forward)
    return model


def _build_model():
    import transformers

    if model_name == "mlp":
        return MLP()
    if model_name == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
            max_position_embeddings=SEQ, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ))


step_ends = []
step_begins = []
losses = []
phase_steps = []  # per step: seconds in each timed call
_phase_now = {"forward": 0.0, "backward": 0.0, "clip": 0.0, "optimizer": 0.0}
_phase_stack = []


def timed(name, fn):
    @functools.wraps(fn)  # keeps the signature: the trainers read forward's to pick the dataset columns
    def wrapper(*args, **kwargs):
        _phase_stack.append(0.0)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            nested = _phase_stack.pop()
            _phase_now[name] += elapsed - nested
            if _phase_stack:
                _phase_stack[-1] += elapsed

    return wrapper


def step_end():
    step_ends.append(time.time())
    if PHASES:
        phase_steps.append(dict(_phase_now))
        _phase_now.update(dict.fromkeys(_phase_now, 0.0))


if PHASES:
    torch.autograd.backward = timed("backward", torch.autograd.backward)
    torch.nn.utils.clip_grad_norm_ = timed("clip", torch.nn.utils.clip_grad_norm_)
    torch.optim.AdamW.step = timed("optimizer", torch.optim.AdamW.step)

data = Rows(BATCH * steps)

if framework == "raw":
    model = build_model()
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)
    # The same work as the trainers do: transformers' weight-decay groups (two, as in its *_no_trainer.py example
    # scripts), fused AdamW (its default on torch >= 2.8), clipping at 1.0 and a linear schedule.
    no_decay = ("bias", "LayerNorm.weight", "norm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay) == nd],
               "weight_decay": 0.0} for nd in (False, True)]
    optimizer = torch.optim.AdamW(groups, lr=5e-5, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    model.train()
    for batch in loader:
        loss = model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_end()
else:
    if framework == "hf":
        from transformers import Trainer, TrainerCallback, TrainingArguments
    else:
        from transformers import TrainerCallback

        from hf_lightning import Trainer, TrainingArguments  # hl-baseline: from the checkout on PYTHONPATH

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            step_begins.append(time.time())

        def on_step_end(self, args, state, control, **kwargs):
            step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in (logs or {}):
                losses.append(logs["loss"])

    args = TrainingArguments(f"/tmp/hfl-bench-{framework}", per_device_train_batch_size=BATCH, max_steps=steps,
                             logging_steps=1 if LOSSES else 10**6, save_strategy="no", report_to="none",
                             disable_tqdm=True,
                             use_cpu=True, dataloader_pin_memory=False, log_level="error", torch_compile=COMPILE)
    Trainer(build_model(), args=args, train_dataset=data, callbacks=[Clock()]).train()

deltas = [b - a for a, b in zip(step_ends[10:], step_ends[11:])]
result = {
    "first_step_s": step_ends[0] - spawn_time,
    "median_step_ms": 1000 * sorted(deltas)[len(deltas) // 2],
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}
if PHASES:  # medians over the same steps; "rest" = the step minus the four timed calls, per step
    timed_steps = phase_steps[11:]
    for name in _phase_now:
        values = sorted(p[name] for p in timed_steps)
        result[f"{name}_ms"] = 1000 * values[len(values) // 2]
    rest = sorted(d - sum(p.values()) for d, p in zip(deltas, timed_steps))
    result["rest_ms"] = 1000 * rest[len(rest) // 2]
if step_begins:
    result["first_step_compute_s"] = step_ends[0] - step_begins[0]
if LOSSES:
    result["losses"] = losses
if "hf_lightning" in sys.modules:
    result["hf_lightning_file"] = sys.modules["hf_lightning"].__file__
print(json.dumps(result))
