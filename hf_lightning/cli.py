"""`hf-lightning`: fit / validate / predict from a YAML config, on LightningCLI (jsonargparse).

    hf-lightning fit --config run.yaml [--args.learning_rate 3e-5] [--trainer.callbacks+=EarlyStopping] [--print_config]
    hf-lightning validate --config run.yaml
    hf-lightning predict --config run.yaml

A config has four groups: `model` (TransformersTask), `data` (TextFiles), `args` (every TrainingArguments field,
with transformers' own help texts) and `trainer` (lightning.Trainer's own arguments, merged with `args` by the rule
written above ARGS_OWNED; `callbacks`: TrainerCallbacks and Lightning callbacks by class_path; `logger`: Lightning loggers
by class_path, or name them in `args.report_to`). A YAML printed by --print_config runs unchanged.
Bad input ends with one line on stderr and exit code 2; a traceback (exit code 1) means a bug. Bad input is:
a parse error (an unknown key or a value of the wrong type); a `ValueError` or `TypeError` from building the
groups (transformers' TrainingArguments checks: an unknown `optim` or `eval_strategy`, ...); what `run` checks itself
(a missing file, column or model folder); and a `ValueError`, `TypeError` or `OSError` raised before training or
evaluation begins (hf_lightning's checks: a refused field, a missing `--ckpt_path`, eval without validation data;
torch's and datasets': batch size 0, a negative learning rate, an empty file, validation_split 1.5). Once the run
has begun (TrainerCallback.on_train_begin / on_prediction_step), every error is reported with its traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import typing
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


# ---------------------------------------------------------------------- the trainer group
# `--trainer.X` takes every argument of lightning.Trainer (its signature, as LightningCLI reads it). The rule that
# merges them with `args`: a Lightning argument that a TrainingArguments field controls (ARGS_OWNED) is written into
# that field (`--trainer.max_epochs 3` is `--args.num_train_epochs 3`), or refused naming the field where there is no
# exact translation; giving both is an error naming both flags. Every other one is `args.lightning_trainer_kwargs[X]`
# (a key given both ways is an error), so `--trainer.devices 2` starts Lightning's launcher (launch.py).


def _precision(value) -> dict:
    fields = {"bf16-mixed": {"bf16": True}, "bf16": {"bf16": True}, "16-mixed": {"fp16": True}, "16": {"fp16": True},
              "32-true": {}, "32": {}}
    if str(value) not in fields:
        raise UsageError(f"--trainer.precision {value} has no TrainingArguments equivalent; use --args.bf16 or "
                         "--args.fp16 (mixed precision), or leave both off (32-bit).")
    return fields[str(value)]


def _deterministic(value) -> dict:
    if value is not True:
        raise UsageError(f"--trainer.deterministic {value}: use --args.full_determinism true (transformers' switch).")
    return {"full_determinism": True}


# Lightning argument -> (the TrainingArguments fields that control it, their values for the Lightning value; None:
# no exact translation, refused naming the first field).
ARGS_OWNED: dict[str, tuple[tuple[str, ...], Any]] = {
    "max_epochs": (("num_train_epochs",), lambda v: {"num_train_epochs": float(v)}),
    "max_steps": (("max_steps",), lambda v: {"max_steps": int(v)}),
    "accumulate_grad_batches": (("gradient_accumulation_steps",), lambda v: {"gradient_accumulation_steps": int(v)}),
    "gradient_clip_val": (("max_grad_norm",), lambda v: {"max_grad_norm": float(v)}),
    "log_every_n_steps": (("logging_steps",), lambda v: {"logging_steps": int(v)}),
    "default_root_dir": (("output_dir",), lambda v: {"output_dir": str(v)}),
    "enable_progress_bar": (("disable_tqdm",), lambda v: {"disable_tqdm": not v}),
    "precision": (("bf16", "fp16"), _precision),
    "deterministic": (("full_determinism",), _deterministic),
    "gradient_clip_algorithm": (("max_grad_norm",), None),
    "val_check_interval": (("eval_steps", "eval_strategy"), None),
    "check_val_every_n_epoch": (("eval_strategy",), None),
    "num_sanity_val_steps": (("eval_on_start",), None),
    "enable_checkpointing": (("save_strategy",), None),
    "min_epochs": (("num_train_epochs",), None),
    "min_steps": (("max_steps",), None),
    "use_distributed_sampler": (("accelerator_config",), None),  # hf_lightning shards the data as transformers does
}
# The Runner's own parameters in the trainer group (not passed to lightning.Trainer as they are).
_RUNNER_OWN = ("args", "callbacks", "logger")


def lightning_parameters() -> dict[str, inspect.Parameter]:
    """lightning.Trainer's arguments, annotations resolved (jsonargparse reads them where Runner is defined)."""
    hints = typing.get_type_hints(pl.Trainer.__init__)
    params = list(inspect.signature(pl.Trainer.__init__).parameters.values())[1:]
    return {p.name: p.replace(annotation=hints.get(p.name, p.annotation)) for p in params if p.name not in _RUNNER_OWN}


