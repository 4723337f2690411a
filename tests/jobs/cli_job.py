"""A fork server for tests/test_cli.py: `python -m hf_lightning.cli ARGV` many times, the imports paid once.

    python cli_job.py           # started with cwd = the repository root, as the tests start `python -m hf_lightning.cli`

Each request line {"runs": [{"argv": [...], "stdout": path, "stderr": path}, ...]} forks one child per run, all at
once; each child runs `hf_lightning.cli` as `python -m` runs it (runpy, `__main__`, sys.argv), its stdout and stderr in
the two files, and exits as that interpreter would: the code of `sys.exit(main())`, or 1 with the traceback printed
for an exception. The reply line {"returncodes": [...]} gives their exit statuses as subprocess does. An import costs
~7 s of CPU here and a failing command well under one; nothing runs in this process but the imports (no model, no
thread), so every child starts as a fresh interpreter would be right after them.
"""

import json
import os
import runpy
import signal
import sys

# `python -m` puts the working directory first on sys.path (a class_path like tests.test_cli.FailingCallback resolves
# from there); a script's own folder is not on it.
sys.path[0] = os.getcwd()

import hf_lightning.cli  # noqa: E402,F401 - the imports `python -m hf_lightning.cli` does, paid once

# ... except the module itself: `python -m` runs it only as __main__, so does each child.
del sys.modules["hf_lightning.cli"], hf_lightning.cli


def child(run: dict) -> None:
    """Never returns: the exit of `python -m hf_lightning.cli`, through the interpreter's own SystemExit handling."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, run["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, run["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(path, flags, 0o644), fd)
    signal.alarm(300)  # a hung command ends (SIGALRM) instead of hanging the tests, as subprocess.run(timeout=300)
    sys.argv = ["hf_lightning.cli", *run["argv"]]
    runpy.run_module("hf_lightning.cli", run_name="__main__", alter_sys=True)
    sys.exit(0)


def serve() -> None:
    for line in sys.stdin:
        pids = []
        for run in json.loads(line)["runs"]:
            pid = os.fork()
            if pid == 0:
                child(run)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        print(json.dumps({"returncodes": codes}), flush=True)


if __name__ == "__main__":
    serve()
