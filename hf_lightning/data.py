"""Data: transformers' DataLoaders, grouped into gradient-accumulation windows for Lightning.

transformers prefetches the `gradient_accumulation_steps` micro-batches of one optimizer step (a *window*) before
running any of them, to count the label tokens of the whole window (`num_items_in_batch`) and to know how short the
last window of an epoch is. Here Lightning's "batch" is that window: one `training_step` = one optimizer step, so
Lightning's `global_step`, `max_steps` and progress bar count what transformers counts.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import os
import random
import sys
from functools import partial
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler
from transformers.trainer_callback import TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import (
    RemoveColumnsCollator, find_executable_batch_size, has_length, seed_worker, unwrap_peft_model,
)

from .run import TrainingPlan


def is_datasets_dataset(dataset) -> bool:
    """isinstance(dataset, datasets.Dataset) without importing `datasets` (it brings pandas and pyarrow): an object
    of that class exists only once the module is imported."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(dataset, module.Dataset)


# ---------------------------------------------------------------------- columns


def signature_columns(model, label_names: list[str]) -> list[str]:
    """The columns a batch may keep: the arguments of the model's forward, plus the label columns. A PEFT model's
    forward takes *args/**kwargs: transformers inspects its base model's, as here."""
    columns = list(inspect.signature(unwrap_peft_model(model).forward).parameters.keys())
    return columns + list(set(["label", "label_ids"] + list(label_names)))


def remove_unused_columns(dataset, columns: list[str], description: str | None, model_name: str):
    """transformers' `_remove_unused_columns` for a `datasets.Dataset`, refusing a dataset that keeps nothing."""
    kept = [k for k in columns if k in dataset.column_names]
    ignored = sorted(set(dataset.column_names) - set(columns))
    if ignored:  # transformers' notice, on its logger, in its words (and its column order)
        listed = ", ".join(set(dataset.column_names) - set(columns))
        dset_description = "" if description is None else f"in the {description} set"
        logging.getLogger("transformers.trainer").info(
            f"The following columns {dset_description} don't have a corresponding argument in "
            f"`{model_name}.forward` and have been ignored: {listed}."
            f" If {listed} are not expected by `{model_name}.forward`, "
            " you can safely ignore this message."
        )
    if not kept:
        raise ValueError(
            f"No column of the {description} dataset ({', '.join(dataset.column_names)}) is an argument of "
            f"{model_name}.forward ({', '.join(columns)}). Tokenize the dataset into the model's inputs (e.g. "
            "input_ids, attention_mask, labels), or set `remove_unused_columns=False` if your data_collator builds them."
        )
    return dataset.remove_columns(ignored) if ignored else dataset


def removing_collator(data_collator, columns: list[str], description: str | None, model_name: str):
    """transformers' collator wrapper that drops the columns the model does not take (for non-`datasets` data)."""
    return RemoveColumnsCollator(
        data_collator=data_collator,
        signature_columns=columns,
        logger=logging.getLogger("transformers.trainer"),
        description=description,
        model_name=model_name,
    )


@contextlib.contextmanager
def _preserved_rng():
    """Checks that peek at data must not shift the random streams training will draw from."""
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(states[0])
    np.random.set_state(states[1])


def check_batch_fits_model(model, dataloader: DataLoader, description: str) -> None:
    """Fail before training when the collated rows lack what the model's forward needs."""
    dataset = getattr(dataloader, "dataset", None)  # an overridden get_train_dataloader may return any iterable
    if dataset is None or not hasattr(dataloader, "collate_fn") or isinstance(dataset, IterableDataset) or not has_length(dataset) or len(dataset) == 0:
        return  # a stream is never consumed ahead of training
    with _preserved_rng():
        batch = dataloader.collate_fn([dataset[0]])
    if not isinstance(batch, Mapping):
        return
    main_input = getattr(model, "main_input_name", "input_ids")
    accepted = set(inspect.signature(unwrap_peft_model(model).forward).parameters)
    if main_input in accepted and main_input not in batch and "inputs_embeds" not in batch:
        raise ValueError(
            f"The {description} batches have no `{main_input}`, which {model.__class__.__name__}.forward needs; "
            f"they hold: {', '.join(batch) or 'nothing'}. Tokenize the dataset (e.g. with `dataset.map(tokenize)`) "
            "so that every row has the model's inputs."
        )


