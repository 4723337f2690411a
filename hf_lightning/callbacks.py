"""TrainerCallbacks and Lightning callbacks in one `callbacks=` list.

transformers' `CallbackHandler` dispatches the 16 TrainerCallback events; the one change here is what a callback may
return. transformers replaces `control` by whatever a callback returns, so the guide's own example, which returns
`{"should_training_stop": True}`, breaks the loop. Here a returned dict updates the control's fields (an unknown key
is an error naming it) and a returned `TrainerControl` replaces it, as in transformers.
"""

from __future__ import annotations

import dataclasses

from transformers.trainer_callback import CallbackHandler as _HFCallbackHandler
from transformers.trainer_callback import TrainerCallback, TrainerControl

_CONTROL_FIELDS = {f.name for f in dataclasses.fields(TrainerControl)}


def split_callbacks(callbacks: list) -> tuple[list, list]:
    """(TrainerCallbacks, Lightning callbacks); each may be given as a class or an instance."""
    from lightning.pytorch.callbacks import Callback as LightningCallback

    hf, lightning_cbs = [], []
    for cb in callbacks:
        kind = cb if isinstance(cb, type) else type(cb)
        if issubclass(kind, TrainerCallback):
            hf.append(cb)
        elif issubclass(kind, LightningCallback):
            lightning_cbs.append(cb() if isinstance(cb, type) else cb)
        else:
            raise TypeError(
                f"callbacks: {kind.__name__} is neither a transformers.TrainerCallback nor a "
                "lightning.pytorch.Callback. Subclass one of them."
            )
    return hf, lightning_cbs


def pop_lightning_callback(callbacks: list, callback):
    """Remove and return the first Lightning callback that is `callback` (or an instance of it, given a class)."""
    for cb in list(callbacks):
        if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
            callbacks.remove(cb)
            return cb
    return None


def _apply_result(control: TrainerControl, result, callback, event: str) -> TrainerControl:
    if result is None:
        return control
    if isinstance(result, TrainerControl):
        return result
    if isinstance(result, dict):
        unknown = set(result) - _CONTROL_FIELDS
        if unknown:
            raise ValueError(
                f"{type(callback).__name__}.{event} returned unknown TrainerControl field(s) {sorted(unknown)}; "
                f"valid fields are {sorted(_CONTROL_FIELDS)}."
            )
        for key, value in result.items():
            setattr(control, key, bool(value))
        return control
    raise TypeError(
        f"{type(callback).__name__}.{event} returned a {type(result).__name__}; return None, a TrainerControl or a "
        "dict of TrainerControl fields."
    )


class CallbackHandler(_HFCallbackHandler):
    """transformers' CallbackHandler, accepting dict returns (see the module docstring)."""

    def call_event(self, event, args, state, control, **kwargs):
        for callback in self.callbacks:
            result = getattr(callback, event)(
                args,
                state,
                control,
                model=self.model,
                processing_class=self.processing_class,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                train_dataloader=self.train_dataloader,
                eval_dataloader=self.eval_dataloader,
                **kwargs,
            )
            control = _apply_result(control, result, callback, event)
        return control
