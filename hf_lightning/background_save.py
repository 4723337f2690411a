"""`async_save=True`: a checkpoint's files are written, flushed and renamed in by a background thread.

On the training thread a save only copies the state that training changes (weights, optimizer state) into CPU
buffers allocated once and reused by every later save (pinned, and copied without blocking, for GPU tensors), and
snapshots the small rest (scheduler, scaler, TrainerState). The writer thread then writes the same files as a
synchronous save, byte for byte where the format is deterministic: the two big ones around the page cache
(`DirectWriter`: optimizer.pt by torch.save into an O_DIRECT file, model.safetensors from the tensors save_pretrained
would write, `compat.save_pretrained_weights`), the rest with the same writers (save_pretrained for config and
generation config, torch.save, save_to_json); then the fsync of every file and folder, the atomic rename and the
rotation (checkpoint.py), at the lowest OS priority (Linux: its own thread's niceness), so that it takes the cores
training leaves idle rather than slowing training down.

Why not Lightning's `AsyncCheckpointIO`: it writes one file per call from a fresh `clone()` of every tensor (the
first touch of ~1 GB of new memory at each save is most of the stall it is meant to remove), and a checkpoint-N
folder is several files renamed in together once all are written.

Everything that reads a checkpoint waits for the write in flight: the next save, the end of training (before the
best model is loaded and the last `save_total_limit` clean-up), an exception leaving `fit`, and a SIGTERM's save
(written synchronously: the process is about to exit). A failed write is raised at the next step's end.
A SIGKILL while the writer writes leaves the previous checkpoint the newest complete one (the folder is renamed in
only once complete). `on_save` fires when the save is taken, as with a synchronous save; its folder is complete
once the writer is done (`BackgroundSave.wait()`).
"""

from __future__ import annotations

import copy
import errno
import io
import logging
import mmap
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import lightning.pytorch as pl
import torch

logger = logging.getLogger(__name__)


def _lower_own_priority() -> None:
    # On Linux a thread is a task with its own niceness: this lowers the writer only, not the process.
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError as err:  # a sandbox may refuse it: the writer then runs at the training thread's priority
            logger.debug("hf_lightning: could not lower the checkpoint writer's priority (%s)", err)