# ---------------------------------------------------------------------- the plan


def training_plan(args, micro_loader: DataLoader, train_batch_size: int, num_examples: int) -> TrainingPlan:
    """transformers' `set_initial_training_values`: epochs, update steps per epoch, max_steps."""
    ga = args.gradient_accumulation_steps
    from .tensor_parallel import data_parallel

    total_batch_size = train_batch_size * ga * data_parallel(args)[0]  # transformers' dp_world_size
    if has_length(micro_loader):
        len_dl = len(micro_loader)
        if len_dl == 0:
            raise ValueError(
                "The training DataLoader is empty: the train_dataset has fewer rows than one batch with "
                "dataloader_drop_last=True. Use a larger dataset or a smaller per_device_train_batch_size."
            )
        updates_per_epoch = max(len_dl // ga + int(len_dl % ga > 0), 1)
        if args.max_steps > 0:
            max_steps = args.max_steps
            num_train_epochs = max_steps // updates_per_epoch + int(max_steps % updates_per_epoch > 0)
            num_train_samples = max_steps * total_batch_size
        else:
            max_steps = math.ceil(args.num_train_epochs * updates_per_epoch)
            num_train_epochs = math.ceil(args.num_train_epochs)
            num_train_samples = num_examples * args.num_train_epochs
        steps_in_epoch = len_dl
    else:
        max_steps = args.max_steps
        num_train_epochs = 2**31
        updates_per_epoch = max_steps
        num_train_samples = max_steps * total_batch_size
        steps_in_epoch = max_steps * ga
    return TrainingPlan(
        max_steps=max_steps,
        num_train_epochs=num_train_epochs,
        updates_per_epoch=updates_per_epoch,
        steps_in_epoch=steps_in_epoch,
        num_train_samples=num_train_samples,
        total_batch_size=total_batch_size,
        num_examples=num_examples,
    )


# ---------------------------------------------------------------------- samplers and loaders


def train_sampler(args, dataset, processing_class=None):
    """The sampler transformers' Trainer ends up with after accelerate's `prepare` (seedable, epoch-aware)."""
    if not has_length(dataset):
        return None
    if args.train_sampling_strategy == "sequential":
        return SequentialSampler(dataset)
    if args.train_sampling_strategy == "group_by_length":
        lengths = None
        if hasattr(dataset, "column_names") and args.length_column_name in dataset.column_names:
            lengths = dataset[args.length_column_name]
        model_input_name = processing_class.model_input_names[0] if processing_class is not None else None
        return LengthGroupedSampler(
            args.train_batch_size * args.gradient_accumulation_steps,
            dataset=dataset,
            lengths=lengths,
            model_input_name=model_input_name,
        )
    if not _accelerator_config(args, "use_seedable_sampler", True):
        # accelerate keeps transformers' RandomSampler: each epoch's order is drawn from torch's global RNG
        return torch.utils.data.RandomSampler(dataset)
    from accelerate.data_loader import SeedableRandomSampler

    # as accelerate: without data_seed, the seed of torch's last manual_seed (a model_init that seeds torch moves it)
    return SeedableRandomSampler(data_source=dataset, data_seed=args.data_seed)


def eval_sampler(args, dataset):
    return SequentialSampler(dataset) if has_length(dataset) else None


class TrainerDataLoader(DataLoader):
    """A DataLoader with what user code reads off accelerate's prepared loaders (transformers' Trainer returns those):
    `total_batch_size` (rows per step over all processes) and `total_dataset_length`."""

    fetch_wrapper = None  # wraps each iteration's batches (CountsAhead.wrap, while an evaluation runs)

    def __iter__(self):
        iterator = super().__iter__()
        return iterator if self.fetch_wrapper is None else self.fetch_wrapper(iterator)

    @property
    def total_batch_size(self) -> int:
        batch_sampler = self.batch_sampler
        inner = getattr(batch_sampler, "batch_sampler", None)  # accelerate's BatchSamplerShard
        if inner is not None:
            if batch_sampler.split_batches:  # each process takes a slice of one batch
                return inner.batch_size
            return inner.batch_size * getattr(batch_sampler, "num_processes", 1)
        if batch_sampler is not None:
            return batch_sampler.batch_size
        return self.batch_size * getattr(self.dataset, "num_processes", 1)  # an IterableDatasetShard

    @property
    def total_dataset_length(self) -> int:
        return getattr(self.dataset, "total_length", None) or len(self.dataset)


def remainder(loader) -> int:
    """accelerate's `DataLoaderStateMixin.remainder`: how many real samples the last batch over all processes holds
    (what `gather_for_metrics` keeps of it), 0 when it is full, -1 when unknown (no length, or drop_last)."""
    inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)  # accelerate's BatchSamplerShard
    if getattr(loader, "drop_last", False) or getattr(inner, "drop_last", False):
        return -1
    try:
        length = len(loader.dataset)
        total = loader.total_batch_size if isinstance(loader, TrainerDataLoader) else loader.batch_size
        return length % total
    except (TypeError, AttributeError, ZeroDivisionError):
        return -1


