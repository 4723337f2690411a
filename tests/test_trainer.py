"""Differential tests: transformers.Trainer is the oracle for steps, log_history, metrics and final weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import hf_lightning
from differential import (assert_same_history, assert_same_run, assert_same_weights, run_pair, stable,
                          transformers_bug)
from helpers import accuracy, classification_dataset, lm_dataset, tiny_bert, tiny_llama


def test_epochs_accumulation_eval_steps_and_weight_decay(tmp_path):
    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(22), classification_dataset(10, seed=1),
        trainer_kwargs={"compute_metrics": accuracy},
        per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2, logging_steps=2,
        eval_strategy="steps", eval_steps=3, gradient_accumulation_steps=2, seed=3, warmup_steps=2, weight_decay=0.1,
    )
    assert_same_run(results)
    hl = results["hl"][0]
    assert hl.state.global_step == 6  # 6 micro-batches/epoch, GA=2, 2 epochs
    assert any("eval_accuracy" in entry for entry in hl.state.log_history)
    assert hl.lightning_trainer.global_step == 6  # Lightning counts what transformers counts


def test_causal_lm_num_items_in_batch_and_short_last_window(tmp_path):
    # 26 rows / batch 4 = 7 micro-batches per epoch; GA=3 -> windows of 3, 3 and a short 1.
    # Ragged -100 labels make num_items_in_batch differ per window: HF normalises the loss by it.
    results = run_pair(
        tmp_path, tiny_llama, lm_dataset(26), lm_dataset(8, seed=2),
        per_device_train_batch_size=4, num_train_epochs=2, gradient_accumulation_steps=3, logging_steps=1,
        learning_rate=5e-3, eval_strategy="epoch", max_grad_norm=0.5, lr_scheduler_type="cosine", warmup_steps=0.2,
    )
    assert_same_run(results)
    assert results["hl"][0].state.global_step == 6


def test_max_steps_cuts_an_epoch_with_dropout_and_data_seed(tmp_path):
    results = run_pair(
        tmp_path, lambda: tiny_bert(dropout=0.3), classification_dataset(20), None,
        per_device_train_batch_size=3, max_steps=9, logging_steps=2, logging_first_step=True, data_seed=11, seed=5,
        lr_scheduler_type="constant_with_warmup", warmup_steps=3,
    )
    assert_same_run(results)
    history = results["hl"][0].state.log_history
    assert history[0]["step"] == 1  # logging_first_step
    assert results["hl"][0].state.epoch == pytest.approx(9 / 7)


def test_fractional_epochs_and_logging_per_epoch(tmp_path):
    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(24), classification_dataset(6, seed=4),
        per_device_train_batch_size=4, num_train_epochs=1.5, logging_strategy="epoch", eval_strategy="steps",
        eval_steps=4, eval_delay=5, lr_scheduler_type="polynomial", lr_scheduler_kwargs={"power": 2.0},
    )
    assert_same_run(results)
    assert results["hl"][0].state.global_step == 9


def test_metrics_inputs_losses_preprocess_and_eval_accumulation(tmp_path):
    seen = {}

    def metrics(pred):
        seen.setdefault("calls", []).append((pred.inputs is not None, pred.losses is not None))
        return {"mean_pred": float(np.mean(pred.predictions)), "n_inputs": int(pred.inputs.shape[0])}

    def preprocess(logits, labels):
        return logits.argmax(-1)

    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(16), classification_dataset(9, seed=3),
        trainer_kwargs={"compute_metrics": metrics, "preprocess_logits_for_metrics": preprocess},
        per_device_train_batch_size=4, per_device_eval_batch_size=2, num_train_epochs=1, eval_strategy="epoch",
        include_for_metrics=["inputs", "loss"], eval_accumulation_steps=2,
    )
    assert_same_run(results)
    assert seen["calls"] == [(True, True)] * 2


def test_batch_eval_metrics(tmp_path):
    class Running:
        def __init__(self):
            self.correct = self.total = 0

        def __call__(self, pred, compute_result):
            self.correct += int((pred.predictions.argmax(-1) == pred.label_ids).sum())
            self.total += len(pred.label_ids)
            if compute_result:
                result = {"acc": self.correct / self.total}
                self.correct = self.total = 0
                return result
            return {}

    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(12), classification_dataset(7, seed=3),
        trainer_kwargs={"compute_metrics": Running()},
        per_device_train_batch_size=4, per_device_eval_batch_size=3, num_train_epochs=1, eval_strategy="epoch",
        batch_eval_metrics=True,
    )
    assert_same_run(results)


def test_evaluate_dict_of_datasets_and_predict(tmp_path):
    evals = {"a": classification_dataset(6, seed=1), "b": classification_dataset(5, seed=2)}
    test = classification_dataset(7, seed=9)

    def after(trainer):
        return trainer.evaluate(), trainer.evaluate(metric_key_prefix="dev"), trainer.predict(test)

    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(8), evals, trainer_kwargs={"compute_metrics": accuracy},
        per_device_train_batch_size=4, num_train_epochs=1, eval_strategy="epoch", after=after,
    )
    assert_same_run(results)
    (hf_metrics, hf_dev, hf_pred), (hl_metrics, hl_dev, hl_pred) = results["hf_after"], results["hl_after"]
    assert stable(hf_metrics) == pytest.approx(stable(hl_metrics))
    assert {"eval_a_loss", "eval_b_accuracy"} <= set(hl_metrics)
    assert stable(hf_dev) == pytest.approx(stable(hl_dev)) and "dev_a_loss" in hl_dev
    np.testing.assert_allclose(hf_pred.predictions, hl_pred.predictions, rtol=1e-6)
    np.testing.assert_array_equal(hf_pred.label_ids, hl_pred.label_ids)
    assert stable(hf_pred.metrics) == pytest.approx(stable(hl_pred.metrics))
    assert "test_accuracy" in hl_pred.metrics


def test_evaluate_before_training_matches(tmp_path):
    results = run_pair(tmp_path, tiny_llama, None, lm_dataset(10), evaluate=True, per_device_eval_batch_size=3)
    assert stable(results["hf"][1]) == pytest.approx(stable(results["hl"][1]))


def test_eval_on_start(tmp_path):
    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(8), classification_dataset(4, seed=1),
        per_device_train_batch_size=4, num_train_epochs=1, eval_strategy="epoch", eval_on_start=True,
    )
    assert_same_run(results)
    assert results["hl"][0].state.log_history[0]["step"] == 0


def test_bf16_on_cpu(tmp_path):
    results = run_pair(
        tmp_path, tiny_llama, lm_dataset(12), None, per_device_train_batch_size=4, num_train_epochs=1,
        logging_steps=1, bf16=True,
    )
    assert results["hl"][0].lightning_trainer.precision == "bf16-mixed"
    assert_same_run(results, rel=2e-2, atol=2e-3)


def test_label_smoothing_and_label_names(tmp_path):
    results = run_pair(
        tmp_path, tiny_bert, classification_dataset(12), classification_dataset(5, seed=1),
        per_device_train_batch_size=4, num_train_epochs=1, logging_steps=1, label_smoothing_factor=0.1,
        label_names=["labels"], eval_strategy="epoch",
    )
    assert_same_run(results)


def test_compute_loss_func_receives_what_transformers_passes(tmp_path):
    seen = []  # transformers' run first, then hf_lightning's

    def loss_func(outputs, labels, num_items_in_batch=None):
        seen.append((num_items_in_batch.dtype, float(num_items_in_batch)))
        logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1])
        return nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum") / num_items_in_batch

    results = run_pair(tmp_path, tiny_llama, lm_dataset(12), trainer_kwargs={"compute_loss_func": loss_func},
                       per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, logging_steps=1)
    assert_same_run(results)
    hf, hl = seen[: len(seen) // 2], seen[len(seen) // 2:]
    assert len(hf) == 6 and hl == hf and hf[0][0] == torch.float32  # a float tensor: the window's label count


def test_user_optimizer_and_optimizer_cls(tmp_path):
    def make(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    models = {k: tiny_bert() for k in ("hf", "hl")}
    trainers = {}
    for key, cls, args_cls in (("hf", transformers.Trainer, transformers.TrainingArguments),
                               ("hl", hf_lightning.Trainer, hf_lightning.TrainingArguments)):
        args = args_cls(str(tmp_path / key), per_device_train_batch_size=4, num_train_epochs=1, logging_steps=1,
                        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
        trainers[key] = cls(models[key], args=args, train_dataset=classification_dataset(16),
                            optimizers=make(models[key]))
        trainers[key].train()
    assert_same_history(trainers["hf"].state.log_history, trainers["hl"].state.log_history)
    assert_same_weights(models["hf"], models["hl"])

    results = run_pair(
        tmp_path / "cls", tiny_bert, classification_dataset(12), None,
        trainer_kwargs={"optimizer_cls_and_kwargs": (torch.optim.Adagrad, {"lr": 0.05})},
        per_device_train_batch_size=4, num_train_epochs=1, logging_steps=1,
    )
    assert_same_run(results)
    assert isinstance(results["hl"][0].optimizer, torch.optim.Adagrad)


@pytest.mark.parametrize("optim", ["adamw_torch", "adafactor", "sgd", "rmsprop", "adagrad"])
def test_builtin_optim_names(tmp_path, optim):
    results = run_pair(
        tmp_path, tiny_llama, lm_dataset(8), None, per_device_train_batch_size=4, max_steps=3, logging_steps=1,
        optim=optim, learning_rate=1e-3,
    )
    assert_same_run(results)


def test_overridden_hooks_are_the_ones_called(tmp_path):
    calls = []

    class Custom(hf_lightning.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls.append("compute_loss")
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def create_optimizer(self, model=None):
            calls.append("create_optimizer")
            return super().create_optimizer(model)

        def create_scheduler(self, num_training_steps, optimizer=None):
            calls.append(("create_scheduler", num_training_steps))
            return super().create_scheduler(num_training_steps, optimizer)

        def training_step(self, model, inputs, num_items_in_batch=None):
            calls.append("training_step")
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            calls.append("prediction_step")
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

        def get_train_dataloader(self):
            calls.append("get_train_dataloader")
            return super().get_train_dataloader()

        def get_eval_dataloader(self, eval_dataset=None):
            calls.append("get_eval_dataloader")
            return super().get_eval_dataloader(eval_dataset)

    args = hf_lightning.TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                          eval_strategy="steps", eval_steps=2, report_to="none", save_strategy="no")
    Custom(tiny_bert(), args=args, train_dataset=classification_dataset(8),
           eval_dataset=classification_dataset(4)).train()
    for name in ("compute_loss", "create_optimizer", "training_step", "prediction_step", "get_train_dataloader",
                 "get_eval_dataloader"):
        assert name in calls, name
    assert ("create_scheduler", 2) in calls


class WeightedLossTrainer:
    """The guide's CustomTrainer: the 4-argument compute_loss override."""

    def compute_loss(self, model, inputs, return_outputs=False):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.get("logits")
        loss_fct = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], device=model.device))
        loss = loss_fct(logits.view(-1, self.model.config.num_labels), labels.view(-1))
        return (loss, outputs) if return_outputs else loss


