"""TrainingArguments switches that are a small Lightning callback each (chosen in training_args.translate_arguments).

    neftune_noise_alpha          NEFTune            transformers' noise hook on the input embeddings while fitting
    activation_checkpointing     ActivationCheckpointing   model.gradient_checkpointing_enable before the strategy wraps it
    tf32                         TF32               torch's TF32 matmul/cuDNN switches on CUDA
    torch_empty_cache_steps      EmptyDeviceCache   the device cache emptied before the backward every N steps
    bf16_full_eval/fp16_full_eval FullEvalCast      evaluate()/predict() with the model cast to that dtype
    debug="underflow_overflow"   UnderflowOverflow  transformers' DebugUnderflowOverflow on the model being fitted
    torch_compile(_backend/_mode) TorchCompile      the training forward compiled in place, as accelerate.prepare does
    use_liger_kernel(+ _config)  LigerKernel        liger-kernel's Triton kernels patched into the model (CUDA only)
"""

from __future__ import annotations

import atexit
import os
import threading
import time

import lightning.pytorch as pl
import torch


class NEFTune(pl.Callback):
    """transformers' NEFTune (`neftune_noise_alpha`): uniform noise added to the input embeddings during training.

    The hook is registered when fitting starts and removed when it ends, also when it ends by an exception, so the
    model a user keeps after `train()` embeds without noise, as with transformers.
    """

    def __init__(self, noise_alpha: float):
        self.noise_alpha = noise_alpha
        self._handle = None

    def on_fit_start(self, trainer, pl_module):
        from transformers.integrations.neftune import activate_neftune

        self._handle = activate_neftune(pl_module.model, self.noise_alpha)

    def on_fit_end(self, trainer, pl_module):
        self._remove(pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self._remove(pl_module)

    def _remove(self, pl_module):
        if self._handle is not None:
            from transformers.integrations.neftune import deactivate_neftune

            deactivate_neftune(pl_module.model, self._handle)
            self._handle = None


class ActivationCheckpointing(pl.Callback):
    """`activation_checkpointing` / `gradient_checkpointing` and their kwargs, split as transformers splits them:
    `every_n_layers` and `offload` select and place, the rest goes to torch.utils.checkpoint."""

    def __init__(self, kwargs: dict | None):
        self.kwargs = dict(kwargs or {})

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        kwargs = dict(self.kwargs)
        options = {"every_n_layers": kwargs.pop("every_n_layers", 1), "offload": kwargs.pop("offload", False)}
        model = pl_module.model
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None, **options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None, **options)


class TF32(pl.Callback):
    """`tf32`: TensorFloat-32 for CUDA matmuls and cuDNN, as transformers sets it (where CUDA is)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def setup(self, trainer, pl_module, stage):
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = self.enabled
            torch.backends.cudnn.allow_tf32 = self.enabled


class EmptyDeviceCache(pl.Callback):
    """`torch_empty_cache_steps`: the accelerator's cache emptied every N optimizer steps, before the backward (where
    transformers empties it, after the forward)."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step % self.every_n_steps == 0:
            from accelerate.utils.memory import clear_device_cache

            clear_device_cache()