def make_dataloader(args, dataset, collate_fn, batch_size: int, sampler, is_training: bool) -> DataLoader:
    """A DataLoader with the parameters transformers' `Trainer._get_dataloader` uses."""
    params: dict[str, Any] = {
        "batch_size": batch_size,
        "collate_fn": collate_fn,
        "num_workers": args.dataloader_num_workers,
        "pin_memory": args.dataloader_pin_memory and torch.cuda.is_available(),
        "persistent_workers": args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
        "prefetch_factor": args.dataloader_prefetch_factor,
        "multiprocessing_context": args.dataloader_multiprocessing_context,
        "in_order": args.dataloader_in_order,
    }
    # each process trains on, and evaluates, its own batches, as accelerate's prepare shards them; evaluation's
    # padded last batches are dropped again by gather_for_metrics (the loader's `remainder`)
    # tensor parallel: the ranks of one TP group share their batches, as accelerate's loaders do
    from .tensor_parallel import data_parallel

    shards, shard_index = data_parallel(args)
    shard = shards > 1
    if isinstance(dataset, IterableDataset):
        if shard:
            from transformers.trainer_pt_utils import IterableDatasetShard

            if _accelerator_config(args, "split_batches", False):
                raise ValueError(
                    "TrainingArguments.accelerator_config.split_batches=True is not supported by hf_lightning for an "
                    "IterableDataset with several processes; use a map-style dataset or leave split_batches False."
                )

            dataset = IterableDatasetShard(
                dataset, batch_size=batch_size, drop_last=args.dataloader_drop_last,
                num_processes=shards, process_index=shard_index, seed=args.seed,
            )
        return TrainerDataLoader(dataset, **params)
    if is_training:
        params["worker_init_fn"] = partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index)
    if shard:
        from accelerate.data_loader import BatchSamplerShard
        from torch.utils.data import BatchSampler

        if isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
            # use_seedable_sampler=False: as accelerate, one generator seeded from the (same) global RNG of every
            # process, so that the processes shard one shared order
            sampler.generator = torch.Generator()
            sampler.generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        batches = BatchSampler(sampler if sampler is not None else SequentialSampler(dataset), batch_size,
                               args.dataloader_drop_last)
        del params["batch_size"]
        # split_batches: each process takes its slice of every batch; even_batches=False: the last ones may differ
        params["batch_sampler"] = BatchSamplerShard(
            batches, shards, shard_index, split_batches=_accelerator_config(args, "split_batches", False),
            even_batches=_accelerator_config(args, "even_batches", True),
        )
        return TrainerDataLoader(dataset, **params)
    if sampler is not None:
        params["sampler"] = sampler
    params["drop_last"] = args.dataloader_drop_last
    return TrainerDataLoader(dataset, **params)


