"""Checkpoints: transformers' `checkpoint-N/` folders, read by both doors (train() and Lightning's fit(ckpt_path=)).

A folder holds what transformers.Trainer writes (model via save_pretrained, processing class, optimizer.pt,
scheduler.pt, scaler.pt, rng_state[_rank].pth, trainer_state.json, training_args.bin) and, only when
`save_lightning_checkpoint=True`, the export `lightning.ckpt` (Lightning's own dict: state_dict, optimizer_states,
lr_schedulers, loops, callbacks, hyper_parameters; the HF TrainerState and RNG states ride in the callbacks entry).
It is written under a temporary name and renamed into place, so `get_last_checkpoint` never sees a partial one.

Resuming reads either format and restores weights, optimizer, scheduler, TrainerState and, at the point transformers
does, the RNG states; nothing is unpickled beyond tensors and the RNG allow-list (training_args.bin is never read).
Lightning's `fit(ckpt_path=<folder> | "last")` reads the same folder through `FolderCheckpointIO`; an incomplete
folder (see `missing_training_state`) is refused or, given explicitly to train(), warned about.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import threading
from dataclasses import dataclass

import numpy as np
import safetensors.torch
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from transformers.trainer_callback import TrainerState
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    compare_trainer_and_checkpoint_args,
    get_last_checkpoint,
    rotate_checkpoints,
    sort_checkpoints,
)
from transformers.utils import SAFE_WEIGHTS_NAME

from . import adapters, compat, gpu_checkpoints, sharding
from .background_save import BackgroundSave, snapshots_model
from .optimizers import OptimizerQuirks, optimizer_state_globals
from .run import RunState, TrainerHooks, TrainingPlan

hf_logger = logging.getLogger("transformers.trainer")  # where transformers logs these lines (users' config sees them)

TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
TRAINING_ARGS_NAME = "training_args.bin"
LIGHTNING_CKPT_NAME = "lightning.ckpt"
FLOW_KEY = "hf_lightning.TrainingFlow"


# ---------------------------------------------------------------------- paths


def resolve_resume_path(args, resume_from_checkpoint) -> str | None:
    """None, True (latest complete checkpoint in output_dir), a checkpoint-N folder or a .ckpt file."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        if args.should_save:
            _clean_interrupted_saves(args.output_dir)
        path = _last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if path is None:
            raise ValueError(  # transformers' message first, so code matching it keeps working
                f"No valid checkpoint found in output directory ({args.output_dir}): resume_from_checkpoint=True but "
                "no checkpoint-N folder was found there."
            )
        # Another rank than the saving one may find it still aside (see _last_checkpoint): its files are there.
        folder = path if os.path.isdir(path) else os.path.join(os.path.dirname(path), f"tmp-old-{os.path.basename(path)}")
        missing = missing_training_state(folder, args) if os.path.isdir(folder) else []
        if missing:
            raise ValueError(
                f"The latest checkpoint {path} is incomplete: it lacks {', '.join(missing)} (it was not saved with "
                "save_only_model, which leaves out all of them). Resuming it would continue with a fresh optimizer "
                "state, silently. Restore the missing file, delete the folder to resume from the previous checkpoint, "
                "or pass its path as resume_from_checkpoint to resume it anyway."
            )
        return path
    path = os.fspath(resume_from_checkpoint)
    if not os.path.exists(path):
        raise ValueError(f"Can't find a valid checkpoint at {path}: resume_from_checkpoint={path!r} does not exist.")
    if os.path.isdir(path) and not (
        os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)) or os.path.isfile(os.path.join(path, LIGHTNING_CKPT_NAME))
    ):
        raise ValueError(
            f"Can't find a valid checkpoint at {path}: resume_from_checkpoint={path!r} is not a checkpoint folder "
            f"(it has no {TRAINER_STATE_NAME})."
        )
    if os.path.isdir(path) and (missing := missing_training_state(path, args)):
        hf_logger.warning(
            f"CHECKPOINT INCOMPLETE: {path} lacks {', '.join(missing)} and was not saved with save_only_model (which "
            "leaves out all of them). Resuming it as asked, with the missing state started afresh: the run will NOT "
            "continue as the interrupted one would have."
        )
    return path


def missing_training_state(folder: str, args) -> list[str]:
    """The training-state files a checkpoint folder lacks; [] when complete or saved with `save_only_model`.

    Neither trainer_state.json nor anything else readable without unpickling records `save_only_model`
    (training_args.bin does, but it is never unpickled here). transformers and hf_lightning write optimizer.pt,
    scheduler.pt and rng_state*.pth together unless save_only_model is set, and then none of them (nor
    lightning.ckpt): a folder without all three (and no lightning.ckpt) is a model-only checkpoint, one without
    some of them is damaged."""
    rng_names = [n for n in os.listdir(folder) if re.fullmatch(r"rng_state(_\d+)?\.pth", n)]
    missing = [n for n in (OPTIMIZER_NAME, SCHEDULER_NAME) if not os.path.isfile(os.path.join(folder, n))]
    if OPTIMIZER_NAME in missing and os.path.isdir(os.path.join(folder, sharding.OPTIMIZER_DIR)):
        missing.remove(OPTIMIZER_NAME)  # written from sharded state (FSDP2, FSDP1), as a DCP folder
    engine = gpu_checkpoints.has_engine_checkpoint(folder)
    if OPTIMIZER_NAME in missing and engine:
        missing.remove(OPTIMIZER_NAME)  # in DeepSpeed's own checkpoint (global_stepN/), as transformers writes it
    if not rng_names:
        missing.append(_rng_file(args))
    # ZeRO-3 without stage3_gather_16bit_weights_on_model_save writes the engine's checkpoint to get the weights,
    # under save_only_model too (as transformers' save_model): its optimizer state alone is no training state.
    model_only = (len(missing) == 3 or (engine and len(missing) == 2 and OPTIMIZER_NAME not in missing)) and (
        not os.path.isfile(os.path.join(folder, LIGHTNING_CKPT_NAME)))
    return [] if model_only else missing


