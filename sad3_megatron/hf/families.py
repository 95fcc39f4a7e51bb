"""The transformers families sad3 imports and exports (Llama, Qwen2 / 2.5, Qwen3, Mistral), as two
translations that work both ways and live only here:

- config: a family's config.json ⇄ `ModelConfig`'s architecture fields (`read_architecture`,
  `family_fields`). `MODEL_NAMES` is the one table of sad3 field → transformers name, which sad3's
  own config.json derives its standard fields from too (configuration_sad3.py); what differs per
  family (biases, rope parameters, QK-norm) is written out here. Unsupported architectures are
  refused in one line naming the config.json field.
- tensors: sad3's tensor names (core/network.py's modules, the TP = 1 layout) ⇄ the family's,
  described as row pieces (`tensor_plan`): the fused q/k/v is, per key/value group, rows of q_proj,
  k_proj and v_proj (megatron-core's linear_qkv layout); SwiGLU's fc1 is [gate_proj; up_proj]; the
  embedding table may grow past the base's rows (a new mask token). A reader fetches any row range of
  a sad3 tensor, a tensor-parallel shard for instance, by safetensors slices (`read_rows`), and the
  export inverts the same pieces (`hf_pieces`), so import → export returns the original tensors.

Shipped with the export (the SDAR-format classes read Qwen3 tensors through it); imports torch,
safetensors and core only.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import Sad3Error
from ..core.model_config import ModelConfig

# sad3 field -> the name transformers' configs use for it (sad3's config.json writes them for tools; the
# families' config.json are read and written through them).
MODEL_NAMES = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "ffn_hidden_size": "intermediate_size",
    "seq_len": "max_position_embeddings",
    "rotary_base": "rope_theta",
    "tie_embeddings": "tie_word_embeddings",
    "dropout": "hidden_dropout",
}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "MistralForCausalLM": "mistral", "SDARForCausalLM": "qwen3"}  # fmt: skip
CLASS_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "mistral": "MistralForCausalLM"}  # fmt: skip
ROPE_TYPES = ("default", "linear", "llama3")
# config.json keys that mean an architecture sad3 does not build (a non-empty value refuses the import).
UNSUPPORTED = {
    "num_experts": "mixture of experts", "num_local_experts": "mixture of experts", "n_routed_experts": "mixture of experts",
    "moe_intermediate_size": "mixture of experts", "num_experts_per_tok": "mixture of experts",
    "vision_config": "multimodal", "audio_config": "multimodal", "text_config": "multimodal",
    "image_token_id": "multimodal", "image_token_index": "multimodal", "vision_start_token_id": "multimodal",
    "quantization_config": "a quantized checkpoint", "attn_logit_softcapping": "logit soft-capping",
    "final_logit_softcapping": "logit soft-capping", "num_nextn_predict_layers": "multi-token prediction",
}  # fmt: skip
WEIGHTS_NAME, WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers older transformers saved


def refuse(field: str, value: Any, what: str) -> Sad3Error:
    return Sad3Error(f"config.json: {field}={json.dumps(value)} ({what}) is not supported: sad3 imports dense "
                     f"Llama, Qwen2, Qwen3 and Mistral decoders with full attention")  # fmt: skip


def family_of(config: dict) -> str:
    """The family of a config.json, refusing unsupported architectures by the field that says so."""
    for key, what in UNSUPPORTED.items():
        if config.get(key) not in (None, 0, [], {}):
            raise refuse(key, config[key], what)
    arch = (config.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise refuse("architectures", config.get("architectures"), f"not one of {', '.join(CLASS_NAMES.values())}")
    return ARCHITECTURES[arch]


def _check_attention(config: dict, family: str) -> None:
    """Only full attention: a sliding window that is active is refused."""
    if config.get("use_sliding_window"):
        raise refuse("use_sliding_window", True, "sliding-window attention")
    window = config.get("sliding_window", 4096) if family == "mistral" else None  # Mistral's class default is 4096
    if window is not None and window < config.get("max_position_embeddings", 0):
        raise refuse("sliding_window", window, "sliding-window attention")
    other = sorted({t for t in config.get("layer_types") or [] if t != "full_attention"})
    if other:
        raise refuse("layer_types", other, "attention other than full")
    if config.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", config["hidden_act"], "an MLP other than SwiGLU")


def rope_parameters(config: dict) -> dict:
    """{rope_type, rope_theta, ...} from transformers 5's `rope_parameters` or the legacy top-level
    `rope_theta` / `rope_scaling` (which wins when both are there, as transformers reads it)."""
    params = dict(config.get("rope_parameters") or {})
    if config.get("rope_scaling"):
        params = dict(config["rope_scaling"])
    if any(isinstance(v, dict) for v in params.values()):
        raise refuse("rope_parameters", sorted(params), "rotary parameters per layer type")
    params.setdefault("rope_theta", config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] not in ROPE_TYPES:
        raise refuse("rope_parameters.rope_type", params["rope_type"], f"rope types are {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise refuse("partial_rotary_factor", params.get("partial_rotary_factor", config.get("partial_rotary_factor")),
                     "rotary embeddings on part of a head")  # fmt: skip
    return params


def _rope_fields(config: dict) -> dict[str, Any]:
    rope = rope_parameters(config)
    kind = {"default": "none"}.get(rope["rope_type"], rope["rope_type"])
    fields = {"rotary_base": float(rope["rope_theta"]), "rope_scaling": kind, "rope_factor": float(rope.get("factor", 1.0))}
    if kind == "llama3":
        fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]), rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_positions=int(rope.get("original_max_position_embeddings",
                                                               config["max_position_embeddings"])))  # fmt: skip
    return fields


def _bias_fields(config: dict, family: str) -> dict[str, bool]:
    attention_bias = bool(config.get("attention_bias", False))
    if family == "qwen2":  # q/k/v biases are hard-wired in Qwen2, the output projection has none
        return {"qkv_bias": True, "out_bias": False, "mlp_bias": False}
    if family == "mistral":
        return {"qkv_bias": False, "out_bias": False, "mlp_bias": False}
    return {"qkv_bias": attention_bias, "out_bias": attention_bias,
            "mlp_bias": bool(config.get("mlp_bias", False)) if family == "llama" else False}  # fmt: skip


def read_architecture(config: dict, family: str | None = None) -> dict[str, Any]:
    """ModelConfig's architecture fields from a family's config.json (refusing what sad3 cannot build)."""
    family = family or family_of(config)
    _check_attention(config, family)
    shared = ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "num_kv_heads", "head_dim", "tie_embeddings")
    fields = {k: config.get(MODEL_NAMES[k]) for k in shared}
    fields["num_kv_heads"] = fields["num_kv_heads"] or fields["num_heads"]  # transformers' defaults
    fields["head_dim"] = fields["head_dim"] or fields["hidden_size"] // fields["num_heads"]
    fields["tie_embeddings"] = bool(fields["tie_embeddings"])
    return {
        **fields, "norm": "rmsnorm", "mlp": "swiglu", "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "qk_norm": family == "qwen3", "vocab_rows": config["vocab_size"],
        "max_positions": config.get("max_position_embeddings"), "hf_family": family,
        **_bias_fields(config, family), **_rope_fields(config),
    }  # fmt: skip


def read_config_json(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise Sad3Error(f"{str(directory)!r} has no config.json: pass a transformers model directory")
    return json.loads(path.read_text())


# ---- export: which family can express an architecture, and its config fields --------------------


def expressible(m: ModelConfig, family: str) -> str | None:
    """Why the resolved `m` is not a `family` model, or None when it is."""
    if m.norm != "rmsnorm" or m.mlp != "swiglu":
        return f"model.norm={m.norm}, model.mlp={m.mlp} (the families use rmsnorm and swiglu)"
    if m.qk_norm != (family == "qwen3"):
        return f"model.qk_norm={m.qk_norm} (only Qwen3 has QK-norm, always)"
    biases = (m.qkv_bias, m.out_bias, m.mlp_bias)
    allowed = {"llama": {(b, b, c) for b in (False, True) for c in (False, True)}, "qwen2": {(True, False, False)},
               "qwen3": {(False, False, False), (True, True, False)}, "mistral": {(False, False, False)}}[family]  # fmt: skip
    if biases not in allowed:
        return f"model.qkv_bias/out_bias/mlp_bias={list(biases)}"
    if family == "llama" and m.hidden_size % m.num_heads:
        return "model.hidden_size not divisible by model.num_heads (transformers' Llama requires it)"
    return None


def family_for(m: ModelConfig) -> str:
    """The transformers family to export `m` (resolved) as: its own (`hf_family`), else the first that fits."""
    order = ([m.hf_family] if m.hf_family else []) + [f for f in CLASS_NAMES if f != m.hf_family]
    for family in order:
        if expressible(m, family) is None:
            return family
    raise Sad3Error(f"this architecture has no transformers family ({expressible(m, order[0])}): export it with --format sad3")


def rope_json(m: ModelConfig) -> dict[str, Any]:
    """transformers' rope_parameters of a resolved config."""
    rope: dict[str, Any] = {"rope_type": {"none": "default"}.get(m.rope_scaling, m.rope_scaling), "rope_theta": m.rotary_base}
    if m.rope_scaling in ("linear", "llama3"):
        rope["factor"] = m.rope_factor
    if m.rope_scaling == "llama3":
        rope.update(low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor,
                    original_max_position_embeddings=m.rope_original_max_positions)  # fmt: skip
    return rope


