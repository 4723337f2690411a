"""Save and resume cost of an 81M-parameter model: transformers.Trainer vs hf_lightning.Trainer (synchronous and
`async_save=True`), in one run.

Each measurement is a fresh process (`--one NAME`) that trains a Llama (81M parameters, from config) for 12 steps
with a save at step 4, then a fresh process resumes from that checkpoint. Reported, as medians over the rounds
(each round runs every framework once, so machine noise hits them alike): time of the save (on_save minus the step
end; for async_save, the time the training thread spends on it), the stall (the step interval that holds the save
minus the clean step: the median of the intervals that overlap no save's writing, a save's writing lasting until the
first step end that sees its folder in place, and not the first interval: what a save costs training at that step;
the same at the run's second save, step 8, where a process has written files before: the steady state of a long
run), the whole cost to training (the sum over the save's interval and every later one of its excess over the clean
step, both saves included: with async_save, the writer's competition for the cores shows up here), time from building a Trainer in a fresh process to the end of its
first step after train(resume_from_checkpoint=) (from the disk: the checkpoint's pages are evicted from the page cache
first, for every framework, as after a restart on another node), and the checkpoint folder's size. hf_lightning's
folders hold exactly transformers' files by default; `--export` adds a row with `save_lightning_checkpoint=True` (a
second copy of weights and optimizer in lightning.ckpt). The last row is a
plain PyTorch loop whose save clones the state on the training thread and writes it from a thread (the same two big
files, fsynced, renamed in): what any background writer costs training on this machine.

    python bench/checkpoint.py [--rounds 3] [--export]   # the 81M Llama (slow on CPU: run it on a quiet machine)
    python bench/checkpoint.py --cuda --rounds 2         # on a CUDA GPU, bf16, batch 32 (bench/gpu.sh runs it)
    python bench/checkpoint.py --threads 1               # training leaves a core to the writer (spare cores)
    python bench/checkpoint.py --only async_save --rounds 5   # transformers' row and the rows naming async_save
    python bench/checkpoint.py --tiny --rounds 1         # a 2-layer toy: checks that the script runs
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers

import hf_lightning


TINY = "--tiny" in sys.argv
CUDA = "--cuda" in sys.argv  # on the GPU, in bf16, with a larger batch (bench/gpu.sh runs it)
BATCH = 32 if CUDA else 2
THREADS = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else None
# what every measuring process gets from the command line
PASS = (["--tiny"] if TINY else []) + (["--cuda"] if CUDA else []) + (["--threads", str(THREADS)] if THREADS else [])
SAVE_AT, STEPS = 4, 12


def model():
    torch.manual_seed(0)
    if TINY:
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=8, num_attention_heads=10,
        num_key_value_heads=10, max_position_embeddings=128))


def folder_mb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


class Clock(transformers.TrainerCallback):
    def __init__(self, out, stop_at=None):
        self.marks, self.out, self.in_place, self.stop_at = {}, out, {}, stop_at

    def on_step_end(self, args, state, control, **kwargs):
        if CUDA:
            torch.cuda.synchronize()  # the step's kernels done: a step's time, not its launch
        self.marks.setdefault("step_end", {})[state.global_step] = time.time()
        self.in_place[state.global_step] = set(os.listdir(self.out)) if os.path.isdir(self.out) else set()
        if state.global_step == self.stop_at:
            control.should_training_stop = True

    def writing(self, save_step):
        """The step intervals a save's writing overlaps: from the save to the first step end that sees its folder."""
        seen = next((step for step in sorted(self.in_place) if step > save_step
                     and f"checkpoint-{save_step}" in self.in_place[step]), STEPS)
        return set(range(save_step + 1, seen + 1))

    def on_save(self, args, state, control, **kwargs):
        self.marks.setdefault("save", {})[state.global_step] = time.time()


RUNS = {  # name: (framework, extra TrainingArguments)
    "transformers.Trainer": ("hf", {}),
    "hf_lightning.Trainer": ("hl", {}),
    "hf_lightning, async_save=True": ("hl", {"async_save": True}),
    "hf_lightning, save_lightning_checkpoint=True": ("hl", {"save_lightning_checkpoint": True}),
    "raw loop, a writer thread": ("raw", {}),
}


def arguments(args_cls, out, extra):
    return args_cls(out, per_device_train_batch_size=BATCH, max_steps=STEPS, save_steps=SAVE_AT, report_to="none",
                    disable_tqdm=True, use_cpu=not CUDA, bf16=CUDA, log_level="error", **extra)


