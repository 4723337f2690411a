"""gpu_checkpoints.py on a real DeepSpeed engine: DeepSpeed runs ZeRO on the CPU (its CPU accelerator, gloo), though
Lightning's DeepSpeedStrategy refuses to set one up there. So the engine comes from `deepspeed.initialize` over a
module shaped as the LightningModule (the transformers model as its `model`), and a real DeepSpeedStrategy holds it
as Lightning's `_initialize_deepspeed_train` leaves it (`strategy.model = engine`); everything from there on is the
code checkpoint.py runs. The whole training under Lightning, FSDP1 included, runs in bench/gpu_strategies.sh on GPUs.

The cases run in one process (a process group of one)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="the `deepspeed` extra is not installed")


def _worker(stage: int, gather: bool, folder: str) -> dict:
    """Train an engine 2 steps, checkpoint it as checkpoint.py does, resume a fresh engine from the folder, take one
    more step on both; the consolidated weights are checked against the engine's own forward."""
    import torch
    import deepspeed
    import transformers
    from lightning.pytorch.strategies import DeepSpeedStrategy

    sys.path.insert(0, HERE)
    from helpers import tiny_llama

    from hf_lightning import gpu_checkpoints

    config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": gather}}

    class Module(torch.nn.Module):  # the LightningModule's shape: the transformers model as `model`
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.model = tiny_llama()

    def strategy_for(seed):
        module = Module(seed)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                               dist_init_required=False)
        strategy = DeepSpeedStrategy(config=config)
        strategy.model = engine
        return strategy, engine, module.model

    def step(engine, model, ids):
        loss = model(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    batches = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    strategy, engine, model = strategy_for(0)
    for ids in batches[:2]:
        step(engine, model, ids)
    assert gpu_checkpoints.save_engine_checkpoint(strategy, model, folder)
    weights = gpu_checkpoints.full_state_dict(strategy, model, folder)
    if weights is None:  # ZeRO-1/2: the model holds its weights whole
        weights = model.state_dict()
    dtype = str(next(iter(weights.values())).dtype)
    tiny_llama().save_pretrained(folder, state_dict=dict(weights))  # it pops what it writes
    with torch.no_grad():
        expected = model(input_ids=batches[3]).logits
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)(input_ids=batches[3]).logits

    resumed_strategy, resumed_engine, resumed_model = strategy_for(1)  # other initial weights: all must come back
    full_weights = DeepSpeedStrategy(config=config, load_full_weights=True)
    restores = [gpu_checkpoints.restores_state_dict_entry(s) for s in (resumed_strategy, full_weights)]
    assert gpu_checkpoints.load_engine_checkpoint(resumed_strategy, resumed_model, folder)
    result = {"files": sorted(os.listdir(folder)), "weights_dtype": dtype, "restores_state_dict_entry": restores,
              "from_pretrained_max_diff": (loaded - expected).abs().max().item(),
              "next_loss": step(engine, model, batches[2]), "resumed_next_loss": step(resumed_engine, resumed_model,
                                                                                    batches[2]),
              "after": step(engine, model, batches[3]), "resumed_after": step(resumed_engine, resumed_model,
                                                                              batches[3])}
    if stage == 3 and not gather:
        # save_model / save_only_model: the weights come through an engine checkpoint written for them, here into a
        # folder whose `latest` (step 2) is older than the engine (step 4): the weights must be the engine's now
        weights = gpu_checkpoints.full_state_dict(strategy, model, folder)
        fresh = tiny_llama()
        fresh.load_state_dict(weights, strict=False)  # save_pretrained's tied weights aside, as from_pretrained
        with torch.no_grad():
            result["resaved_max_diff"] = (fresh(input_ids=batches[3]).logits - model(input_ids=batches[3]).logits
                                          ).abs().max().item()
        # a checkpoint-N folder saved with save_only_model: weights, trainer state, the engine's files beside
        model_only = folder + "-model-only"
        tiny_llama().save_pretrained(model_only, state_dict=dict(gpu_checkpoints.full_state_dict(strategy, model,
                                                                                               model_only)))
        transformers.TrainerState(global_step=4).save_to_json(os.path.join(model_only, "trainer_state.json"))
        from types import SimpleNamespace

        from hf_lightning import checkpoint

        args = SimpleNamespace(world_size=1, process_index=0)
        result["model_only_missing"] = checkpoint.missing_training_state(model_only, args)
        os.remove(os.path.join(model_only, "latest"))  # without the engine's files it was model-only already
        result["model_only_missing_without_engine"] = checkpoint.missing_training_state(model_only, args)
    return result


