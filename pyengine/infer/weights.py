"""Weight names and lazy checkpoint reading for Llama-family decoders (Llama, Mistral, Qwen2).

One table maps every Hugging Face checkpoint tensor to the LlamaDecoder parameter it goes into
(our state_dict name) and to its GGUF tensor (llama.cpp's name); the loader
(pyengine.infer.model) and the GGUF exporter (pyengine.export) both read it.  HF tensors
that share one of our names are concatenated in table order (q, k, v -> qkv; gate, up ->
gate_up).  Rows marked rope "q" / "k" have their rows permuted per head (n_heads / n_kv_heads
heads) from HF's rotate-half order to adjacent (real, imag) pairs: always for ours, and for
GGUF architectures that rotate adjacent pairs ("llama"; "qwen2" keeps HF's order).

Checkpoint reads safetensors one tensor at a time: each read maps the file (safe_open),
copies that tensor out in its stored dtype and unmaps it, so a model in memory costs its
own bytes, never the file's on top.  A PEFT adapter (pyengine.lora.read_adapter) is merged
into each tensor it changes as that tensor is read, in fp32.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


class ModelLoadError(ValueError):
    """The model directory (or adapter) is missing, corrupt or unsupported."""


@dataclass(frozen=True)
class WeightName:
    hf: str  # the Hugging Face checkpoint's name
    ours: str  # the LlamaDecoder state_dict name it is (part of)
    gguf: str  # llama.cpp's name
    rope: str | None = None  # "q" / "k": rows permuted per query / kv head
    optional: bool = False  # biases, an untied head


GLOBAL_WEIGHTS = (
    WeightName("model.embed_tokens.weight", "embed.weight", "token_embd.weight"),
    WeightName("model.norm.weight", "norm", "output_norm.weight"),
    WeightName("lm_head.weight", "lm_head.weight", "output.weight", optional=True),
)


def _layer_weights() -> tuple[WeightName, ...]:
    """Per-layer rows ("{i}": the layer index) in GGUF tensor order."""
    rows = [WeightName("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm",
                       "blk.{i}.attn_norm.weight"),
            WeightName("model.layers.{i}.post_attention_layernorm.weight",
                       "layers.{i}.mlp_norm", "blk.{i}.ffn_norm.weight")]
    for hf, ours, gguf, rope in (("self_attn.q_proj", "qkv", "attn_q", "q"),
                                 ("self_attn.k_proj", "qkv", "attn_k", "k"),
                                 ("self_attn.v_proj", "qkv", "attn_v", None),
                                 ("self_attn.o_proj", "o", "attn_output", None)):
        for kind in ("bias", "weight"):
            rows.append(WeightName(f"model.layers.{{i}}.{hf}.{kind}", f"layers.{{i}}.{ours}.{kind}",
                                   f"blk.{{i}}.{gguf}.{kind}", rope, optional=kind == "bias"))
    for hf, ours, gguf in (("gate_proj", "gate_up", "ffn_gate"), ("up_proj", "gate_up", "ffn_up"),
                           ("down_proj", "down", "ffn_down")):
        rows.append(WeightName(f"model.layers.{{i}}.mlp.{hf}.weight", f"layers.{{i}}.{ours}.weight",
                               f"blk.{{i}}.{gguf}.weight"))
    return tuple(rows)


LAYER_WEIGHTS = _layer_weights()
# buffers some older checkpoints saved; nothing reads them
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def weight_names(n_layers: int) -> list[WeightName]:
    """Every weight name of an n_layers decoder: the global ones, then layer by layer."""
    layers = [WeightName(w.hf.format(i=i), w.ours.format(i=i), w.gguf.format(i=i), w.rope,
                         w.optional) for i in range(n_layers) for w in LAYER_WEIGHTS]
    return [*GLOBAL_WEIGHTS, *layers]


class WeightTable:
    """weight_names(n_layers) by HF name and grouped by our name."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.rows = weight_names(n_layers)
        self.by_hf = {w.hf: w for w in self.rows}
        self.by_ours: dict[str, list[WeightName]] = {}
        for w in self.rows:
            self.by_ours.setdefault(w.ours, []).append(w)

    def lookup(self, hf_name: str, where: str) -> WeightName:
        if hf_name not in self.by_hf:
            raise ModelLoadError(
                f"{where}: tensor '{hf_name}' is not a weight of a {self.n_layers}-layer "
                "Llama-family decoder (names such as model.layers.N.self_attn.q_proj.weight; "
                "see pyengine.infer.weights)")
        return self.by_hf[hf_name]


def _rope_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """w's rows as [heads, d/2, 2, ...]: (row j, row j + d/2) of each head side by side."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2)


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows (or bias) of each head from rotate-half order to adjacent
    (real, imag) pairs: row j of the half-split becomes row 2j, row j+d/2 becomes 2j+1.
    This is llama.cpp's permutation for HF Llama checkpoints."""
    return _rope_pairs(w, n_heads).reshape(w.shape)