def run(name, root):
    framework, extra = RUNS[name]
    trainer_cls = transformers.Trainer if framework == "hf" else hf_lightning.Trainer
    args_cls = transformers.TrainingArguments if framework == "hf" else hf_lightning.TrainingArguments
    ids = torch.randint(0, 32000, (BATCH * STEPS, 128))
    data = [{"input_ids": row, "labels": row} for row in ids]
    out = os.path.join(root, "run")
    clock = Clock(out)
    if framework == "raw":
        raw_train(ids, out, clock)
    else:
        trainer_cls(model(), args=arguments(args_cls, out, extra), train_dataset=data, callbacks=[clock]).train()
    ends = clock.marks["step_end"]
    save_s = clock.marks["save"][SAVE_AT] - ends[SAVE_AT]
    intervals = {step: ends[step] - ends[step - 1] for step in range(2, STEPS + 1)}
    busy = {2} | clock.writing(SAVE_AT) | clock.writing(2 * SAVE_AT)  # and the first interval: warm-up
    base = statistics.median(v for step, v in intervals.items() if step not in busy)
    stall_s = intervals[SAVE_AT + 1] - base
    stall2_s = intervals[2 * SAVE_AT + 1] - base  # the run's second save (step 8): pages of earlier files exist
    cost_s = sum(max(intervals[step] - base, 0.0) for step in range(SAVE_AT + 1, STEPS + 1))
    size = folder_mb(os.path.join(out, f"checkpoint-{SAVE_AT}"))
    evict(os.path.join(out, f"checkpoint-{SAVE_AT}"))
    command = [sys.executable, __file__, "--resume", name, out] + PASS
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} resume failed:\n{done.stderr[-3000:]}")
    resume_s = json.loads(done.stdout.strip().splitlines()[-1])["resume"]
    return {"save": save_s, "stall": stall_s, "stall2": stall2_s, "cost": cost_s, "resume": resume_s, "size": size,
            "step": base}


def raw_train(ids, out, clock):
    """The floor of a background save: a plain PyTorch loop whose save clones weights and optimizer state on the
    training thread and hands them to a thread that writes model.safetensors and optimizer.pt, fsyncs them and
    renames the folder in (no Trainer, no scheduler, RNG or trainer state)."""
    import threading

    import safetensors.torch

    device = "cuda" if CUDA else "cpu"
    net = model().to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-5)
    writer = None

    def write(weights, optim, folder):
        tmp = folder + ".tmp"
        os.makedirs(tmp)
        safetensors.torch.save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        torch.save(optim, os.path.join(tmp, "optimizer.pt"))
        for name in os.listdir(tmp):
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        os.rename(tmp, folder)

    clone = lambda obj: {k: clone(v) for k, v in obj.items()} if isinstance(obj, dict) else (  # noqa: E731
        obj.detach().to("cpu", copy=True) if torch.is_tensor(obj) else copy.deepcopy(obj))
    for step in range(1, STEPS + 1):
        batch = ids[(step - 1) * BATCH:step * BATCH].to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=CUDA):
            loss = net(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        clock.on_step_end(None, transformers.TrainerState(global_step=step), None)
        if step % SAVE_AT == 0:
            if writer is not None:
                writer.join()
            weights, optim = clone(net.state_dict()), clone(optimizer.state_dict())
            writer = threading.Thread(target=write, args=(weights, optim, os.path.join(out, f"checkpoint-{step}")))
            writer.start()
            clock.on_save(None, transformers.TrainerState(global_step=step), None)
    writer.join()


def raw_resume(out):
    import safetensors.torch

    device = "cuda" if CUDA else "cpu"
    ids = torch.randint(0, 32000, (BATCH * STEPS, 128))
    start = time.time()
    net = model()
    folder = os.path.join(out, f"checkpoint-{SAVE_AT}")
    net.load_state_dict(safetensors.torch.load_file(os.path.join(folder, "model.safetensors")))
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-5)
    optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
    batch = ids[SAVE_AT * BATCH:(SAVE_AT + 1) * BATCH].to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=CUDA):
        loss = net(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    if CUDA:
        torch.cuda.synchronize()
    return {"resume": time.time() - start}


def resume(name, out):
    """A fresh process, as a restarted run is, resumes from checkpoint-SAVE_AT: seconds from building the Trainer to
    the end of the first resumed step."""
    framework, extra = RUNS[name]
    if framework == "raw":
        return raw_resume(out)
    trainer_cls = transformers.Trainer if framework == "hf" else hf_lightning.Trainer
    args_cls = transformers.TrainingArguments if framework == "hf" else hf_lightning.TrainingArguments
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 32000, (BATCH * STEPS, 128))]
    args = arguments(args_cls, out, extra)
    clock = Clock(out, stop_at=SAVE_AT + 1)  # what it measures is over: the rest would only take time
    start = time.time()
    trainer_cls(model(), args=args, train_dataset=data, callbacks=[clock]).train(
        resume_from_checkpoint=os.path.join(out, f"checkpoint-{SAVE_AT}"))
    return {"resume": clock.marks["step_end"][SAVE_AT + 1] - start}


