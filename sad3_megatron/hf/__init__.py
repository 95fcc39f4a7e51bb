"""The standalone half of sad3: everything an exported model needs, in plain torch.

Each file here imports only torch (and, for the HuggingFace classes, transformers) and its siblings by
relative import, never DeepSpeed, megatron-core or the rest of sad3_megatron. `sad3 export` copies the
files verbatim next to the weights, so the trainer, `sad3 sample` / `sad3 eval` and an exported model
loaded with `trust_remote_code=True` run one definition of the mask (Suppl. D), rotary positions, the
NELBO (Eq. 7/8), the within-block samplers and Alg. 2's loop.

This file stays empty on purpose: importing one module (say `masks`) loads nothing else.
"""
