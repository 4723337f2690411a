"""Pushing to the Hugging Face Hub: `push_to_hub` and the `hub_*` fields, with transformers.Trainer's semantics.

transformers' own methods do the work (surface.py borrows `push_to_hub` and `init_hf_repo`; the two private ones come
through compat.py): they only read what the facade shares (`args`, `state`, `model`, `processing_class`,
`callback_handler`, `save_model`, `create_model_card`) and talk to the Hub through huggingface_hub (`create_repo`,
`upload_folder(run_as_future=True)`), so `HF_ENDPOINT` and the token are read as huggingface_hub reads them. What this
module adds around them:

* `Trainer(...)` creates the repository (transformers' `init_hf_repo`); a token the Hub refuses is a `ValueError` there,
  naming what to change, instead of a bare HTTP error;
* a checkpoint push runs in huggingface_hub's background thread and never blocks a step; one that fails (server down,
  token revoked) is logged with the reason by `push_from_checkpoint` (transformers drops the futures' errors), and
  the local checkpoint is kept and training goes on; one skipped because the previous push still runs
  (`hub_always_push=False`) is logged too;
* `trainer.save_model()` called by the user pushes ("Model save"), as transformers' does; the end of `train()` waits
  for the last push (flow.py calls `_finish_current_push`).

huggingface_hub draws its upload display only on a terminal (its log lines are INFO); transformers switches
huggingface_hub's progress bars off process-wide during `train()` when pushing, which hf_lightning does not do (no
process-wide side effects).
"""

from __future__ import annotations

import logging
import os

from . import compat

logger = logging.getLogger("hf_lightning")


def init_repo(trainer) -> None:
    """With `push_to_hub`, transformers' `init_hf_repo` at construction; a refused token becomes a clear error naming
    what to change."""
    if not trainer.args.push_to_hub:
        return
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        trainer.init_hf_repo()
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status not in (401, 403):
            raise
        args = trainer.args
        source = "TrainingArguments.hub_token" if args.hub_token is not None else (
            "the HF_TOKEN environment variable or the token saved by `hf auth login`")
        repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        raise ValueError(
            f"push_to_hub=True: the Hub at {constants.ENDPOINT} refused to create or open the repository {repo!r} with "
            f"the token from {source} (HTTP {status}: {err.server_message or err}). Pass a token with write access as "
            "hub_token=..., set HF_TOKEN, or run `hf auth login`; or set push_to_hub=False."
        ) from err


def push_from_checkpoint(self, checkpoint_folder: str) -> None:
    """transformers' `_push_from_checkpoint` (the facade's method of that name), with failures and skips logged."""
    before = _jobs(self)
    compat.transformers_push_from_checkpoint()(self, checkpoint_folder)
    new_jobs = [job for job in _jobs(self) if all(job is not old for old in before)]
    name = os.path.basename(checkpoint_folder)
    if new_jobs:
        for job in new_jobs:
            job.add_done_callback(lambda future: _log_failure(future, self.hub_model_id, checkpoint_folder))
    elif self.is_world_process_zero() and str(getattr(strategy := self.args.hub_strategy, "value", strategy)) != "end":
        logger.info(f"Push of {name} to the Hub skipped: the previous push is still running (hub_always_push=False).")


def finish_current_push(self) -> None:
    """transformers' `_finish_current_push`: wait for the push in progress, if any."""
    compat.transformers_finish_current_push()(self)


def after_save_model(trainer, internal_call: bool) -> None:
    """transformers' `save_model`: a save the user asks for is also pushed when `push_to_hub` is set."""
    if trainer.args.push_to_hub and not internal_call:
        trainer.push_to_hub(commit_message="Model save", revision=trainer.args.hub_revision)


def _jobs(trainer) -> list:
    in_progress = getattr(trainer, "push_in_progress", None)
    return list(in_progress.jobs) if in_progress is not None else []


def _log_failure(future, repo_id: str | None, checkpoint_folder: str) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        logger.warning(
            f"Pushing {os.path.basename(checkpoint_folder)} to the Hub repository {repo_id} failed: "
            f"{type(error).__name__}: {error}. The local checkpoint {checkpoint_folder} is kept and training goes on; "
            "the next save pushes again (or call trainer.push_to_hub() once the Hub is reachable)."
        )