def sorted_checkpoints(output_dir: str) -> list[str]:
    return sort_checkpoints(output_dir=output_dir) if os.path.isdir(output_dir) else []


# ---------------------------------------------------------------------- saving


def load_checkpoint_weights(model, folder: str) -> None:
    """A `checkpoint-N/` folder's weights into `model`, refused with a clear error if they do not fit it
    (transformers' `Trainer._load_from_checkpoint`)."""
    _load_weights(model, folder)


def save_model_folder(hooks: TrainerHooks, output_dir: str, final_dir: str | None = None) -> None:
    """save_pretrained (or safetensors for a plain nn.Module), the processing class and training_args.bin;
    announced as transformers does, naming `final_dir` (the folder `output_dir` becomes) when given.

    A schedule-free optimizer is switched to eval() mode first, so that the saved weights are the averaged ones a
    user deploys (transformers 5.24 saves the training iterate); the next training step switches it back.
    A sharded (FSDP2) model is gathered first: every rank must call this, rank 0 writes the consolidated weights."""
    model_folder_writer(hooks, output_dir, final_dir)()


def model_folder_writer(hooks: TrainerHooks, output_dir: str, final_dir: str | None = None,
                        background: BackgroundSave | None = None, engine_saved: bool = False):
    """save_model_folder's work as a function to call later (one that does nothing on a process that does not save).
    A sharded model is gathered here, on every rank. With `background` (async_save), the weights are copied into its
    buffers now and the function writes the copy, model.safetensors around the page cache (the rest of the folder by
    save_pretrained; see compat.save_pretrained_weights); a model whose weights are not copied (see
    `snapshots_model`) is written now. `engine_saved`: DeepSpeed's engine checkpoint was just written into
    `output_dir` (every rank)."""
    model, processing_class, args = hooks.model, hooks.processing_class, hooks.args
    weights = sharding.full_state_dict(model) if sharding.is_sharded(model) else (  # ZeRO-3, FSDP1
        gpu_checkpoints.full_state_dict(gpu_checkpoints.strategy_of(hooks), model, output_dir, engine_saved))
    if not args.should_save:
        return lambda: None
    OptimizerQuirks(hooks.optimizer).eval()
    hf_logger.info(f"Saving model checkpoint to {final_dir or output_dir}")
    files = None  # where the weights are a copy in CPU buffers: the writer of model.safetensors around the page cache
    if weights is None and background is not None and snapshots_model(model):
        weights = background.buffers.take(model.state_dict(), ("model",))
        files = background.files

    def write() -> None:
        os.makedirs(output_dir, exist_ok=True)
        with _paths_logged_as(output_dir, final_dir):
            if hasattr(model, "save_pretrained"):
                # save_pretrained pops the tensors it writes from the dict it is given: a fresh one, buffers stay
                tensors = None if files is None else compat.save_pretrained_weights(model, weights)
                if tensors is not None:  # save_pretrained writes the rest of the folder
                    model.save_pretrained(output_dir, state_dict={})
                    files.write_safetensors(os.path.join(output_dir, SAFE_WEIGHTS_NAME), tensors, {"format": "pt"})
                else:
                    model.save_pretrained(output_dir, **({} if weights is None else {"state_dict": dict(weights)}))
            else:
                safetensors.torch.save_file(
                    {k: v.contiguous() for k, v in (model.state_dict() if weights is None else weights).items()},
                    os.path.join(output_dir, SAFE_WEIGHTS_NAME))
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(output_dir)
        torch.save(_args_to_save(args), os.path.join(output_dir, TRAINING_ARGS_NAME))  # never loaded here

    if background is not None and weights is None:
        write()
        return lambda: None
    return write


def _args_to_save(args):
    """The args as transformers pickles them; objects in lightning_trainer_kwargs (a strategy holds the model once it
    ran, and an FSDP2-sharded class cannot be pickled) are recorded by their repr."""
    extra = getattr(args, "lightning_trainer_kwargs", None)
    plain = (str, int, float, bool, type(None))
    if not extra or all(isinstance(value, plain) for value in extra.values()):
        return args
    saved = copy.copy(args)
    saved.lightning_trainer_kwargs = {k: v if isinstance(v, plain) else repr(v) for k, v in extra.items()}
    return saved


class _RenamePath(logging.Filter):
    def __init__(self, old: str, new: str):
        super().__init__()
        self.old, self.new = old, new

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and self.old in record.msg:
            record.msg = record.msg.replace(self.old, self.new)
        if isinstance(record.args, tuple):
            record.args = tuple(a.replace(self.old, self.new) if isinstance(a, str) else a for a in record.args)
        return True


