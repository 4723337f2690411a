"""transformers' `evaluation_loop` bookkeeping, for batches that Lightning's validation/test loop hands over.

`EvaluationRun` keeps one dataset's losses, predictions, labels and inputs in transformers' `EvalLoopContainer`s;
`finish` turns them into transformers' metrics; `report` is what transformers does after its evaluation loop (speed
metrics, `log`, `on_evaluate`; for a prediction only `on_predict`) — one function for in-training evaluations,
`evaluate()` and `predict()`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from transformers.trainer_pt_utils import EvalLoopContainer, IterableDatasetShard, find_batch_size, nested_truncate
from transformers.trainer_utils import EvalPrediction, denumpify_detensorize, has_length, speed_metrics

from .eval_gather import WindowGather, deferrable
from .run import RunState, TrainerHooks

EVALUATION = "Evaluation"
PREDICTION = "Prediction"

# transformers' own logger: users' logging configuration and `log_level` see these lines where they see transformers'.
hf_logger = logging.getLogger("transformers.trainer")


def announce_evaluation(description: str, loader, args) -> None:
    """transformers' `evaluation_loop` header (its `num_examples` estimate included)."""
    hf_logger.info(f"\n***** Running {description} *****")
    if has_length(loader):
        try:
            num_examples = len(loader.dataset)
        except (TypeError, AttributeError):
            num_examples = len(loader) * args.per_device_train_batch_size
        hf_logger.info(f"  Num examples = {num_examples}")
    else:
        hf_logger.info("  Num examples: Unknown")
    hf_logger.info(f"  Batch size = {args.eval_batch_size}")


@dataclass
class EvaluationOutput:
    """What one evaluation of one dataset produced (transformers' EvalLoopOutput plus its prefix and start time)."""

    prefix: str
    description: str
    start_time: float
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: Any = None
    label_ids: Any = None
    num_samples: int = 0


