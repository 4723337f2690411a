"""Differential tests on batches from the collators users actually use (issue #12).

Rows are tokenized with a real (local WordLevel) tokenizer and left ragged, so every collator pads, and the label-token
count `num_items_in_batch` differs from window to window. DataCollatorWithPadding, DataCollatorForLanguageModeling and
DataCollatorForSeq2Seq yield `BatchEncoding` batches (a Mapping, not a dict); default_data_collator,
DataCollatorWithFlattening and a plain function yield dicts. transformers.Trainer is the oracle for log_history,
training_loss, eval metrics and weights.
"""

from __future__ import annotations

import functools

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BatchEncoding,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    default_data_collator,
)

import hf_lightning
from differential import assert_same_run, run_pair, transformers_bug
from helpers import VOCAB, accuracy, classification_dataset, tiny_bert, tiny_llama

WORDS = [f"w{i}" for i in range(2, VOCAB)]


@functools.lru_cache(maxsize=None)
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i for i, word in enumerate(WORDS, start=2)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
        model_input_names=["input_ids", "attention_mask"],
    )


def _texts(n: int, seed: int, low: int, high: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(low, high)))) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def classification_rows(n: int, seed: int = 0) -> datasets.Dataset:
    """Ragged tokenized rows with a `label` column and a leftover `text` column, as a user's `dataset.map` leaves."""
    texts = _texts(n, seed, 2, 13)
    labels = [int(int(text.split()[0][1:]) > VOCAB // 2) for text in texts]
    dataset = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return dataset.map(lambda batch: tokenizer()(batch["text"]), batched=True)


@functools.lru_cache(maxsize=None)
def lm_rows(n: int, seed: int = 0) -> datasets.Dataset:
    """Ragged tokenized rows without labels (DataCollatorForLanguageModeling builds them, -100 on padding)."""
    return datasets.Dataset.from_dict({"text": _texts(n, seed, 2, 15)}).map(
        lambda batch: tokenizer()(batch["text"]), batched=True, remove_columns=["text"]
    )


@functools.lru_cache(maxsize=None)
def sft_rows(n: int, seed: int = 0, max_length: int | None = None) -> datasets.Dataset:
    """Prompt + response rows; labels are -100 on the prompt, so each row counts a different number of label tokens.

    Ragged by default (labels as long as their row, but of different lengths across rows); with `max_length`, padded to
    a fixed length by the tokenizer (labels -100 on the padding too) for default_data_collator.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for prompt, response in zip(_texts(n, seed, 1, 7), _texts(n, seed + 100, 1, 8)):
        prompt_len = len(prompt.split())
        if max_length is None:
            encoded = tokenizer()(f"{prompt} {response}")
        else:
            encoded = tokenizer()(f"{prompt} {response}", padding="max_length", max_length=max_length)
        labels = [
            token if i >= prompt_len and mask else -100
            for i, (token, mask) in enumerate(zip(encoded["input_ids"], encoded["attention_mask"]))
        ]
        rows.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels,
                     "source": "sft", "weight": float(rng.random())})  # extra columns: removed as unused
    return datasets.Dataset.from_list(rows)


def pad_collator(rows: list[dict]) -> dict[str, torch.Tensor]:
    """A user's own collator: a plain dict of right-padded tensors."""
    length = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), length, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
        "labels": torch.full((len(rows), length), -100, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        for key in batch:
            batch[key][i, : len(row[key])] = torch.tensor(row[key])
    return batch


def token_accuracy(eval_pred):
    """Next-token accuracy over label tokens; logits/labels of batches of different lengths arrive padded with -100."""
    logits, labels = eval_pred
    predictions, targets = np.argmax(logits[:, :-1], axis=-1), labels[:, 1:]
    mask = targets != -100
    return {"token_accuracy": float((predictions[mask] == targets[mask]).mean()), "label_tokens": int(mask.sum())}


# id: (model, train rows, eval rows, collator, batch size, GA, yields BatchEncoding, extra args)
# 22 rows / batch 3 = 8 micro-batches per epoch (the last holds 1 row): GA 3 -> windows of 3, 3 and a short 2.
CASES = {
    "padding-cls-ga1": (tiny_bert, lambda: classification_rows(22), None,
                        lambda: DataCollatorWithPadding(tokenizer()), 3, 1, True, {}),
    "padding-cls-ga3-eval": (tiny_bert, lambda: classification_rows(22), lambda: classification_rows(9, seed=1),
                             lambda: DataCollatorWithPadding(tokenizer()), 3, 3, True,
                             {"eval_strategy": "steps", "eval_steps": 2, "compute_metrics": accuracy}),
    "lm-ga1": (tiny_llama, lambda: lm_rows(22), None,
               lambda: DataCollatorForLanguageModeling(tokenizer(), mlm=False), 3, 1, True, {}),
    "lm-ga3-eval": (tiny_llama, lambda: lm_rows(22), lambda: lm_rows(7, seed=1),
                    lambda: DataCollatorForLanguageModeling(tokenizer(), mlm=False), 3, 3, True,
                    {"eval_strategy": "epoch", "per_device_eval_batch_size": 3, "compute_metrics": token_accuracy}),
    "seq2seq-ga3": (tiny_llama, lambda: sft_rows(22), None,
                    lambda: DataCollatorForSeq2Seq(tokenizer(), model=None), 3, 3, True, {}),
    "default-fixed-ga3": (tiny_llama, lambda: sft_rows(22, max_length=14), None,
                          lambda: default_data_collator, 3, 3, False, {}),
    "dict-function-ga3": (tiny_llama, lambda: sft_rows(22), None, lambda: pad_collator, 3, 3, False, {}),
    # padding-free: a window's rows packed into one (1, total) row with position_ids; -100 on each sequence start
    "flattening-ga3": (tiny_llama, lambda: sft_rows(22), None, lambda: DataCollatorWithFlattening(), 3, 3, False, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_collator_trains_like_transformers(tmp_path, case):
    make_model, train_rows, eval_rows, make_collator, batch_size, ga, batch_encoding, extra = CASES[case]
    train, collator = train_rows(), make_collator()
    # The test is about the collator's real output type: BatchEncoding (a Mapping, not a dict) or a plain dict.
    sample = collator([{k: v for k, v in train[i].items() if k in ("input_ids", "attention_mask", "label", "labels")}
                       for i in range(batch_size)])
    assert isinstance(sample, BatchEncoding) is batch_encoding and isinstance(sample, dict) is not batch_encoding
    assert "labels" in sample
    extra = dict(extra)
    trainer_kwargs = {"data_collator": collator}
    if "compute_metrics" in extra:
        trainer_kwargs["compute_metrics"] = extra.pop("compute_metrics")
    epochs = 2
    results = run_pair(
        tmp_path, make_model, train, eval_rows() if eval_rows else None, trainer_kwargs=trainer_kwargs,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=ga, num_train_epochs=epochs,
        logging_steps=1, learning_rate=1e-2, seed=7, **extra,
    )
    assert_same_run(results)
    _, hl = results["hf"][0], results["hl"][0]
    steps_per_epoch = -(-8 // ga)  # ceil: the short last window is a step of its own
    assert hl.state.global_step == epochs * steps_per_epoch
    train_logs = [entry for entry in hl.state.log_history if "loss" in entry]
    assert len(train_logs) == epochs * steps_per_epoch
    assert all({"loss", "grad_norm", "learning_rate"} <= entry.keys() for entry in train_logs)
    if eval_rows is not None:
        evals = [entry for entry in hl.state.log_history if "eval_loss" in entry]
        metric = "eval_accuracy" if "padding" in case else "eval_token_accuracy"
        assert evals and all(metric in entry for entry in evals)  # assert_same_run compared them with transformers'


def test_processing_class_without_collator_pads_like_transformers(tmp_path):
    # Neither trainer is given a data_collator: both default to DataCollatorWithPadding(processing_class).
    results = run_pair(
        tmp_path, tiny_bert, classification_rows(22), classification_rows(9, seed=1),
        trainer_kwargs={"processing_class": tokenizer(), "compute_metrics": accuracy},
        per_device_train_batch_size=3, gradient_accumulation_steps=2, num_train_epochs=1, logging_steps=1,
        learning_rate=1e-2, seed=3, eval_strategy="steps", eval_steps=3,
    )
    assert_same_run(results)
    for key in ("hf", "hl"):
        assert isinstance(results[key][0].data_collator, DataCollatorWithPadding)
    assert results["hl"][0].state.global_step == 4  # 8 micro-batches, GA 2


def _recording(trainer_cls):
    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.recorded.append((
                model.training,
                None if num_items_in_batch is None else float(num_items_in_batch),
                type(inputs).__name__,
            ))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    Recording.recorded = None
    return Recording


@pytest.mark.parametrize("collator", ["lm", "seq2seq"])
def test_num_items_in_batch_reaches_compute_loss_from_batch_encoding(tmp_path, collator):
    hf_cls, hl_cls = _recording(transformers.Trainer), _recording(hf_lightning.Trainer)
    hf_cls.recorded, hl_cls.recorded = [], []
    if collator == "lm":
        train, make = lm_rows(22), lambda: DataCollatorForLanguageModeling(tokenizer(), mlm=False)
    else:
        train, make = sft_rows(22), lambda: DataCollatorForSeq2Seq(tokenizer(), model=None)
    results = run_pair(
        tmp_path, tiny_llama, train, lm_rows(5, seed=2) if collator == "lm" else sft_rows(5, seed=2),
        trainer_kwargs={"data_collator": make()}, hf_cls=hf_cls, hl_cls=hl_cls,
        per_device_train_batch_size=3, gradient_accumulation_steps=3, num_train_epochs=1, logging_steps=1,
        learning_rate=1e-2, eval_strategy="epoch", per_device_eval_batch_size=2,
    )
    assert_same_run(results)
    train_calls = [call for call in hf_cls.recorded if call[0]]
    # 8 micro-batches: windows of 3, 3 and 2; every micro-batch of a window gets the window's label-token count.
    assert len(train_calls) == 8 and all(call[1] is not None for call in hf_cls.recorded)
    windows = [train_calls[0:3], train_calls[3:6], train_calls[6:8]]
    assert all(len({call[1] for call in window}) == 1 for window in windows)
    assert len({window[0][1] for window in windows}) > 1  # ragged rows: the count differs between windows
    assert [call[:2] for call in hl_cls.recorded] == [call[:2] for call in hf_cls.recorded]
    assert [call[2] for call in hl_cls.recorded if call[0]] == [call[2] for call in train_calls]  # BatchEncoding


def test_evaluation_compute_loss_receives_the_collators_batch(tmp_path):
    # A compute_loss override that reads `inputs.labels` (BatchEncoding attribute access) works in transformers'
    # evaluation and would raise AttributeError in hf_lightning's.
    hf_cls, hl_cls = _recording(transformers.Trainer), _recording(hf_lightning.Trainer)
    hf_cls.recorded, hl_cls.recorded = [], []
    run_pair(tmp_path, tiny_llama, None, lm_rows(5, seed=2), evaluate=True, hf_cls=hf_cls, hl_cls=hl_cls,
             trainer_kwargs={"data_collator": DataCollatorForLanguageModeling(tokenizer(), mlm=False)},
             per_device_eval_batch_size=2)
    assert [call[2] for call in hf_cls.recorded] == ["BatchEncoding"] * 3
    assert hl_cls.recorded == hf_cls.recorded


# ---------------------------------------------------------------------- streams and loader options


STREAM_ARGS = dict(per_device_train_batch_size=4, max_steps=50, logging_steps=1, report_to="none", save_strategy="no",
                   use_cpu=True)


class Stream(IterableDataset):
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        yield from self.rows


def test_iterable_dataset_with_max_steps(tmp_path):
    rows = list(classification_dataset(40, extra_column=False))
    results = run_pair(
        tmp_path, tiny_bert, Stream(rows), None, per_device_train_batch_size=4, max_steps=5, logging_steps=1,
        gradient_accumulation_steps=2,
    )
    assert_same_run(results)


def test_dataloader_options(tmp_path):
    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(15), None, per_device_train_batch_size=4, num_train_epochs=2,
        dataloader_drop_last=True, dataloader_num_workers=1, logging_steps=1, train_sampling_strategy="sequential",
    )
    assert_same_run(results)
    assert results["hl"][0].state.global_step == 6


class OneShotStream(IterableDataset):
    """A stream that can be read once (e.g. a network source): the second epoch is empty."""

    def __init__(self, rows):
        self.rows = iter(rows)

    def __iter__(self):
        yield from self.rows


def test_stream_that_runs_dry_stops_the_run_on_transformers(tmp_path):
    rows = list(classification_dataset(12, extra_column=False))
    trainer = transformers.Trainer(tiny_bert(), args=transformers.TrainingArguments(str(tmp_path), **STREAM_ARGS),
                                   train_dataset=OneShotStream(rows))
    with transformers_bug(ValueError, "does not contain any data", "transformers 5.24 fails on the empty second "
                          "epoch of a stream that runs dry (accelerate: 'Batch does not contain any data')"):
        output = trainer.train()
    assert output.global_step == 3
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3]


def test_stream_that_runs_dry_stops_the_run(tmp_path):
    rows = list(classification_dataset(12, extra_column=False))
    trainer = hf_lightning.Trainer(tiny_bert(), args=hf_lightning.TrainingArguments(str(tmp_path), **STREAM_ARGS),
                                   train_dataset=OneShotStream(rows))
    output = trainer.train()
    assert output.global_step == trainer.lightning_trainer.global_step == 3
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3]
