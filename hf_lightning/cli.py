"""`hf-lightning`: fit / validate / predict from a YAML config, on LightningCLI (jsonargparse).

    hf-lightning fit --config run.yaml [--args.learning_rate 3e-5] [--trainer.callbacks+=EarlyStopping] [--print_config]
    hf-lightning validate --config run.yaml
    hf-lightning predict --config run.yaml

A config has four groups: `model` (TransformersTask), `data` (TextFiles), `args` (every TrainingArguments field,
with transformers' own help texts) and `trainer` (`callbacks`: TrainerCallbacks and Lightning callbacks by
class_path; `logger`: Lightning loggers by class_path, or name them in `args.report_to`). A YAML printed by --print_config runs unchanged.
Bad input ends with one line on stderr and exit code 2; a traceback (exit code 1) means a bug. Bad input is:
a parse error (an unknown key or a value of the wrong type); a `ValueError` or `TypeError` from building the
groups (transformers' TrainingArguments checks: an unknown `optim` or `eval_strategy`, ...); what `run` checks itself
(a missing file, column or model folder); and a `ValueError`, `TypeError` or `OSError` raised before training or
evaluation begins (hf_lightning's checks: a refused field, a missing `--ckpt_path`, eval without validation data;
torch's and datasets': batch size 0, a negative learning rate, an empty file, validation_split 1.5). Once the run
has begun (TrainerCallback.on_train_begin / on_prediction_step), every error is reported with its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import Logger
from transformers import TrainerCallback

from .training_args import TrainingArguments

TASKS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
}
DATA_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class ModelConfig:
    """Which model to train.

    Args:
        name_or_path: A local folder written by `save_pretrained` (a pretrained model).
        config: Or a model config to build from, e.g. {"model_type": "llama", "hidden_size": 64, ...}.
        task: "sequence-classification" or "causal-lm": picks the AutoModelFor* class.
        num_labels: Classes of a sequence-classification head (default: the labels found in the data).
        tokenizer: A local tokenizer folder (default: name_or_path).
    """

    name_or_path: Optional[str] = None
    config: Optional[dict] = None
    task: str = "sequence-classification"
    num_labels: Optional[int] = None
    tokenizer: Optional[str] = None


@dataclass
class DataConfig:
    """Local data files read with `datasets` (csv, json, jsonl, parquet, txt).

    Args:
        train_file: Training rows.
        validation_file: Evaluation rows (or use validation_split).
        test_file: Rows for `predict`.
        validation_split: Fraction of train_file held out for evaluation when there is no validation_file.
        text_column: Column with the text.
        label_column: Column with the class (sequence classification).
        max_length: Tokens kept per row.
    """

    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    validation_split: Optional[float] = None
    text_column: str = "text"
    label_column: Optional[str] = "label"
    max_length: int = 128


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


# What the libraries raise for a bad value; reported as bad input while no step has run (see the module docstring).
INPUT_ERRORS = (ValueError, TypeError)


class RunBegan(TrainerCallback):
    """Marks where bad input can no longer be the cause: every check has passed and the run's first work began."""

    began = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = True

    def on_prediction_step(self, args, state, control, **kwargs):
        self.began = True


class TransformersTask(pl.LightningModule):
    """The `model:` group: which transformers model to train (see ModelConfig). A LightningModule only so that
    LightningCLI parses it; the model itself is built and trained by hf_lightning.Trainer."""

    def __init__(
        self,
        name_or_path: Optional[str] = None,
        config: Optional[dict] = None,
        task: str = "sequence-classification",
        num_labels: Optional[int] = None,
        tokenizer: Optional[str] = None,
    ):
        super().__init__()
        self.spec = ModelConfig(name_or_path, config, task, num_labels, tokenizer)


class TextFiles(pl.LightningDataModule):
    """The `data:` group: local files read with `datasets` (see DataConfig)."""

    def __init__(
        self,
        train_file: Optional[str] = None,
        validation_file: Optional[str] = None,
        test_file: Optional[str] = None,
        validation_split: Optional[float] = None,
        text_column: str = "text",
        label_column: Optional[str] = "label",
        max_length: int = 128,
    ):
        super().__init__()
        self.spec = DataConfig(train_file, validation_file, test_file, validation_split, text_column, label_column,
                               max_length)


