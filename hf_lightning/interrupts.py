"""How a Lightning call ends when the process is told to stop: SIGTERM and Ctrl-C, as with transformers.

While `lightning.Trainer.fit/validate/test` runs, Lightning handles both signals itself. On SIGTERM it finishes the
step in progress and raises `SIGTERMException`, a `SystemExit` without a code: the process would exit 0, and a
scheduler or a `train.py && next-step` chain would take a killed run for a success. On Ctrl-C it runs its
`on_exception` hooks, then `sys.exit(1)`: a script's `except KeyboardInterrupt:` never runs. `lightning_call` puts
transformers' outcomes back at the facade's boundary:

* SIGTERM ends the call with `SIGTERMException` carrying exit code 143 (128 + SIGTERM, what a shell reports for a
  process the signal killed), also when the signal came during the last step and Lightning returned normally. With
  `enable_jit_checkpoint`, the flow has saved the last finished step first (flow.py).
* Ctrl-C raises the `KeyboardInterrupt` itself, after Lightning's clean-up (loggers finalised, strategy torn down).
* The SIGINT handler the call found is the one it leaves (Lightning ignores SIGINT while it shuts down); Lightning
  restores its own SIGTERM handler at teardown. Nothing is installed at import.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from lightning.pytorch.utilities.exceptions import SIGTERMException

EXIT_SIGTERM = 128 + signal.SIGTERM


@contextlib.contextmanager
def lightning_call(lightning_trainer):
    """Around one `fit`/`validate`/`test` of `lightning_trainer`: SIGTERM → exit 143, Ctrl-C → KeyboardInterrupt."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    sigint_handler = signal.getsignal(signal.SIGINT) if in_main_thread else None
    try:
        yield
    except SIGTERMException as err:
        err.code = EXIT_SIGTERM
        raise
    except SystemExit as err:
        # Lightning's `sys.exit(1)` is raised while it handles the KeyboardInterrupt, which is its context.
        if isinstance(err.__context__, KeyboardInterrupt):
            raise err.__context__ from None
        raise
    finally:
        if sigint_handler is not None:
            signal.signal(signal.SIGINT, sigint_handler)
    if lightning_trainer.received_sigterm:  # the signal came after Lightning's last check: still a killed run
        raise SIGTERMException(EXIT_SIGTERM)