GUIDE_LOSS_ARGS = dict(per_device_train_batch_size=4, num_train_epochs=1, report_to="none", save_strategy="no",
                       use_cpu=True, gradient_accumulation_steps=2, logging_steps=1)


def _three_class_data():
    return classification_dataset(12).map(lambda row: {"labels": row["input_ids"][1] % 3})


def test_guide_custom_compute_loss_on_transformers(tmp_path):
    hf_cls = type("HFCustom", (WeightedLossTrainer, transformers.Trainer), {})
    trainer = hf_cls(tiny_bert(num_labels=3), args=transformers.TrainingArguments(str(tmp_path), **GUIDE_LOSS_ARGS),
                     train_dataset=_three_class_data())
    with transformers_bug(TypeError, "num_items_in_batch", "transformers 5.24 always passes num_items_in_batch= to "
                          "compute_loss and so breaks the guide's own 4-argument example"):
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_guide_custom_compute_loss(tmp_path):
    data, args = _three_class_data(), GUIDE_LOSS_ARGS
    hl_cls = type("HLCustom", (WeightedLossTrainer, hf_lightning.Trainer), {})
    trainer = hl_cls(tiny_bert(num_labels=3), args=hf_lightning.TrainingArguments(str(tmp_path / "hl"), **args),
                     train_dataset=data)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(np.isfinite(losses))

    # Same weights as transformers would give with a 5.x-signature override (loss ÷ GA per micro-batch).
    class FiveX(transformers.Trainer):
        loss_is_scaled_for_ga = False  # a per-batch mean: transformers divides it by GA only when told so

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return WeightedLossTrainer.compute_loss(self, model, inputs, return_outputs)

    reference = tiny_bert(num_labels=3)
    FiveX(reference, args=transformers.TrainingArguments(str(tmp_path / "ref"), **args), train_dataset=data).train()
    assert_same_weights(reference, trainer.model)


