"""The network of `core/network.py` on megatron-core tensor-parallel layers, and what runs around it
on the trainer's side: sequence parallelism, the chunked vocabulary-parallel loss, fp8, activation
checkpointing, per-layer compilation."""
