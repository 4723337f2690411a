"""Checkpoints: transformers' folder layout, exact resume after a real SIGKILL, both formats, crash safety."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import hf_lightning
from helpers import classification_dataset, tiny_bert

JOB = os.path.join(os.path.dirname(__file__), "jobs", "train_job.py")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """job(framework, output_dir, *options, killed_at=None) runs tests/jobs/train_job.py in a process of its own,
    forked from a server that did the imports once (see its serve()); returns the job's output."""
    server = subprocess.Popen([sys.executable, JOB, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    logs = tmp_path_factory.mktemp("job_logs")
    count = itertools.count()

    def run(framework, out, *extra, killed_at=None):
        log = logs / f"{next(count)}.log"
        request = {"argv": [framework, str(out), *map(str, extra)], "log": str(log)}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        reply = server.stdout.readline()
        assert reply, "the job server died"
        returncode, output = json.loads(reply)["returncode"], log.read_text()
        if killed_at:
            assert returncode == -signal.SIGKILL and f"KILLED at {killed_at}\n" in output, (
                f"not killed at {killed_at} (exit status {returncode}): {output[-3000:]}")
        else:
            assert returncode == 0, output[-3000:]
        return output

    yield run
    server.stdin.close()
    server.wait(timeout=60)


def final_weights(out):
    return safetensors.torch.load_file(os.path.join(out, "final", "model.safetensors"))


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_state(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif hasattr(a, "shape"):  # numpy's RNG keys
        assert (a == b).all()
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def resumed_at(output):
    return int(re.findall(r"^RESUMED_AT (\d+)$", output, re.M)[-1])


def assert_complete(folder, reference):
    """`folder` is a checkpoint that can be resumed: the uninterrupted run's files of that step, each one readable
    (a partly written one is not), and the same weights."""
    folder, expected = Path(folder), Path(reference) / Path(folder).name
    assert sorted(os.listdir(folder)) == sorted(os.listdir(expected)), folder
    assert_bitwise(safetensors.torch.load_file(folder / "model.safetensors"),
                   safetensors.torch.load_file(expected / "model.safetensors"))
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == int(folder.name.split("-")[1])
    assert json.loads((folder / "config.json").read_text()) == json.loads((expected / "config.json").read_text())
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "lightning.ckpt"):
        torch.load(folder / name, weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, job):
    root = tmp_path_factory.mktemp("uninterrupted")
    job("hl", root / "hl")
    job("hf", root / "hf")
    return root


def test_folder_layout_matches_transformers(uninterrupted, tmp_path):
    hl, hf = uninterrupted / "hl" / "checkpoint-4", uninterrupted / "hf" / "checkpoint-4"
    # By default a folder holds exactly transformers' files; the job's runs also export lightning.ckpt.
    _trainer(tmp_path / "default", max_steps=2).train()
    assert sorted(os.listdir(tmp_path / "default" / "checkpoint-2")) == sorted(os.listdir(hf))
    assert sorted(os.listdir(hl)) == sorted(os.listdir(hf) + ["lightning.ckpt"])
    hl_state = json.load(open(hl / "trainer_state.json"))
    hf_state = json.load(open(hf / "trainer_state.json"))
    assert hl_state.keys() == hf_state.keys()
    for key in ("global_step", "epoch", "max_steps", "save_steps", "logging_steps", "train_batch_size"):
        assert hl_state[key] == hf_state[key], key
    assert sorted(os.listdir(uninterrupted / "hl")) == sorted(os.listdir(uninterrupted / "hf"))
    ckpt = torch.load(hl / "lightning.ckpt", weights_only=False)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters"} <= set(ckpt)
    assert ckpt["hyper_parameters"]["training_args"]["gradient_accumulation_steps"] == 2
    assert "hf_lightning.TrainingFlow" in ckpt["callbacks"]
    # Final model = transformers' (same seed and data) to float tolerance; save_model() loads with from_pretrained.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(uninterrupted / "hl" / "final")
    reference = final_weights(uninterrupted / "hf")
    for name, value in model.state_dict().items():
        assert torch.allclose(value, reference[name], atol=1e-6), name


# The job: 20 rows, batches of 3, 2 micro-batches per update: 7 micro-batches and 4 updates per epoch (the 4th a short
# window), 12 steps in 3 epochs, a checkpoint every 2 steps. Each case: SIGKILL at a point (see train_job.py), then a
# run with resume_from_checkpoint=True (or the given path) must start at `resumed_from` and end bitwise equal to the
# uninterrupted run, leaving the same folders; at the kill, the checkpoint transformers' get_last_checkpoint picks
# must be complete.
KILLS = [  # (kill point, reference checkpoints in output_dir first, the killed run's resume, then resume, resumed_from)
    ("step@2", [], None, "latest", 2),                # mid-epoch
    ("step@4", [], None, "latest", 4),                # epoch boundary
    ("step@6", [], None, "checkpoint-6/lightning.ckpt", 6),  # mid-epoch, from the Lightning checkpoint file
    ("substep@6", [], None, "latest", 6),             # inside an accumulation window (one micro-batch of two done)
    # Inside each file of a save (epoch-boundary save 4, mid-epoch 6, boundary 8), and before its rename.
    ("write:config.json@4", [], None, "latest", 2),
    ("write:model.safetensors@4", [], None, "latest", 2),
    ("write:training_args.bin@4", [], None, "latest", 2),
    ("write:optimizer.pt@6", [], None, "latest", 4),
    ("write:scheduler.pt@6", [], None, "latest", 4),
    ("write:rng_state.pth@6", [], None, "latest", 4),
    ("write:trainer_state.json@8", [], None, "latest", 6),
    ("write:lightning.ckpt@8", [], None, "latest", 6),
    ("rename@8", [], None, "latest", 6),
    # Saving over an existing checkpoint-4: a new run in an output_dir that holds one (killed once the old folder was
    # first changed), and a run resumed from checkpoint-2 that saves step 4 again (killed while the replaced folder
    # is deleted). The newest checkpoint is never lost nor left partial.
    ("aside@4", ["checkpoint-4"], None, "latest", 4),
    ("discard@4", ["checkpoint-2", "checkpoint-4"], "checkpoint-2", "latest", 4),
]


@pytest.mark.parametrize("point,existing,first_resume,then_resume,resumed_from", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_then_resume_is_bitwise_exact(job, uninterrupted, tmp_path, point, existing, first_resume,
                                              then_resume, resumed_from):
    reference, out = uninterrupted / "hl", tmp_path / "run"
    for name in existing:
        shutil.copytree(reference / name, out / name)
    job("hl", out, "--kill", point, *(["--resume", out / first_resume] if first_resume else []), killed_at=point)
    latest = transformers.trainer_utils.get_last_checkpoint(str(out))
    assert latest is not None
    assert_complete(latest, reference)
    resume = then_resume if then_resume == "latest" else out / then_resume
    output = job("hl", out, "--resume", resume)
    assert resumed_at(output) == resumed_from
    assert_complete(out / f"checkpoint-{resumed_from}", reference)
    assert_bitwise(final_weights(out), final_weights(reference))
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # every checkpoint, no tmp-* folder left


# async_save=True: the same kills, inside the writer thread while training goes on (the RNG file and the
# lightning.ckpt export are written on the training thread, as above). The newest complete checkpoint is resumed.
ASYNC_KILLS = [
    ("write:model.safetensors@4", [], None, "latest", 2),
    ("write:optimizer.pt@6", [], None, "latest", 4),
    ("rename@8", [], None, "latest", 6),
    ("discard@4", ["checkpoint-2", "checkpoint-4"], "checkpoint-2", "latest", 4),
]


@pytest.mark.parametrize("point,existing,first_resume,then_resume,resumed_from", ASYNC_KILLS,
                         ids=[k[0] for k in ASYNC_KILLS])
def test_sigkill_in_the_background_writer_then_resume_is_bitwise_exact(job, uninterrupted, tmp_path, point, existing,
                                                                       first_resume, then_resume, resumed_from):
    reference, out = uninterrupted / "hl", tmp_path / "run"
    for name in existing:
        shutil.copytree(reference / name, out / name)
    job("hl", out, "--async-save", "--kill", point, *(["--resume", out / first_resume] if first_resume else []),
        killed_at=point)
    latest = transformers.trainer_utils.get_last_checkpoint(str(out))
    assert_complete(latest, reference)
    output = job("hl", out, "--async-save", "--resume", then_resume)
    assert resumed_at(output) == resumed_from
    assert_complete(out / f"checkpoint-{resumed_from}", reference)
    assert_bitwise(final_weights(out), final_weights(reference))
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))


def test_training_goes_on_while_the_background_writer_writes(tmp_path, monkeypatch):
    """With async_save the save of step 2 is held inside its optimizer.pt until step 4 has ended: training must
    reach step 4 meanwhile (a synchronous save would wait forever), and every checkpoint still ends up complete
    and bitwise equal to a synchronous run's."""
    import threading

    released, seen = threading.Event(), {}
    real_save = torch.save

    def held_save(obj, f, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread() and str(getattr(f, "name", f)).endswith(
                os.path.join("tmp-checkpoint-2", "optimizer.pt")):
            seen["released_in_time"] = released.wait(timeout=120)
        return real_save(obj, f, *args, **kwargs)

    class Watch(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.setdefault("folders", {})[state.global_step] = sorted(os.listdir(args.output_dir))
            if state.global_step == 4:
                released.set()

    monkeypatch.setattr(torch, "save", held_save)
    trainer = _trainer(tmp_path / "async", max_steps=6, async_save=True)
    trainer.add_callback(Watch())
    trainer.train()
    assert seen["released_in_time"]
    assert "checkpoint-2" not in seen["folders"][3]  # still being written after the next step
    monkeypatch.setattr(torch, "save", real_save)
    _trainer(tmp_path / "sync", max_steps=6).train()
    for step in (2, 4, 6):
        folder, expected = tmp_path / "async" / f"checkpoint-{step}", tmp_path / "sync" / f"checkpoint-{step}"
        assert sorted(os.listdir(folder)) == sorted(os.listdir(expected))
        assert_bitwise(safetensors.torch.load_file(folder / "model.safetensors"),
                       safetensors.torch.load_file(expected / "model.safetensors"))
        for name in ("optimizer.pt", "rng_state.pth"):
            assert_same_state(torch.load(folder / name, weights_only=False),
                              torch.load(expected / name, weights_only=False))
    assert not [t for t in threading.enumerate() if t.name.startswith("hf_lightning-checkpoint")]


def test_background_writer_bypasses_the_page_cache(tmp_path, monkeypatch):
    """async_save's writer writes optimizer.pt and model.safetensors with O_DIRECT (on this VM, filling the page cache
    is what stalled training): the file torch.save gets is open with O_DIRECT, and so is model.safetensors, which
    holds the same bytes as a synchronous save's (save_pretrained's) file; optimizer.pt loads as its file."""
    opened, real_open = {}, os.open

    def watched_open(path, flags, *args, **kwargs):
        if str(path).endswith("model.safetensors") and flags & os.O_WRONLY:
            opened["model"] = bool(flags & os.O_DIRECT)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watched_open)
    real_save = torch.save

    def watched_save(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith("optimizer.pt"):
            with open(f"/proc/self/fdinfo/{f.fileno()}") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
            opened["direct"] = bool(flags & os.O_DIRECT)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", watched_save)
    _trainer(tmp_path / "async", max_steps=2, async_save=True).train()
    assert opened == {"direct": True, "model": True}
    monkeypatch.setattr(torch, "save", real_save)
    _trainer(tmp_path / "sync", max_steps=2).train()
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "async" / "checkpoint-2" / name).read_bytes() == \
            (tmp_path / "sync" / "checkpoint-2" / name).read_bytes(), name
    assert_same_state(torch.load(tmp_path / "async" / "checkpoint-2" / "optimizer.pt", weights_only=True),
                      torch.load(tmp_path / "sync" / "checkpoint-2" / "optimizer.pt", weights_only=True))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise, and /proc for the paths")
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async_save"])
def test_saved_files_release_their_page_cache(tmp_path, monkeypatch, async_save):
    """Once a checkpoint's file is on disk its page-cache pages are released (POSIX_FADV_DONTNEED after its fsync),
    so that the next save writes into re-used pages: every file of every checkpoint, each after its fsync."""
    events = []
    real_fsync, real_fadvise = os.fsync, os.posix_fadvise

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def fadvise(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            events.append(("release", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    _trainer(tmp_path, max_steps=4, async_save=async_save).train()
    released = [path for kind, path in events if kind == "release"]
    for step in (2, 4):
        names = sorted(os.listdir(tmp_path / f"checkpoint-{step}"))
        assert sorted(os.path.basename(p) for p in released if f"tmp-checkpoint-{step}" in p) == names
    for index, (kind, path) in enumerate(events):
        if kind == "release":
            assert events[index - 1] == ("fsync", path)


def test_direct_writer_files_and_its_fallback(tmp_path, monkeypatch):
    """Files of every length (a tail shorter than the alignment, exact chunks, several chunks) read back exactly;
    where the file system refuses O_DIRECT, a plain buffered file is written instead."""
    import errno

    from hf_lightning.background_save import DirectWriter

    writer, rng = DirectWriter(), np.random.default_rng(0)
    for size in (0, 1, 4095, 4096, DirectWriter.CHUNK, DirectWriter.CHUNK + 12345, 3 * DirectWriter.CHUNK - 1):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        with writer.open(str(tmp_path / "f.bin")) as f:
            assert f.write(data[: size // 3]) + f.write(data[size // 3:]) == size
        assert (tmp_path / "f.bin").read_bytes() == data, size
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    real_write, refused = os.write, []

    def refuse_direct_writes(fd, data):  # opens with O_DIRECT, then refuses its writes (another alignment)
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refuse_direct_writes)
    data = rng.integers(0, 256, DirectWriter.CHUNK + 5, dtype=np.uint8).tobytes()
    with writer.open(str(tmp_path / "h.bin")) as f:
        f.write(data)
    assert len(refused) == 1 and (tmp_path / "h.bin").read_bytes() == data
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.setattr(os, "open", no_direct)
    with writer.open(str(tmp_path / "g.bin")) as f:
        f.write(b"abc")
    assert not hasattr(f, "fd") and (tmp_path / "g.bin").read_bytes() == b"abc"


def test_direct_writer_writes_safetensors_files_byte_for_byte(tmp_path):
    """DirectWriter.write_safetensors writes the bytes safetensors.torch.save_file writes (layout by dtype then name,
    header padding), for every dtype, scalars, empty and non-contiguous tensors, with and without metadata."""
    from hf_lightning.background_save import DirectWriter

    torch.manual_seed(0)
    tensors = {f"{name}.{dtype}".replace("torch.", ""): torch.randn(5, 7).to(dtype)
               for name, dtype in zip("qbzamyxc", (torch.float64, torch.int64, torch.float32, torch.int32,
                                                   torch.bfloat16, torch.float16, torch.int8, torch.bool))}
    tensors.update({"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "b.bf16": torch.randn(3, dtype=torch.bfloat16),
                    "transposed": torch.randn(6, 4).t(), "big": torch.randn(DirectWriter.CHUNK // 4 + 3)})
    writer = DirectWriter()
    for metadata in (None, {"format": "pt"}):
        writer.write_safetensors(str(tmp_path / "ours.safetensors"), tensors, metadata)
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors",
                                    metadata)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_background_write_errors_surface(tmp_path, monkeypatch):
    import errno

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _trainer(tmp_path, async_save=True).train()
    assert transformers.trainer_utils.get_last_checkpoint(str(tmp_path)) is None


def test_checkpoint_moved_aside_resolves_the_same_on_every_rank(uninterrupted, tmp_path):
    # What a kill between the two renames of an overwrite leaves (aside@4 above): the old checkpoint-4 under its
    # aside name, the new one complete but not renamed in.
    from hf_lightning.checkpoint import resolve_resume_path

    reference, out = uninterrupted / "hl", tmp_path / "run"
    shutil.copytree(reference / "checkpoint-2", out / "checkpoint-2")
    shutil.copytree(reference / "checkpoint-4", out / "tmp-old-checkpoint-4")
    shutil.copytree(reference / "checkpoint-4", out / "tmp-checkpoint-4")
    left = sorted(os.listdir(out))
    other_rank = SimpleNamespace(output_dir=str(out), should_save=False)
    assert resolve_resume_path(other_rank, True) == str(out / "checkpoint-4")
    assert sorted(os.listdir(out)) == left  # only the process that saves changes output_dir
    saving_rank = SimpleNamespace(output_dir=str(out), should_save=True)
    assert resolve_resume_path(saving_rank, True) == str(out / "checkpoint-4")
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]
    assert_complete(out / "checkpoint-4", reference)


def test_transformers_resumes_our_folder_and_we_resume_its(job, uninterrupted, tmp_path):
    ours = tmp_path / "ours"
    shutil.copytree(uninterrupted / "hl" / "checkpoint-6", ours / "checkpoint-6")
    job("hf", ours, "--resume", "latest")
    theirs = tmp_path / "theirs"
    shutil.copytree(uninterrupted / "hf" / "checkpoint-6", theirs / "checkpoint-6")
    job("hl", theirs, "--resume", "latest")
    reference = final_weights(uninterrupted / "hf")
    for result in (final_weights(ours), final_weights(theirs)):
        for name, value in result.items():
            assert torch.allclose(value, reference[name], atol=1e-6), name


def _trainer(tmp_path, **kw):
    options = dict(per_device_train_batch_size=4, max_steps=4, save_steps=2, report_to="none", disable_tqdm=True)
    options.update(kw)
    args = hf_lightning.TrainingArguments(str(tmp_path), **options)
    return hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(16))


def test_bad_checkpoints_get_clear_errors(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.train()
    folder = tmp_path / "run" / "checkpoint-2"
    with pytest.raises(ValueError, match="no checkpoint-N folder"):
        _trainer(tmp_path / "empty").train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="does not exist"):
        _trainer(tmp_path / "x").train(resume_from_checkpoint=str(tmp_path / "nope"))
    # Truncated optimizer file.
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    with open(broken / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="optimizer.pt"):
        _trainer(tmp_path / "y").train(resume_from_checkpoint=str(broken))
    # Another model.
    other = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, num_labels=2))
    args = hf_lightning.TrainingArguments(str(tmp_path / "z"), max_steps=4, report_to="none")
    with pytest.raises(ValueError, match="model.safetensors|does not fit"):
        hf_lightning.Trainer(other, args=args, train_dataset=classification_dataset(16)).train(
            resume_from_checkpoint=str(folder))
    # Another optimizer.
    with pytest.raises(ValueError, match="optimizer"):
        _trainer(tmp_path / "w", optim="sgd").train(resume_from_checkpoint=str(folder))


def test_save_errors_surface(tmp_path, monkeypatch):
    import errno

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    trainer = _trainer(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    # The failed save never became a checkpoint-N folder that resume_from_checkpoint=True would pick.
    assert transformers.trainer_utils.get_last_checkpoint(str(tmp_path)) is None


def _optimizer_file_held_until_flushed(monkeypatch, fail_flush: bool = False) -> dict:
    """torch.save of optimizer.pt waits (10 s at most) until model.safetensors, written before it, has been flushed
    by os.fdatasync (with `fail_flush`, until a first flush, which fails); the returned dict tells whether that
    happened and which files were flushed early."""
    import errno
    import time

    seen = {"flushed": []}
    real_fdatasync, real_save = os.fdatasync, torch.save

    def fdatasync(fd):
        seen["flushed"].append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        if fail_flush:
            raise OSError(errno.EIO, "Input/output error")
        return real_fdatasync(fd)

    def save(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith("optimizer.pt") and "model_flushed_first" not in seen:
            deadline = time.monotonic() + 10
            flushed = (lambda: seen["flushed"]) if fail_flush else (lambda: "model.safetensors" in seen["flushed"])
            while not flushed() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["model_flushed_first"] = bool(flushed())
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(torch, "save", save)
    return seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a file descriptor's path from /proc")
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async_save"])
def test_files_reach_the_disk_while_the_next_ones_are_written(tmp_path, monkeypatch, async_save):
    """The fsync before the rename must not wait for the whole folder's disk writes: each file is flushed in a
    helper thread while the next one is written (model.safetensors while optimizer.pt is), and the folder is still
    complete and resumable."""
    seen = _optimizer_file_held_until_flushed(monkeypatch)
    _trainer(tmp_path, max_steps=2, async_save=async_save).train()
    assert seen["model_flushed_first"]
    folder = tmp_path / "checkpoint-2"
    assert transformers.trainer_utils.get_last_checkpoint(str(tmp_path)) == str(folder)
    _trainer(tmp_path / "resumed", max_steps=2).train(resume_from_checkpoint=str(folder))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a file descriptor's path from /proc")
def test_early_flush_errors_surface(tmp_path, monkeypatch):
    # Linux reports a failed write-back to one fsync caller only: the helper's error must not be lost.
    seen = _optimizer_file_held_until_flushed(monkeypatch, fail_flush=True)
    with pytest.raises(OSError, match="Input/output error"):
        _trainer(tmp_path, max_steps=2).train()
    assert seen["model_flushed_first"]
    assert transformers.trainer_utils.get_last_checkpoint(str(tmp_path)) is None


def test_best_model_and_total_limit(tmp_path):
    def metric(pred):
        return {"score": float(-abs(pred.predictions).mean())}

    args = hf_lightning.TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=4,
                                          eval_strategy="epoch", save_strategy="epoch", save_total_limit=1,
                                          load_best_model_at_end=True, metric_for_best_model="score",
                                          greater_is_better=True, report_to="none", disable_tqdm=True)
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(8),
                                   eval_dataset=classification_dataset(4), compute_metrics=metric)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.listdir(tmp_path).count(os.path.basename(best)) == 1
    assert [d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")] == [os.path.basename(best)]
    saved = safetensors.torch.load_file(os.path.join(best, "model.safetensors"))
    for name, value in trainer.model.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name


def test_model_rebuilt_from_the_lightning_checkpoint_alone(tmp_path):
    trainer = _trainer(tmp_path, save_lightning_checkpoint=True)
    trainer.train()
    model = hf_lightning.model_from_lightning_checkpoint(str(tmp_path / "checkpoint-4" / "lightning.ckpt"))
    assert type(model) is type(trainer.model)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_save_options(tmp_path):
    # save_steps as a ratio of max_steps, save_only_model, no Lightning file.
    trainer = _trainer(tmp_path / "a", save_steps=0.5, save_only_model=True, save_lightning_checkpoint=False)
    trainer.train()
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoint-2", "checkpoint-4"]
    files = set(os.listdir(tmp_path / "a" / "checkpoint-2"))
    assert "model.safetensors" in files and not files & {"optimizer.pt", "scheduler.pt", "lightning.ckpt"}
    # save_strategy="best": a folder only when the metric improved.
    def metric(pred):
        metric.calls += 1
        return {"score": [0.5, 0.4, 0.6, 0.1][metric.calls - 1]}
    metric.calls = 0
    args = hf_lightning.TrainingArguments(str(tmp_path / "b"), per_device_train_batch_size=4, max_steps=4,
                                          eval_strategy="steps", eval_steps=1, save_strategy="best",
                                          metric_for_best_model="score", greater_is_better=True, report_to="none")
    hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(16),
                         eval_dataset=classification_dataset(4), compute_metrics=metric).train()
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-1", "checkpoint-3"]


def test_resumed_logs_match_the_uninterrupted_run(tmp_path):
    def args(out, **kw):
        return hf_lightning.TrainingArguments(str(out), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                                              num_train_epochs=3, save_steps=2, logging_steps=1, report_to="none",
                                              disable_tqdm=True, **kw)

    full = hf_lightning.Trainer(tiny_bert(), args=args(tmp_path / "full"), train_dataset=classification_dataset(20))
    full.train()
    resumed = hf_lightning.Trainer(tiny_bert(seed=5), args=args(tmp_path / "resumed"),
                                   train_dataset=classification_dataset(20))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))  # mid-epoch
    after = lambda h: [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}  # noqa: E731
                       for e in h if e["step"] > 2]
    assert after(resumed.state.log_history)[:-1] == after(full.state.log_history)[:-1]  # state.epoch included


def test_best_checkpoint_that_was_never_saved(tmp_path):
    def metric(pred):
        metric.calls += 1
        return {"score": [0.9, 0.1, 0.2, 0.3][metric.calls - 1]}

    outcome = {}
    for key, cls, args_cls in (("hf", transformers.Trainer, transformers.TrainingArguments),
                               ("hl", hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        metric.calls = 0
        args = args_cls(str(tmp_path / key), per_device_train_batch_size=2, max_steps=8, eval_strategy="steps",
                        eval_steps=2, save_steps=4, save_total_limit=1, metric_for_best_model="score",
                        greater_is_better=True, report_to="none", use_cpu=True)
        trainer = cls(tiny_bert(), args=args, train_dataset=classification_dataset(16),
                      eval_dataset=classification_dataset(4), compute_metrics=metric)
        trainer.train()
        outcome[key] = trainer
    assert outcome["hl"].state.best_model_checkpoint == outcome["hf"].state.best_model_checkpoint is None
    assert sorted(os.listdir(tmp_path / "hl")) == sorted(os.listdir(tmp_path / "hf"))



def test_plain_lightning_fit_with_ckpt_path(tmp_path):
    def args(out, **kw):
        return hf_lightning.TrainingArguments(str(out), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                                              num_train_epochs=3, save_steps=2, report_to="none", disable_tqdm=True,
                                              learning_rate=1e-2, **kw)

    full = hf_lightning.Trainer(tiny_bert(dropout=0.2), args=args(tmp_path / "full", save_lightning_checkpoint=True),
                                train_dataset=classification_dataset(20))
    full.train()
    # 4 update steps per epoch: checkpoint-6 is mid-epoch, checkpoint-4 ends epoch 1. The checkpoint-N folder itself
    # (read by FolderCheckpointIO), the exported lightning.ckpt, and "last" (the newest folder of output_dir).
    out = tmp_path / "other"
    other = hf_lightning.Trainer(tiny_bert(dropout=0.2, seed=9), args=args(out),
                                 train_dataset=classification_dataset(20))
    other.train()  # sets up the run; then continue it the Lightning way from checkpoints of `full`
    for name, door in [("checkpoint-6", "folder"), ("checkpoint-4", "folder"), ("checkpoint-6", "lightning.ckpt"),
                       ("checkpoint-4", "last")]:
        if door == "last":
            for folder in out.glob("checkpoint-*"):
                shutil.rmtree(folder)
            shutil.copytree(tmp_path / "full" / name, out / name)
        path = {"folder": tmp_path / "full" / name, "lightning.ckpt": tmp_path / "full" / name / "lightning.ckpt",
                "last": "last"}[door]
        loads = []
        with pytest.MonkeyPatch.context() as patch:  # records how every file is loaded
            real_load = torch.load
            patch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("weights_only")) or real_load(*a, **kw))
            other.lightning_trainer.fit(other.lightning_module, ckpt_path=str(path))
        assert loads and all(value is True for value in loads), (door, loads)  # passed, not left to a default
        assert other.state.global_step == other.lightning_trainer.global_step == 12, (name, door)
        for key, value in full.model.state_dict().items():
            assert torch.equal(other.model.state_dict()[key], value), (name, door, key)
    # An incomplete folder is refused through this door too, the missing file named.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "full" / "checkpoint-6", broken)
    os.remove(broken / "scheduler.pt")
    with pytest.raises(ValueError, match="lacks scheduler.pt"):
        other.lightning_trainer.fit(other.lightning_module, ckpt_path=str(broken))



class BertWithLabelHistory(transformers.BertForSequenceClassification):
    """A persistent buffer that grows with every training batch (the labels seen so far), so its saved size differs
    from a fresh model's; the model's own `load_state_dict` resizes it before loading, as such models do."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("label_history", torch.zeros(0, dtype=torch.long))

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if self.training and labels is not None:
            self.label_history = torch.cat([self.label_history, labels.detach()])
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if "label_history" in state_dict:
            self.label_history = torch.empty_like(state_dict["label_history"])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def test_resume_loads_weights_through_the_models_own_load_state_dict(tmp_path):
    def model():
        torch.manual_seed(0)
        return BertWithLabelHistory(tiny_bert().config)

    def trainer(cls, args_cls, out, the_model):
        args = args_cls(str(out), per_device_train_batch_size=4, max_steps=4, save_steps=2, report_to="none",
                        disable_tqdm=True, use_cpu=True, learning_rate=1e-2)
        return cls(the_model, args=args, train_dataset=classification_dataset(16))

    full = trainer(hf_lightning.Trainer, hf_lightning.TrainingArguments, tmp_path / "full", model())
    full.train()
    assert full.model.label_history.numel() == 16
    saved = safetensors.torch.load_file(str(tmp_path / "full" / "checkpoint-2" / "model.safetensors"))
    assert saved["label_history"].numel() == 8  # a fresh model's buffer is empty: only the override can load it
    results = {}
    for key, cls, args_cls in (("hf", transformers.Trainer, transformers.TrainingArguments),
                               ("hl", hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        resumed = trainer(cls, args_cls, tmp_path / key, model())
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
        results[key] = resumed.model.state_dict()
    # The Lightning way: fit(ckpt_path=...) after a run whose buffer grew past the checkpoint's.
    lightning_way = trainer(hf_lightning.Trainer, hf_lightning.TrainingArguments, tmp_path / "lightning", model())
    lightning_way.train()
    lightning_way.lightning_trainer.fit(lightning_way.lightning_module,
                                        ckpt_path=str(tmp_path / "full" / "checkpoint-2"))
    results["lightning"] = lightning_way.model.state_dict()
    for name, value in full.model.state_dict().items():
        assert torch.allclose(results["hl"][name], value, atol=1e-6), name
        assert torch.allclose(results["hl"][name], results["hf"][name], atol=1e-6), name
        assert torch.allclose(results["lightning"][name], value, atol=1e-6), name
    # Another model's weights are still refused, naming the keys.
    other = trainer(hf_lightning.Trainer, hf_lightning.TrainingArguments, tmp_path / "other",
                    transformers.LlamaForCausalLM(transformers.LlamaConfig(
                        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2)))
    with pytest.raises(ValueError, match=r"does not fit LlamaForCausalLM: missing \['lm_head.weight'.*unexpected"):
        other.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))


def test_incomplete_checkpoints_are_refused_or_warned_about(tmp_path):
    import logging

    _trainer(tmp_path / "run").train()
    _trainer(tmp_path / "model_only", save_only_model=True).train()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        out = tmp_path / f"without-{name}"
        shutil.copytree(tmp_path / "run", out)
        os.remove(out / "checkpoint-4" / name)
        # Found by resume_from_checkpoint=True: refused, the missing file named, nothing trained.
        with pytest.raises(ValueError, match=rf"checkpoint-4 is incomplete: it lacks {re.escape(name)}"):
            _trainer(out).train(resume_from_checkpoint=True)
        assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]
    # Given explicitly: resumed as asked, with a loud warning naming the file.
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        _trainer(tmp_path / "explicit", max_steps=6).train(
            resume_from_checkpoint=str(tmp_path / "without-optimizer.pt" / "checkpoint-4"))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert any("CHECKPOINT INCOMPLETE" in line and "optimizer.pt" in line for line in lines), lines
    # A save_only_model checkpoint (none of the three files) resumes as transformers resumes it.
    trainer = _trainer(tmp_path / "model_only", max_steps=6, save_only_model=True)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6
    # Truncated weights: the file is named (safetensors' own error names none).
    broken = tmp_path / "truncated"
    shutil.copytree(tmp_path / "run", broken)
    weights = broken / "checkpoint-4" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(50)
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        _trainer(broken, max_steps=6).train(resume_from_checkpoint=True)


def test_lightning_door_installation_respects_user_settings(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from hf_lightning.checkpoint import FolderCheckpointIO, LastCheckpointFinder
    from hf_lightning.training_args import translate_arguments

    def lightning_trainer(**extra):
        args = hf_lightning.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none",
                                              lightning_trainer_kwargs=extra)
        return pl.Trainer(**translate_arguments(args), logger=False)

    default = lightning_trainer()
    assert isinstance(default.strategy.checkpoint_io, FolderCheckpointIO)
    assert isinstance(default.checkpoint_callback, LastCheckpointFinder)
    # Lightning's checkpointing switched off, a ModelCheckpoint or CheckpointIO of the user's: theirs are kept.
    assert lightning_trainer(enable_checkpointing=False).checkpoint_callback is None
    own = ModelCheckpoint(dirpath=str(tmp_path / "mine"))
    assert lightning_trainer(callbacks=[own]).checkpoint_callbacks == [own]
    io = TorchCheckpointIO()
    assert lightning_trainer(plugins=[io]).strategy.checkpoint_io is io
