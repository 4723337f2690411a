"""Sharded evaluation results gathered once per window instead of once per batch, with the per-batch result.

transformers' `evaluation_loop` pads each batch's logits, labels and inputs on dim 1 to the largest over the processes
and gathers them, with the losses, as the batch comes: under DDP that is five gathers per batch (seven with inputs;
each one, through Lightning's `strategy.all_gather`, a barrier, a shape exchange and the data), and each of them makes
every process wait for the slowest one, batch after batch. `WindowGather` keeps a process's batch results until the end of the evaluation or
of an `eval_accumulation_steps` window (where transformers moves its containers to the CPU), exchanges their shapes in
one `gather_object` and each tensor of the window in one `gather`, then hands back, batch by batch, what the per-batch
gathers give: the processes' batches in rank order, padded on dim 1 with -100 (`pad_across_processes`), the last one
cut to the loader's `remainder` (`gather_for_metrics`). So the containers, and compute_metrics, see the same arrays.

Used only where nothing reads a gathered batch as it comes (`deferrable`): with `batch_eval_metrics` compute_metrics
takes each gathered batch, `preprocess_logits_for_metrics` sees each padded batch, `eval_use_gather_object` gathers
objects; one process gathers nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import recursively_apply

PAD_INDEX = -100  # transformers' evaluation_loop pads with it (pad_across_processes(..., pad_index=-100))
UNPADDED = ("losses",)  # transformers gathers the repeated losses without padding them


def deferrable(args, hooks, num_processes: int) -> bool:
    """Whether an evaluation's batch results may be gathered once per window (see the module docstring)."""
    return (
        num_processes > 1
        and not args.batch_eval_metrics
        and hooks.preprocess_logits_for_metrics is None
        and not args.eval_use_gather_object
    )


def _leaves(value) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    recursively_apply(leaves.append, value, error_on_other_type=True)  # pad_across_processes refuses other leaves too
    return leaves


def _rebuild(template, leaves: list[torch.Tensor]):
    it = iter(leaves)
    return recursively_apply(lambda _: next(it), template)


def _padded_shape(shapes: list[tuple], name: str) -> tuple:
    """The shape every process's tensor has once `pad_across_processes(dim=1)` has padded it."""
    first = shapes[0]
    if name in UNPADDED or len(first) < 2:
        target = first
    else:
        target = (first[0], max(shape[1] for shape in shapes), *first[2:])
    padded_dims = () if name in UNPADDED else (1,)
    for shape in shapes:
        if len(shape) != len(target) or any(a != b for i, (a, b) in enumerate(zip(shape, target)) if i not in padded_dims):
            raise ValueError(
                f"evaluation: the processes' `{name}` of one batch have shapes {shapes}, which cannot be gathered (as "
                "with transformers' evaluation loop, only dim 1 is padded across processes); make prediction_step "
                "return the same shape on every process apart from dim 1."
            )
    return target


def _pad(tensor: torch.Tensor, shape: tuple) -> torch.Tensor:
    """`pad_across_processes(tensor, dim=1, pad_index=-100)` to a known size: -100 after the values."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    padded = tensor.new_zeros(shape) + PAD_INDEX
    padded[:, : tensor.shape[1]] = tensor
    return padded


class WindowGather:
    """One process's batch results of an evaluation window, gathered from every process by `flush`."""

    def __init__(self, accelerator, trim: bool):
        self.accelerator = accelerator
        self.trim = trim  # gather_for_metrics (cut the last batch to `remainder`); False: gather (keep every row)
        self.batches: list[dict[str, Any]] = []
        self.cuts: list[int] = []

    def add(self, values: dict[str, Any], last: bool, remainder: int) -> None:
        """One batch's results on this process (None values are not gathered, as in the per-batch loop)."""
        values = {
            name: recursively_apply(lambda t: t[None] if t.ndim == 0 else t, value)  # gather: a 0-dim tensor is 1 row
            for name, value in values.items() if value is not None
        }
        self.batches.append(values)
        self.cuts.append(remainder if self.trim and last and remainder > 0 else -1)

    def flush(self) -> list[dict[str, Any]]:
        """The window's batches gathered from every process, in order. A collective: every process calls it at the
        same point of the evaluation (the end, or the end of an `eval_accumulation_steps` window)."""
        batches, cuts = self.batches, self.cuts
        self.batches, self.cuts = [], []
        leaves = [{name: _leaves(value) for name, value in batch.items()} for batch in batches]
        local = [{name: [tuple(t.shape) for t in ts] for name, ts in batch.items()} for batch in leaves]
        # under tensor parallelism the ranks of one TP group hold the same rows: the data-parallel peers only
        everyone = self.accelerator.gather_object_data_parallel([local])  # [rank][batch][name][leaf] = shape
        if any(len(steps) != len(local) for steps in everyone):
            raise RuntimeError(
                f"evaluation: the processes evaluated {[len(steps) for steps in everyone]} batches in this window; "
                "transformers' evaluation loop gathers every batch on every process. Keep "
                "accelerator_config.even_batches=True (the default) so that every process gets as many batches."
            )
        if not local:
            return []
        structure = {name: len(metas) for name, metas in everyone[0][0].items()}
        if any({name: len(metas) for name, metas in step.items()} != structure for steps in everyone for step in steps):
            raise ValueError(
                "evaluation: prediction_step returned losses/logits/labels of different structures (None, or nested "
                f"tensors in different numbers) across batches or processes: {structure} first; as with transformers' "
                "evaluation loop, every process must gather the same tensors at every batch."
            )
        channels = [(name, j) for name, count in structure.items() for j in range(count)]
        # per channel and batch: the padded shape all processes share, and this process's padded tensors
        targets = {
            channel: [_padded_shape([steps[s][channel[0]][channel[1]] for steps in everyone], channel[0])
                      for s in range(len(local))]
            for channel in channels
        }
        results: list[dict[str, list[torch.Tensor]]] = [{name: [] for name in batch} for batch in local]
        world = len(everyone)
        for (name, j), shapes in targets.items():
            flat = torch.cat([_pad(batch[name][j], shape).reshape(-1) for batch, shape in zip(leaves, shapes)])
            # the padded shapes are shared, so every process sends as many elements: a plain all_gather
            gathered = self.accelerator.gather_data_parallel(flat).reshape(world, flat.numel())
            sizes = [torch.Size(shape).numel() for shape in shapes]
            parts = [row.split(sizes) for row in gathered]
            for s, shape in enumerate(shapes):
                tensor = torch.cat([parts[rank][s].view(shape) for rank in range(world)])
                results[s][name].append(tensor[: cuts[s]] if cuts[s] > 0 else tensor)
        return [{name: _rebuild(batch[name], results[s][name]) for name in batch} for s, batch in enumerate(batches)]
