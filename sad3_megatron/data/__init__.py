"""Data: tokenizers, recipes and sources, token shards (prepare / read back), packing, and the batch sampler.

Importing this package stays light (no megatron, no `datasets`): those load when shards are written or read.
"""