def evict(folder):
    """Flush the folder's files and drop their pages from the page cache, whoever wrote them, so that every framework
    resumes from the disk, as a run restarted after a reboot or on another node does (hf_lightning's saves release
    their pages themselves; transformers' leave them cached, and a resume from cached pages reads ~1 GB less)."""
    for d, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_floor(mb: int) -> dict:
    """What writing `mb` MB of files costs this machine's kernel: plain writes from memory then fsync, wall time and
    the process's system CPU time (os.times). The background writer cannot take less from the cores than this: on a
    VM whose file system does its work in kernel time, that cost competes with training whatever the writer's
    priority."""
    data = torch.randn(mb * 2**20 // 4).numpy().tobytes()
    root = tempfile.mkdtemp()
    try:
        before, start = os.times(), time.perf_counter()
        path = os.path.join(root, "floor.bin")
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        after = os.times()
        return {"seconds": time.perf_counter() - start, "system_cpu": after.system - before.system,
                "user_cpu": after.user - before.user}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main():
    if CUDA and not torch.cuda.is_available():
        print("SKIP: bench/checkpoint.py --cuda needs a CUDA GPU and this machine has none (nothing was run).")
        return
    if THREADS:
        torch.set_num_threads(THREADS)
    if "--resume" in sys.argv:  # the resume of a --one run, in a process of its own
        at = sys.argv.index("--resume")
        print(json.dumps(resume(sys.argv[at + 1], sys.argv[at + 2])))
        return
    if "--one" in sys.argv:  # one measurement in this process: its JSON on the last line
        root = tempfile.mkdtemp()
        try:
            print(json.dumps(run(sys.argv[sys.argv.index("--one") + 1], root)))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    names = [n for n in RUNS if "--export" in sys.argv or "save_lightning_checkpoint" not in n]
    if "--only" in sys.argv:  # a comma-separated subset of the rows (transformers' is always run: the ratios' base)
        wanted = sys.argv[sys.argv.index("--only") + 1].split(",")
        names = [n for n in names if n == "transformers.Trainer" or any(w.strip() in n for w in wanted)]
    params = sum(p.numel() for p in model().parameters()) / 1e6
    print(f"Llama from config, {params:.0f}M parameters, {STEPS} {'bf16 GPU' if CUDA else 'CPU'} steps of "
          f"{BATCH}x128 tokens, a save at step {SAVE_AT}, {rounds} rounds (medians), "
          f"{THREADS or torch.get_num_threads()} torch threads of {os.cpu_count()} cores\n")
    results = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            command = [sys.executable, __file__, "--one", name] + PASS
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| framework | step (s) | save (s) | stall around the save (s) | stall around the second save (s) "
          "| whole cost to training (s) | resume to first step (s) | checkpoint size (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    hf = {key: statistics.median(r[key] for r in results["transformers.Trainer"]) for key in ("save", "stall", "stall2")}
    for name in names:
        m = {key: statistics.median(r[key] for r in results[name]) for key in results[name][0]}
        ratio = lambda key: f" ({m[key] / hf[key]:.2f}x)" if hf[key] > 0 else ""  # noqa: E731
        print(f"| {name} | {m['step']:.2f} | {m['save']:.2f}{ratio('save')} | {m['stall']:.2f}{ratio('stall')} | "
              f"{m['stall2']:.2f}{ratio('stall2')} | {m['cost']:.2f} | {m['resume']:.2f} | {m['size']:.0f} |")
    size = statistics.median(r["size"] for r in results["transformers.Trainer"])
    floors = [write_floor(int(size)) for _ in range(rounds)]
    print(f"\nthe kernel's cost of writing {size:.0f} MB here (plain write + fsync, median of {rounds}): "
          f"{statistics.median(f['seconds'] for f in floors):.2f} s wall, "
          f"{statistics.median(f['system_cpu'] for f in floors):.2f} s system CPU, "
          f"{statistics.median(f['user_cpu'] for f in floors):.2f} s user CPU")
    print("\nper round:", json.dumps({n: [{k: round(v, 2) for k, v in r.items()} for r in rs]
                                      for n, rs in results.items()}))


if __name__ == "__main__":
    main()
