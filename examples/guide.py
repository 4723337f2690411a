"""The transformers Trainer guide's code blocks, on hf_lightning, offline.

Each function is one block of the guide with the import swapped, a tiny model built from a config instead of
google/gemma-2b, and the bundled sentences instead of IMDB from the Hub (trl.SFTTrainer's text handling is replaced
by tokenizing the text column). What the guide sets is kept as written; its push_to_hub=True pushes where HF_ENDPOINT
points (e.g. the test Hub of tests/hub_server.py), and is off without it (no Hub access here).
Liger kernels need a GPU and are not part of this file.

    python examples/guide.py [block ...]      # e.g. python examples/guide.py quickstart galore lomo
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

import datasets
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from hf_lightning import Trainer, TrainerCallback, TrainingArguments

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("GUIDE_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "hf_lightning_guide"))
STEPS = int(os.environ.get("GUIDE_MAX_STEPS", "20"))


# ---------------------------------------------------------------------- offline stand-ins for the Hub


def tokenizer():
    texts = datasets.load_dataset("csv", data_files=os.path.join(HERE, "data", "sentiment.csv"))["train"]["text"]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for text in texts:
        for word in text.lower().replace(".", " .").replace("'", " '").split():
            vocab.setdefault(word, len(vocab))
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def dataset(tok, with_labels_for_lm=True):
    """The bundled sentences: 'label' for classification; input_ids/labels for causal LM."""
    ds = datasets.load_dataset("csv", data_files=os.path.join(HERE, "data", "sentiment.csv"))["train"]
    ds = ds.map(lambda rows: tok([t.lower() for t in rows["text"]], truncation=True, max_length=16), batched=True)
    return ds.train_test_split(test_size=0.2, seed=0)


def causal_lm(tok):
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      pad_token_id=tok.pad_token_id)
    return transformers.AutoModelForCausalLM.from_config(config)


def classifier(tok, num_labels=2):
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return transformers.AutoModelForSequenceClassification.from_config(config)


def lm_trainer(args, **kwargs):
    tok = tokenizer()
    data = dataset(tok)
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    train = data["train"].remove_columns(["text", "label"])
    return Trainer(model=causal_lm(tok), args=args, train_dataset=train, data_collator=collator, **kwargs)


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


# ---------------------------------------------------------------------- the guide's blocks


def quickstart():
    tok = tokenizer()
    data = dataset(tok)
    model = classifier(tok)
    data_collator = transformers.DataCollatorWithPadding(tok)
    training_args = TrainingArguments(
        output_dir=os.path.join(OUT, "your-model"),
        learning_rate=2e-5,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        num_train_epochs=2,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        push_to_hub="HF_ENDPOINT" in os.environ,
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        tokenizer=tok,  # the guide's keyword (transformers 5.24 rejects it)
        data_collator=data_collator,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    return trainer


def resume():
    trainer = quickstart()
    # resume from latest checkpoint
    trainer.train(resume_from_checkpoint=True)
    # resume from specific checkpoint saved in output directory
    first = sorted(d for d in os.listdir(trainer.args.output_dir) if d.startswith("checkpoint-"))[0]
    trainer.train(resume_from_checkpoint=os.path.join(trainer.args.output_dir, first))
    return trainer


class CustomTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False):
        labels = inputs.pop("labels")
        # forward pass
        outputs = model(**inputs)
        logits = outputs.get("logits")
        # compute custom loss for 3 labels with different weights
        loss_fct = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], device=model.device))
        loss = loss_fct(logits.view(-1, self.model.config.num_labels), labels.view(-1))
        return (loss, outputs) if return_outputs else loss


def custom_loss():
    tok = tokenizer()
    data = dataset(tok)["train"].map(lambda row: {"label": len(row["text"]) % 3})
    args = TrainingArguments(os.path.join(OUT, "custom"), max_steps=STEPS, report_to="none", save_strategy="no")
    trainer = CustomTrainer(model=classifier(tok, num_labels=3), args=args, train_dataset=data,
                            data_collator=transformers.DataCollatorWithPadding(tok))
    trainer.train()
    return trainer


class EarlyStoppingCallback(TrainerCallback):
    def __init__(self, num_steps=10):
        self.num_steps = num_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.num_steps:
            return {"should_training_stop": True}
        else:
            return {}


def early_stopping_callback():
    tok = tokenizer()
    data = dataset(tok)
    training_args = TrainingArguments(os.path.join(OUT, "callback"), num_train_epochs=3, report_to="none",
                                      save_strategy="no", eval_strategy="epoch")
    trainer = Trainer(
        model=classifier(tok),
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        tokenizer=tok,
        data_collator=transformers.DataCollatorWithPadding(tok),
        compute_metrics=compute_metrics,
        callback=[EarlyStoppingCallback()],
    )
    trainer.train()
    return trainer


def log_levels(argv=("--output_dir", os.path.join(OUT, "logs"), "--log_level", "warning",
                     "--log_level_replica", "error", "--max_steps", str(STEPS), "--report_to", "none")):
    # my_app.py ... --log_level warning --log_level_replica error
    (training_args,) = transformers.HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=list(argv))
    logger = logging.getLogger(__name__)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    trainer = lm_trainer(training_args)
    trainer.train()
    return trainer


def neftune():
    training_args = TrainingArguments(os.path.join(OUT, "neftune"), neftune_noise_alpha=0.1, max_steps=STEPS,
                                      report_to="none", save_strategy="no")
    trainer = lm_trainer(training_args)
    trainer.train()
    return trainer


def galore(optim="galore_adamw", optim_args=None):
    args = TrainingArguments(
        output_dir=os.path.join(OUT, "test-galore"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        optim=optim,
        optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
        optim_args=optim_args,
        report_to="none",
        save_strategy="no",
    )
    trainer = lm_trainer(args)
    trainer.train()
    return trainer


def galore_optim_args():
    return galore(optim_args="rank=64, update_proj_gap=100, scale=0.10")


def galore_layerwise():
    return galore(optim="galore_adamw_layerwise")


def lomo():
    args = TrainingArguments(
        output_dir=os.path.join(OUT, "test-lomo"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        optim="adalomo",
        gradient_checkpointing=True,
        logging_strategy="steps",
        logging_steps=1,
        learning_rate=2e-6,
        save_strategy="no",
        run_name="lomo-imdb",
        report_to="none",
    )
    trainer = lm_trainer(args)
    trainer.train()
    return trainer


def grokadamw():
    args = TrainingArguments(
        output_dir=os.path.join(OUT, "test-grokadamw"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        optim="grokadamw",
        logging_strategy="steps",
        logging_steps=1,
        learning_rate=2e-5,
        save_strategy="no",
        run_name="grokadamw-imdb",
        report_to="none",
    )
    trainer = lm_trainer(args)
    trainer.train()
    return trainer


def schedule_free():
    args = TrainingArguments(
        output_dir=os.path.join(OUT, "test-schedulefree"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        optim="schedule_free_adamw",
        gradient_checkpointing=True,
        logging_strategy="steps",
        logging_steps=1,
        learning_rate=2e-6,
        save_strategy="no",
        run_name="sfo-imdb",
        report_to="none",
    )
    trainer = lm_trainer(args)
    trainer.train()
    return trainer


BLOCKS = {f.__name__: f for f in (quickstart, resume, custom_loss, early_stopping_callback, log_levels, neftune,
                                   galore, galore_optim_args, galore_layerwise, lomo, grokadamw, schedule_free)}

if __name__ == "__main__":
    for name in sys.argv[1:] or BLOCKS:
        trainer = BLOCKS[name]()
        print(f"{name}: {trainer.state.global_step} steps, last log {trainer.state.log_history[-1]}")
