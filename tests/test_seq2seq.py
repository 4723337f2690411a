"""Seq2SeqTrainer / Seq2SeqTrainingArguments against transformers.Seq2SeqTrainer, on a tiny T5 built from its config:
the same loss curve, the same generated ids (padded alike) and the same metrics computed from them, in in-training
evaluations and in evaluate()/predict() with generate() keyword arguments."""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DataCollatorForSeq2Seq, GenerationConfig

import hf_lightning
from hf_lightning.training_args import FIELD_POLICY, HONOURED
from differential import VOLATILE, assert_same_history, assert_same_weights

VOCAB = 24


@functools.lru_cache(maxsize=None)
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


def rows(n: int, seed: int) -> list[dict]:
    """Ragged source/target pairs (the target: the source's first tokens reversed, then </s>)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        source = rng.integers(3, VOCAB, size=int(rng.integers(3, 9))).tolist()
        target = source[::-1][: int(rng.integers(2, 6))] + [1]
        out.append({"input_ids": source + [1], "attention_mask": [1] * (len(source) + 1), "labels": target})
    return out


def generated_metrics(eval_pred):
    """Metrics that read the generated ids: their width (the padding), an exact checksum and a token accuracy."""
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    labels = np.where(labels == -100, 0, labels)
    width = min(preds.shape[1], labels.shape[1])
    mask = labels[:, :width] != 0
    return {
        "width": preds.shape[1],
        "label_width": labels.shape[1],
        "checksum": float((preds * np.arange(1, preds.shape[1] + 1)).sum()),
        "token_accuracy": float(((preds[:, :width] == labels[:, :width]) & mask).sum() / mask.sum()),
    }


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(word in k for word in VOLATILE)}


def run(trainer_cls, args_cls, out, train, test, **args):
    """Train with generating in-training evaluations, then predict and evaluate with generate() kwargs; everything
    is read before the other Trainer builds its arguments (transformers' accelerate state is process-wide)."""
    options = dict(report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=True, learning_rate=3e-2,
                   per_device_train_batch_size=4, per_device_eval_batch_size=3, max_steps=6, logging_steps=1,
                   eval_strategy="steps", eval_steps=3, predict_with_generate=True, generation_max_length=6)
    options.update(args)
    model = tiny_t5()
    trainer = trainer_cls(
        model, args=args_cls(str(out), **options), train_dataset=train, eval_dataset=test,
        data_collator=DataCollatorForSeq2Seq(tokenizer(), model=model), processing_class=tokenizer(),
        compute_metrics=generated_metrics,
    )
    trainer.train()
    predicted = trainer.predict(test, num_beams=2, max_length=7)
    evaluated = trainer.evaluate(max_new_tokens=4, metric_key_prefix="short")
    return trainer, model, predicted, evaluated


def test_seq2seq_trainer_matches_transformers(tmp_path):
    train, test = rows(24, seed=0), rows(7, seed=1)
    hf_trainer, hf_model, hf_pred, hf_eval = run(transformers.Seq2SeqTrainer, transformers.Seq2SeqTrainingArguments,
                                                 tmp_path / "hf", train, test)
    hl_trainer, hl_model, hl_pred, hl_eval = run(hf_lightning.Seq2SeqTrainer, hf_lightning.Seq2SeqTrainingArguments,
                                                 tmp_path / "hl", train, test)

    # the loss curve and the in-training evaluations (generated with generation_max_length=6, padded to 20: the
    # generation config's max_length, as transformers pads)
    assert_same_history(hf_trainer.state.log_history, hl_trainer.state.log_history, rel=1e-5, abs_=1e-6)
    evals = [entry for entry in hl_trainer.state.log_history if "eval_width" in entry]
    assert len(evals) == 2 and evals[0]["eval_width"] == 20
    assert_same_weights(hf_model, hl_model, atol=1e-5)

    # predict(num_beams=2, max_length=7): the same generated ids and labels, the same metrics
    assert hl_pred.predictions.shape == hf_pred.predictions.shape == (7, 20)
    np.testing.assert_array_equal(hl_pred.predictions, hf_pred.predictions)
    np.testing.assert_array_equal(hl_pred.label_ids, hf_pred.label_ids)
    assert stable(hl_pred.metrics) == pytest.approx(stable(hf_pred.metrics), rel=1e-5)
    assert hl_pred.metrics["test_token_accuracy"] > 0  # the model learnt something: the ids are not noise

    # evaluate(max_new_tokens=4): generation_max_length yields to it; the metrics under the given prefix
    assert stable(hl_eval) == pytest.approx(stable(hf_eval), rel=1e-5)
    assert "short_checksum" in hl_eval


def test_generate_kwargs_reach_generate(tmp_path):
    """Beams and length change the generated ids: the kwargs are not dropped on the way to generate()."""
    train, test = rows(8, seed=0), rows(5, seed=1)
    model = tiny_t5()
    args = hf_lightning.Seq2SeqTrainingArguments(str(tmp_path), report_to="none", disable_tqdm=True, use_cpu=True,
                                                 predict_with_generate=True, per_device_eval_batch_size=5)
    trainer = hf_lightning.Seq2SeqTrainer(model, args=args, eval_dataset=test, processing_class=tokenizer(),
                                          data_collator=DataCollatorForSeq2Seq(tokenizer(), model=model))
    expected = model.generate(**DataCollatorForSeq2Seq(tokenizer())(
        [{k: v for k, v in row.items() if k != "labels"} for row in test]), max_length=3, num_beams=2)
    predicted = trainer.predict(test, max_length=3, num_beams=2).predictions
    assert predicted.shape == (5, 20)  # padded to the generation config's max_length, with the pad id
    np.testing.assert_array_equal(predicted[:, :3], expected.numpy())
    assert (predicted[:, 3:] == 0).all()
    args.predict_with_generate = False
    logits = trainer.predict(test).predictions[0]
    assert logits.shape[-1] == VOCAB  # without predict_with_generate: the logits, as the Trainer's


def test_generation_config_argument_sets_the_models(tmp_path):
    saved = GenerationConfig(max_length=5, num_beams=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    saved.save_pretrained(tmp_path / "gen")
    for source in (saved, str(tmp_path / "gen"), str(tmp_path / "gen" / "generation_config.json")):
        model = tiny_t5()
        args = hf_lightning.Seq2SeqTrainingArguments(str(tmp_path / "out"), report_to="none", use_cpu=True,
                                                     generation_config=source)
        hf_lightning.Seq2SeqTrainer(model, args=args)
        assert model.generation_config.max_length == 5 and model.generation_config.num_beams == 2
        assert model.generation_config is not saved
    bad = GenerationConfig(num_beams=1, early_stopping=True)  # a beam-search flag without beams
    args = hf_lightning.Seq2SeqTrainingArguments(str(tmp_path / "out"), report_to="none", use_cpu=True,
                                                 generation_config=bad)
    with pytest.raises(ValueError, match="Fix these issues"):
        hf_lightning.Seq2SeqTrainer(tiny_t5(), args=args)


def test_arguments_without_seq2seq_fields_are_refused_clearly(tmp_path):
    args = hf_lightning.TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="Seq2SeqTrainingArguments"):
        hf_lightning.Seq2SeqTrainer(tiny_t5(), args=args)
    # transformers' own arguments are accepted as they are
    args = transformers.Seq2SeqTrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    assert hf_lightning.Seq2SeqTrainer(tiny_t5(), args=args).args is args


def test_sortish_sampler_is_accepted_and_said_to_change_nothing(tmp_path, caplog):
    args = hf_lightning.Seq2SeqTrainingArguments(str(tmp_path), report_to="none", use_cpu=True, sortish_sampler=True)
    with caplog.at_level(logging.WARNING, logger="hf_lightning"):
        hf_lightning.Seq2SeqTrainer(tiny_t5(), args=args)
    assert "sortish_sampler=True changes nothing" in caplog.text


def test_seq2seq_fields_are_classified_and_arguments_keep_hf_lightnings_fields():
    names = [f.name for f in dataclasses.fields(hf_lightning.Seq2SeqTrainingArguments) if f.init]
    assert all(name in FIELD_POLICY for name in names)
    for name in ("sortish_sampler", "predict_with_generate", "generation_max_length", "generation_num_beams",
                 "generation_config"):
        assert FIELD_POLICY[name][0] == HONOURED
    args = hf_lightning.Seq2SeqTrainingArguments("unused", save_lightning_checkpoint=True, predict_with_generate=True)
    assert isinstance(args, hf_lightning.TrainingArguments) and isinstance(args, transformers.Seq2SeqTrainingArguments)
    parsed, = transformers.HfArgumentParser(hf_lightning.Seq2SeqTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "o", "--predict_with_generate", "--generation_num_beams", "3",
         "--save_lightning_checkpoint", "true"])
    assert parsed.predict_with_generate and parsed.generation_num_beams == 3 and parsed.save_lightning_checkpoint


def test_seq2seq_surface_is_transformers():
    names = [name for name in vars(transformers.Seq2SeqTrainer) if not name.startswith("__")]
    assert [name for name in names if not hasattr(hf_lightning.Seq2SeqTrainer, name)] == []
