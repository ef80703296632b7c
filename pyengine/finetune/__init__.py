"""Fine-tuning: `python -m pyengine.finetune [flags]` or `pyengine.finetune.run(config)`.

run(config) takes a FinetuneConfig, a dict of config keys, a YAML path, or None (the
embedded default: LoRA on the bundled MiniLM for sentiment classification)."""
from pyengine.finetune.config import FinetuneConfig, build_config
from pyengine.finetune.trainer import run

__all__ = ["FinetuneConfig", "build_config", "run"]