def rope_heads(w: WeightName, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads' rows `w` permutes (None: rows kept)."""
    return {"q": n_heads, "k": n_kv_heads, None: None}[w.rope]


def gather(state: Mapping[str, torch.Tensor], rows: list[WeightName], dtype: torch.dtype,
           n_heads: int, n_kv_heads: int) -> torch.Tensor | None:
    """One of our tensors from its HF tensors `rows` (those present; None if none is):
    concatenated along dim 0, q/k rows interleaved, in `dtype`.  Built in place, copied from
    one mapped HF tensor at a time (no other copy)."""
    present = []
    for w in rows:
        if w.hf in state:
            present.append((w, tensor_shape(state, w.hf)))
        elif not w.optional:
            raise ModelLoadError(f"weight '{w.hf}' missing from the checkpoint")
    if not present:
        return None
    inner = present[0][1][1:]
    for w, shape in present:
        if shape[1:] != inner:
            first, first_shape = present[0]
            raise ModelLoadError(f"weight '{w.hf}' has shape {list(shape)}; it is concatenated "
                                 f"with '{first.hf}' {list(first_shape)}, so its rows must be "
                                 f"{list(inner)} long")
    out = torch.empty(sum(shape[0] for _, shape in present), *inner, dtype=dtype)
    row = 0
    for w, shape in present:
        dest = out[row:row + shape[0]]
        heads = rope_heads(w, n_heads, n_kv_heads)
        with _mapped(state, w.hf) as t:
            if heads is None:
                dest.copy_(t)
            else:
                dest.view(heads, shape[0] // heads // 2, 2, *inner).copy_(_rope_pairs(t, heads))
        row += shape[0]
    return out


def tensor_shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """The shape of state[name] without reading it (a Checkpoint has it from the header)."""
    return state.shapes[name] if isinstance(state, Checkpoint) else tuple(state[name].shape)


@contextmanager
def _mapped(state: Mapping[str, torch.Tensor], name: str):
    if isinstance(state, Checkpoint):
        with state.mapped(name) as t:
            yield t
    else:
        yield state[name]


# ---------------------------------------------------------------------------------------
# Reading

def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{index}: corrupt index ({e})") from e
        return [model_dir / n for n in names]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    raise ModelLoadError(f"{model_dir}: no model.safetensors (or sharded index) found")


class Checkpoint(Mapping):
    """The tensors of an HF safetensors directory by HF name, each read when asked (in its
    stored dtype, an owned copy), with a PEFT adapter merged per tensor (fp32).

    Every tensor name must be in the WeightTable of `n_layers` layers. With an adapter, the
    rules are PEFT's (pyengine.lora.read_adapter): modules_to_save tensors replace the weight
    they name; one for lm_head unties a tied head (PEFT trains a copy; `untied_head` is then
    True); LoRA deltas add scaling * B @ A."""

    def __init__(self, model_dir: Path, n_layers: int, tied_embeddings: bool,
                 adapter_dir: str | Path | None = None):
        from safetensors import SafetensorError, safe_open

        table = WeightTable(n_layers)
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in safetensors_files(model_dir):
            try:
                with safe_open(str(path), "pt") as f:
                    for name in f.keys():
                        if not IGNORED.fullmatch(name):
                            table.lookup(name, str(path))
                            self.files[name] = path
                            self.shapes[name] = tuple(f.get_slice(name).get_shape())
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ModelLoadError(f"{path}: cannot read safetensors ({e})") from e
        self.untied_head = False
        self.extra: dict[str, torch.Tensor] = {}
        self.adapter = None
        if adapter_dir is not None:
            self._check_adapter(adapter_dir, tied_embeddings)

    def _check_adapter(self, adapter_dir, tied: bool) -> None:
        from pyengine.lora import AdapterError, read_adapter

        try:
            adapter = read_adapter(adapter_dir)
        except (AdapterError, FileNotFoundError) as e:
            raise ModelLoadError(str(e)) from e
        where, head, embed = adapter.weights_file, "lm_head.weight", "model.embed_tokens.weight"
        if tied:
            if "lm_head" in adapter.lora:
                raise ModelLoadError(f"{where}: LoRA on lm_head, which shares its weight with "
                                     "model.embed_tokens (tie_word_embeddings): not supported")
            if embed in adapter.extra:
                raise ModelLoadError(f"{where}: modules_to_save replaces model.embed_tokens, which "
                                     "is tied to lm_head (tie_word_embeddings): not supported")
            if head in adapter.extra:  # its tensor comes from the adapter (shape checked below)
                self.untied_head = True
                self.shapes[head] = self.shapes.get(embed, ())
        for name, t in adapter.extra.items():
            if name not in self.shapes or self.shapes[name] != tuple(t.shape):
                have = list(self.shapes[name]) if name in self.shapes else "no such weight in the model"
                raise ModelLoadError(f"{where}: {adapter.keys[name]} {list(t.shape)} cannot be placed "
                                     f"in this causal-LM decoder ({name}: {have})")
        for path, (a, b) in adapter.lora.items():
            name = path + ".weight"
            if name not in self.shapes:
                raise ModelLoadError(f"{where}: {adapter.keys[path]} targets {name}, which the model "
                                     "does not have")
            if self.shapes[name] != (b.shape[0], a.shape[1]):
                raise ModelLoadError(f"{where}: LoRA delta for {name} has shape "
                                     f"{[b.shape[0], a.shape[1]]}, the weight has "
                                     f"{list(self.shapes[name])}")
        self.adapter, self.extra = adapter, adapter.extra

    @contextmanager
    def mapped(self, name: str):
        """The tensor `name`, valid inside the with-block only: a view of the mapped file
        (no copy), or the fp32 merge when the adapter changes it."""
        if name not in self.shapes:
            raise KeyError(name)
        module = name.removesuffix(".weight")
        lora = self.adapter is not None and module in self.adapter.lora
        if name in self.extra:
            yield self.extra[name].float() + (self.adapter.delta(module) if lora else 0)
            return
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as f:
            t = f.get_tensor(name)
            yield t.float() + self.adapter.delta(module) if lora else t

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor `name` (an owned copy)."""
        with self.mapped(name) as t:
            return t.clone()

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
        return name in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)
