"""Launched by tests/test_distributed.py with `torchrun --nproc_per_node 2` (CPU, gloo), as transformers users do.

    torchrun --nproc_per_node 2 ddp_job.py FRAMEWORK OUTPUT_DIR [neftune|layerwise|accelerate_style|lora|eval37]
    python ddp_job.py hl OUTPUT_DIR lightning_launch   # Lightning's own launcher starts the second process
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import transformers

import hf_lightning
from helpers import classification_dataset, lm_dataset, tiny_llama

framework, output_dir = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3 and sys.argv[3] == "neftune":  # NEFTune on a model that DDP wraps
    args = hf_lightning.TrainingArguments(output_dir, neftune_noise_alpha=5.0, max_steps=2, report_to="none",
                                          use_cpu=True, save_strategy="no", ddp_backend="gloo", logging_steps=1)
    model = tiny_llama()
    trainer = hf_lightning.Trainer(model, args=args, train_dataset=lm_dataset(8))
    noisy = []
    embeddings = model.get_input_embeddings()
    probe = embeddings.register_forward_hook(lambda mod, inp, out: noisy.append(len(mod._forward_hooks) > 1))
    trainer.train()
    probe.remove()
    # one string, flushed: a single write() that rank 0's progress bar cannot split
    print(f"NEFTUNE {all(noisy) and len(noisy) > 0} {len(embeddings._forward_hooks) == 0} "
          f"{trainer.lightning_trainer.strategy.__class__.__name__}", flush=True)
    # model_wrapped: the strategy's DDP wrapper (around the LightningModule holding the model); model stays unwrapped,
    # and a second train() wraps the same module once, not the previous wrapper.
    ddp = torch.nn.parallel.DistributedDataParallel
    first = trainer.model_wrapped
    trainer.train()
    second = trainer.model_wrapped
    with torch.no_grad():  # called, the wrapper runs the model's forward (both ranks: DDP syncs buffers)
        ids = torch.tensor([[1, 2, 3, 4]])
        same_output = torch.equal(second(input_ids=ids).logits, model(input_ids=ids).logits)
    checks = (isinstance(first, ddp) and isinstance(second, ddp) and same_output, first.module.model is model,
              second.module is trainer.lightning_module and second.module.model is model,
              not isinstance(second.module, ddp), trainer.model is model)
    print("WRAPPED " + " ".join(map(str, checks)), flush=True)
    sys.exit(0)
if len(sys.argv) > 3 and sys.argv[3] == "layerwise":  # transformers refuses layer-wise optimizers under DDP
    args = hf_lightning.TrainingArguments(output_dir, optim="galore_adamw_layerwise", optim_target_modules=["mlp"],
                                          max_steps=2, report_to="none", use_cpu=True, ddp_backend="gloo")
    try:
        hf_lightning.Trainer(tiny_llama(), args=args, train_dataset=lm_dataset(8)).train()
    except NotImplementedError as err:
        print("REFUSED:", err)
        sys.exit(0)
    sys.exit(1)
trainer_cls = transformers.Trainer if framework == "hf" else hf_lightning.Trainer
if len(sys.argv) > 3 and sys.argv[3] == "eval37":  # sharded evaluation/prediction of 37 samples, no training
    from helpers import tiny_bert

    def flat(arrays):  # eval_do_concat_batches=False hands over one array per gathered batch
        return np.concatenate(arrays) if isinstance(arrays, list) else arrays

    def metrics(prediction):
        labels, inputs = flat(prediction.label_ids), flat(prediction.inputs)
        return {"rows": float(len(labels)), "accuracy": float((flat(prediction.predictions).argmax(-1) == labels).mean()),
                "first_tokens": inputs[:, 0].tolist()}  # the samples' order as compute_metrics sees it

    dataset = classification_dataset(37, seed=7)
    results = {}
    for name, variant in {"concat": {}, "accumulation": {"eval_accumulation_steps": 2},
                          "batches": {"eval_do_concat_batches": False}}.items():
        args = (transformers.TrainingArguments if framework == "hf" else hf_lightning.TrainingArguments)(
            os.path.join(output_dir, name), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
            ddp_backend="gloo", include_for_metrics=["inputs"], disable_tqdm=True, **variant)
        trainer = trainer_cls(tiny_bert(), args=args, eval_dataset=dataset, compute_metrics=metrics)
        evaluated = trainer.evaluate()
        predicted = trainer.predict(dataset)
        results[name] = {"eval": evaluated, "predict": predicted.metrics,
                         "predictions": flat(predicted.predictions).tolist(), "label_ids": flat(predicted.label_ids).tolist()}
    # token logits of rows 3-12 long, each batch padded to its longest row: the processes' batches differ in length,
    # so each gathered batch is padded across processes (-100) before it joins the others
    rng = np.random.default_rng(3)
    rows = [rng.integers(1, 64, size=int(rng.integers(3, 13))).tolist() for _ in range(37)]

    from tokenizers import Tokenizer, models

    # the collator users use for per-token labels: pads input_ids with the tokenizer's pad id, labels with -100, and
    # yields a BatchEncoding (the tokenizer only supplies the padding; the rows are ids already)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 64)}}
    pad_batch = transformers.DataCollatorForTokenClassification(transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]", unk_token="[UNK]"))
    rows_with_labels = [{"input_ids": row, "labels": row} for row in rows]

    args = (transformers.TrainingArguments if framework == "hf" else hf_lightning.TrainingArguments)(
        os.path.join(output_dir, "ragged"), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
        ddp_backend="gloo", include_for_metrics=["inputs"], disable_tqdm=True, eval_accumulation_steps=2)
    trainer = trainer_cls(tiny_llama(), args=args, data_collator=pad_batch, compute_metrics=metrics)
    gathers = []
    if framework == "hl":  # counted: the tensor gathers of one prediction, whichever path (every one goes through _gather)
        gather = trainer.accelerator._gather
        trainer.accelerator._gather = lambda tensor, group: gathers.append(1) or gather(tensor, group)
    # each batch's label-token count over the processes: started as the batch is fetched (taken by prediction_step)
    # or counted when prediction_step asks
    counts = {"ahead": 0, "again": 0}
    if framework == "hl":
        take, count_again = hf_lightning.data.CountsAhead.take, trainer._get_num_items_in_batch

        def counted(key, function):
            def wrapper(*args, **kwargs):
                result = function(*args, **kwargs)
                counts[key] += result is not None
                return result
            return wrapper

        hf_lightning.data.CountsAhead.take = counted("ahead", take)
        trainer._get_num_items_in_batch = counted("again", count_again)
    predicted = trainer.predict(rows_with_labels)
    results["ragged"] = {"predict": predicted.metrics, "predictions": predicted.predictions.tolist(),
                         "label_ids": predicted.label_ids.tolist(), "rows": rows, "gathers": len(gathers),
                         "counts": counts}
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "eval37.json"), "w") as f:
            json.dump(results, f)
    if framework == "hf":
        trainer.end()
    sys.exit(0)
if len(sys.argv) > 3 and sys.argv[3] == "accelerate_style":  # a TRL-style subclass on trainer.accelerator
    from test_accelerator import _accelerate_style

    trainer_cls = _accelerate_style(trainer_cls)
args_cls = transformers.TrainingArguments if framework == "hf" else hf_lightning.TrainingArguments
extra_args = {}
if len(sys.argv) > 3 and sys.argv[3] == "lightning_launch":
    # no ddp_backend: transformers' TrainingArguments(ddp_backend="gloo") fails in a process without a launcher's
    # environment (accelerate then asks for a process group that does not exist); Lightning's DDP uses gloo on CPU
    extra_args = {"lightning_trainer_kwargs": {"devices": 2}, "ddp_backend": None}
args = args_cls(
    output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2, logging_steps=1,
    learning_rate=5e-3, eval_strategy="epoch", save_strategy="epoch", report_to="none", disable_tqdm=True,
    use_cpu=True, seed=3, log_level="info", log_level_replica="error", **({"ddp_backend": "gloo"} | extra_args),
)
extra = {}
if len(sys.argv) > 3 and sys.argv[3] == "accelerate_style":  # how many eval rows reach compute_metrics
    extra["compute_metrics"] = lambda prediction: {"rows": float(len(prediction.label_ids))}
model = tiny_llama()
if len(sys.argv) > 3 and sys.argv[3] == "lora":  # LoRA adapters on a frozen base, each process holding a replica
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
trainer = trainer_cls(model, args=args, train_dataset=lm_dataset(22), eval_dataset=lm_dataset(6, seed=5), **extra)
trainer.train()
rank = trainer.args.process_index
levels = {name: logging.getLogger(name).getEffectiveLevel() for name in ("transformers", "hf_lightning", "lightning.pytorch")}
with open(os.path.join(output_dir, f"levels_{rank}.json"), "w") as f:
    json.dump(levels, f)
if trainer.is_world_process_zero():
    trainer.save_model(os.path.join(output_dir, "final"))
    with open(os.path.join(output_dir, "history.json"), "w") as f:
        json.dump(trainer.state.log_history, f)
if framework == "hf":  # transformers 5.24 aborts at exit in ~1 run of 3 without it ("terminate called without an
    trainer.end()  # active exception"); hf_lightning releases the group itself (each hl torchrun test checks it)
