"""Small real models and datasets shared by the tests (built from configs, no Hub access)."""

from __future__ import annotations

import datasets
import numpy as np
import torch
import transformers
from transformers import TrainerCallback

VOCAB = 64


def tiny_bert(num_labels: int = 2, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def classification_dataset(n: int = 24, seq: int = 8, seed: int = 0, extra_column: bool = True) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, seq))
    labels = (ids[:, 0] > VOCAB // 2).astype(int)
    data = {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(), "labels": labels.tolist()}
    if extra_column:
        data["text"] = [f"row {i}" for i in range(n)]  # removed by remove_unused_columns
    return datasets.Dataset.from_dict(data)


def lm_dataset(n: int = 24, seed: int = 0, ragged: bool = True) -> datasets.Dataset:
    """Causal LM rows; ragged lengths padded with -100 labels so num_items_in_batch differs per batch."""
    rng = np.random.default_rng(seed)
    rows_ids, rows_mask, rows_labels = [], [], []
    for _ in range(n):
        length = int(rng.integers(4, 12)) if ragged else 12
        ids = rng.integers(1, VOCAB, size=12)
        mask = [1] * length + [0] * (12 - length)
        labels = [int(t) if m else -100 for t, m in zip(ids, mask)]
        rows_ids.append(ids.tolist()); rows_mask.append(mask); rows_labels.append(labels)
    return datasets.Dataset.from_dict({"input_ids": rows_ids, "attention_mask": rows_mask, "labels": rows_labels})


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


EVENTS = [
    "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
    "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_evaluate", "on_predict",
    "on_save", "on_log", "on_prediction_step", "on_push_begin",
]


class Recorder(TrainerCallback):
    """Records (event, global_step) and checks the references callbacks receive."""

    def __init__(self):
        self.events = []
        self.bad_refs = []

    def _record(self, event, args, state, control, **kwargs):
        self.events.append((event, state.global_step))
        if event in ("on_train_begin", "on_step_end", "on_pre_optimizer_step"):
            for ref in ("model", "optimizer", "lr_scheduler", "train_dataloader"):
                if kwargs.get(ref) is None:
                    self.bad_refs.append((event, ref))
        if event in ("on_evaluate", "on_prediction_step") and kwargs.get("eval_dataloader") is None:
            self.bad_refs.append((event, "eval_dataloader"))


for _event in EVENTS:
    setattr(Recorder, _event, lambda self, args, state, control, _e=_event, **kw: self._record(_e, args, state, control, **kw))