def family_fields(m: ModelConfig, family: str, vocab_rows: int) -> dict[str, Any]:
    """The architecture keys of `family`'s config.json for a resolved config (the inverse of read_architecture)."""
    fields = {MODEL_NAMES[k]: getattr(m, k) for k in ("hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                                                      "num_kv_heads", "head_dim", "tie_embeddings")}  # fmt: skip
    fields.update(rms_norm_eps=m.norm_eps, model_type=family, architectures=[CLASS_NAMES[family]], vocab_size=vocab_rows, hidden_act="silu",
                  max_position_embeddings=m.max_positions or m.seq_len, rope_parameters=rope_json(m))  # fmt: skip
    if family in ("llama", "qwen3"):
        fields["attention_bias"] = m.qkv_bias
    if family == "llama":
        fields["mlp_bias"] = m.mlp_bias
    if family in ("qwen2", "qwen3"):
        fields.update(use_sliding_window=False, sliding_window=None)
    if family == "mistral":
        fields["sliding_window"] = None
    if family == "qwen2" and m.head_dim * m.num_heads == m.hidden_size:
        del fields["head_dim"]  # not a Qwen2 config field (transformers reads it only when present)
    return fields


# ---- tensors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Rows [start, start + rows) of a source tensor (`mean`: that many copies of its mean row)."""

    source: str
    start: int
    rows: int
    mean: bool = False


def _qkv(prefix: str, m: ModelConfig, kind: str) -> list[Piece]:
    """The fused q/k/v rows (weight or bias) per key/value group: its query heads, its key, its value."""
    d, g = m.head_dim, m.query_groups
    pieces = []
    for group in range(m.num_kv_heads):
        pieces += [Piece(f"{prefix}q_proj.{kind}", group * g * d, g * d), Piece(f"{prefix}k_proj.{kind}", group * d, d),
                   Piece(f"{prefix}v_proj.{kind}", group * d, d)]  # fmt: skip
    return pieces


def _layer_plan(i: int, m: ModelConfig, shapes: dict[str, int]) -> dict[str, list[Piece]]:
    hf, ours = f"model.layers.{i}.", f"layers.{i}."
    attn, mlp = hf + "self_attn.", hf + "mlp."
    whole = {"norm1.weight": hf + "input_layernorm.weight", "norm2.weight": hf + "post_attention_layernorm.weight",
             "attn.proj.weight": attn + "o_proj.weight", "mlp.fc2.weight": mlp + "down_proj.weight"}  # fmt: skip
    if m.qk_norm:
        whole.update({"attn.q_norm.weight": attn + "q_norm.weight", "attn.k_norm.weight": attn + "k_norm.weight"})
    if m.out_bias:
        whole["attn.proj.bias"] = attn + "o_proj.bias"
    if m.mlp_bias:
        whole["mlp.fc2.bias"] = mlp + "down_proj.bias"
    plan = {ours + k: [Piece(v, 0, shapes[v])] for k, v in whole.items()}
    kinds = ("weight", "bias") if m.qkv_bias else ("weight",)
    plan.update({f"{ours}attn.qkv.{kind}": _qkv(attn, m, kind) for kind in kinds})
    for kind in ("weight", "bias") if m.mlp_bias else ("weight",):
        f = m.ffn_hidden_size
        plan[f"{ours}mlp.fc1.{kind}"] = [Piece(f"{mlp}gate_proj.{kind}", 0, f), Piece(f"{mlp}up_proj.{kind}", 0, f)]
    return plan


def hf_shapes(m: ModelConfig, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a family checkpoint of the resolved `m` holds (tied: no lm_head)."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    q, kv = m.num_heads * d, m.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_rows, h), "model.norm.weight": (h,)}
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (vocab_rows, h)
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h),
                 "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}  # fmt: skip
        if m.qk_norm:
            layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
        if m.qkv_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if m.out_bias:
            layer["self_attn.o_proj.bias"] = (h,)
        if m.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (h,)})
        shapes.update({p + k: v for k, v in layer.items()})
    return shapes