def _accelerator_config(args, name: str, default):
    """A sub-field of transformers' `accelerator_config` (an AcceleratorConfig once TrainingArguments is built)."""
    config = getattr(args, "accelerator_config", None)
    return getattr(config, name, default) if config is not None else default


class AccumulationWindows:
    """Iterates a micro-batch DataLoader as lists of `gradient_accumulation_steps` micro-batches.

    The last window of an epoch holds the remainder, as in transformers. `skip_windows` fast-forwards a resumed epoch
    (the sampler's order is unchanged: the skipped indices are drawn, not loaded).
    """

    def __init__(self, dataloader: DataLoader, gradient_accumulation_steps: int):
        self.dataloader = dataloader
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.skip_windows = 0
        self.on_empty_epoch = None  # called when an epoch yields nothing (a stream that ran dry)

    # Lightning calls `set_epoch` on `.sampler` / `.batch_sampler` of each train dataloader at every epoch start.
    @property
    def sampler(self):
        batch_sampler = getattr(self.dataloader, "batch_sampler", None)
        inner = getattr(batch_sampler, "batch_sampler", None)  # accelerate's BatchSamplerShard
        if inner is not None:
            return inner.sampler
        return getattr(self.dataloader, "sampler", None)

    @property
    def dataset(self):
        return getattr(self.dataloader, "dataset", None)

    @property
    def micro_batches_per_epoch(self) -> int | None:
        return len(self.dataloader) if has_length(self.dataloader) else None

    def __len__(self) -> int:
        # The full epoch, also while a resumed epoch skips windows: Lightning reads the length once per fit and ends
        # the shorter resumed epoch when the iterator runs out.
        return math.ceil(len(self.dataloader) / self.gradient_accumulation_steps)

    def __iter__(self) -> Iterator[list]:
        iterator = self._micro_batches()
        window: list = []
        empty = True
        for batch in iterator:
            empty = False
            window.append(batch)
            if len(window) == self.gradient_accumulation_steps:
                yield window
                window = []
        if window:
            yield window
        if empty and self.on_empty_epoch is not None:
            self.on_empty_epoch()

    def _micro_batches(self) -> Iterator:
        skip = self.skip_windows * self.gradient_accumulation_steps
        self.skip_windows = 0
        if skip == 0:
            yield from self.dataloader
            return
        from accelerate.data_loader import skip_first_batches

        yield from skip_first_batches(self.dataloader, skip)


def find_batch_size(hooks, inner_training_loop, resume_from_checkpoint: str | None):
    """transformers' `find_executable_batch_size` around one training attempt: with `auto_find_batch_size`, an
    out-of-memory error retries at a smaller per-device batch (accelerate's rule); a resumed run starts at the batch
    size its checkpoint found, as transformers restores it."""
    args = hooks.args
    start = hooks._train_batch_size
    if args.auto_find_batch_size and resume_from_checkpoint is not None:
        path = resume_from_checkpoint
        state_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "trainer_state.json")
        if os.path.isfile(state_file):
            start = TrainerState.load_from_json(state_file).train_batch_size or start

    def attempt(batch_size, **attempt_kwargs):
        hooks._train_batch_size = batch_size
        return inner_training_loop(**attempt_kwargs)

    return find_executable_batch_size(attempt, start, args.auto_find_batch_size)


def num_examples(dataloader, args, train_batch_size: int) -> int:
    """transformers' `num_examples`: the dataset's rows, else an estimate from the loader or max_steps."""
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError):
        pass
    try:
        return len(dataloader) * args.per_device_train_batch_size
    except TypeError:
        return args.max_steps * train_batch_size * args.gradient_accumulation_steps


def num_items_in_batch(batches: list, shifts_labels: bool, args, strategy=None):
    """transformers' `_get_num_items_in_batch`: label tokens of a window, summed over the processes of a Lightning
    strategy when `average_tokens_across_devices`, as a float tensor (transformers divides by its parallel sizes)."""
    num_items = count_items(batches, shifts_labels)
    if num_items is None:
        return None
    if args.average_tokens_across_devices and strategy is not None and getattr(strategy, "world_size", 1) > 1:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # one collective, as transformers' one gather: Lightning's reduce adds a barrier before its all_reduce,
            # a second rendezvous of the processes at every evaluation batch and every optimizer step
            torch.distributed.all_reduce(num_items, op=torch.distributed.ReduceOp.SUM)
        else:  # a strategy without a torch.distributed group (XLA)
            num_items = strategy.reduce(num_items, reduce_op="sum")
    from .tensor_parallel import tp_size

    return num_items / tp_size(args)  # transformers: the tp_size ranks of a batch counted it tp_size times


