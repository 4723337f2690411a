"""No silent ignores: every TrainingArguments field is classified, unsupported values are refused early."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

import hf_lightning
from hf_lightning.training_args import FIELD_POLICY, HONOURED, LIGHTNING, UNSUPPORTED, translate_arguments
from helpers import classification_dataset, lm_dataset, tiny_bert


def test_every_transformers_field_is_classified():
    names = [f.name for f in dataclasses.fields(transformers.TrainingArguments) if f.init]
    missing = [n for n in names if n not in FIELD_POLICY]
    assert not missing, f"classify these new transformers fields in hf_lightning/training_args.py: {missing}"
    assert {policy for policy, _ in FIELD_POLICY.values()} <= {HONOURED, LIGHTNING, UNSUPPORTED}
    ours = [f.name for f in dataclasses.fields(hf_lightning.TrainingArguments) if f.init]
    assert all(n in FIELD_POLICY for n in ours)
    for name in ("lightning_trainer_kwargs", "save_lightning_checkpoint", "async_save"):
        field = next(f for f in dataclasses.fields(hf_lightning.TrainingArguments) if f.name == name)
        assert field.metadata["help"]  # HfArgumentParser shows it


UNSUPPORTED_EXAMPLES = {
    "trackio_space_id": "someone/space",
}


@pytest.mark.parametrize("name,value", sorted(UNSUPPORTED_EXAMPLES.items()))
def test_unsupported_field_with_a_non_default_value_is_refused(tmp_path, name, value):
    assert FIELD_POLICY[name][0] == UNSUPPORTED
    try:
        args = transformers.TrainingArguments(str(tmp_path), **{name: value})
    except (ValueError, ImportError) as err:  # transformers itself refuses it here (e.g. fsdp without GPUs)
        pytest.skip(f"transformers refuses {name}={value!r} on this machine: {err}")
    with pytest.raises(ValueError, match=name):
        hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))


def test_refused_value_of_a_supported_field(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), train_sampling_strategy="batch_rebalance")
    with pytest.raises(ValueError, match="train_sampling_strategy"):
        hf_lightning.Trainer(tiny_bert(), args=args)


def test_defaults_are_accepted_and_translated(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), bf16=True, disable_tqdm=True, use_cpu=True,
                                          lightning_trainer_kwargs={"log_every_n_steps": 7})
    kwargs = translate_arguments(args)
    assert kwargs["precision"] == "bf16-mixed"
    assert kwargs["enable_progress_bar"] is False
    assert kwargs["accelerator"] == "cpu"
    assert kwargs["log_every_n_steps"] == 7  # lightning_trainer_kwargs win
    assert kwargs["default_root_dir"] == str(tmp_path)


def test_ddp_fields_build_a_ddp_strategy(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    args = hf_lightning.TrainingArguments(str(tmp_path), ddp_find_unused_parameters=True, ddp_timeout=60,
                                          ddp_bucket_cap_mb=10)
    strategy = translate_arguments(args)["strategy"]
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs == {"find_unused_parameters": True, "bucket_cap_mb": 10}
    assert strategy._timeout.total_seconds() == 60


# ---------------------------------------------------------------------- bad input: clear, early errors


def test_eval_strategy_without_eval_dataset(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), eval_strategy="epoch")
    with pytest.raises(ValueError, match="eval_dataset"):
        hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))


def test_train_without_train_dataset(tmp_path):
    trainer = hf_lightning.Trainer(tiny_bert(), args=hf_lightning.TrainingArguments(str(tmp_path)))
    with pytest.raises(ValueError, match="train_dataset"):
        trainer.train()


def test_rows_without_the_model_inputs(tmp_path):
    import datasets

    data = datasets.Dataset.from_dict({"text": ["a b", "c d"], "labels": [0, 1]})
    args = hf_lightning.TrainingArguments(str(tmp_path), remove_unused_columns=False, report_to="none")
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=data,
                                   data_collator=lambda rows: {"labels": __import__("torch").tensor([r["labels"] for r in rows])})
    with pytest.raises(ValueError, match="input_ids"):
        trainer.train()
    # With remove_unused_columns (the default) the same rows have no usable column at all.
    trainer = hf_lightning.Trainer(tiny_bert(), args=hf_lightning.TrainingArguments(str(tmp_path)), train_dataset=data)
    with pytest.raises(ValueError, match="Tokenize"):
        trainer.train()


def test_model_that_returns_no_loss(tmp_path):
    data = classification_dataset(4).remove_columns(["labels"])
    args = hf_lightning.TrainingArguments(str(tmp_path), report_to="none", save_strategy="no")
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=data)
    with pytest.raises(ValueError, match="labels"):
        trainer.train()


def test_iterable_dataset_without_max_steps(tmp_path):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from lm_dataset(4)

    with pytest.raises(ValueError, match="max_steps"):
        hf_lightning.Trainer(tiny_bert(), args=hf_lightning.TrainingArguments(str(tmp_path)), train_dataset=Stream())


def test_unknown_lr_scheduler_type(tmp_path):
    with pytest.raises(ValueError, match="warp_speed"):
        args = hf_lightning.TrainingArguments(str(tmp_path), lr_scheduler_type="warp_speed")
        hf_lightning.Trainer(tiny_bert(), args=args)


def test_base_model_without_head_is_refused(tmp_path):
    model = transformers.BertModel(tiny_bert().config)
    with pytest.raises(ValueError, match="head"):
        hf_lightning.Trainer(model, args=hf_lightning.TrainingArguments(str(tmp_path)))


def test_not_a_callback(tmp_path):
    with pytest.raises(TypeError, match="TrainerCallback"):
        hf_lightning.Trainer(tiny_bert(), args=hf_lightning.TrainingArguments(str(tmp_path)), callbacks=[object()])


def test_spawning_strategies_are_refused_sharded_ones_translated(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    for extra, fragment in (({"devices": 2, "strategy": "ddp_spawn"}, "strategy='ddp'"),
                            ({"devices": 2, "strategy": "ddp_fork"}, "torchrun")):
        args = hf_lightning.TrainingArguments(str(tmp_path), lightning_trainer_kwargs=extra)
        with pytest.raises(ValueError, match=fragment):
            translate_arguments(args)
    # Lightning's sharded strategies go through (the CUDA-only ones: tests/test_gpu_strategies.py)
    given = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    args = hf_lightning.TrainingArguments(str(tmp_path), lightning_trainer_kwargs={"strategy": given})
    assert translate_arguments(args)["strategy"] is given
    args = hf_lightning.TrainingArguments(str(tmp_path), lightning_trainer_kwargs={"strategy": "model_parallel"})
    assert type(translate_arguments(args)["strategy"]).__name__ == "FolderModelParallelStrategy"


def test_loop_limits_in_lightning_kwargs_are_refused_naming_the_field(tmp_path):
    """train() sets the loop limits from TrainingArguments: a value in lightning_trainer_kwargs would be dropped."""
    for key, field in (("max_epochs", "num_train_epochs"), ("max_steps", "max_steps"),
                       ("val_check_interval", "eval_strategy"), ("num_sanity_val_steps", "eval_on_start")):
        args = hf_lightning.TrainingArguments(str(tmp_path), lightning_trainer_kwargs={key: 1})
        with pytest.raises(ValueError, match=rf"lightning_trainer_kwargs\['{key}'\].*TrainingArguments.{field}"):
            translate_arguments(args)


def test_lightning_launcher_topology_before_the_processes_start(tmp_path):
    """devices=2 without a launcher: this process is rank 0 of 2 for transformers' properties before fit() starts
    the other (data sharding and the training plan are computed before)."""
    args = hf_lightning.TrainingArguments(str(tmp_path), use_cpu=True, lightning_trainer_kwargs={"devices": 2},
                                          log_on_each_node=False)
    assert args.world_size == 1  # accelerate saw no launcher
    trainer = hf_lightning.Trainer(tiny_bert(), args=args)
    assert (args.world_size, args.process_index, args.local_process_index) == (2, 0, 0)
    assert args.should_save and args.should_log and trainer.is_world_process_zero()
    kwargs = translate_arguments(args)
    assert (kwargs["devices"], kwargs["strategy"], kwargs.get("num_nodes", 1)) == (2, "ddp", 1)
    import pickle

    assert type(pickle.loads(pickle.dumps(args)).distributed_state).__name__ == "PartialState"
