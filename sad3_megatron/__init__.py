"""sad3: semi-autoregressive discrete diffusion language models (SAD3-LMs) on DeepSpeed + megatron-core."""

__version__ = "0.1.0"
