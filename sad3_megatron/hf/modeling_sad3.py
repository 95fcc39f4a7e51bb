"""transformers classes of an exported SAD3-LM: `Sad3ForMaskedLM` (block diffusion, any L') and
`Sad3ForCausalLM` (the AR baseline, driven by transformers' own `generate()`), and `SdarForCausalLM`,
the block-diffusion model of an SDAR-format export (Qwen3's tensor names, read through families.py).

Both wrap the `Network` of `core/network.py`, the module the trainer runs (on megatron-core layers
there, on nn.Linear / nn.Embedding here), so an export computes what the trainer computed; the
objective and the sampler are built from `core/registry.py` by the run's own names, so a SEDD, AR,
MDLM or block-diffusion export scores (`nelbo`) and samples (`generate_blocks`, Alg. 2) exactly as
its run does. `sad3 export` ships these files beside the core files they import (with the imports
made flat); loaded with `trust_remote_code=True` they need torch and transformers only.

`forward(input_ids, ...)` follows transformers' conventions around Eq. 6, x_θ(tokens, K^{<b}, V^{<b}):
`past_key_values` (a `Cache`, or the legacy per-layer (K, V) tuples) holds the clean prefix, and with
`use_cache=True` this call's keys and values are appended to it. The input tokens see the cache and
each other block-causally (M_BC of Suppl. D, blocks aligned to position 0): that encodes clean text
of any length, and denoises one block against its clean prefix. `sad3_mask` passes any other window
of the training mask, e.g. `AttentionMask.doubled(L, L')` with `position_ids=doubled_positions(L)`
and `num_outputs=L` for the vectorized x_t ⊕ x pass of Alg. 1. Logits follow SUBS: [MASK] is never
predicted, and in the masked LM an unmasked input position predicts its own token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from ..core.errors import Sad3Error
from ..core.generate import GenerationResult, SamplingConfig, generate
from ..core.kv_cache import KV
from ..core.likelihood import estimate_bound
from ..core.masks import AttentionMask
from ..core.network import Network, build_network, copy_unmasked, rotary_embedding, subs_blocked_ids
from ..core.registry import build_objective, objective_entry
from ..core.schedules import evaluation_schedule
from .configuration_sad3 import Sad3Config, SdarConfig
from .families import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    SafetensorsDir,
    check_source,
    check_tensors,
    read_rows,
    tensor_plan,
)


def network_of(config: Sad3Config) -> Network:
    """The network of `core/network.py` on plain torch layers, as `config` sizes it (module names as in training)."""
    autoregressive = objective_entry(config.objective).autoregressive
    return build_network(config.model_config(), config.vocab_size, config.mask_token_id, autoregressive)


def _blocked_ids(config: Sad3Config) -> torch.Tensor:
    model, autoregressive = config.model_config(), objective_entry(config.objective).autoregressive
    return subs_blocked_ids(0, config.vocab_size, config.vocab_size, model.blocked_mask_id(config.mask_token_id, autoregressive))


def expected_shapes(config: Sad3Config) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor an export of `config` must hold (built on the meta device: no memory)."""
    with torch.device("meta"):
        network = network_of(config)
    return {f"model.{k}": tuple(v.shape) for k, v in network.state_dict().items()}