def test_tokenizer_keyword_and_public_objects(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    data = classification_dataset(8)
    args = hf_lightning.TrainingArguments(str(tmp_path), max_steps=1, report_to="none", save_strategy="no")
    trainer = hf_lightning.Trainer(model=tiny_bert(), args=args, train_dataset=data, tokenizer=tokenizer)
    assert trainer.processing_class is tokenizer
    assert isinstance(trainer.data_collator, transformers.DataCollatorWithPadding)
    trainer.train()
    assert isinstance(trainer.lightning_trainer, __import__("lightning").pytorch.Trainer)
    assert trainer.lightning_module.model is trainer.model
    assert isinstance(trainer.state, transformers.TrainerState)
    # Any transformers.TrainingArguments is accepted as is.
    plain = transformers.TrainingArguments(str(tmp_path / "plain"), max_steps=1, report_to="none", save_strategy="no")
    hf_lightning.Trainer(tiny_bert(), args=plain, train_dataset=data).train()


def test_second_train_call_gets_a_fresh_schedule(tmp_path):
    def twice(trainer):
        trainer.train()
        return [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]

    results = run_pair(tmp_path, tiny_bert, classification_dataset(12), None, per_device_train_batch_size=4,
                       num_train_epochs=1, logging_steps=1, after=twice)
    assert results["hl_after"] == pytest.approx(results["hf_after"])
    assert results["hl_after"][0] > 0


def test_activation_checkpointing_options(tmp_path):
    results = run_pair(
        tmp_path, tiny_llama, lm_dataset(8), None, per_device_train_batch_size=4, max_steps=2, logging_steps=1,
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": 1},
    )
    assert_same_run(results)
    assert results["hl"][2].is_gradient_checkpointing


def test_assert_same_weights_checks_names_before_values():
    def layers(*names, seed=0):
        torch.manual_seed(seed)
        return nn.ModuleDict({name: nn.Linear(2, 2) for name in names})

    assert_same_weights(layers("a", "b"), layers("a", "b"))
    with pytest.raises(AssertionError, match=r"only in the first \[\], only in the second \['b.bias', 'b.weight'\]"):
        assert_same_weights(layers("a"), layers("a", "b"))  # zip() alone would compare "a" and pass
    with pytest.raises(AssertionError, match="only in the first"):
        assert_same_weights(layers("a"), layers("z"))  # same values under other names
    with pytest.raises(AssertionError, match="another order"):
        assert_same_weights(layers("a", "b"), layers("b", "a"))
    with pytest.raises(AssertionError, match="max diff"):
        assert_same_weights(layers("a"), layers("a", seed=1))


@pytest.mark.parametrize("framework", [transformers, hf_lightning], ids=["transformers", "hf_lightning"])
def test_a_dropped_trainer_frees_its_optimizer_at_once(framework, tmp_path):
    # transformers.Trainer is freed by reference counting when its user drops it, and a second train() with
    # model_init (a search trial) drops the first model's optimizer. hf_lightning must not keep them until a gc:
    # a sweep of Trainers on a GPU would hold two trials' optimizer state at once.
    import gc
    import weakref

    args = framework.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
                                       save_strategy="no", disable_tqdm=True, use_cpu=True)
    data, eval_data = classification_dataset(8), classification_dataset(4, seed=1)
    gc.collect()
    gc.disable()
    try:
        trainer = framework.Trainer(model_init=lambda: tiny_bert(), args=args, train_dataset=data,
                                    eval_dataset=eval_data)
        trainer.train()
        first, first_model = weakref.ref(trainer.optimizer), weakref.ref(trainer.model)
        trainer.train()  # model_init: a new model and optimizer
        assert first() is None, "the first train()'s optimizer outlived it"
        assert first_model() is None, "the first train()'s model outlived it"
        trainer.evaluate()
        optimizer, model, dropped = weakref.ref(trainer.optimizer), weakref.ref(trainer.model), weakref.ref(trainer)
        del trainer
        assert dropped() is None and optimizer() is None, "the dropped Trainer or its optimizer waits for a gc"
        assert model() is None, "the dropped Trainer's model (from model_init) waits for a gc"
    finally:
        gc.enable()


def test_the_lightning_side_of_a_dropped_trainer_says_to_keep_it(tmp_path):
    # The Lightning side refers to the Trainer weakly (run.FacadeRef): used after its Trainer was dropped, it says so.
    args = hf_lightning.TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                          report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = hf_lightning.Trainer(tiny_bert(), args=args, train_dataset=classification_dataset(4))
    trainer.train()
    module = trainer.lightning_module
    assert module.hf_trainer is trainer  # the Trainer itself, not a proxy
    del trainer
    with pytest.raises(RuntimeError, match="keep a reference to the hf_lightning.Trainer"):
        module.hf_trainer
