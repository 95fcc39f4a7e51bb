"""The paper's math in plain torch: masks, attention kernels, rotary positions, the network, noise
schedules, noising, the objectives (block diffusion, AR, SEDD, D3PM), variance estimators, the
samplers and Alg. 2, likelihood, and the registry that names objectives and samplers.

Files here import torch, numpy and each other (relative imports, flat), nothing else of sad3_megatron,
DeepSpeed or megatron: `sad3 export` ships them beside the transformers classes of `hf/`.
This file stays empty on purpose: importing one module (say `masks`) loads nothing else.
"""