def _is_set(value, default) -> bool:
    return not (value is default or (type(value) is type(default) and value == default))


def merge_trainer_into_args(trainer, args) -> None:
    """Apply the rule above to a parsed config (jsonargparse Namespaces, before instantiation) for ARGS_OWNED; the
    Lightning values left in `trainer` go into lightning_trainer_kwargs once instantiated (Runner)."""
    if args is None:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    changes: dict[str, Any] = {}
    for name, param in lightning_parameters().items():
        value = trainer.get(name, param.default)
        if name not in ARGS_OWNED or not _is_set(value, param.default):
            continue
        fields, translate = ARGS_OWNED[name]
        given = [f for f in fields if _is_set(args.get(f), defaults[f])]
        if given:
            raise UsageError(f"--trainer.{name} and --args.{given[0]} both set what TrainingArguments controls; "
                             f"give only --args.{given[0]}.")
        if translate is None:
            raise UsageError(f"--trainer.{name}: hf_lightning runs TrainingArguments' loop; use --args.{fields[0]}.")
        changes.update(translate(value))
        trainer[name] = param.default
    for field_name, value in changes.items():
        args[field_name] = value


class Runner(pl.Trainer):
    """What `hf-lightning fit|validate|predict` runs: an hf_lightning.Trainer built from the config.

    It stands where LightningCLI expects a lightning.Trainer: its `trainer:` group holds lightning.Trainer's own
    arguments (merged with `args` as the rule above says); the hf_lightning.Trainer it builds creates the real
    lightning.Trainer from `args`.
    """

    def __init__(
        self,
        args: Optional[TrainingArguments] = None,
        callbacks: Optional[list[Union[Callback, TrainerCallback]]] = None,
        logger: Optional[list[Logger]] = None,
        **lightning: Any,
    ):
        # Deliberately no lightning.Trainer.__init__: nothing runs on this object but the three methods below.
        self.args = args
        self.extra_callbacks = list(callbacks or [])
        self.loggers_given = list(logger or [])
        params = lightning_parameters()
        given = {name: value for name, value in lightning.items() if _is_set(value, params[name].default)}
        if given and args is not None:
            own = dict(args.lightning_trainer_kwargs or {})
            both = sorted(set(own) & set(given))
            if both:
                raise UsageError(f"--trainer.{both[0]} and --args.lightning_trainer_kwargs {both[0]} are both given; "
                                 "give one.")
            args.lightning_trainer_kwargs = {**own, **given}

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


def _runner_signature() -> inspect.Signature:
    own = list(inspect.signature(Runner.__init__).parameters.values())[:4]
    lightning = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in lightning_parameters().values()]
    return inspect.Signature(own + lightning)


# jsonargparse (as LightningCLI) builds the trainer group from this signature and takes help texts from the docstring.
Runner.__init__.__signature__ = _runner_signature()
Runner.__init__.__doc__ = (pl.Trainer.__init__.__doc__ or "").replace(
    "Args:\n", "Args:\n            args: TrainingArguments (the `args:` group, linked here).\n\n", 1)


class HFLightningCLI(LightningCLI):
    """LightningCLI with transformers' TrainingArguments as the top-level `args:` group."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "predict": {"model", "dataloaders", "datamodule"},
        }

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        merge_trainer_into_args(config.trainer, config.get("args"))

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
    would walk them all again, with the data). The Hub is as the environment says (HF_HUB_OFFLINE, HF_ENDPOINT), read
    by huggingface_hub at import: `--args.push_to_hub true` needs nothing more."""
    import gc

    gc.freeze()
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
        if trainer.is_world_process_zero():  # one writer when --trainer.devices starts several processes
            os.makedirs(args.output_dir, exist_ok=True)
            with open(path, "w") as f:
                for row in output.predictions.argmax(-1).tolist() if labels else output.predictions.tolist():
                    f.write(json.dumps({"prediction": labels[row] if labels else row}) + "\n")
        metrics["predictions_file"] = path
    if trainer.is_world_process_zero():
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
    from huggingface_hub import is_offline_mode

    local = os.path.isabs(path) or path.startswith((".", "~")) or is_offline_mode()
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