def tensor_plan(m: ModelConfig, vocab_rows: int, table_rows: int) -> dict[str, list[Piece]]:
    """sad3 name → the row pieces of the family's tensors it is made of (resolved `m`; the embedding
    and output tables have `table_rows` rows, those past the base's `vocab_rows` copies of the mean row)."""
    shapes = {k: v[0] for k, v in hf_shapes(m, vocab_rows).items()}
    plan = {"head.norm.weight": [Piece("model.norm.weight", 0, m.hidden_size)]}
    for i in range(m.num_layers):
        plan.update(_layer_plan(i, m, shapes))
    tables = {"embedding.embed.weight": "model.embed_tokens.weight"}
    if not m.tie_embeddings:
        tables["head.output.weight"] = "lm_head.weight"
    for ours, theirs in tables.items():
        plan[ours] = [Piece(theirs, 0, min(vocab_rows, table_rows))]
        if table_rows > vocab_rows:  # new rows (the mask token, then padding): the mean row of the base's table
            plan[ours].append(Piece(theirs, 0, table_rows - vocab_rows, mean=True))
    return plan


def hf_pieces(plan: dict[str, list[Piece]]) -> dict[str, list[tuple[int, str, int, int]]]:
    """The inverse of `plan`: family name → (row in it, sad3 name, row in sad3's, rows), sorted; the
    grown rows (`mean`) are not the base's and go nowhere."""
    out: dict[str, list[tuple[int, str, int, int]]] = {}
    for ours, pieces in plan.items():
        row = 0
        for piece in pieces:
            if not piece.mean:
                out.setdefault(piece.source, []).append((piece.start, ours, row, piece.rows))
            row += piece.rows
    return {name: sorted(parts) for name, parts in out.items()}