class FullEvalCast(pl.Callback):
    """`bf16_full_eval` / `fp16_full_eval`: as transformers' `evaluation_loop`, an evaluation or prediction outside
    training casts the model to the dtype (and leaves it so); evaluations during `train()` run uncast."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def on_validation_start(self, trainer, pl_module):
        self._cast(trainer, pl_module)

    def on_test_start(self, trainer, pl_module):
        self._cast(trainer, pl_module)

    def _cast(self, trainer, pl_module):
        if trainer.state.fn != "fit":
            pl_module.to(dtype=self.dtype)  # the LightningModule's own dtype record follows the model's


class UnderflowOverflow(pl.Callback):
    """`debug="underflow_overflow"`: transformers' `DebugUnderflowOverflow` hooked on the model when fitting starts
    (before the strategy wraps it), as transformers attaches it in `train()`; it raises on the first inf/nan."""

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            from transformers.debug_utils import DebugUnderflowOverflow

            DebugUnderflowOverflow(pl_module.model)


class TorchCompile(pl.Callback):
    """`torch_compile`, `torch_compile_backend`, `torch_compile_mode`: the training forward compiled with the keyword
    arguments of accelerate's TorchDynamoPlugin, as transformers' `accelerator.prepare` compiles `model_wrapped`.

    The model is compiled in place (`nn.Module.compile`) rather than wrapped in an OptimizedModule, so that
    `trainer.model` stays the user's object and its state dict, checkpoints and optimizer state keep the parameter
    names without `_orig_mod.`. As in transformers, evaluation during and after training runs uncompiled (its
    `_wrap_model(self.model, training=False)`), and the compilation is dropped when training ends. One difference:
    transformers also compiles an evaluate()/predict() that runs before any train(); here those run uncompiled.
    """

    def __init__(self, backend: str | None, mode: str | None):
        from accelerate.utils import TorchDynamoPlugin

        # transformers' own plugin; the Neuron backend cannot compile graphs with dynamic shapes.
        self.kwargs = TorchDynamoPlugin(backend=backend, mode=mode,
                                        dynamic=False if backend == "neuron" else None).to_kwargs()
        self._set_aside = None

    def on_train_start(self, trainer, pl_module):
        pl_module.model.compile(**self.kwargs)

    def on_validation_start(self, trainer, pl_module):
        from .compat import compiled_call, set_compiled_call

        self._set_aside = compiled_call(pl_module.model)
        set_compiled_call(pl_module.model, None)

    def on_validation_end(self, trainer, pl_module):
        from .compat import set_compiled_call

        if self._set_aside is not None:
            set_compiled_call(pl_module.model, self._set_aside)
            self._set_aside = None

    def on_train_end(self, trainer, pl_module):
        self._drop(pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self._drop(pl_module)

    def _drop(self, pl_module):
        from .compat import set_compiled_call

        self._set_aside = None
        set_compiled_call(pl_module.model, None)


class LigerKernel(pl.Callback):
    """`use_liger_kernel` / `liger_kernel_config`: transformers' `apply_liger_kernel` (liger-kernel's
    `_apply_liger_kernel_to_instance(model=..., **liger_kernel_config)`) when fitting starts, where transformers'
    `train()` applies it (after `model_init`, before the model is wrapped). The `kernels` extra installs liger-kernel;
    its kernels are Triton GPU kernels, so a machine without CUDA is refused at `Trainer(...)` time."""

    def __init__(self, config: dict | None):
        self.config = dict(config or {})

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            from transformers.integrations.liger import apply_liger_kernel

            apply_liger_kernel(pl_module.model, self.config)


def feature_callbacks(args) -> list[pl.Callback]:
    """The callbacks these TrainingArguments switch on."""
    callbacks: list[pl.Callback] = []
    if args.neftune_noise_alpha is not None:
        callbacks.append(NEFTune(args.neftune_noise_alpha))
    if args.activation_checkpointing or args.gradient_checkpointing:
        callbacks.append(
            ActivationCheckpointing(args.activation_checkpointing_kwargs or args.gradient_checkpointing_kwargs)
        )
    if args.tf32 is not None:
        callbacks.append(TF32(args.tf32))
    if args.torch_empty_cache_steps is not None:
        callbacks.append(EmptyDeviceCache(args.torch_empty_cache_steps))
    if args.fp16_full_eval or args.bf16_full_eval:
        callbacks.append(FullEvalCast(torch.float16 if args.fp16_full_eval else torch.bfloat16))
    if "underflow_overflow" in [str(getattr(option, "value", option)) for option in args.debug or []]:
        callbacks.append(UnderflowOverflow())
    # TrainingArguments.__post_init__ already turned torch_compile on for a backend or mode, inductor by default.
    if args.torch_compile:
        callbacks.append(TorchCompile(args.torch_compile_backend, args.torch_compile_mode))
    if args.use_liger_kernel:
        callbacks.append(LigerKernel(args.liger_kernel_config))
    if getattr(args, "async_save", False) and args.save_strategy != "no":
        from .background_save import BackgroundSave

        callbacks.append(BackgroundSave())
    return callbacks


_destroy_registered = False


def release_process_group_at_exit() -> None:
    """Release the process group when the script ends, as Lightning does for NCCL only, and let the collectives'
    worker threads finish with their last results first. A gloo worker drops a finished collective's tensors a moment
    after the caller's `wait()` returns; when that moment falls after the interpreter began to shut down (a rank that
    ends right after its last collective, e.g. a non-zero rank after `save_model`), taking the GIL to release them
    aborts the process ("terminate called without an active exception", about one FSDP2 job in three on 2 busy
    cores, after the work is done). `destroy_process_group` does not stop those threads (the model's FSDP and DDP state
    still holds its groups), so the exit handler waits, with the GIL released, until no other thread of the process is
    runnable (Linux; a short sleep elsewhere)."""
    global _destroy_registered
    if not _destroy_registered and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.register(_destroy_process_group_and_settle)
        _destroy_registered = True


def _destroy_process_group_and_settle(timeout_s: float = 2.0) -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    wait_for_idle_threads(timeout_s)


def wait_for_idle_threads(timeout_s: float) -> bool:
    """Sleep in short steps until no thread of this process but the caller is runnable twice in a row (read from
    /proc/self/task); False if `timeout_s` passed first. Where /proc is missing, one 50 ms sleep."""
    me = str(threading.get_native_id())
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        time.sleep(0.05)
        return True
    deadline, quiet = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        time.sleep(0.005)
        busy = False
        for tid in os.listdir(tasks):
            if tid == me:
                continue
            try:
                with open(f"{tasks}/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):  # the thread ended since the listing
                continue
            busy = busy or state == "R"
        quiet = 0 if busy else quiet + 1
        if quiet >= 2:
            return True
    return False
