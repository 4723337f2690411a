"""Hub jobs run in their own process by tests/test_hub.py, with HF_ENDPOINT / HF_TOKEN set for the test Hub server
(huggingface_hub reads HF_ENDPOINT once, at import, as it does for a user).

    python hub_job.py JOB OUT_DIR      # JOB: pair | strategies | down; prints one JSON line of results last

pair        transformers.Trainer and hf_lightning.Trainer push the same run (hub_strategy="checkpoint",
            hub_always_push, hub_private_repo, stopped at step 2 of 4, then push_to_hub() and save_model()); then the
            hf_lightning repo is downloaded (snapshot_download / hf_hub_download) and training resumes from its
            `last-checkpoint` to step 4, beside an uninterrupted local run.
strategies  a wrong hub_token at Trainer(...); a token refused during training (401); hub_revision; "end";
            "all_checkpoints".
down        the server drops every upload connection of the repo: training goes on, the failure is logged.
"""

import json
import logging
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import transformers

import hf_lightning
from helpers import classification_dataset, tiny_bert

COMMON = dict(report_to="none", disable_tqdm=True, use_cpu=True, per_device_train_batch_size=4, max_steps=4,
              save_strategy="steps", save_steps=2, logging_steps=1, push_to_hub=True)


class StopAt(transformers.TrainerCallback):
    """An interrupted run: training stops after `step` (its checkpoint is saved and pushed first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def run(framework, out, name, callbacks=(), **overrides):
    trainer_cls, args_cls = ((transformers.Trainer, transformers.TrainingArguments) if framework == "hf"
                             else (hf_lightning.Trainer, hf_lightning.TrainingArguments))
    args = args_cls(os.path.join(out, name), hub_model_id=name, **{**COMMON, **overrides})
    trainer = trainer_cls(tiny_bert(), args=args, train_dataset=classification_dataset(16), callbacks=list(callbacks))
    trainer.train()
    return trainer


def files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names
                  if ".cache" not in d)


def pair(out):
    from huggingface_hub import hf_hub_download, snapshot_download

    result = {}
    for framework in ("hf", "hl"):
        trainer = run(framework, out, f"{framework}-run", callbacks=[StopAt(2)], hub_strategy="checkpoint",
                      hub_always_push=True, hub_private_repo=True)
        result[f"{framework}_hub_model_id"] = trainer.hub_model_id
        trainer.push_to_hub(commit_message="End of training", blocking=True)
        trainer.save_model()  # a save the user asks for is pushed too ("Model save")
        result[f"{framework}_local"] = files(trainer.args.output_dir)
    # round trip: what was pushed downloads as it was written
    clone = snapshot_download("alice/hl-run", local_dir=os.path.join(out, "clone"))
    result["downloaded"] = files(clone)
    weights = hf_hub_download("alice/hl-run", "model.safetensors")
    with open(weights, "rb") as a, open(os.path.join(out, "hl-run", "model.safetensors"), "rb") as b:
        result["weights_round_trip"] = a.read() == b.read()
    # resume from the pushed last-checkpoint, as transformers' docs say: train(resume_from_checkpoint="last-checkpoint")
    os.chdir(clone)
    model = tiny_bert()
    trainer = hf_lightning.Trainer(model, args=hf_lightning.TrainingArguments(
        os.path.join(out, "resumed"), **{**COMMON, "push_to_hub": False}), train_dataset=classification_dataset(16))
    trainer.train(resume_from_checkpoint="last-checkpoint")
    result["resumed_step"] = trainer.state.global_step
    full = run("hl", out, "uninterrupted", push_to_hub=False)
    result["max_weight_diff"] = max((a - b).abs().max().item() for a, b in
                                    zip(model.state_dict().values(), full.model.state_dict().values()))
    return result


def strategies(out):
    from huggingface_hub import HfApi

    result = {}
    try:
        run("hl", out, "wrong-token", hub_token="hf_wrong")
        result["wrong_token"] = None
    except ValueError as err:
        result["wrong_token"] = str(err)
    # the test server refuses this repo's uploads with 401; always push, so that both saves try whatever the timing
    revoked = run("hl", out, "revoked", hub_always_push=True)
    result["revoked_step"] = revoked.state.global_step
    result["revoked_local"] = sorted(os.listdir(revoked.args.output_dir))
    api = HfApi()
    api.create_repo("on-dev")
    api.create_branch("alice/on-dev", branch="dev")  # the Hub commits only to an existing branch; transformers too
    run("hl", out, "on-dev", hub_revision="dev", max_steps=2)
    run("hl", out, "at-end", hub_strategy="end").push_to_hub()
    run("hl", out, "all", hub_strategy="all_checkpoints", hub_always_push=True)
    return result


def down(out):
    trainer = run("hl", out, "down", max_steps=4)
    return {"step": trainer.state.global_step, "local": sorted(os.listdir(trainer.args.output_dir))}


if __name__ == "__main__":
    job, out = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("hf_lightning").setLevel(logging.INFO)
    try:
        print(json.dumps({"pair": pair, "strategies": strategies, "down": down}[job](out)))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