def snapshots_model(model) -> bool:
    """Whether a save copies the model's weights for the writer: a transformers model (its save_pretrained takes the
    copy as `state_dict=`) or a plain nn.Module (written with safetensors). Anything else with a save_pretrained of
    its own (a peft model: adapter weights only, small) writes its folder on the training thread."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return not getattr(model, "peft_config", None)  # set by transformers' load_adapter/add_adapter
    return not hasattr(model, "save_pretrained")


class SnapshotBuffers:
    """Copies of nested state (dicts, lists, tuples of tensors and plain values) into tensors kept from one save to
    the next, keyed by their place in the structure; tensors that share memory in the source share it in the copy
    (save_pretrained recognises tied weights by their storage)."""

    def __init__(self):
        self._store: dict[tuple, torch.Tensor] = {}
        self._device_copies = False  # non-blocking copies from a GPU queued since the last seal()
        self._copied = None  # the CUDA event the writer waits for before it reads the buffers

    def take(self, obj: Any, key: tuple = (), copy_data: bool = True, _memo: dict | None = None) -> Any:
        memo = {} if _memo is None else _memo
        if isinstance(obj, torch.Tensor):
            alias = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), tuple(obj.stride()),
                     obj.dtype, obj.device)
            if alias in memo:
                return memo[alias]
            buffer = self._store.get(key)
            if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
                buffer = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=obj.is_cuda)
                if not copy_data:
                    buffer.zero_()  # touch the pages now (in the writer), not on the first save's copy
                self._store[key] = buffer
            if copy_data:
                buffer.copy_(obj.detach(), non_blocking=obj.is_cuda)
                self._device_copies = self._device_copies or obj.is_cuda
            memo[alias] = buffer
            return buffer
        if isinstance(obj, dict):
            return {k: self.take(v, (*key, k), copy_data, memo) for k, v in obj.items()}
        if type(obj) in (list, tuple):  # other sequences (a namedtuple) are deep-copied whole, below
            return type(obj)(self.take(v, (*key, i), copy_data, memo) for i, v in enumerate(obj))
        return copy.deepcopy(obj) if copy_data else None

    def seal(self) -> None:
        """Called by the training thread once the copies are queued (later kernels, queued after them, may change
        the sources)."""
        if self._device_copies:
            self._copied = torch.cuda.Event()
            self._copied.record()
            self._device_copies = False

    def ready(self) -> None:
        """Called by the writer before it reads the buffers: the non-blocking device copies have landed."""
        copied, self._copied = self._copied, None
        if copied is not None:
            copied.synchronize()


class DirectWriter:
    """Writes files with O_DIRECT from one page-aligned staging buffer, kept from one file and one save to the next.

    A buffered write puts every byte in the page cache first, and the kernel takes fresh pages for each checkpoint:
    on a virtual machine the first touch of a page stalls the virtual CPU that touches it while the host backs it,
    system time that no thread priority lowers. Measured on this project's 2-core VM, torch.save of 640 MB from a
    thread while the main thread runs 2-thread matmuls: the main thread lost 1.9 s buffered, 0.26 s with O_DIRECT
    (and 900 MB of plain writes: 3.0 s of system time buffered, 0.05 s direct). Where the file system refuses
    O_DIRECT, at open or at the first write, the file is written through the page cache instead."""

    CHUNK = 8 << 20
    ALIGN = 4096  # O_DIRECT's alignment of memory, file offsets and lengths (the logical block size or a multiple)

    def __init__(self):
        self._staging: mmap.mmap | None = None

    def open(self, path: str):
        flag = getattr(os, "O_DIRECT", 0)
        if flag:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
            except OSError:
                fd = None
            if fd is not None:
                if self._staging is None:
                    self._staging = mmap.mmap(-1, self.CHUNK)
                return _DirectFile(fd, path, self._staging, self.ALIGN)
        return open(path, "wb")

    def write_safetensors(self, path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        """safetensors.torch.save_file(tensors, path, metadata), byte for byte, written through `open`: the header
        (8 bytes of its length, then its JSON padded with spaces to a multiple of 8) lists the tensors in the order
        safetensors lays them out, taken from safetensors itself (one-element stand-ins: by dtype, then name), and
        their bytes follow in that order. A big-endian host gets save_file (safetensors swaps the bytes there)."""
        import json
        import struct

        import safetensors.torch

        if sys.byteorder != "little":
            safetensors.torch.save_file(tensors, path, metadata)
            return
        probe = safetensors.torch.save({name: torch.zeros(1, dtype=t.dtype) for name, t in tensors.items()})
        layout = json.loads(probe[8:8 + struct.unpack("<Q", probe[:8])[0]])
        header, offset = ({"__metadata__": metadata} if metadata else {}), 0
        for name, entry in layout.items():
            if name != "__metadata__":
                size = tensors[name].numel() * tensors[name].element_size()
                header[name] = {"dtype": entry["dtype"], "shape": list(tensors[name].shape),
                                "data_offsets": [offset, offset + size]}
                offset += size
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        with self.open(path) as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name in header:
                if name != "__metadata__":
                    f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())


class _DirectFile(io.RawIOBase):
    """A write-only file (torch.save's target) whose bytes go through `staging` to `fd`, opened with O_DIRECT."""

    def __init__(self, fd: int, name: str, staging: mmap.mmap, align: int):
        super().__init__()
        self.fd, self.name, self._staging, self._align = fd, name, staging, align
        self._view = memoryview(staging)
        self._used = 0  # bytes of the staging buffer holding data not yet written
        self._written = 0  # bytes already in the file

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def tell(self) -> int:
        return self._written + self._used

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        size, done = len(data), 0
        while done < size:
            room = len(self._view) - self._used
            take = min(room, size - done)
            self._view[self._used:self._used + take] = data[done:done + take]
            self._used += take
            done += take
            if self._used == len(self._view):
                self._write_staging(self._used)
        return size

    def _write_staging(self, length: int) -> None:
        view, written = self._view[:length], 0
        while written < length:
            try:
                written += os.write(self.fd, view[written:])
            except OSError as err:  # a file system that opens O_DIRECT but wants another alignment: buffered
                import fcntl  # POSIX only, as O_DIRECT

                flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                if err.errno != errno.EINVAL or not flags & os.O_DIRECT:
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self._written += self._used
        self._used = 0

    def close(self) -> None:
        if self.closed:
            return
        try:
            end = self._written + self._used
            if self._used:  # the tail, padded to the alignment, then the file cut to its real length
                padded = -(-self._used // self._align) * self._align
                self._view[self._used:padded] = bytes(padded - self._used)
                self._write_staging(padded)
            os.ftruncate(self.fd, end)
        finally:
            self._view.release()
            os.close(self.fd)
            super().close()


class BackgroundSave(pl.Callback):
    """Owns the writer thread and the snapshot buffers of one `fit`; checkpoint.save_checkpoint hands it the writes."""

    def __init__(self):
        self.buffers = SnapshotBuffers()
        self.files = DirectWriter()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []  # in submission order; the single writer runs them in that order
        self._prepared = False

    @staticmethod
    def of(lightning_trainer) -> BackgroundSave | None:
        if lightning_trainer is None:
            return None
        return next((cb for cb in lightning_trainer.callbacks if isinstance(cb, BackgroundSave)), None)

    # ------------------------------------------------------------------ the writer

    def submit(self, job: Callable[[], None]) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="hf_lightning-checkpoint",
                                                initializer=_lower_own_priority)
        self._pending.append(self._executor.submit(job))

    def wait(self) -> None:
        """Until everything submitted is done; raises the first error."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.exception()  # every job finished before an error is raised
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self.buffers = SnapshotBuffers()  # ~ the model and optimizer state in memory: not kept past the fit
            self._prepared = False

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if any(future.done() and future.exception() is not None for future in self._pending):
            self.wait()  # a failed write ends training here, naming its error
        if not self._prepared and trainer.is_global_zero:
            # After the first optimizer step the optimizer state exists: the buffers of what a save copies (see
            # checkpoint.save_checkpoint) are allocated and touched in the background now, so that the first save
            # only copies. State dicts hold references: reading their shapes in the writer is safe.
            self._prepared = True
            model = pl_module.model.state_dict() if snapshots_model(pl_module.model) else {}
            optimizer = trainer.optimizers[0].state_dict() if trainer.optimizers else {}
            self.submit(lambda: (self.buffers.take(model, ("model",), copy_data=False),
                                 self.buffers.take(optimizer, ("optimizer",), copy_data=False)))

    def on_exception(self, trainer, pl_module, exception):
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - the training error is the one raised; this one is reported
            logger.error("hf_lightning: the checkpoint being written when training failed was not completed: %r", err)

    def teardown(self, trainer, pl_module, stage):
        self.close()
