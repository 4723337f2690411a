"""The TrainingArguments fields a drop-in needs that were refused before: each does what transformers 5.24 does with it.

skip_memory_metrics=False, auto_find_batch_size, eval_use_gather_object, bf16_full_eval/fp16_full_eval,
accelerator_config (its sub-fields) and debug="underflow_overflow" (training_args.FIELD_POLICY says where each lives).
"""

from __future__ import annotations

import json
import types

import pytest
import torch
import transformers
from torch.utils.data import RandomSampler, SequentialSampler

import hf_lightning
from hf_lightning import data as hf_data
from differential import assert_same_history, assert_same_run, assert_same_weights, run_pair
from helpers import accuracy, classification_dataset, tiny_bert

# ---------------------------------------------------------------------- skip_memory_metrics=False


def _memory_keys(metrics: dict) -> set[str]:
    return {k for k in metrics if "_mem_" in k}


def test_memory_metrics_have_transformers_names_and_places(tmp_path):
    """train() metrics (and its log entry), evaluate() and predict() metrics carry transformers' *_mem_* keys;
    the evaluation's log entry does not (transformers adds them after logging)."""
    data = classification_dataset(4)
    seen = {}
    for key, trainer_cls, args_cls in (("hf", transformers.Trainer, transformers.TrainingArguments),
                                       ("hl", hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        args = args_cls(str(tmp_path / key), skip_memory_metrics=False, max_steps=1, per_device_train_batch_size=4,
                        report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=True)
        trainer = trainer_cls(tiny_bert(), args=args, train_dataset=data, eval_dataset=data)
        train_metrics = trainer.train().metrics
        eval_metrics = trainer.evaluate()
        test_metrics = trainer.predict(data).metrics
        history = trainer.state.log_history
        seen[key] = (train_metrics, eval_metrics, test_metrics, history)

    (hf_train, hf_eval, hf_test, hf_history), (hl_train, hl_eval, hl_test, hl_history) = seen["hf"], seen["hl"]
    assert _memory_keys(hl_train) == _memory_keys(hf_train) == {
        "before_init_mem_cpu", "init_mem_cpu_alloc_delta", "init_mem_cpu_peaked_delta",
        "train_mem_cpu_alloc_delta", "train_mem_cpu_peaked_delta",
    }
    assert _memory_keys(hl_eval) == _memory_keys(hf_eval) == {"eval_mem_cpu_alloc_delta", "eval_mem_cpu_peaked_delta"}
    assert _memory_keys(hl_test) == _memory_keys(hf_test) == {"test_mem_cpu_alloc_delta", "test_mem_cpu_peaked_delta"}
    assert [_memory_keys(entry) for entry in hl_history] == [_memory_keys(entry) for entry in hf_history]
    for metrics in (hl_train, hl_eval, hl_test):
        for name in _memory_keys(metrics):
            assert isinstance(metrics[name], int), name
            assert metrics[name] > 0 if name == "before_init_mem_cpu" else True
            assert metrics[name] >= 0 if "peaked" in name else True


def test_memory_metrics_are_off_by_default(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), max_steps=1, report_to="none", disable_tqdm=True,
                                          save_strategy="no", use_cpu=True)
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))
    assert not _memory_keys(trainer.train().metrics)


# ---------------------------------------------------------------------- auto_find_batch_size


class OutOfMemoryAbove(transformers.BertForSequenceClassification):
    """A real model that fails as a device does when a batch is larger than `limit` rows."""

    limit = 4

    def __init__(self, config):
        super().__init__(config)
        self.oversized_calls = 0

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if input_ids.shape[0] > self.limit:
            self.oversized_calls += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {input_ids.shape[0]}.")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


def oom_model():
    torch.manual_seed(0)
    return OutOfMemoryAbove(tiny_bert().config)


def test_auto_find_batch_size_retries_smaller_as_transformers(tmp_path):
    data = classification_dataset(16)
    results = run_pair(tmp_path, oom_model, data, auto_find_batch_size=True, per_device_train_batch_size=6,
                       max_steps=5, logging_steps=1)
    assert_same_run(results)
    hf_trainer, hl_trainer = results["hf"][0], results["hl"][0]
    # accelerate's rule: 6 -> 5 -> 4 (x0.9), the first size that fits
    assert hl_trainer.state.train_batch_size == hf_trainer.state.train_batch_size == 4
    assert results["hl"][2].oversized_calls == results["hf"][2].oversized_calls == 2
    # log_history has no trace of the failed attempts: one run at the size found, step for step as transformers'


