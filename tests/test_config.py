"""FinetuneConfig: the same types and ranges from YAML, flags and the Python API."""
from __future__ import annotations

import re

import pytest

from pyengine.finetune import build_config
from pyengine.finetune.config import FinetuneConfig, coerce, from_argv, make_parser

BASE = dict(model="m", data="d.jsonl")


def from_yaml(tmp_path, text):
    (tmp_path / "run.yaml").write_text("model: m\ndata: d.jsonl\n" + text)
    return from_argv(["--config", str(tmp_path / "run.yaml")])


def from_flags(*flags):
    return from_argv(["--model", "m", "--data", "d.jsonl", *flags])


@pytest.mark.parametrize("yaml_text, key, want", [
    ("lr: 1e-4\n", "lr", 1e-4),             # PyYAML reads 1e-4 as the string '1e-4'
    ("max_steps: '2'\n", "max_steps", 2),
    ("packing: 'no'\n", "packing", False),  # a non-empty string must not mean True
    ("packing: 'yes'\n", "packing", True),
    ("lora_alpha: 16\n", "lora_alpha", 16.0),
    ("target_modules: q_proj\n", "target_modules", ["q_proj"]),
    ("target-modules: [q_proj, v_proj]\n", "target_modules", ["q_proj", "v_proj"]),
    ("target_modules: all-linear\n", "target_modules", "all-linear"),
])
def test_yaml_values_are_converted(tmp_path, yaml_text, key, want):
    value = getattr(from_yaml(tmp_path, yaml_text), key)
    assert value == want and type(value) is type(want)


@pytest.mark.parametrize("flags, key, want", [
    (["--lr", "1e-4"], "lr", 1e-4),
    (["--max-steps", "2"], "max_steps", 2),
    (["--target-modules", "q_proj"], "target_modules", ["q_proj"]),
    (["--target-modules", "all-linear"], "target_modules", "all-linear"),
    (["--no-packing"], "packing", False),
    (["--max-grad-norm", "0"], "max_grad_norm", 0.0),
    (["--task", "seq-cls", "--labels", "neg", "pos"], "labels", ["neg", "pos"]),
    (["--ce-filter-eps", "auto"], "ce_filter_eps", "auto"),
    (["--ce-filter-eps", "1e-3"], "ce_filter_eps", 1e-3),
    (["--ce-filter-eps", "0"], "ce_filter_eps", 0.0),
])
def test_flag_values_are_converted(flags, key, want):
    value = getattr(from_flags(*flags), key)
    assert value == want and type(value) is type(want)


BAD = [  # key, value, what the message must say is allowed
    ("batch_size", 4.9, "valid integer"),
    ("batch_size", 0, "greater than or equal to 1"),
    ("max_grad_norm", -1, "greater than or equal to 0"),
    ("lora_alpha", 0, "greater than 0"),
    ("weight_decay", -1, "greater than or equal to 0"),
    ("lr", "fast", "valid number"),
    ("lr", float("inf"), "finite number"),
    ("lora_dropout", 1.0, "less than 1"),
    ("warmup_ratio", 1.0, "less than 1"),  # a schedule that never leaves its warmup
    ("packing", "maybe", "valid boolean"),
    ("task", "chat", "'causal-lm', 'seq-cls' or 'token-cls'"),
    ("target_modules", ["q_proj", "q_proj"], "distinct non-empty names"),
    ("max_steps", 0, "greater than or equal to 1"),
    ("batch_size", True, "not a yes/no value"),  # lax parsing would read it as 1
    ("lr", True, "not a yes/no value"),
    ("seed", 2**40, "less than or equal to 4294967295"),  # overflowed the shuffle's seed
    ("output", "", "at least 1 character"),  # would mean the current directory
    ("ce_filter_eps", 1.0, "less than 1"),
    ("ce_filter_eps", -0.5, "greater than or equal to 0"),
    ("ce_filter_eps", "high", "Input should be 'auto'"),
]


@pytest.mark.parametrize("key, value, allowed", BAD)
def test_bad_values_name_key_value_and_what_is_allowed(tmp_path, key, value, allowed):
    want = f"{key} = {re.escape(repr(value))}: .*{re.escape(allowed)}"
    with pytest.raises(ValueError, match=f"^config: {want}"):
        build_config({**BASE, key: value})
    if FinetuneConfig.model_fields[key].annotation is not bool:  # bool flags take no value
        flag_value = [str(value)] if not isinstance(value, list) else value
        with pytest.raises(ValueError, match=f"^command line: {key} = "):
            from_flags("--" + key.replace("_", "-"), *flag_value)
    with pytest.raises(ValueError, match=f"run.yaml: {want}"):
        from_yaml(tmp_path, f"{key}: {value!r}\n" if not isinstance(value, float)
                  else f"{key}: {value}\n".replace("inf", ".inf"))


def test_python_api_validates_a_config_object():
    cfg = FinetuneConfig.model_construct(**{**dict(build_config(BASE)),
                                            "batch_size": 4.9})
    with pytest.raises(ValueError, match="batch_size = 4.9"):
        coerce(cfg)
    good = build_config(BASE)
    with pytest.raises(ValueError, match="valid integer"):
        good.batch_size = 4.9  # assignment is validated too


def test_cross_key_rules():
    with pytest.raises(ValueError, match="^config: quant nf4 needs method lora"):
        build_config({**BASE, "method": "full", "quant": "nf4"})
    with pytest.raises(ValueError, match="^config: packing only applies to task causal-lm"):
        build_config({**BASE, "task": "seq-cls", "packing": True})
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        build_config({**BASE, "resume": True, "overwrite": True})
    with pytest.raises(ValueError, match="labels only applies to tasks seq-cls"):
        build_config({**BASE, "labels": ["a", "b"]})


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match="^config: unknown config key 'lora_rank'"):
        build_config({**BASE, "lora_rank": 8})
    with pytest.raises(ValueError, match="run.yaml: unknown config key 'learning_rate'"):
        from_yaml(tmp_path, "learning_rate: 0.1\n")


def test_every_flag_has_help_with_its_default():
    for action in make_parser()._actions:
        if action.dest != "help":
            assert action.help and "(default: " in action.help, action.dest


def test_ce_filter_eps_defaults_to_exact_and_is_not_resumable():
    """Filtering changes the gradients: off unless asked for, and a --resume may not turn
    it on or off."""
    from pyengine.finetune.config import RESUMABLE_CHANGES
    assert build_config(BASE).ce_filter_eps is None
    assert "ce_filter_eps" not in RESUMABLE_CHANGES