CASES = [(3, True), (3, False), (2, False)]  # ZeRO-3 gathering 16-bit weights, ZeRO-3 without (zero_to_fp32), ZeRO-2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """All cases in one process (DeepSpeed's import and CPU setup are paid once)."""
    folder = tmp_path_factory.mktemp("engine")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(folder)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_deepspeed
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"zero{s}-gather{g}" for s, g in CASES])
def test_engine_checkpoint_resumes_exactly_and_its_weights_load_with_from_pretrained(results, case):
    result = results[case]
    assert {"latest", "global_step2", "model.safetensors", "config.json"} <= set(result["files"])
    assert result["from_pretrained_max_diff"] < 1e-5  # the consolidated weights are the engine's
    assert result["resumed_next_loss"] == result["next_loss"]  # weights restored
    assert result["resumed_after"] == result["after"]  # fp32 master weights and Adam moments restored
    # a folder's checkpoint dict holds no "state_dict" (under ZeRO-3 a module.state_dict() gathers): Lightning reads
    # it only to load full weights into ZeRO-3 shards (load_full_weights)
    assert result["restores_state_dict_entry"] == [False, CASES[case][0] == 3]


@needs_deepspeed
def test_zero3_weights_without_gathering_come_from_a_fresh_engine_checkpoint_and_stay_model_only(results):
    result = results[CASES.index((3, False))]
    assert result["resaved_max_diff"] < 1e-5  # not the older engine checkpoint the folder held
    # save_only_model: the engine checkpoint written for the weights does not make the folder an incomplete one
    assert result["model_only_missing"] == [] == result["model_only_missing_without_engine"]


def test_fsdp1_root_checkpoint_consolidates_and_resumes_exactly(tmp_path):
    """torch's FSDP1 on 2 gloo CPU processes, wrapped as Lightning's FSDPStrategy wraps on GPUs (jobs/fsdp1_job.py):
    names without FSDP's and the checkpoint wrapper's prefixes, tied weights, the DCP optimizer under the
    transformers model's names, so that it moves between FSDP1, DDP and one process."""
    from test_distributed import TORCHRUN, free_port

    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
                           os.path.join(HERE, "jobs", "fsdp1_job.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "model.embed_tokens.weight" in result["weight_keys"] and "model.norm.weight" in result["weight_keys"]
    assert not any("_fsdp_wrapped_module" in k or "_checkpoint_wrapped_module" in k or k.startswith("model.model.")
                   for k in result["weight_keys"])
    assert {"model.safetensors", "optimizer_0"} <= set(result["files"])
    assert result["from_pretrained_max_diff"] < 1e-6
    assert result["resumed_next"] == result["next"]  # weights, then Adam moments: the same two next steps
    # FSDP1's optimizer folder read by an unsharded optimizer (DDP, one process): every moment and step as trained
    trained = result["trained_moments"]
    assert "model.embed_tokens.weight" in trained and len(trained) == len(result["weight_keys"]) - 1  # lm_head tied
    assert result["trained_steps"] == [2]
    assert result["ddp_differing"] == [] == result["one_process_differing"]
    # FSDPStrategy ignores a checkpoint's "state_dict": building it would gather the full weights on every rank
    assert "state_dict" not in result["resumed_entries"] and "lr_schedulers" in result["resumed_entries"]
    # as ModelParallelStrategy; DDP and one device load the weights from it (DeepSpeed: in the engine test above)
    assert result["restores_state_dict_entry"] == {"FSDPStrategy": False, "ModelParallelStrategy": False,
                                                   "DDPStrategy": True, "SingleDeviceStrategy": True}


if __name__ == "__main__":
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    print(json.dumps([_worker(stage, gather, os.path.join(sys.argv[1], f"checkpoint-{stage}-{int(gather)}"))
                      for stage, gather in CASES]))