def test_auto_find_batch_size_resumes_at_the_size_found(tmp_path):
    data = classification_dataset(16)
    common = dict(auto_find_batch_size=True, per_device_train_batch_size=5, max_steps=4, report_to="none",
                  disable_tqdm=True, use_cpu=True, save_strategy="steps", save_steps=2)
    full = oom_model()
    hf_lightning.Trainer(full, args=hf_lightning.TrainingArguments(str(tmp_path / "full"), **common),
                         train_dataset=data).train()
    resumed = oom_model()
    trainer = hf_lightning.Trainer(resumed, args=hf_lightning.TrainingArguments(str(tmp_path / "full"), **common),
                                   train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert full.oversized_calls == 1
    assert resumed.oversized_calls == 0  # trainer_state.json's train_batch_size (4), not 5 again
    assert trainer.state.train_batch_size == 4 and trainer.state.global_step == 4
    assert_same_weights(full, resumed)


def test_without_auto_find_batch_size_the_error_propagates(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=1, report_to="none",
                                          disable_tqdm=True, save_strategy="no", use_cpu=True)
    with pytest.raises(torch.OutOfMemoryError):
        hf_lightning.Trainer(oom_model(), args=args, train_dataset=classification_dataset(8)).train()


# ---------------------------------------------------------------------- eval_use_gather_object, *_full_eval


def test_eval_use_gather_object_evaluates_as_transformers(tmp_path):
    data = classification_dataset(12)
    results = run_pair(tmp_path, tiny_bert, eval_dataset=data, evaluate=True, eval_use_gather_object=True,
                       trainer_kwargs={"compute_metrics": accuracy})
    assert_same_history(results["hf"][0].state.log_history, results["hl"][0].state.log_history)


@pytest.mark.parametrize("field,dtype", [("bf16_full_eval", torch.bfloat16), ("fp16_full_eval", torch.float16)])
def test_full_eval_casts_the_model_as_transformers(tmp_path, field, dtype):
    """evaluate() outside train() runs (and leaves) the model in that dtype; evaluations inside train() do not."""
    data = classification_dataset(12)
    results = run_pair(tmp_path, tiny_bert, data, eval_dataset=data, evaluate=True, max_steps=2,
                       eval_strategy="steps", eval_steps=1, trainer_kwargs={"compute_metrics": accuracy},
                       **{field: True})
    hf_history, hl_history = results["hf"][0].state.log_history, results["hl"][0].state.log_history
    # in-training evaluations and the training itself: float32, equal to transformers'
    assert_same_history(hf_history[:-1], hl_history[:-1])
    # the final evaluate(): cast, so a loss only equal to the dtype's precision, and far from the float32 one
    hf_final, hl_final = hf_history[-1]["eval_loss"], hl_history[-1]["eval_loss"]
    assert hl_final == pytest.approx(hf_final, rel=1e-2)
    assert {p.dtype for p in results["hl"][2].parameters()} == {p.dtype for p in results["hf"][2].parameters()} == {dtype}


def test_full_eval_loss_differs_from_float32(tmp_path):
    """The cast is real: the same evaluation in float32 gives another loss (bfloat16 keeps 8 bits of mantissa)."""
    data = classification_dataset(12)
    losses = {}
    for flag in (False, True):
        args = hf_lightning.TrainingArguments(str(tmp_path / str(flag)), bf16_full_eval=flag, report_to="none",
                                              disable_tqdm=True, use_cpu=True)
        losses[flag] = hf_lightning.Trainer(tiny_bert(), args=args, eval_dataset=data).evaluate()["eval_loss"]
    assert losses[True] != losses[False]


# ---------------------------------------------------------------------- accelerator_config


def test_accelerator_config_one_process_as_transformers(tmp_path):
    """use_seedable_sampler=False (torch's RandomSampler, ordered by the global RNG), split_batches (nothing to split
    in one process), gradient_accumulation_kwargs num_steps (becomes gradient_accumulation_steps)."""
    config = {"use_seedable_sampler": False, "split_batches": True, "non_blocking": True,
              "gradient_accumulation_kwargs": {"num_steps": 2, "sync_each_batch": True}}
    # a JSON file, so that each TrainingArguments reads its own dict: transformers' Trainer writes num_steps=1 into it
    path = tmp_path / "accelerator_config.json"
    path.write_text(json.dumps(config))
    results = run_pair(tmp_path, tiny_bert, classification_dataset(24), accelerator_config=str(path),
                       per_device_train_batch_size=4, num_train_epochs=2, logging_steps=1)
    assert_same_run(results)
    hl_trainer = results["hl"][0]
    assert hl_trainer.args.gradient_accumulation_steps == 2 and hl_trainer.state.max_steps == 6
    sampler = hl_trainer.get_train_dataloader().sampler
    assert type(sampler) is RandomSampler  # not accelerate's SeedableRandomSampler


def _shard_args(rank: int, **config):
    return types.SimpleNamespace(
        world_size=2, process_index=rank, seed=0, dataloader_drop_last=False, dataloader_num_workers=0,
        dataloader_pin_memory=False, dataloader_persistent_workers=False, dataloader_prefetch_factor=None,
        dataloader_multiprocessing_context=None, dataloader_in_order=True,
        accelerator_config=transformers.trainer_pt_utils.AcceleratorConfig(**config),
    )


def _rank_batches(rows: int, batch_size: int, **config) -> list[list[list[int]]]:
    dataset = list(range(rows))
    return [
        [batch.tolist() for batch in hf_data.make_dataloader(_shard_args(rank, **config), dataset, None, batch_size,
                                                             SequentialSampler(dataset), is_training=True)]
        for rank in (0, 1)
    ]


def test_split_batches_and_even_batches_shard_as_accelerate():
    """Two processes (as the launcher reports them): accelerate's BatchSamplerShard semantics."""
    assert _rank_batches(8, 2) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]  # whole batches per process
    assert _rank_batches(8, 4, split_batches=True) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]  # a slice of each
    assert _rank_batches(6, 2) == [[[0, 1], [4, 5]], [[2, 3], [0, 1]]]  # even_batches: loops to the start
    assert _rank_batches(6, 2, even_batches=False) == [[[0, 1], [4, 5]], [[2, 3]]]
    with pytest.raises(ValueError, match="split_batches"):
        _rank_batches(6, 3, split_batches=True)