class Runner(pl.Trainer):
    """What `hf-lightning fit|validate|predict` runs: an hf_lightning.Trainer built from the config.

    It stands where LightningCLI expects a lightning.Trainer (its `trainer:` group holds the callbacks and loggers);
    the hf_lightning.Trainer it builds creates the real lightning.Trainer from `args`.
    """

    def __init__(
        self,
        args: Optional[TrainingArguments] = None,
        callbacks: Optional[list[Union[Callback, TrainerCallback]]] = None,
        logger: Optional[list[Logger]] = None,
    ):
        # Deliberately no lightning.Trainer.__init__: nothing runs on this object but the three methods below.
        self.args = args
        self.extra_callbacks = list(callbacks or [])
        self.loggers_given = list(logger or [])

    def fit(self, model: TransformersTask, datamodule: TextFiles, ckpt_path: Optional[str] = None) -> None:
        """Train (and evaluate on the validation data)."""
        run("fit", model.spec, datamodule.spec, self._args(ckpt_path), self.extra_callbacks)

    def validate(self, model: TransformersTask, datamodule: TextFiles) -> None:
        """Evaluate on data.validation_file (or data.validation_split)."""
        run("validate", model.spec, datamodule.spec, self._args(), self.extra_callbacks)

    def predict(self, model: TransformersTask, datamodule: TextFiles) -> None:
        """Predict data.test_file; writes predictions.jsonl into args.output_dir."""
        run("predict", model.spec, datamodule.spec, self._args(), self.extra_callbacks)

    def _args(self, ckpt_path: Optional[str] = None) -> TrainingArguments:
        if self.args is None:
            raise UsageError("args.output_dir is required (the TrainingArguments group).")
        if self.loggers_given:
            self.args.report_to = self.loggers_given
        if ckpt_path is not None:
            self.args.resume_from_checkpoint = ckpt_path
        return self.args