class EvaluationRun:
    """The containers of transformers' `evaluation_loop` for one dataset."""

    def __init__(self, args, prefix: str, description: str, ignore_keys=None):
        self.args = args
        self.prefix = prefix
        self.description = description
        self.ignore_keys = ignore_keys
        self.start_time = time.time()
        self.losses = EvalLoopContainer(args.eval_do_concat_batches, padding_index=-100)
        self.preds = EvalLoopContainer(args.eval_do_concat_batches, padding_index=-100)
        self.labels = EvalLoopContainer(args.eval_do_concat_batches, padding_index=-100)
        self.inputs = EvalLoopContainer(args.eval_do_concat_batches, padding_index=-100)
        self.observed = 0
        self.steps = 0
        self.batch_metrics = None
        self.remainder = -1  # accelerate's: the real samples of the last batch over all processes (data.remainder)
        self.window: WindowGather | None = None  # under DDP: the batches gathered once per window (eval_gather.py)

    def step(self, hooks: TrainerHooks, model, inputs, num_batches: float) -> None:
        """One batch: transformers' `prediction_step`, then what its loop keeps of the result, gathered from every
        process (each evaluates its shard) with transformers' gather function."""
        args = self.args
        accelerator = hooks.accelerator
        prediction_loss_only = True if hooks.compute_metrics is None else args.prediction_loss_only
        if self.description == PREDICTION:
            prediction_loss_only = args.prediction_loss_only
        batch_size = find_batch_size(inputs)
        self.observed += batch_size or 0
        # what accelerate's dataloader tells gather_for_metrics (also when a prediction_step override calls it)
        accelerator.end_of_dataloader = self.steps + 1 == num_batches
        accelerator.remainder = self.remainder
        if hooks._keep_padded_eval_losses:  # Seq2SeqTrainer gathers with a gather that drops no samples
            gather = accelerator.gather_data_parallel
        else:
            gather = partial(accelerator.gather_for_metrics, use_gather_object=args.eval_use_gather_object)
        main_input_name = getattr(model, "main_input_name", "input_ids")
        inputs_decode = inputs[main_input_name] if "inputs" in args.include_for_metrics else None
        losses, logits, labels = hooks.prediction_step(model, inputs, prediction_loss_only, ignore_keys=self.ignore_keys)
        keep_all = not args.batch_eval_metrics or self.description == PREDICTION
        if self.steps == 0 and deferrable(args, hooks, accelerator.num_processes):
            self.window = WindowGather(accelerator, trim=not hooks._keep_padded_eval_losses)
        if self.window is not None:  # gathered with the window's other batches: nothing to gather here
            self.window.add({"losses": None if losses is None else losses.repeat(args.eval_batch_size),
                             "inputs": inputs_decode, "preds": logits, "labels": labels},
                            accelerator.end_of_dataloader, self.remainder)
            losses = logits = labels = inputs_decode = None
        if losses is not None:
            # each loss weighs eval_batch_size samples; gather_for_metrics trims a short last batch's repeats
            losses = gather(losses.repeat(args.eval_batch_size))
            self.losses.add(losses)
        if inputs_decode is not None:
            inputs_decode = gather(accelerator.pad_across_processes(inputs_decode, dim=1, pad_index=-100))
            if keep_all:
                self.inputs.add(inputs_decode)
        if labels is not None:  # padded before preprocess_logits_for_metrics sees them, as in transformers
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
        if logits is not None:
            logits = accelerator.pad_across_processes(logits, dim=1, pad_index=-100)
            if hooks.preprocess_logits_for_metrics is not None:
                logits = hooks.preprocess_logits_for_metrics(logits, labels)
            logits = gather(logits)
            if keep_all:
                self.preds.add(logits)
        if labels is not None:
            labels = gather(labels)
            if keep_all:
                self.labels.add(labels)
        self.steps += 1
        if args.batch_eval_metrics:
            if hooks.compute_metrics is not None and logits is not None and labels is not None:
                self.batch_metrics = hooks.compute_metrics(
                    EvalPrediction(
                        predictions=logits,
                        label_ids=labels,
                        losses=losses if "loss" in args.include_for_metrics else None,
                        inputs=inputs if "inputs" in args.include_for_metrics else None,
                    ),
                    compute_result=self.steps == num_batches,
                )
        elif args.eval_accumulation_steps is not None and self.steps % args.eval_accumulation_steps == 0:
            self._gather_window()
            for container in (self.losses, self.preds, self.labels, self.inputs):
                container.to_cpu_and_numpy()
        accelerator.end_of_dataloader, accelerator.remainder = False, -1

    def _gather_window(self) -> None:
        """The deferred batches, gathered from every process, into the containers as the per-batch loop adds them."""
        if self.window is None:
            return
        for batch in self.window.flush():
            for name, container in (("losses", self.losses), ("inputs", self.inputs), ("preds", self.preds),
                                    ("labels", self.labels)):
                if name in batch:
                    container.add(batch[name])

    def finish(self, hooks: TrainerHooks, run: RunState, dataset) -> EvaluationOutput:
        """transformers' metrics for the whole dataset (compute_metrics, the mean loss, the prefix on every key)."""
        args = self.args
        self._gather_window()
        all_losses = self.losses.get_arrays()
        all_preds = self.preds.get_arrays()
        all_labels = self.labels.get_arrays()
        all_inputs = self.inputs.get_arrays()
        shard_examples = getattr(dataset, "num_examples", 0) if isinstance(dataset, IterableDatasetShard) else 0
        if shard_examples > 0:
            # a sharded stream has no length to trim its last batch by as it comes (accelerate's dispatcher knows it
            # there): the padding that completed the processes' last batches is at the end, cut once it is counted
            all_losses, all_preds, all_labels, all_inputs = (
                _truncate(arrays, shard_examples) for arrays in (all_losses, all_preds, all_labels, all_inputs)
            )
        if hooks.compute_metrics is not None and all_preds is not None and all_labels is not None and not args.batch_eval_metrics:
            metrics = hooks.compute_metrics(
                EvalPrediction(
                    predictions=all_preds,
                    label_ids=all_labels,
                    losses=all_losses if "loss" in args.include_for_metrics else None,
                    inputs=all_inputs if "inputs" in args.include_for_metrics else None,
                )
            )
        else:
            metrics = self.batch_metrics or {}
        metrics = denumpify_detensorize(metrics)
        losses = np.concatenate(all_losses) if isinstance(all_losses, list) and all_losses else all_losses
        if isinstance(losses, np.ndarray):
            finite = np.isfinite(losses)
            if args.logging_nan_inf_filter and finite.any():
                losses = losses[finite]
            metrics[f"{self.prefix}_loss"] = losses.mean().item()
        start_time = self.start_time
        if run.model_preparation_time is not None:
            metrics[f"{self.prefix}_model_preparation_time"] = run.model_preparation_time
            start_time += run.model_preparation_time
        for key in list(metrics.keys()):
            if not key.startswith(f"{self.prefix}_"):
                metrics[f"{self.prefix}_{key}"] = metrics.pop(key)
        try:
            num_samples = len(dataset)
        except TypeError:
            num_samples = shard_examples or self.observed
        if num_samples == 0 and self.observed > 0:
            num_samples = self.observed
        return EvaluationOutput(self.prefix, self.description, start_time, metrics, all_preds, all_labels, num_samples)


def _truncate(arrays, limit: int):
    """The first `limit` samples of a container's arrays: nested arrays, or a list of per-batch ones
    (eval_do_concat_batches=False)."""
    if arrays is None:
        return None
    if not isinstance(arrays, list):
        return nested_truncate(arrays, limit)
    kept, seen = [], 0
    for batch in arrays:
        if seen >= limit:
            break
        size = find_batch_size(batch)
        kept.append(nested_truncate(batch, limit - seen) if size is not None and seen + size > limit else batch)
        seen += size or 0
    return kept


def report(hooks: TrainerHooks, run: RunState, output: EvaluationOutput) -> dict[str, float]:
    """What transformers does after its evaluation loop: speed metrics, then `log` + `on_evaluate` for an
    evaluation, `on_predict` for a prediction (which transformers does not log)."""
    metrics = output.metrics
    total_batch_size = run.args.eval_batch_size * run.args.world_size
    metrics.update(
        speed_metrics(
            output.prefix,
            output.start_time,
            num_samples=output.num_samples,
            num_steps=math.ceil(output.num_samples / total_batch_size),
        )
    )
    if output.description == PREDICTION:
        run.on_predict(metrics)
    else:
        hooks.log(metrics)
        run.on_evaluate(metrics)
    # after the log, as transformers: in the returned metrics only (and not for evaluations inside train())
    run.memory.stop_stage(memory_stage(output.description), metrics)
    return metrics


def memory_stage(description: str) -> str:
    """transformers' memory-metric prefix of evaluate() / predict()."""
    return "test" if description == PREDICTION else "eval"
