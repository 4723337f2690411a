"""PEFT adapters in Lightning's own checkpoint (`lightning.ckpt`): only what trains, and the model rebuilt from it.

A checkpoint-N/ folder of a PEFT model holds the adapter files only, as transformers writes them (peft's
save_pretrained). The Lightning export follows suit: its `state_dict` keeps the trainable parameters (the adapter
weights, plus any `modules_to_save`), whose optimizer state is all the optimizer holds, and leaves out the frozen
base model, which training never changes. Its `hyper_parameters` carry the base model's class and config and the
adapter configs, so that `model_from_lightning_checkpoint` rebuilds the PEFT model on the base model the user
passes (or the one the adapter config names, as peft's `PeftModel.from_pretrained` loads it).

Base-model buffers are left out too, as peft's adapter files leave them out: resuming either format restores the
same tensors.
"""

from __future__ import annotations

import json
import sys

from torch import nn

PREFIX = "model."  # the LightningModule holds the model as `self.model`


def peft_model(model):
    """The model as a peft `PeftModel`/`PeftMixedModel`, or None. peft is imported only if something else did (a
    model cannot be a PeftModel otherwise), so a run without adapters never pays for the import."""
    peft = sys.modules.get("peft")
    return model if peft is not None and isinstance(model, (peft.PeftModel, peft.PeftMixedModel)) else None


def model_hparams(model: nn.Module) -> dict:
    """What rebuilds the model from a lightning.ckpt: its class and config; for a PEFT model, those of its base
    model and the adapter configs (as JSON values, so that a weights-only load reads them)."""
    peft = peft_model(model)
    inner = peft.get_base_model() if peft is not None and hasattr(peft, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    hparams = {"model_class": type(inner).__name__, "model_config": config.to_dict()}
    if peft is not None:
        # peft's own save_pretrained writes sets as lists; enums are str subclasses, dumped as their values.
        hparams["peft_config"] = {name: json.loads(json.dumps(cfg.to_dict(), default=sorted))
                                  for name, cfg in peft.peft_config.items()}
    return hparams


def keep_trainable_only(model: nn.Module, state_dict: dict) -> dict:
    """A PEFT model's LightningModule state dict without the frozen base model: the keys of trainable parameters.
    Anything else is returned as is."""
    if peft_model(model) is None:
        return state_dict
    trainable = {PREFIX + name for name, param in model.named_parameters() if param.requires_grad}
    return {key: value for key, value in state_dict.items() if key in trainable}


def load_trainable(model: nn.Module, weights: dict, source: str):
    """Load a PEFT model's trainable parameters (`weights`, named as in `model.state_dict()`); the frozen base stays
    as it is. Refuses a key the model lacks, or a missing trainable parameter, naming them."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    frozen |= {name for name, _ in model.named_buffers()}

    def refuse(detail: str):
        return ValueError(
            f"{source} does not fit the PEFT model {type(model).__name__} (adapters "
            f"{sorted(getattr(model, 'peft_config', {}))}): {detail}. Resume into the model wrapped with the adapter "
            "config the checkpoint was written with.")

    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # torch names each size mismatch
        raise refuse(str(err)) from err
    missing = set(result.missing_keys) - frozen
    if missing or result.unexpected_keys:
        raise refuse(f"missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    return result


def rebuild(hparams: dict, weights: dict, base_model, path: str):
    """The PEFT model of a lightning.ckpt: its adapters (configs from `hparams`, weights from `weights`) on
    `base_model`, or on the base model the adapter config names when none is given."""
    import peft
    import transformers

    if len(hparams["peft_config"]) != 1:
        raise ValueError(f"{path!r} holds a PEFT model with the adapters {sorted(hparams['peft_config'])}: "
                         "hf_lightning rebuilds one adapter per model.")
    (active, config), = hparams["peft_config"].items()
    config = peft.PeftConfig.from_peft_type(**config)
    if base_model is None:
        name_or_path = config.base_model_name_or_path
        if not name_or_path:
            raise ValueError(
                f"{path!r} holds the adapters of a PEFT model on a {hparams['model_class']}, not that base model, and "
                "the adapter config names none (base_model_name_or_path=None): pass base_model=<the "
                f"{hparams['model_class']} the adapters were trained on>.")
        model_cls = getattr(transformers, hparams["model_class"], None)
        if model_cls is None:
            raise ValueError(f"{path!r}: transformers has no class {hparams['model_class']}; pass base_model=.")
        base_model = model_cls.from_pretrained(name_or_path, revision=config.revision)
    elif peft_model(base_model) is not None or type(base_model).__name__ != hparams["model_class"]:
        raise ValueError(
            f"{path!r} holds adapters trained on a {hparams['model_class']}: base_model must be that model without "
            f"adapters, not a {type(base_model).__name__}.")
    model = peft.get_peft_model(base_model, config, adapter_name=active)
    load_trainable(model, weights, path)
    return model
