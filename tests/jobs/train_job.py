"""A training job run in its own process by tests/test_checkpoint.py, so that crashes are real (SIGKILL).

    python train_job.py FRAMEWORK OUTPUT_DIR [--kill POINT] [--resume PATH|latest] [--lora]
    python train_job.py serve      # fork server: one job per JSON request line, see serve()

--kill POINT sends this process SIGKILL at one point, S being a global step:
    step@S        right after the checkpoint of step S was saved (on_save)
    substep@S     inside the accumulation window after step S, once its first micro-batch is done (on_substep_end)
    write:FILE@S  while the save of step S writes FILE (config.json, model.safetensors, training_args.bin,
                  optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, lightning.ckpt): the file is
                  written, cut to half its size, then the process is killed
    rename@S      just before the folder of step S is renamed to checkpoint-S
    aside@S       right after the first change to an existing checkpoint-S folder that is being saved again: its
                  rename to another name, or (a deletion) half of its files deleted
    discard@S     while deleting a folder left over once the new checkpoint-S is in place (the old checkpoint-S that
                  was moved aside): half of its files deleted, then the kill
--signal NAME@S sends this process SIGNAME (TERM, INT) at the end of step S (on_step_end), as a scheduler or a
Ctrl-C would; a KeyboardInterrupt that reaches the script is reported ("KeyboardInterrupt at step S") and exits 130.
The writers are wrapped where the library and transformers call them (torch.save, safetensors' save_file,
PreTrainedConfig.to_json_file, TrainerState.save_to_json, lightning's Trainer.save_checkpoint, os.replace/os.rename,
shutil.rmtree); a kill point never reached ends the job normally, which the tests report.
"""

import argparse
import json
import os
import re
import shutil
import signal
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch
import safetensors.torch
import torch
import transformers
import transformers.modeling_utils
from transformers.trainer_callback import TrainerState

import hf_lightning
import hf_lightning.background_save
from helpers import classification_dataset, tiny_bert


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=["hf", "hl"])
    parser.add_argument("output_dir")
    parser.add_argument("--kill", help="where to SIGKILL this process (see the module docstring)")
    parser.add_argument("--resume")
    parser.add_argument("--signal", help="NAME@S: send SIGNAME to this process at the end of step S")
    parser.add_argument("--jit", action="store_true", help="enable_jit_checkpoint=True")
    parser.add_argument("--async-save", action="store_true", help="hf_lightning's async_save=True")
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) on the frozen model")
    return parser.parse_args(argv)


