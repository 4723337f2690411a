"""`report_to` → Lightning loggers, and `log_level` / `log_level_replica` → Python logging verbosity."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

import transformers

# report_to name -> builder(args, save_dir, name). Lightning owns the loggers; this table only names them.
def _tensorboard(args, save_dir, name):
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=save_dir, name="runs", version=name)


def _csv(args, save_dir, name):
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=save_dir, name="csv", version=name)


def _mlflow(args, save_dir, name):
    from lightning.pytorch.loggers import MLFlowLogger

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not _mlflow_store_chosen():
        # MLflow 3 refuses its file store unless opted in; the choice of a store is the user's, not a library's.
        raise ValueError(
            "report_to='mlflow' needs a tracking store: set MLFLOW_TRACKING_URI (a server or a database), or "
            "MLFLOW_ALLOW_FILE_STORE=true for a local file store under output_dir/mlruns."
        )
    return MLFlowLogger(
        experiment_name=args.project or "huggingface",
        run_name=name,
        tracking_uri=tracking_uri or f"file:{os.path.join(save_dir, 'mlruns')}",
    )


def _mlflow_store_chosen() -> bool:
    return "MLFLOW_TRACKING_URI" in os.environ or os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")


def _wandb(args, save_dir, name):
    from lightning.pytorch.loggers import WandbLogger

    offline = os.environ.get("WANDB_MODE", "offline") == "offline"
    return WandbLogger(name=name, project=args.project or "huggingface", save_dir=save_dir, offline=offline)


LOGGERS = {"tensorboard": _tensorboard, "csv": _csv, "mlflow": _mlflow, "wandb": _wandb}
_PIP_EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def make_loggers(args: transformers.TrainingArguments) -> list:
    """The Lightning loggers `args.report_to` asks for ("all" = every installed one, "none"/[] = none)."""
    from lightning.pytorch.loggers import Logger

    report_to = args.report_to
    if report_to is None or report_to == "none":
        report_to = []
    if isinstance(report_to, (str, Logger)):
        report_to = [report_to]
    if "all" in report_to:
        report_to = [n for n in LOGGERS if n == "csv" or _installed(n)]
    name = args.run_name or "version_0"
    save_dir = args.output_dir
    loggers = []
    for entry in report_to:
        if isinstance(entry, Logger):
            loggers.append(entry)
            continue
        if entry == "none":
            continue
        if entry not in LOGGERS:
            raise ValueError(
                f"TrainingArguments.report_to={entry!r} has no Lightning logger here; use one of "
                f"{sorted(LOGGERS)}, 'all', 'none', or pass a lightning.pytorch.loggers.Logger instance."
            )
        if entry in _PIP_EXTRA and not _installed(entry):
            raise ImportError(
                f"report_to={entry!r} needs the `{_PIP_EXTRA[entry]}` package: pip install 'hf-lightning[loggers]'."
            )
        loggers.append(LOGGERS[entry](args, save_dir, name))
    return loggers


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


_LOGGER_NAMES = ("transformers", "datasets", "lightning", "lightning.pytorch", "lightning.fabric", "hf_lightning")


def apply_log_levels(args: transformers.TrainingArguments) -> None:
    """transformers' rule (log_level on the main process, log_level_replica elsewhere; "passive" leaves levels alone),
    applied to transformers, datasets (once imported), lightning and hf_lightning (Lightning is imported with
hf_lightning, so its own level setting at import comes first)."""
    level = args.get_process_log_level()
    passive = args.log_level == "passive" if _is_main(args) else args.log_level_replica == "passive"
    if passive:
        return
    transformers.utils.logging.set_verbosity(level)
    # `datasets` is imported only when the data is a datasets object; train() applies the levels again.
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.set_verbosity(level)

    for name in _LOGGER_NAMES[2:]:
        logging.getLogger(name).setLevel(level)


def _is_main(args) -> bool:
    return args.should_log  # transformers' rule, on the topology launch.adopt_topology gave args


# What Lightning says on every run that is neither true nor useful to a transformers user (README, "What is covered").
_LIGHTNING_NOISE_WARNINGS = (
    r".*defined a `validation_step` but have no `val_dataloader`.*",  # evaluation data is optional (eval_strategy="no")
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch deprecating a name Lightning uses inside
    r"GPU available but not used",  # its advice is Lightning's API; use_cpu=True is how a transformers user asks
    r"Total length of `list` across ranks is zero",  # the empty list of evaluation loaders of a run without eval data
)
_LIGHTNING_BANNERS = ("GPU available:", "TPU available:", "\N{ELECTRIC LIGHT BULB} Tip:")


class _DropBanners(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_BANNERS)


@contextlib.contextmanager
def quiet_lightning():
    """Around a lightning.Trainer's construction and its loops: drop Lightning's device banners and product tips, and
    the warnings above; everything else Lightning says passes. Nothing outlives the block (no global filter, no
    level change): the logging filter sits on Lightning's rank-zero logger for the block only."""
    from lightning_utilities.core import rank_zero

    banner_logger = rank_zero.log  # the logger Lightning's rank_zero_info writes to (set by lightning.pytorch)
    drop = _DropBanners()
    banner_logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message in _LIGHTNING_NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        banner_logger.removeFilter(drop)
