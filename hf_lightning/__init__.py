"""hf_lightning: the Hugging Face `Trainer` API, running on PyTorch Lightning.

Swap ``from transformers import Trainer, TrainingArguments`` for ``from hf_lightning import Trainer,
TrainingArguments``; everything else in a transformers script stays as it is.
"""

import gc as _gc

# The imports below (transformers' trainer pieces, Lightning, torchmetrics) create a few hundred thousand objects that
# live as long as the process; collecting garbage while they are being created only walks them again and again.
# The collector is paused while they run and restored as it was (bench/README.md: time to first step). Nothing else
# of the process is touched: a user's `gc.disable()` is left alone.
_gc_was_enabled = _gc.isenabled()
_gc.disable()
try:
    # Lightning before transformers' trainer pieces: imported after them, its torchmetrics -> scipy.signal import
    # takes ~0.2 s longer here (measured with `python -X importtime`, bench/README.md).
    import lightning.pytorch  # noqa: F401 - imported first on purpose (above)
    from transformers import (
        DataCollatorForLanguageModeling,
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        EvalPrediction,
        HfArgumentParser,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        default_data_collator,
        set_seed,
    )
    from transformers.trainer_utils import IntervalStrategy, PredictionOutput, TrainOutput, get_last_checkpoint

    from .checkpoint import model_from_lightning_checkpoint
    from .seq2seq import Seq2SeqTrainer, Seq2SeqTrainingArguments
    from .trainer import Trainer
    from .training_args import TrainingArguments
finally:
    if _gc_was_enabled:
        _gc.enable()

__version__ = "0.1.0"

__all__ = [
    "DataCollatorForLanguageModeling",
    "DataCollatorWithPadding",
    "EarlyStoppingCallback",
    "EvalPrediction",
    "HfArgumentParser",
    "IntervalStrategy",
    "PredictionOutput",
    "Seq2SeqTrainer",
    "Seq2SeqTrainingArguments",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainOutput",
    "TrainingArguments",
    "default_data_collator",
    "get_last_checkpoint",
    "model_from_lightning_checkpoint",
    "set_seed",
]
