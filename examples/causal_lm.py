"""A transformers-style script (HfArgumentParser): train a small Llama built from a config as a causal language
model on the bundled sentences, with a word-level tokenizer built locally (no Hub access).

    python examples/causal_lm.py --output_dir outputs/lm --log_level warning --log_level_replica error
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformers  # noqa: E402

from guide import causal_lm, dataset, tokenizer  # noqa: E402
from hf_lightning import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402


def main(argv=None):
    parser = HfArgumentParser(TrainingArguments)
    parser.set_defaults(output_dir="outputs/causal_lm", num_train_epochs=2, learning_rate=3e-3,
                        per_device_train_batch_size=16, eval_strategy="epoch", logging_steps=10, report_to="none",
                        save_strategy="no")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    tok = tokenizer()
    data = dataset(tok)
    data = data.remove_columns(["text", "label"])
    trainer = Trainer(model=causal_lm(tok), args=args, train_dataset=data["train"], eval_dataset=data["test"],
                      processing_class=tok, data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    trainer.log_metrics("eval", metrics)


if __name__ == "__main__":
    main()
