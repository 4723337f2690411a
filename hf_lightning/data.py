"""Data: transformers' DataLoaders, grouped into gradient-accumulation windows for Lightning.

transformers prefetches the `gradient_accumulation_steps` micro-batches of one optimizer step (a *window*) before
running any of them, to count the label tokens of the whole window (`num_items_in_batch`) and to know how short the
last window of an epoch is. Here Lightning's "batch" is that window: one `training_step` = one optimizer step, so
Lightning's `global_step`, `max_steps` and progress bar count what transformers counts.
"""

from __future__ import annotations

import math
from functools import partial
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import has_length, seed_worker


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
    from accelerate.data_loader import SeedableRandomSampler

    seed = args.data_seed if args.data_seed is not None else args.seed
    return SeedableRandomSampler(data_source=dataset, data_seed=seed)


def eval_sampler(args, dataset):
    return SequentialSampler(dataset) if has_length(dataset) else None


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
    shard = is_training and args.world_size > 1  # each process trains on its own batches, as accelerate shards them
    if isinstance(dataset, IterableDataset):
        if shard:
            from transformers.trainer_pt_utils import IterableDatasetShard

            dataset = IterableDatasetShard(
                dataset, batch_size=batch_size, drop_last=args.dataloader_drop_last,
                num_processes=args.world_size, process_index=args.process_index, seed=args.seed,
            )
        return DataLoader(dataset, **params)
    if is_training:
        params["worker_init_fn"] = partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index)
    if shard:
        from accelerate.data_loader import BatchSamplerShard
        from torch.utils.data import BatchSampler

        batches = BatchSampler(sampler if sampler is not None else SequentialSampler(dataset), batch_size,
                               args.dataloader_drop_last)
        del params["batch_size"]
        params["batch_sampler"] = BatchSamplerShard(batches, args.world_size, args.process_index)
        return DataLoader(dataset, **params)
    if sampler is not None:
        params["sampler"] = sampler
    params["drop_last"] = args.dataloader_drop_last
    return DataLoader(dataset, **params)


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
        return self.dataloader.dataset

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
