"""python -m pyengine.finetune --help"""
import logging
import signal
import sys

from pyengine.finetune.config import from_argv
from pyengine.finetune.trainer import Run


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = from_argv(argv)
        Run(cfg)()
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: 128 + the signal's number
        return 128 + getattr(e, "signum", signal.SIGINT)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
