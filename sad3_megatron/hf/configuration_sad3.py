"""The transformers config of an exported SAD3-LM (or of its AR baseline).

Sizes use transformers' standard names; `max_position_embeddings` is the training context L. The rest
says how the model was trained and must be sampled and scored: the block size L', the objective
(`sad3`: the SAR NELBO of Eq. 7/8, MDLM when L' = L; `ar`: next-token), the training noise schedule
with its clip range [β, ω] (Sec. 5.2; bounds are always reported under the linear schedule, t ~ U[0, 1]),
the special ids, and the full sad3 training config for the record.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class Sad3Config(PreTrainedConfig):
    model_type = "sad3"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 30522  # the tokenizer's vocabulary including the mask token
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 1024  # L, the training context
    rope_theta: float = 10000.0
    hidden_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    mask_token_id: int | None = None
    block_size: int = 4  # L'
    objective: str = "sad3"  # sad3 | ar
    noise_schedule: str = "clipped"
    noise_beta: float = 0.3  # clipped schedule: training mask rates ~ U[β, ω]
    noise_omega: float = 0.8
    antithetic: bool = True
    attention_backend: str = "sdpa"  # sdpa | flex | flash | auto
    use_cache: bool = True
    tie_word_embeddings: bool = False
    weights: str = "ema"  # which weights of the checkpoint were exported: ema | raw
    training_config: dict | None = None  # the sad3 config the model was trained with


__all__ = ["Sad3Config"]
