"""python -m pyengine.finetune --help

Errors print `error: ...` and exit 2; Ctrl-C / SIGTERM stop at a step boundary with a
checkpoint and exit 128 + the signal's number. The command runs with
OMP_WAIT_POLICY=PASSIVE unless the user set a policy (pyengine.cli.passive_openmp);
programs it starts do not inherit that setting.  Under torchrun every rank trains its
share of each step (pyengine.finetune.distributed) and rank 0 alone writes."""
import logging
import os
import signal
import sys

from pyengine.cli import passive_openmp
from pyengine.finetune.config import from_argv
from pyengine.finetune.distributed import session
from pyengine.finetune.trainer import EvalRun, Run


def main(argv=None) -> int:
    # torchrun's ranks > 0 log only warnings: rank 0 reports the run
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0"
                        else logging.WARNING, format="%(message)s")
    try:
        cfg = from_argv(argv)
        with session():  # under torchrun: its process group, left also on errors
            (EvalRun if cfg.eval_only else Run)(cfg)()
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: 128 + the signal's number
        return 128 + getattr(e, "signum", signal.SIGINT)
    except (ValueError, OSError) as e:  # bad input, unreadable / unwritable paths, disk full
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    passive_openmp()
    sys.exit(main())