class CountsAhead:
    """transformers' prediction_step counts each evaluation batch's label tokens over all processes
    (`average_tokens_across_devices`): one collective per batch, whose CPU cost (gloo's threads waking on a busy
    machine) is paid batch after batch. Here the evaluation's loaders (`wrap`, their `fetch_wrapper` while it runs)
    fetch `CHUNK` batches at a time and count them in one asynchronous all_reduce, which runs while the batches are
    evaluated; `take` hands each batch's count to prediction_step. Every process makes the same collectives (one per
    chunk), and each batch gets transformers' count; a batch whose labels tensor is not the one fetched (moved to an
    accelerator, replaced by an override) is counted again, as transformers counts it.
    """

    # batches per collective, the same on every process: 2,000 rows in batches of 16 on 2 processes measured 0.62x,
    # 0.61x and 0.55x the 1-process time with 16, 32 and 64 (noise ~0.03); a chunk's batches wait in memory
    CHUNK = 32

    def __init__(self, shifts_labels: bool, args):
        self.shifts_labels = shifts_labels
        self.args = args
        self.pending: dict[int, tuple] = {}  # id(labels) -> (the labels tensor, the chunk's counts, index, work)

    @staticmethod
    def applies() -> bool:
        """Processes to count over, on the CPU (an accelerator's batch is a copy made after the fetch)."""
        return (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1 and torch.distributed.get_backend() == "gloo")

    def wrap(self, iterator: Iterator) -> Iterator:
        """The loader's batches, each chunk counted over the processes as it is fetched."""
        if not self.applies():
            yield from iterator
            return
        while chunk := list(itertools.islice(iterator, self.CHUNK)):
            self.start(chunk)
            yield from chunk

    def start(self, chunk: list) -> None:
        counts = torch.zeros(self.CHUNK, dtype=torch.int64)  # the same size on every process, also the last chunk
        labels = [batch.get("labels") if isinstance(batch, Mapping) else None for batch in chunk]
        for index, batch in enumerate(chunk):
            count = count_items([batch], self.shifts_labels) if torch.is_tensor(labels[index]) else None
            if count is None:
                labels[index] = None
            else:
                counts[index] = count
        work = torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, async_op=True)
        for index, tensor in enumerate(labels):
            if tensor is not None:
                self.pending[id(tensor)] = (tensor, counts, index, work)

    def take(self, batch):
        """The batch's count over the processes (as `num_items_in_batch` returns it), or None where it has none."""
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        entry = self.pending.pop(id(labels), None)
        if entry is None or entry[0] is not labels:
            return None
        tensor, counts, index, work = entry
        work.wait()
        from .tensor_parallel import tp_size

        return counts[index] / tp_size(self.args)  # a 0-dim tensor, as the per-batch count

    def close(self) -> None:
        """Counts never taken (an override that does not count) are done on every process already: wait, drop."""
        for *_, work in self.pending.values():
            work.wait()
        self.pending.clear()


def count_items(batches: list, shifts_labels: bool) -> torch.Tensor | None:
    """transformers' `_get_num_items_in_batch`: label tokens that are not -100 over a whole window."""
    # transformers tests `"labels" in batch`: collators yield BatchEncoding (a Mapping, not a dict) as often as dicts.
    if not batches or not isinstance(batches[0], Mapping) or "labels" not in batches[0]:
        return None
    try:
        counts = [
            b["shift_labels"] if "shift_labels" in b else b["labels"][..., 1:] if shifts_labels else b["labels"]
            for b in batches
        ]
        return sum(labels.ne(-100).sum() for labels in counts)
    except (TypeError, AttributeError):
        return None