@pytest.mark.parametrize("config,fragment", [
    ({"dispatch_batches": True}, "dispatch_batches"),
    ({"gradient_accumulation_kwargs": {"num_stepz": 2}}, "num_stepz"),
])
def test_accelerator_config_sub_fields_that_do_not_apply_are_refused(tmp_path, config, fragment):
    args = hf_lightning.TrainingArguments(str(tmp_path), accelerator_config=config)
    with pytest.raises(ValueError, match=fragment):
        hf_lightning.Trainer(tiny_bert(), args=args)


# ---------------------------------------------------------------------- debug


def _overflowing_model():
    model = tiny_bert()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(1e38)  # the embedding LayerNorm's variance overflows
    return model


def test_debug_underflow_overflow_fires_as_transformers(tmp_path, capsys):
    dumps = {}
    for key, trainer_cls, args_cls in (("hf", transformers.Trainer, transformers.TrainingArguments),
                                       ("hl", hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        args = args_cls(str(tmp_path / key), debug="underflow_overflow", max_steps=2, report_to="none",
                        disable_tqdm=True, save_strategy="no", use_cpu=True)
        trainer = trainer_cls(_overflowing_model(), args=args, train_dataset=classification_dataset(8))
        capsys.readouterr()
        with pytest.raises(ValueError, match="DebugUnderflowOverflow: inf/nan detected"):
            trainer.train()
        out = capsys.readouterr().out
        dumps[key] = out[out.index("Detected inf/nan"):]
    assert "bert.embeddings" in dumps["hl"]
    assert dumps["hl"] == dumps["hf"]


def test_debug_tpu_metrics_is_refused(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), debug="tpu_metrics_debug")
    with pytest.raises(ValueError, match="tpu_metrics_debug"):
        hf_lightning.Trainer(tiny_bert(), args=args)