class HFLightningCLI(LightningCLI):
    """LightningCLI with transformers' TrainingArguments as the top-level `args:` group."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "predict": {"model", "dataloaders", "datamodule"},
        }

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except INPUT_ERRORS as err:  # raised by a group's own checks (TrainingArguments.__post_init__)
            raise UsageError(str(err)) from err

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(TrainingArguments, "args")
        parser.link_arguments("args", "trainer.args", apply_on="instantiate")


def main(argv: list[str] | None = None) -> int:
    """The `hf-lightning` command. It owns its process, so it may set process-wide things a library import must not:
    the objects of the imports go to the collector's permanent generation (the first full collection after them
    would walk them all again, with the data), and the Hub is offline unless the environment says otherwise."""
    import gc

    gc.freeze()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from jsonargparse import ArgumentError

    try:
        HFLightningCLI(
            TransformersTask,
            TextFiles,
            trainer_class=Runner,
            save_config_callback=None,  # `fit` writes checkpoints and the final model; --print_config shows the YAML
            seed_everything_default=False,  # TrainingArguments.seed decides, as in transformers
            auto_configure_optimizers=False,  # TrainingArguments.optim decides
            parser_kwargs={"exit_on_error": False, "prog": "hf-lightning"},
            args=argv,
        )
    except (UsageError, ArgumentError, MisconfigurationException) as err:
        message = " ".join(str(err).split())  # one line
        print(f"hf-lightning: error: {message}", file=sys.stderr)
        return 2
    return 0


def run(subcommand: str, model_cfg: ModelConfig, data_cfg: DataConfig, args, callbacks) -> None:
    began = RunBegan()
    try:
        _run(subcommand, model_cfg, data_cfg, args, [*callbacks, began])
    except (*INPUT_ERRORS, OSError) as err:
        if began.began:
            raise
        raise UsageError(f"{type(err).__name__}: {err}") from err


def _run(subcommand: str, model_cfg: ModelConfig, data_cfg: DataConfig, args, callbacks) -> None:
    from . import Trainer

    splits = load_data(data_cfg, subcommand, model_cfg.task)
    classify = model_cfg.task == "sequence-classification"
    if classify and subcommand == "fit":
        labels = label_names(splits, data_cfg)
        model = load_model(model_cfg, labels)
        # Kept in the saved config, so that validate/predict on the fine-tuned folder know the classes.
        model.config.id2label = {i: str(label) for i, label in enumerate(labels)}
        model.config.label2id = {str(label): i for i, label in enumerate(labels)}
    else:
        model = load_model(model_cfg, None)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)] if classify else None
        unknown = sorted(set(map(str, label_names(splits, data_cfg))) - set(map(str, labels or []))) if classify else []
        if unknown:
            raise UsageError(
                f"labels {unknown[:5]} in the data are not classes of the model ({', '.join(map(str, labels))})."
            )
    tokenizer = load_tokenizer(model_cfg)
    tokenized = {name: tokenize(ds, tokenizer, data_cfg, model_cfg.task, labels) for name, ds in splits.items()}
    trainer = Trainer(
        model,
        args=args,
        train_dataset=tokenized.get("train") if subcommand == "fit" else None,
        eval_dataset=tokenized.get("validation"),
        processing_class=tokenizer,
        data_collator=collator(tokenizer, model_cfg.task),
        compute_metrics=accuracy if model_cfg.task == "sequence-classification" else None,
        callbacks=callbacks,
    )
    if subcommand == "fit":
        result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.save_model()
        metrics = dict(result.metrics)
        if "validation" in tokenized:
            metrics.update(trainer.evaluate())
    elif subcommand == "validate":
        metrics = trainer.evaluate()
    else:
        output = trainer.predict(tokenized["test"])
        metrics = output.metrics
        path = os.path.join(args.output_dir, "predictions.jsonl")
        os.makedirs(args.output_dir, exist_ok=True)
        with open(path, "w") as f:
            for row in output.predictions.argmax(-1).tolist() if labels else output.predictions.tolist():
                f.write(json.dumps({"prediction": labels[row] if labels else row}) + "\n")
        metrics["predictions_file"] = path
    print(json.dumps(metrics, default=str))



# ---------------------------------------------------------------------- pieces


def load_data(cfg: DataConfig, subcommand: str, task: str = "sequence-classification") -> dict:
    import datasets

    wanted = {"fit": ["train_file"], "validate": ["validation_file"], "predict": ["test_file"]}[subcommand]
    if subcommand == "validate" and cfg.validation_file is None and cfg.validation_split:
        wanted = ["train_file"]
    for key in wanted:
        if getattr(cfg, key) is None:
            raise UsageError(f"data.{key} is required for `{subcommand}`.")
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    files = {split: path for split, path in files.items() if path is not None}
    splits = {}
    for split, path in files.items():
        if not os.path.isfile(path):
            raise UsageError(f"data file not found: {path} (data.{split if split != 'validation' else 'validation'}_file)")
        fmt = DATA_FORMATS.get(os.path.splitext(path)[1].lower())
        if fmt is None:
            raise UsageError(f"data file {path}: unknown format; use one of {', '.join(sorted(DATA_FORMATS))}.")
        splits[split] = datasets.load_dataset(fmt, data_files=path, split="train")
    if "validation" not in splits and cfg.validation_split and "train" in splits:
        parts = splits["train"].train_test_split(test_size=cfg.validation_split, seed=0)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
    for split, ds in splits.items():
        labelled = cfg.label_column and split != "test" and task == "sequence-classification"  # causal-lm: the text
        needed = [cfg.text_column] + ([cfg.label_column] if labelled else [])
        for column in needed:
            if column not in ds.column_names:
                raise UsageError(
                    f"column '{column}' is not in {files.get(split, files.get('train'))} "
                    f"(columns: {', '.join(ds.column_names)}); set data.text_column / data.label_column."
                )
    return splits


def label_names(splits: dict, cfg: DataConfig) -> list:
    values = set()
    for split, ds in splits.items():
        if cfg.label_column in ds.column_names:
            values.update(ds[cfg.label_column])
    return sorted(values, key=lambda v: (str(type(v)), v))


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = cfg.tokenizer or cfg.name_or_path
    if path is None:
        raise UsageError("model.tokenizer is required when the model is built from model.config.")
    _check_folder(path, "tokenizer folder", "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"tokenizer folder {path} does not load: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _check_folder(path: str, what: str, key: str) -> None:
    """A local path that is not there is reported as such, not as a malformed Hub repo id (from_pretrained's error)."""
    local = os.path.isabs(path) or path.startswith((".", "~")) or os.environ.get("HF_HUB_OFFLINE") == "1"
    if local and not os.path.isdir(os.path.expanduser(path)):
        raise UsageError(f"{what} {path} not found ({key}: a folder written by save_pretrained).")


def load_model(cfg: ModelConfig, labels: list | None):
    import transformers

    if cfg.task not in TASKS:
        raise UsageError(f"model.task={cfg.task!r}; use one of {', '.join(TASKS)}.")
    auto = getattr(transformers, TASKS[cfg.task])
    extra: dict[str, Any] = {}
    if labels is not None:
        extra["num_labels"] = cfg.num_labels or len(labels)
    if cfg.name_or_path is not None:
        _check_folder(cfg.name_or_path, "model folder", "model.name_or_path")
        try:
            return auto.from_pretrained(cfg.name_or_path, **extra)
        except (OSError, ValueError) as err:
            raise UsageError(f"model folder {cfg.name_or_path} does not load: {str(err).splitlines()[0]}") from None
    if cfg.config is None:
        raise UsageError("set model.name_or_path (a pretrained folder) or model.config (a config to build from).")
    config = dict(cfg.config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise UsageError("model.config needs a model_type (e.g. bert, llama).")
    try:
        return auto.from_config(transformers.AutoConfig.for_model(model_type, **config, **extra))
    except (ValueError, KeyError) as err:
        raise UsageError(f"model.config does not build a model: {err}") from None


def tokenize(ds, tokenizer, cfg: DataConfig, task: str, labels: list | None):
    index = {str(label): i for i, label in enumerate(labels)} if labels else None

    def encode(rows):
        encoded = tokenizer(rows[cfg.text_column], truncation=True, max_length=cfg.max_length)
        if index is not None and cfg.label_column in rows:
            encoded["labels"] = [index[str(v)] for v in rows[cfg.label_column]]
        return encoded

    return ds.map(encode, batched=True, remove_columns=ds.column_names)


def collator(tokenizer, task: str):
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    if task == "causal-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)


def accuracy(eval_pred) -> dict:
    import numpy as np

    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


if __name__ == "__main__":
    sys.exit(main())