def die(point: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"KILLED at {point}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Report(transformers.TrainerCallback):
    """Prints the step a run starts from (the resumed checkpoint's) and kills at step@S / substep@S."""

    def __init__(self, kill, send=None):
        self.kind, self.step = (kill.split("@")[0], int(kill.split("@")[1])) if kill else (None, None)
        self.send = (getattr(signal, "SIG" + send.split("@")[0]), int(send.split("@")[1])) if send else None

    def on_train_begin(self, args, state, control, **kwargs):
        print(f"RESUMED_AT {state.global_step}", flush=True)

    def on_save(self, args, state, control, **kwargs):
        if self.kind == "step" and state.global_step == self.step:
            die(f"step@{self.step}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.send and state.global_step == self.send[1]:
            print(f"SIGNAL {self.send[0].name} at step {state.global_step}", flush=True)
            os.kill(os.getpid(), self.send[0])

    def on_substep_end(self, args, state, control, **kwargs):
        if self.kind == "substep" and state.global_step == self.step:
            die(f"substep@{self.step}")


def install_kill_point(point: str) -> None:
    """Wraps the writers / renames / deletions named by `point` (write:, rename@, aside@, discard@)."""
    kind, step = point.rsplit("@", 1)
    folder = re.compile(rf"(^|-){transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{step}$")
    final_name = f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{step}"
    renamed_in = []

    def partly_deleted(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
        for file in files[: max(1, len(files) // 2)]:
            os.unlink(file)
        die(point)

    def writer(owner, attr, position, keyword):
        real = getattr(owner, attr)

        def write(*args, **kwargs):
            path = kwargs.get(keyword, args[position] if len(args) > position else None)
            path = getattr(path, "name", path)  # async_save's writer hands torch.save an open file
            result = real(*args, **kwargs)
            if (isinstance(path, (str, os.PathLike)) and kind == f"write:{os.path.basename(path)}"
                    and folder.search(os.path.basename(os.path.dirname(os.fspath(path))))):
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                die(point)
            return result

        setattr(owner, attr, write)

    def rename(real):
        def move(src, dst, *args, **kwargs):
            src_name, dst_name = os.path.basename(os.fspath(src)), os.path.basename(os.fspath(dst))
            if kind == "rename" and dst_name == final_name:
                die(point)
            result = real(src, dst, *args, **kwargs)
            if kind == "aside" and src_name == final_name:
                die(point)
            if dst_name == final_name:
                renamed_in.append(dst)
            return result

        return move

    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        name = os.path.basename(os.fspath(path))
        if kind == "aside" and name == final_name:
            partly_deleted(path)
        if kind == "discard" and renamed_in and final_name in name and name != final_name:
            partly_deleted(path)
        return real_rmtree(path, *args, **kwargs)

    writer(torch, "save", 1, "f")
    writer(safetensors.torch, "save_file", 1, "filename")
    writer(transformers.modeling_utils, "safe_save_file", 1, "filename")
    writer(hf_lightning.background_save.DirectWriter, "write_safetensors", 1, "path")  # async_save's model file
    writer(transformers.PreTrainedConfig, "to_json_file", 1, "json_file_path")
    writer(TrainerState, "save_to_json", 1, "json_path")
    writer(lightning.pytorch.Trainer, "save_checkpoint", 1, "filepath")
    os.replace, os.rename = rename(os.replace), rename(os.rename)
    shutil.rmtree = rmtree


def main(argv) -> None:
    opts = parse(argv)
    torch.set_num_threads(1)  # a tiny model: threads only contend for the test machine's cores
    if opts.kill and not opts.kill.startswith(("step@", "substep@")):
        install_kill_point(opts.kill)
    trainer_cls = transformers.Trainer if opts.framework == "hf" else hf_lightning.Trainer
    args_cls = transformers.TrainingArguments if opts.framework == "hf" else hf_lightning.TrainingArguments
    # hf_lightning's runs export lightning.ckpt too, so that kills inside that file and resumes from it are covered.
    export = {} if opts.framework == "hf" else {"save_lightning_checkpoint": True, "async_save": opts.async_save}
    args = args_cls(
        opts.output_dir, per_device_train_batch_size=3, gradient_accumulation_steps=opts.grad_accum,
        num_train_epochs=3, save_steps=opts.save_steps, logging_steps=1, learning_rate=1e-2, report_to="none",
        disable_tqdm=True, use_cpu=True, seed=7, enable_jit_checkpoint=opts.jit, **export,
    )
    model = tiny_bert(dropout=0.2)
    if opts.lora:  # with its own dropout, so that the resumed RNG state shows in the adapters
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.1))
    trainer = trainer_cls(model, args=args, train_dataset=classification_dataset(20),
                          callbacks=[Report(opts.kill, opts.signal)])
    resume = True if opts.resume == "latest" else opts.resume
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        print(f"KeyboardInterrupt at step {trainer.state.global_step}", flush=True)
        sys.exit(130)
    finally:
        if (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers:
            print("SIGNAL HANDLERS RESTORED", flush=True)
    trainer.save_model(os.path.join(opts.output_dir, "final"))


def serve() -> None:
    """Fork server: the imports above are paid once; each request line {"argv": [...], "log": path} runs main(argv)
    in a forked child (a process of its own, killed for real, its stdout and stderr in `log`), and the reply line
    {"returncode": ...} gives its exit status as subprocess does (-9: SIGKILL). Nothing runs here but the imports,
    so every child starts as a fresh `python train_job.py ...` would."""
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                signal.alarm(300)  # a hung job ends (SIGALRM) instead of hanging the tests
                main(request["argv"])
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
            except BaseException:  # noqa: BLE001 - reported through the log and the exit status
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        main(sys.argv[1:])