@contextlib.contextmanager
def _paths_logged_as(tmp_dir: str, final_dir: str | None):
    """transformers' save_pretrained lines ("Configuration saved in ...") name the folder the user will find, not
    the temporary one it is renamed from; for this block only, on transformers' loggers only."""
    if final_dir is None:
        yield
        return
    rename = _RenamePath(tmp_dir, final_dir)
    loggers = [
        logger for name, logger in list(logging.root.manager.loggerDict.items())
        if (name == "transformers" or name.startswith("transformers.")) and isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        logger.addFilter(rename)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(rename)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def _rng_file(args) -> str:
    return "rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"


def save_checkpoint(hooks: TrainerHooks, run: RunState, lightning_trainer, trial=None) -> str:
    """Write output_dir/checkpoint-{global_step}/ atomically (a search trial's: under output_dir/run-{id}/); returns
    its path. With `async_save`, what training changes is copied here and the files are written, flushed and renamed
    in by the writer thread (background_save.py)."""
    args, state = run.args, run.state
    run_dir = hooks._get_output_dir(trial)
    background = BackgroundSave.of(lightning_trainer)
    if background is not None:
        background.wait()  # the previous checkpoint is in place: the clean-up, best checkpoint and rotation read it
        if lightning_trainer.received_sigterm:
            background = None  # the process exits after this save: written here, before it does
    buffers = background.buffers if background is not None and args.should_save else None
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    final_dir = os.path.join(run_dir, name)
    tmp_dir = os.path.join(run_dir, f"tmp-{name}")
    strategy = lightning_trainer.strategy
    if args.should_save:
        _clean_interrupted_saves(run_dir)  # tmp-checkpoint-* of killed saves, this step's included
    strategy.barrier("hf_lightning.save_checkpoint.start")
    if hooks.hp_search_backend is None and trial is None:  # as transformers: a trial's flos move at logs only
        run.store_flos(strategy)
    engine_saved = not args.save_only_model and gpu_checkpoints.save_engine_checkpoint(strategy, hooks.model, tmp_dir)
    write_model = model_folder_writer(hooks, tmp_dir, final_dir, background if buffers is not None else None,
                                      engine_saved)  # gathers on every rank
    if state.best_global_step and args.save_strategy in ("steps", "epoch", "best"):
        best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
        # As transformers: only a folder that exists (this one, being written, or an earlier one).
        if state.best_global_step == state.global_step or os.path.isdir(best_dir):
            state.best_model_checkpoint = best_dir
    copied = (lambda value: value) if buffers is None else copy.deepcopy
    files = []  # (name, state) torch.save writes
    if not args.save_only_model:
        sharded = sharding.is_sharded(hooks.model) or gpu_checkpoints.fsdp1_root(strategy) is not None
        if sharded:  # every rank writes its shard of the optimizer state
            sharding.save_optimizer(gpu_checkpoints.optimizer_root(strategy, hooks.model), hooks.optimizer,
                                    os.path.join(tmp_dir, sharding.OPTIMIZER_DIR))
        if args.should_save:
            if not sharded and not engine_saved:
                optimizer_state = hooks.optimizer.state_dict()
                files.append((OPTIMIZER_NAME, optimizer_state if buffers is None else buffers.take(optimizer_state,
                                                                                                    ("optimizer",))))
            files.append((SCHEDULER_NAME, copied(hooks.lr_scheduler.state_dict())))
            scaler = getattr(lightning_trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                files.append((SCALER_NAME, copied(scaler.state_dict())))
        # Every rank's RNG file, here and now (it is small): in before the ranks meet below, and the state of now.
        os.makedirs(tmp_dir, exist_ok=True)
        torch.save(rng_state(), os.path.join(tmp_dir, _rng_file(args)))
    trainer_state = None
    if args.should_save:
        _refresh_stateful_callbacks(run)
        trainer_state = copied(state)
    if getattr(args, "save_lightning_checkpoint", False) and not args.save_only_model:
        # the full state (optimizer, loops, callbacks): said explicitly, as Lightning otherwise notes its default
        lightning_trainer.save_checkpoint(os.path.join(tmp_dir, LIGHTNING_CKPT_NAME), weights_only=False)
    best_model_checkpoint = state.best_model_checkpoint

    def write_files() -> None:
        with EarlyWriteback(tmp_dir):
            if write_model is not None:
                write_model()
            for file_name, value in files:
                if background is None:
                    torch.save(value, os.path.join(tmp_dir, file_name))
                else:  # the writer thread: around the page cache (background_save.DirectWriter)
                    with background.files.open(os.path.join(tmp_dir, file_name)) as f:
                        torch.save(value, f)
            if trainer_state is not None:
                trainer_state.save_to_json(os.path.join(tmp_dir, TRAINER_STATE_NAME))

    def put_in_place() -> None:
        _replace_dir_atomically(tmp_dir, final_dir)
        if args.push_to_hub:  # before the rotation, as transformers (the push runs in the background)
            hooks._push_from_checkpoint(final_dir)
        rotate_checkpoints(run_dir, args.save_total_limit, best_model_checkpoint)

    if background is None:
        write_files()
    strategy.barrier("hf_lightning.save_checkpoint.written")  # every rank's files are in before the rename
    if args.should_save and background is None:
        put_in_place()
    elif args.should_save:
        buffers.seal()
        background.submit(lambda: (buffers.ready(), write_files(), put_in_place()))
    return final_dir


def wait_for_saves(lightning_trainer) -> None:
    """With `async_save`: until the checkpoint being written in the background is in place (raises its error)."""
    background = BackgroundSave.of(lightning_trainer)
    if background is not None:
        background.wait()


def _refresh_stateful_callbacks(run: RunState) -> None:
    stateful = {}
    for cb in run.stateful_callbacks():
        name = cb.__class__.__name__
        if name in stateful:
            if not isinstance(stateful[name], list):
                stateful[name] = [stateful[name]]
            stateful[name].append(cb.state())
        else:
            stateful[name] = cb.state()
    run.state.stateful_callbacks = stateful


# ---------------------------------------------------------------------- Lightning .ckpt entry of the flow


def flow_state_dict(run: RunState) -> dict:
    _refresh_stateful_callbacks(run)
    return {
        "trainer_state": json.dumps(dataclasses.asdict(run.state), sort_keys=True),  # as save_to_json
        "rng": {str(run.args.process_index): _tensors_only(rng_state())},
    }


def _tensors_only(state: dict) -> dict:
    """The RNG state with numpy's array as a tensor, so that Lightning's weights_only loading accepts the .ckpt."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}


def _numpy_state(value) -> tuple:
    kind, keys, pos, has_gauss, cached = value
    if torch.is_tensor(keys):
        keys = keys.numpy().astype(np.uint32)
    return (kind, keys, pos, has_gauss, cached)


def load_flow_state_dict(run: RunState, state_dict: dict):
    """Restore the TrainerState from a .ckpt's callback entry; returns this rank's RNG state."""
    ranks = (run.state.is_local_process_zero, run.state.is_world_process_zero)
    run.state = _state_from_json(json.loads(state_dict["trainer_state"]))
    # which process this is (the checkpoint's file says rank 0's, on every rank)
    run.state.is_local_process_zero, run.state.is_world_process_zero = ranks
    rngs = state_dict.get("rng", {})
    return rngs.get(str(run.args.process_index)) or next(iter(rngs.values()), None)


def _state_from_json(data: dict) -> TrainerState:
    return TrainerState(**data)


# ---------------------------------------------------------------------- best model


def metric_key(args) -> str:
    metric = args.metric_for_best_model
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def determine_best_metric(run: RunState, metrics: dict) -> bool:
    """transformers' `_determine_best_metric`: updates state.best_metric / best_global_step."""
    args, state = run.args, run.state
    if args.metric_for_best_model is None:
        return False
    key = metric_key(args)
    if key not in metrics:
        raise KeyError(
            f"TrainingArguments.metric_for_best_model={args.metric_for_best_model!r}: '{key}' is not among the "
            f"evaluation metrics {sorted(metrics)}. Return it from compute_metrics or change metric_for_best_model."
        )
    value = metrics[key]
    better = np.greater if args.greater_is_better else np.less
    if state.best_metric is None:
        state.best_metric = float("-inf") if args.greater_is_better else float("inf")
    if better(value, state.best_metric):
        state.best_metric = value
        if args.save_strategy in ("steps", "epoch", "best"):
            state.best_global_step = state.global_step
        return True
    return False


_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


_peft_model = adapters.peft_model


def _adapter_config_line(folder: str) -> str:
    try:
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):
        return "an adapter (no readable adapter_config.json)"
    keys = ("peft_type", "r", "target_modules", "base_model_name_or_path")
    show = lambda value: sorted(value) if isinstance(value, list) else value  # noqa: E731 - saved from a set
    return "adapter config " + ", ".join(f"{k}={show(config.get(k))!r}" for k in keys if k in config)


def _load_adapter_weights(model, folder: str) -> None:
    """transformers' `_load_from_checkpoint` for a PEFT model: the active adapter's weights from
    adapter_model.safetensors. transformers calls `model.load_adapter(folder, active, is_trainable=True)`, which
    loads the same tensors through `set_peft_model_state_dict`; called directly here because hf_lightning restores
    after the optimizer exists, and load_adapter may rebuild the adapter layers (new Parameters the optimizer would
    not hold) where set_peft_model_state_dict copies into the existing ones."""
    from peft import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    active = model.active_adapters
    if len(active) > 1:
        hf_logger.warning("Multiple active adapters detected will only consider the first adapter")
    subdirs = [name for name in sorted(os.listdir(folder)) if any(
        os.path.isfile(os.path.join(folder, name, file)) for file in _ADAPTER_FILES)]
    if subdirs or not any(os.path.isfile(os.path.join(folder, file)) for file in _ADAPTER_FILES):
        raise ValueError(
            f"Checkpoint {folder!r} holds no adapter_model.safetensors for the PEFT model's adapter {active[0]!r}"
            + (f" (it holds adapters in {subdirs}: hf_lightning resumes one adapter per model)" if subdirs else "")
            + ": it cannot be resumed.")
    try:
        state_dict = load_peft_weights(folder, device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors names no file ("incomplete metadata")
        raise ValueError(f"Cannot read the adapter weights in {folder!r} ({type(err).__name__}: {err}).") from err
    mine = model.peft_config[active[0]]
    targets = getattr(mine, "target_modules", None)
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets  # a set in memory
    refuse = lambda detail: ValueError(  # noqa: E731
        f"Checkpoint {folder!r} ({_adapter_config_line(folder)}) does not fit the model's adapter {active[0]!r} "
        f"(peft_type={getattr(mine.peft_type, 'value', mine.peft_type)!r}, r={getattr(mine, 'r', None)!r}, "
        f"target_modules={targets!r}): {detail}. Wrap the model with the adapter "
        "config the checkpoint was written with.")
    # Compared in the saved form (adapter name stripped) before loading, so a mismatch loads nothing; the base
    # model's keys are all absent from the file by design.
    own = set(get_peft_model_state_dict(model, adapter_name=active[0]))
    missing, unexpected = own - set(state_dict), set(state_dict) - own
    if missing or unexpected:
        raise refuse(f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    try:
        result = set_peft_model_state_dict(model, state_dict, adapter_name=active[0])
    except RuntimeError as err:  # torch names each size mismatch
        raise refuse(str(err)) from err
    if result.unexpected_keys:
        raise refuse(f"unexpected {sorted(result.unexpected_keys)[:5]}")


def _load_weights(model, folder: str, strategy=None) -> None:
    """`strategy`: the Lightning strategy `model` trains under, where its state is not the model's own (DeepSpeed's
    engine, FSDP1's root)."""
    from transformers.trainer_utils import load_sharded_checkpoint

    if gpu_checkpoints.load_engine_checkpoint(strategy, model, folder):  # as transformers' deepspeed_load_checkpoint
        return
    fsdp1_load = gpu_checkpoints.fsdp1_loader(strategy, model)
    single = os.path.join(folder, "model.safetensors")
    if _peft_model(model) is not None and not os.path.isfile(single):
        _load_adapter_weights(model, folder)
    elif os.path.isfile(os.path.join(folder, "adapter_config.json")) and not os.path.isfile(single):
        raise ValueError(
            f"Checkpoint {folder!r} holds PEFT adapter weights ({_adapter_config_line(folder)}), but the model is a "
            f"plain {model.__class__.__name__} with no adapters: wrap it with peft's get_peft_model(model, <that "
            "config>) before resuming, as it was when the checkpoint was written.")
    elif os.path.isfile(single):
        try:
            state_dict = safetensors.torch.load_file(single, device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors names no file ("incomplete metadata")
            raise ValueError(f"Cannot read the model weights from {single!r} ({type(err).__name__}: {err}). The file "
                             "is corrupt or truncated.") from err
        if sharding.is_sharded(model):  # consolidated weights into this run's shards
            _load_state_dict_checked(model, state_dict, single, load=sharding.load_full_state_dict)
        elif fsdp1_load is not None:
            _load_state_dict_checked(model, state_dict, single, load=fsdp1_load)
        else:
            _load_state_dict_checked(model, state_dict, single)
    elif os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        try:
            load_sharded_checkpoint(model, folder, strict=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"Cannot read the sharded model weights in {folder!r} ({type(err).__name__}: {err}).") from err
    else:
        raise ValueError(f"Checkpoint {folder!r} holds no model.safetensors: it cannot be resumed.")


def _load_state_dict_checked(model, state_dict: dict, source: str, load=None) -> None:
    """The model's own `load_state_dict(state_dict, strict=False)`, as transformers resumes (an override may resize
    buffers or rename keys first), then refusing what does not fit where transformers would only warn: keys missing
    (other than the tied weights save_pretrained drops) or unexpected, or tensors of another shape."""
    def refuse(detail: str):
        # Like transformers, the keys that fit are loaded before the mismatch is known.
        return ValueError(
            f"{source} does not fit {model.__class__.__name__}: {detail}. Resume with the model the checkpoint was "
            "written from (the model passed in may now be partly loaded: rebuild it before retrying)."
        )

    try:
        result = model.load_state_dict(state_dict, strict=False) if load is None else load(model, state_dict)
    except RuntimeError as err:  # torch names each size mismatch
        raise refuse(str(err)) from err
    if result is None:  # an override that returns nothing: compare the names after its load
        own = set(model.state_dict())
        missing, unexpected = own - set(state_dict), set(state_dict) - own
    else:
        missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
    if missing:
        # save_pretrained drops a weight tied to another one (lm_head to the embeddings); it came back with it.
        own = model.state_dict()
        tied_keys = compat.tied_weight_keys(model)
        loaded = {own[k].data_ptr() for k in own if k not in missing}
        missing = {k for k in missing if not (own[k].data_ptr() in loaded
                                              and any(re.fullmatch(t, k) or k == t for t in tied_keys))}
    if missing or unexpected:
        raise refuse(f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_best_model(model, state: TrainerState, strategy=None) -> None:
    folder = state.best_model_checkpoint
    hf_logger.info(f"Loading best model from {folder} (score: {state.best_metric}).")
    _load_weights(model, folder, strategy)


# ---------------------------------------------------------------------- resume


@dataclass
class ResumePoint:
    """Where a resumed run starts, and the RNG state to restore before its first forward."""

    epochs_trained: int
    windows_to_skip: int
    rng: dict | None

    def __post_init__(self):
        self._pending_rng = self.rng is not None

    def restore_rng_at_epoch_start(self, epoch: int) -> None:
        # At an epoch boundary transformers restores the RNG before iterating the epoch.
        if self._pending_rng and epoch == self.epochs_trained and self.windows_to_skip == 0:
            set_rng_state(self.rng)
            self._pending_rng = False

    def before_first_window(self) -> None:
        # Mid-epoch, after the DataLoader iterator was created and the consumed windows skipped.
        if self._pending_rng:
            set_rng_state(self.rng)
            self._pending_rng = False


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.random.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.random.set_rng_state_all(state["cuda"])


def _torch_load(path: str, what: str):
    try:
        with safe_globals(), torch.serialization.safe_globals(optimizer_state_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"Cannot read {what} from {path!r} ({type(err).__name__}: {err}). The file is corrupt, "
                         "truncated or not a checkpoint written by transformers/hf_lightning.") from err


def restore_training_state(hooks: TrainerHooks, run: RunState, lightning_trainer, path: str,
                           plan: TrainingPlan) -> ResumePoint:
    """Load weights, optimizer, scheduler, TrainerState and RNG from a checkpoint folder or a .ckpt file, and move
    Lightning's loop counters to the resumed step (Lightning restores its own loops only from its own ckpt_path)."""
    args = run.args
    hf_logger.info(f"Loading model from {path}.")
    if os.path.isfile(path):
        state, rng = _restore_from_lightning_ckpt(hooks, args, path)
    else:
        state, rng = _restore_from_folder(hooks, args, lightning_trainer, path)
    compare_trainer_and_checkpoint_args(args, state)  # the "save_steps: X (from args) != Y" warning
    state.max_steps = plan.max_steps
    state.num_train_epochs = plan.num_train_epochs
    # logging/eval/save steps stay the checkpoint's, as in transformers (which warns when the args differ, above)
    state.train_batch_size = run.state.train_batch_size
    # init_training_references: which process this is (the checkpoint's file says rank 0's, on every rank)
    state.is_local_process_zero = run.state.is_local_process_zero
    state.is_world_process_zero = run.state.is_world_process_zero
    if state.best_model_checkpoint is not None and not os.path.isdir(state.best_model_checkpoint):
        hf_logger.warning(
            f"The best checkpoint {state.best_model_checkpoint} recorded in the resumed state does not "
            "exist anymore. Ignoring it for this run."
        )
        state.best_model_checkpoint = None
    run.state = state
    load_callback_states(run)
    point = resume_point(run, plan, rng)
    compat.move_fit_loop_to(lightning_trainer, state.global_step, point.epochs_trained)
    return point


def resume_point(run: RunState, plan: TrainingPlan, rng: dict | None) -> ResumePoint:
    """transformers' rule: whole epochs done, then the update steps (windows) done in the current one."""
    epochs_trained = run.state.global_step // plan.updates_per_epoch
    windows_to_skip = 0 if run.args.ignore_data_skip else run.state.global_step % plan.updates_per_epoch
    return ResumePoint(epochs_trained, windows_to_skip, rng)


def _restore_from_folder(hooks: TrainerHooks, args, lightning_trainer, folder: str):
    strategy = lightning_trainer.strategy
    _load_weights(hooks.model, folder, strategy)  # DeepSpeed: the engine's checkpoint, its optimizer state included
    state_file = os.path.join(folder, TRAINER_STATE_NAME)
    try:
        state = TrainerState.load_from_json(state_file)
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"Cannot read {state_file!r}: {err}") from err
    sharded_optimizer = os.path.join(folder, sharding.OPTIMIZER_DIR)
    if os.path.isdir(sharded_optimizer):  # written from FSDP2/FSDP1 shards: DCP reshards it to this run's processes
        sharding.load_optimizer(gpu_checkpoints.optimizer_root(strategy, hooks.model), hooks.optimizer,
                                sharded_optimizer)
    elif (sharding.is_sharded(hooks.model) or gpu_checkpoints.fsdp1_root(strategy) is not None) and os.path.isfile(
            os.path.join(folder, OPTIMIZER_NAME)):
        raise ValueError(
            f"{folder} holds optimizer.pt, written by an unsharded run; this run shards the model (fsdp). Resume it "
            "without fsdp, or start the fsdp run from its weights (model.safetensors) with a fresh optimizer.")
    for name, target in ((OPTIMIZER_NAME, hooks.optimizer), (SCHEDULER_NAME, hooks.lr_scheduler)):
        file = os.path.join(folder, name)
        if os.path.isfile(file) and not (name == OPTIMIZER_NAME and gpu_checkpoints.deepspeed_engine(strategy)):
            _load_into(target, _torch_load(file, name), file)
    scaler = getattr(lightning_trainer.precision_plugin, "scaler", None)
    if scaler is not None and os.path.isfile(os.path.join(folder, SCALER_NAME)):
        scaler.load_state_dict(_torch_load(os.path.join(folder, SCALER_NAME), SCALER_NAME))
    rng = None
    for candidate in (_rng_file(args), "rng_state.pth"):
        file = os.path.join(folder, candidate)
        if os.path.isfile(file):
            rng = _torch_load(file, "the RNG state")
            break
    return state, rng


def _restore_from_lightning_ckpt(hooks: TrainerHooks, args, file: str):
    checkpoint = _torch_load(file, "a Lightning checkpoint")
    missing = [k for k in ("state_dict", "callbacks") if k not in checkpoint]
    if missing or FLOW_KEY not in checkpoint["callbacks"]:
        raise ValueError(f"{file!r} is not an hf_lightning checkpoint: it lacks {missing or [FLOW_KEY]}.")
    prefix = "model."
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if _peft_model(hooks.model) is not None:  # the trainable weights only (adapters.py)
        adapters.load_trainable(hooks.model, weights, file)
    else:
        _load_state_dict_checked(hooks.model, weights, file)
    if checkpoint.get("optimizer_states"):
        _load_into(hooks.optimizer, checkpoint["optimizer_states"][0], file)
    if checkpoint.get("lr_schedulers"):
        _load_into(hooks.lr_scheduler, checkpoint["lr_schedulers"][0], file)
    flow_state = checkpoint["callbacks"][FLOW_KEY]
    state = _state_from_json(json.loads(flow_state["trainer_state"]))
    rngs = flow_state.get("rng", {})
    rng = rngs.get(str(args.process_index)) or next(iter(rngs.values()), None)
    return state, rng


def _load_into(target, state_dict, source: str) -> None:
    if isinstance(target, torch.optim.Optimizer) and state_dict.get("param_groups"):
        saved = set(state_dict["param_groups"][0]) - {"params"}
        current = set(target.param_groups[0]) - {"params"}
        if current - saved:
            raise ValueError(
                f"{source} was written by another optimizer than this run's {type(target).__name__} (it lacks the "
                f"settings {sorted(current - saved)}). Resume with the `optim` the checkpoint was written with."
            )
    try:
        target.load_state_dict(state_dict)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(
            f"{source} does not fit this run's {type(target).__name__} ({err}). Resume with the optimizer and "
            "scheduler the checkpoint was written with."
        ) from err


def load_callback_states(run: RunState) -> None:
    """`restore_callback_states_from_checkpoint`: the saved callbacks and TrainerControl, as transformers restores
    them (see `RunState.load_callback_state`)."""
    if not run.args.restore_callback_states_from_checkpoint:
        return
    not_found = run.load_callback_state()
    if set(run.state.stateful_callbacks or {}) - set(not_found):
        hf_logger.info("Continuing training from checkpoint, restoring any callbacks that were passed in")
    if not_found:
        hf_logger.warning(
            "Checkpoint included callbacks not included in current configuration. Ignoring. (%s)", ", ".join(not_found)
        )


def model_from_lightning_checkpoint(path: str, base_model=None):
    """Rebuild the trained transformers model from a `lightning.ckpt` alone (its config and class travel in
    `hyper_parameters`, its weights in `state_dict`). A PEFT model's checkpoint holds its adapters only: they are
    put on `base_model` (the model without adapters they were trained on), or on the one their adapter config
    names (`base_model_name_or_path`), as peft's `PeftModel.from_pretrained` does."""
    import transformers

    checkpoint = _torch_load(path, "a Lightning checkpoint")
    hparams = checkpoint.get("hyper_parameters", {})
    if "model_config" not in hparams or "model_class" not in hparams:
        raise ValueError(f"{path!r} carries no model config: it was not written by hf_lightning from a transformers model.")
    if "peft_config" in hparams:
        weights = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        return adapters.rebuild(hparams, weights, base_model, path)
    if base_model is not None:
        raise ValueError(f"{path!r} holds a whole {hparams['model_class']} (no adapters): base_model= is for the "
                         "checkpoint of a PEFT model.")
    config_dict = dict(hparams["model_config"])
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model_cls = getattr(transformers, hparams["model_class"], None)
    if model_cls is None:
        raise ValueError(f"{path!r}: transformers has no class {hparams['model_class']}.")
    model = model_cls(config)
    weights = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    _load_state_dict_checked(model, weights, path)
    return model


# ---------------------------------------------------------------------- crash-safe folder replacement


_INTERRUPTED_SAVE = re.compile(rf"tmp-(old-)?({PREFIX_CHECKPOINT_DIR}-\d+)")  # names get_last_checkpoint ignores


def _replace_dir_atomically(tmp_dir: str, final_dir: str) -> None:
    """Put the complete tmp_dir in place as final_dir, its files and folder flushed to disk before the rename.

    An existing final_dir (a step saved again) is renamed aside to tmp-old-<name> and deleted only once the new one
    is in place, so a kill at any point leaves a complete final_dir or, between the two renames, the old one aside,
    which `_last_checkpoint` counts and `_clean_interrupted_saves` puts back."""
    for root, _, files in os.walk(tmp_dir):
        for name in files:
            _fsync(os.path.join(root, name), release_pages=True)
        _fsync(root, directory=True)
    parent, name = os.path.split(final_dir)
    old_dir = os.path.join(parent, f"tmp-old-{name}")
    replacing = os.path.isdir(final_dir)
    if replacing:
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    _fsync(parent, directory=True)
    if replacing:
        shutil.rmtree(old_dir)


class EarlyWriteback:
    """While a folder's files are written, a helper thread flushes what each holds so far to disk, again and again,
    so that the fsync `_replace_dir_atomically` must do before the rename finds little left: the disk writes of one
    file overlap the serialization of its rest and of the next files instead of all following the last one
    (fdatasync waits on the disk with the GIL released). The final fsync of every file and folder is unchanged; an
    error the helper meets is raised when the block ends (an fsync error is reported to one caller only)."""

    INTERVAL_S = 0.05

    def __init__(self, folder: str):
        self._folder = folder
        self._done = threading.Event()
        self._error: OSError | None = None
        self._flushed: dict[str, tuple] = {}  # path -> (size, mtime) at its last flush
        self._thread = threading.Thread(target=self._run, name="hf_lightning-writeback", daemon=True)

    def __enter__(self) -> EarlyWriteback:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()
        if self._error is not None and exc_info[0] is None:
            raise self._error

    def _run(self) -> None:
        try:
            while not self._done.wait(self.INTERVAL_S):
                self._flush_grown_files()
        except OSError as err:
            self._error = err

    def _flush_grown_files(self) -> None:
        for root, _, names in os.walk(self._folder):
            for name in names:
                path = os.path.join(root, name)
                try:
                    stat = os.stat(path)
                    version = (stat.st_size, stat.st_mtime_ns)
                    if self._flushed.get(path) == version:
                        continue
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:  # replaced or removed by its writer since the listing: nothing to flush
                    continue
                try:
                    os.fdatasync(fd) if hasattr(os, "fdatasync") else os.fsync(fd)
                finally:
                    os.close(fd)
                self._flushed[path] = version


def _fsync(path: str, directory: bool = False, release_pages: bool = False) -> None:
    """`release_pages`: once the file is on disk, its page-cache pages go back to the kernel's free pages, from
    which the next checkpoint's writes take theirs (on a VM, writing into fresh pages is most of a save's cost:
    see background_save.DirectWriter). Nothing reads a checkpoint's files in the process that wrote them, but a
    `load_best_model_at_end`, from the disk."""
    if directory and os.name != "posix":  # only POSIX can open and flush a directory
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if release_pages and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _clean_interrupted_saves(output_dir: str) -> None:
    """Tidy what killed saves left in output_dir (called by the saving process only): a tmp-checkpoint-N being
    written is deleted; a checkpoint-N moved aside to tmp-old-checkpoint-N is put back if no new checkpoint-N took
    its place, and deleted otherwise."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        match = _INTERRUPTED_SAVE.fullmatch(name)
        path = os.path.join(output_dir, name)
        if match is None or not os.path.isdir(path):
            continue
        final_dir = os.path.join(output_dir, match[2])
        if match[1] and not os.path.isdir(final_dir):
            os.replace(path, final_dir)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _last_checkpoint(output_dir: str) -> str | None:
    """get_last_checkpoint, also counting a checkpoint-N left under tmp-old-checkpoint-N by a kill between the two
    renames of `_replace_dir_atomically`: every rank then resolves the same checkpoint-N, which the saving process
    has put back (in `_clean_interrupted_saves`) before any rank reads it after the processes' rendezvous."""
    found = [path] if (path := get_last_checkpoint(output_dir)) else []
    for name in os.listdir(output_dir):
        match = _INTERRUPTED_SAVE.fullmatch(name)
        if match and match[1] and os.path.isdir(os.path.join(output_dir, name)):
            found.append(os.path.join(output_dir, match[2]))
    return max(found, key=lambda folder: int(folder.rsplit("-", 1)[1]), default=None)


# ---------------------------------------------------------------------- Lightning's door to the same folders


class FolderCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, reading transformers' `checkpoint-N/` folders as Lightning checkpoints.

    `lightning_trainer.fit(module, ckpt_path="out/checkpoint-20")` (or "last", see `LastCheckpointFinder`) gets the
    dict Lightning restores from: the folder's weights (loaded and checked here, tied weights and shards included),
    optimizer.pt and scheduler.pt as `optimizer_states`/`lr_schedulers`, scaler.pt as the precision plugin's state,
    and trainer_state.json plus this rank's RNG file as TrainingFlow's callback entry. There is no `loops` entry:
    TrainingFlow moves Lightning's loop counters to the resumed step, as for `train(resume_from_checkpoint=...)`.
    One copy of the state serves both doors; `lightning.ckpt` is only an export (`save_lightning_checkpoint`).
    Every load is `weights_only` unless the caller passes `weights_only=False` for a .ckpt file."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.module = None  # the LightningModule being fitted, set by TrainingFlow.setup

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        path = os.fspath(path)
        if not os.path.isdir(path):
            if weights_only is False:
                return super().load_checkpoint(path, map_location=map_location, weights_only=False)
            return _torch_load(path, "a Lightning checkpoint")
        if self.module is None:
            raise RuntimeError(f"{path!r} is a checkpoint folder: it can be read only while hf_lightning fits a module.")
        if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            raise ValueError(f"ckpt_path={path!r} is not a checkpoint folder (it has no {TRAINER_STATE_NAME}).")
        # Refused rather than warned about (as an explicit resume_from_checkpoint is): a CheckpointIO cannot tell
        # an explicit folder from the one "last" resolved to, and Lightning would resume with fresh state silently.
        missing = missing_training_state(path, self.args)
        if missing:
            raise ValueError(f"{path} is incomplete: it lacks {', '.join(missing)} (it was not saved with "
                             "save_only_model). Restore the file or resume from another checkpoint.")
        return lightning_checkpoint_from_folder(path, self.module, self.args)


def lightning_checkpoint_from_folder(folder: str, module, args) -> dict:
    import lightning

    _load_weights(module.model, folder, module.trainer.strategy)  # DeepSpeed: its engine's optimizer state too
    state_file = os.path.join(folder, TRAINER_STATE_NAME)
    try:
        with open(state_file, encoding="utf-8") as f:
            trainer_state = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read {state_file!r}: {err}") from err
    rng = None
    for candidate in (_rng_file(args), "rng_state.pth"):
        if os.path.isfile(os.path.join(folder, candidate)):
            rng = _torch_load(os.path.join(folder, candidate), "the RNG state")
            break
    optional = lambda name: (  # noqa: E731
        [_torch_load(os.path.join(folder, name), name)] if os.path.isfile(os.path.join(folder, name)) else [])
    checkpoint = {
        "pytorch-lightning_version": lightning.__version__,
        "epoch": int(trainer_state.get("epoch") or 0),
        "global_step": trainer_state["global_step"],
        # the weights just loaded (Lightning copies them onto themselves); not built where Lightning ignores it
        **({"state_dict": module.state_dict()} if gpu_checkpoints.restores_state_dict_entry(module.trainer.strategy)
           else {}),
        "optimizer_states": optional(OPTIMIZER_NAME),
        "lr_schedulers": optional(SCHEDULER_NAME),
        "callbacks": {FLOW_KEY: {"trainer_state": json.dumps(trainer_state, sort_keys=True),
                                 "rng": {str(args.process_index): rng} if rng is not None else {}}},
    }
    if os.path.isfile(os.path.join(folder, SCALER_NAME)):
        from lightning.pytorch.plugins.precision import MixedPrecision

        checkpoint[MixedPrecision.__qualname__] = optional(SCALER_NAME)[0]  # restored by its load_state_dict
    return checkpoint


class LastCheckpointFinder(ModelCheckpoint):
    """Makes Lightning's `fit(ckpt_path="last")` find the newest `checkpoint-N/` folder of output_dir; saves nothing
    (save_top_k=0, no save_last: hf_lightning writes the folders itself).

    Lightning resolves "last" among the files in a ModelCheckpoint's `dirpath` whose name starts with its
    `CHECKPOINT_NAME_LAST` and ends with its `FILE_EXTENSION` (documented class attributes), taking the most recently
    modified one; here those are the `checkpoint-N` folders (a killed save's tmp-checkpoint-N never matches)."""

    CHECKPOINT_NAME_LAST = PREFIX_CHECKPOINT_DIR
    FILE_EXTENSION = ""

    def __init__(self, output_dir: str):
        super().__init__(dirpath=output_dir, save_top_k=0, save_last=False)

    @property
    def state_key(self) -> str:
        # Lightning reads a callback's state_key around every hook call; ModelCheckpoint's builds a string of its
        # settings each time. One finder per Trainer: a constant key is unique.
        return "hf_lightning.LastCheckpointFinder"

    # Nothing of it goes into an exported lightning.ckpt: it tracks no saves.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