# ---- reading safetensors by slices ----------------------------------------------------------------


class SafetensorsDir:
    """The tensors of a directory's model.safetensors (or its shards and index), read by slices: each
    read opens the file, copies the rows it asks for, and unmaps it, so a process holds only what it
    asked for. Headers are read once."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / WEIGHTS_INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.directory / WEIGHTS_NAME).is_file():
            files = [WEIGHTS_NAME]
        else:
            raise _no_safetensors(self.directory)
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise Sad3Error(f"{str(self.directory)!r} lacks the weights file {name} that its index names")
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    info = f.get_slice(key)
                    self.file_of[key], self.shapes[key] = path, tuple(info.get_shape())
                    self.dtypes[key] = SAFETENSORS_DTYPES.get(info.get_dtype(), torch.float32)
        self._mean: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def reading(self):
        """Files opened for the reads inside the block (one tensor's pieces), unmapped after it."""
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            self._open = lambda path: stack.enter_context(safe_open(str(path), framework="pt"))
            self._handles: dict[Path, Any] = {}
            try:
                yield self
            finally:
                self._handles = None

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows [a, b) (all by default) and columns [c, e) (all by default) of tensor `name`."""
        if getattr(self, "_handles", None) is None:
            with self.reading():
                return self.read(name, rows, cols)
        a, b = rows if rows is not None else (0, self.shapes[name][0])
        path = self.file_of[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        sliced = self._handles[path].get_slice(name)
        return sliced[a:b] if cols is None else sliced[a:b, cols[0] : cols[1]]

    def mean_row(self, name: str, chunk: int = 8192) -> torch.Tensor:
        """The mean row of a table, in fp32, read chunk by chunk."""
        if name not in self._mean:
            total, n = torch.zeros(self.shapes[name][1:], dtype=torch.float64), self.shapes[name][0]
            for a in range(0, n, chunk):
                total += self.read(name, (a, min(a + chunk, n))).double().sum(0)
            self._mean[name] = (total / n).float()
        return self._mean[name]


def _no_safetensors(directory: Path) -> Sad3Error:
    if any(directory.glob("pytorch_model*.bin")):
        return Sad3Error(
            f"{str(directory)!r} holds pytorch_model.bin weights only: sad3 reads safetensors (by slices, never pickle); "
            f"convert them with: python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{directory}').save_pretrained('{directory}')\""
        )
    return Sad3Error(f"{str(directory)!r} has no model.safetensors or model.safetensors.index.json")


def read_rows(
    source: SafetensorsDir, pieces: list[Piece], rows: list[tuple[int, int]] | None = None,
    cols: tuple[int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Rows `rows` (ranges of the sad3 tensor; all by default) and columns `cols` of the sad3 tensor
    that `pieces` describe, reading only those rows of the sources."""
    with source.reading():
        return _read_rows(source, pieces, rows, cols)


def _read_rows(source: SafetensorsDir, pieces: list[Piece], rows, cols) -> torch.Tensor:
    total = sum(p.rows for p in pieces)
    out = []
    for a, b in rows if rows is not None else [(0, total)]:
        offset = 0
        for piece in pieces:
            lo, hi = max(a, offset), min(b, offset + piece.rows)
            if lo < hi and piece.mean:
                mean = source.mean_row(piece.source).to(source.dtypes[piece.source])
                mean = mean[cols[0] : cols[1]] if cols is not None else mean
                out.append(mean.expand(hi - lo, *mean.shape))
            elif lo < hi:
                start = piece.start + lo - offset
                out.append(source.read(piece.source, (start, start + hi - lo), cols))
            offset += piece.rows
    return torch.cat(out)


def check_tensors(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str, fix: str = "export the checkpoint again"
) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming them (never a random-initialised weight)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shaped = [f"{k} {list(found[k])} (expected {list(expected[k])})" for k in sorted(set(found) & set(expected))
              if tuple(found[k]) != tuple(expected[k])]  # fmt: skip
    problems = [f"{label}: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}"
                for label, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", shaped)) if names]  # fmt: skip
    if problems:
        raise Sad3Error(f"{where} does not match its config.json ({'; '.join(problems)}): {fix}")


def check_source(source: SafetensorsDir, m: ModelConfig, vocab_rows: int, where: str) -> None:
    """Refuse a checkpoint whose tensors are missing, unexpected or mis-shaped for its config.json, by name."""
    expected = hf_shapes(m, vocab_rows)
    found = {k: v for k, v in source.shapes.items() if not k.endswith(IGNORED_SUFFIXES)}
    if m.tie_embeddings and "lm_head.weight" in found:  # saved anyway: the same matrix
        expected["lm_head.weight"] = (vocab_rows, m.hidden_size)
    check_tensors(found, expected, where, "its weights files are not the model its config.json describes")
