"""`Seq2SeqTrainer` and `Seq2SeqTrainingArguments`: transformers' sequence-to-sequence Trainer, on hf_lightning.

The facade subclass adds what transformers' `Seq2SeqTrainer` adds to its Trainer: the `generation_config` argument,
`evaluate`/`predict` taking `generate()` keyword arguments (`max_length`, `num_beams`, ...), and, with
`predict_with_generate`, a prediction step that generates (steps.generation_step). transformers' own functions that
only read shared attributes (`load_generation_config`, `_pad_tensors_to_max_len`) are borrowed, not copied.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import transformers

from . import gpu_strategies, steps, surface
from .trainer import Trainer
from .training_args import TrainingArguments

logger = logging.getLogger("hf_lightning")


@dataclass
class Seq2SeqTrainingArguments(transformers.Seq2SeqTrainingArguments, TrainingArguments):
    """transformers' `Seq2SeqTrainingArguments` (`predict_with_generate`, `generation_max_length`,
    `generation_num_beams`, `generation_config`, `sortish_sampler`) with hf_lightning's added fields
    (`lightning_trainer_kwargs`, `save_lightning_checkpoint`)."""


_SEQ2SEQ_FIELDS = tuple(
    f.name for f in dataclasses.fields(transformers.Seq2SeqTrainingArguments)
    if f.name not in {g.name for g in dataclasses.fields(transformers.TrainingArguments)}
)


def generation_kwargs(args, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers' `generate()` kwargs of an evaluate/predict call: the call's own, else the arguments'
    `generation_max_length` (unless max_new_tokens is given) and `generation_num_beams`."""
    gen_kwargs = dict(gen_kwargs)
    if (
        gen_kwargs.get("max_length") is None
        and gen_kwargs.get("max_new_tokens") is None
        and args.generation_max_length is not None
    ):
        gen_kwargs["max_length"] = args.generation_max_length
    if gen_kwargs.get("num_beams") is None and args.generation_num_beams is not None:
        gen_kwargs["num_beams"] = args.generation_num_beams
    return gen_kwargs


class Seq2SeqTrainer(Trainer):
    """Drop-in replacement for `transformers.Seq2SeqTrainer` whose loop is a `lightning.Trainer`.

    Takes the arguments of `hf_lightning.Trainer`; `args` must have the Seq2Seq fields (a `Seq2SeqTrainingArguments`,
    hf_lightning's or transformers').
    """

    # transformers' evaluate/predict gather with accelerator.gather ("we don't want to drop samples")
    _keep_padded_eval_losses = True
    load_generation_config = surface.Borrowed(surface.transformers_seq2seq_trainer)
    _pad_tensors_to_max_len = surface.Borrowed(surface.transformers_seq2seq_trainer)

    def __init__(self, model=None, args=None, *more, **kwargs):
        if args is None:  # transformers would build a plain TrainingArguments here and then fail on generation_config
            args = Seq2SeqTrainingArguments(output_dir="tmp_trainer")
        missing = [name for name in _SEQ2SEQ_FIELDS if not hasattr(args, name)]
        if missing:
            raise TypeError(
                f"Seq2SeqTrainer needs Seq2SeqTrainingArguments, got {type(args).__name__} without {missing}: build "
                "the arguments with `hf_lightning.Seq2SeqTrainingArguments(...)` (or transformers')."
            )
        if args.sortish_sampler:
            # transformers 5.24 keeps the field but no sampler reads it; say so rather than ignore it silently
            logger.warning(
                "sortish_sampler=True changes nothing (as in transformers 5.24, which has no sortish sampler); "
                "train_sampling_strategy='group_by_length' batches rows of similar length."
            )
        super().__init__(model, args, *more, **kwargs)
        self._gen_kwargs: dict[str, Any] | None = None  # set by evaluate()/predict(), as transformers does
        # Priority, as transformers: args.generation_config > model.generation_config > GenerationConfig's defaults.
        if self.args.generation_config is not None:
            self.model.generation_config = self.load_generation_config(self.args.generation_config)

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval",
                 **gen_kwargs):
        """transformers' Seq2SeqTrainer.evaluate: `gen_kwargs` (`max_length`, `num_beams`, ...) reach `generate()`
        when `predict_with_generate` is set. As transformers, the processes' shards are gathered with a gather that
        drops no samples (`accelerator.gather`: under DDP the last batches' wrapped rows stay)."""
        self._gen_kwargs = generation_kwargs(self.args, gen_kwargs)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test",
                **gen_kwargs):
        """transformers' Seq2SeqTrainer.predict: `gen_kwargs` reach `generate()` when `predict_with_generate` is
        set; predictions are then the generated ids."""
        self._gen_kwargs = generation_kwargs(self.args, gen_kwargs)
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys: list[str] | None = None,
                        **gen_kwargs):
        """With `predict_with_generate` (and predictions wanted): (loss, generated ids, labels), both padded to the
        generation length; otherwise the Trainer's prediction_step."""
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        if self.is_in_train:
            # transformers evaluates inside train() through evaluate(), which sets the arguments' generation kwargs
            self._gen_kwargs = generation_kwargs(self.args, {})
        if not gen_kwargs and self._gen_kwargs is not None:
            gen_kwargs = self._gen_kwargs
        return steps.generation_step(
            model, inputs, gen_kwargs, generating_model=self.model, label_smoother=self.label_smoother,
            pad=self._pad_tensors_to_max_len, loss_context=self.compute_loss_context_manager,
            prediction_loss_only=self.args.prediction_loss_only, partitioned=gpu_strategies.zero3(
                getattr(self.accelerator.lightning_trainer, "strategy", None)),
        )