def stored_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name → shape of the tensors in an export's safetensors files (headers only)."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS_NAME]
    shapes = {}
    for name in files:
        if not (directory / name).is_file():
            raise Sad3Error(f"{str(directory)!r} lacks the weights file {name}: export the checkpoint again")
        with safe_open(str(directory / name), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


@dataclass
class Sad3MaskedLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None


def _as_cache(past_key_values) -> Cache | None:
    if past_key_values is None or isinstance(past_key_values, Cache):
        return past_key_values
    return DynamicCache(ddp_cache_data=[tuple(kv) for kv in past_key_values])  # legacy ((K, V), ...) per layer


def _cached_layers(cache: Cache | None) -> list[KV] | None:
    if cache is None or cache.get_seq_length() == 0:
        return None
    return [(layer.keys, layer.values) for layer in cache.layers]


def _positions(position_ids: torch.Tensor | None, past: int, length: int, device: torch.device) -> torch.Tensor:
    if position_ids is None:
        return torch.arange(past, past + length, device=device)
    if position_ids.dim() == 2:
        if not bool((position_ids == position_ids[:1]).all()):
            raise Sad3Error("position_ids must be the same for every row of the batch (no padding)")
        position_ids = position_ids[0]
    return position_ids.to(device)


def _check_no_padding(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise Sad3Error("padded batches are not supported: give every row the same length (attention_mask all ones)")


class Sad3PreTrainedModel(PreTrainedModel):
    config_class = Sad3Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Layer"]

    def __init__(self, config: Sad3Config):
        super().__init__(config)
        config.check_standard_fields()
        self.model = network_of(config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loading, with every tensor checked by name and shape against the config first
        (local directories) and after (any source): a missing weight is an error, never a random init."""
        want_info = kwargs.pop("output_loading_info", False)
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            config = kwargs.get("config")
            config = config if isinstance(config, Sad3Config) else Sad3Config.from_pretrained(path)
            check_tensors(stored_shapes(path), expected_shapes(config), f"the export {path!r}")
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        leftover = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if leftover:
            raise Sad3Error(f"loading {path!r} left tensors unmatched: {leftover}: export the checkpoint again")
        model.restore_buffers()
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(path)
        return (model, info) if want_info else model

    def restore_buffers(self) -> None:
        """Recompute the non-persistent buffers (rotary frequencies, SUBS-blocked ids), which a load
        that builds the model on the meta device leaves uninitialised."""
        device = self.model.embedding.embed.weight.device
        self.model.rotary.inv_freq = rotary_embedding(self.config.model_config()).inv_freq.to(device)
        self.model.head.blocked_ids = _blocked_ids(self.config).to(device)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embedding.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.model.embedding.embed if self.model.tie_embeddings else self.model.head.output

    def _run(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, sad3_mask, num_outputs, block):
        """Eq. 6 in transformers' conventions: (logits [b, n, V], the updated cache or None)."""
        _check_no_padding(attention_mask)
        cache = _as_cache(past_key_values)
        past = cache.get_seq_length() if cache is not None else 0
        length = input_ids.shape[1]
        positions = _positions(position_ids, past, length, input_ids.device)
        mask = sad3_mask
        if mask is None and (past + length - 1) // block != past // block:  # inputs span several blocks
            mask = AttentionMask.clean_window(past, length, block)
        out = self.model(input_ids, positions, mask, past_kv=_cached_layers(cache), num_outputs=num_outputs,
                         return_kv=use_cache)  # fmt: skip
        if not use_cache:
            return out.logits, None
        cache = cache if cache is not None else DynamicCache()
        for i, (k, v) in enumerate(out.kv):
            cache.update(k, v, i)
        return out.logits, cache

    def generate_blocks(self, input_ids=None, **settings) -> GenerationResult:
        """Sample with the package's Alg. 2 (diffusion: within-block samplers, KV cache, any length
        past L with the sliding context window; AR baseline: next-token with the same cache).

        `input_ids`: the prompt every sample continues (a list of ids, or a [n] / [1, n] tensor),
        default [BOS] (documents were framed with BOS in training). `settings` are the fields of
        `SamplingConfig` (num_tokens, steps, sampler, threshold, temperature, top_p, batch_size,
        seed, kv_cache, window, window_keep, sliding, stop_at_eos, stop_rule, min_entropy,
        entropy_window, max_redraws, block_size); unset ones come from generation_config.json, then
        from the run's objective (its sampler, core/registry.py). num_tokens defaults to
        L - len(prompt) (prompt + sample = L tokens, Table 6). Runs on the device and dtype of the weights."""
        known = {f.name for f in fields(SamplingConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise Sad3Error(f"unknown sampling settings {unknown}: choose from {sorted(known)}")
        defaults = dict(getattr(self.generation_config, "sad3_sampling", None) or {})
        config = SamplingConfig(**{"block_size": self.config.block_size,
                                   **{k: v for k, v in defaults.items() if k in known}, **settings})  # fmt: skip
        if input_ids is None:
            prompt = [self.config.bos_token_id]
        else:
            prompt = input_ids.reshape(-1).tolist() if torch.is_tensor(input_ids) else [int(i) for i in input_ids]
        diffusion = self.config.diffusion_config()  # sampled as trained: token shift, clean attention
        return generate(self.model, config, seq_len=self.config.max_position_embeddings,
                        mask_id=self.config.mask_token_id, eos_id=self.config.eos_token_id, prompt=prompt,
                        objective=self.config.objective, shift=diffusion.shift,
                        clean_attention=diffusion.clean_attention)  # fmt: skip

    @torch.no_grad()
    def nelbo(self, input_ids: torch.Tensor, block_size: int | None = None, draws: int = 1, seed: int = 0) -> dict:
        """The per-token bound of the NLL of `input_ids` [b, n] (nats), as `sad3 eval` computes it
        (`likelihood.estimate_bound` with the run's objective, one batch): the NELBO of Eq. 7/8 (SEDD's
        score-entropy bound for a SEDD run) with t integrated out, averaged over `draws` draws of the
        noise; exact for the AR baseline and at L' = 1 (the first token is context). n must be a
        multiple of L' and at most L. Draw k uses seed·1000003 + k."""
        x = torch.as_tensor(input_ids, device=self.model.embedding.embed.weight.device)
        x = x[None] if x.dim() == 1 else x
        diffusion, n = self.config.diffusion_config(), x.shape[1]
        block = 1 if objective_entry(diffusion.objective).autoregressive else (block_size or self.config.block_size)
        if n > self.config.max_position_embeddings or n % block:
            raise Sad3Error(f"{n} tokens: score at most L={self.config.max_position_embeddings} tokens, a multiple of L'={block}")
        objective = build_objective(diffusion, n, self.config.mask_token_id, block_size=block)
        return estimate_bound(self.model, objective, x, x.device, batch_size=len(x), draws=draws, seed=seed,
                              schedule=evaluation_schedule()).to_dict()  # fmt: skip


class Sad3ForMaskedLM(Sad3PreTrainedModel):
    """A SAD3-LM (block diffusion with L' = `config.block_size`; MDLM when L' = L)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | tuple | None = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        sad3_mask: AttentionMask | None = None,
        num_outputs: int | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Sad3MaskedLMOutput | tuple:
        """Logits [b, n, V] of the first `num_outputs` inputs (all by default), SUBS-parameterized (a
        `diffusion.shift` model's row i predicts token i + 1 and is returned as it is);
        with `use_cache=True` the returned cache holds the past plus this call's keys/values (do
        that for clean tokens only). `labels` (-100 = ignored) give the mean cross-entropy as `loss`."""
        logits, cache = self._run(input_ids, attention_mask, position_ids, past_key_values, bool(use_cache),
                                  sad3_mask, num_outputs, self.config.block_size)  # fmt: skip
        if not self.config.diffusion_config().shift:  # a token-shift model's row i predicts token i + 1
            logits = copy_unmasked(logits, input_ids[:, : logits.shape[1]], self.config.mask_token_id)
        loss = None
        if labels is not None:
            scored = labels[:, : logits.shape[1]]
            loss = F.cross_entropy(logits.flatten(0, 1), scored.flatten(), ignore_index=-100)
        output = Sad3MaskedLMOutput(loss=loss, logits=logits, past_key_values=cache)
        return output.to_tuple() if return_dict is False else output


class Sad3ForCausalLM(Sad3PreTrainedModel, GenerationMixin):
    """The AR baseline (`diffusion.objective=ar`): the same network under the causal mask."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | tuple | None = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Next-token logits [b, n, V]; `labels` give the mean NLL of labels[:, 1:] as `loss`."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        logits, cache = self._run(input_ids, attention_mask, position_ids, past_key_values, use_cache, None, None, 1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
        return output.to_tuple() if return_dict is False else output


class SdarForCausalLM(Sad3ForMaskedLM):
    """A SAD3-LM exported in SDAR's layout (`sad3 export --format sdar`): Qwen3's config and tensor names,
    `block_size` L' and `mask_token_id`. The same network and methods as `Sad3ForMaskedLM` (SDAR's
    training mask is sad3's, without token shift); the weights are read by families.py's pieces."""

    config_class = SdarConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config: SdarConfig | None = None, dtype=None, **kwargs):
        """Build on the meta device and load Qwen3's tensors into sad3's modules, every one checked by
        name and shape (local directories only)."""
        path = str(pretrained_model_name_or_path)
        config = config if isinstance(config, SdarConfig) else SdarConfig.from_pretrained(path)
        with torch.device("meta"):
            model = cls(config)
        source, m = SafetensorsDir(path), config.model_config()
        plan = tensor_plan(m, config.vocab_size, config.vocab_size)
        expected = expected_shapes(config)
        check_source(source, m, config.vocab_size, f"the SDAR export {path!r}")
        state = {name: read_rows(source, pieces) for name, pieces in plan.items()}
        check_tensors({f"model.{k}": tuple(v.shape) for k, v in state.items()}, expected, f"the SDAR export {path!r}")
        model.model.load_state_dict({k: v.to(dtype or torch.float32) for k, v in state.items()}, strict=True, assign=True)
        model.restore_buffers()
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model.eval()


__all__ = ["Sad3ForCausalLM", "Sad3ForMaskedLM", "Sad3PreTrainedModel", "SdarForCausalLM", "expected_shapes", "network_of"]
