from pathlib import Path

from setuptools import find_packages, setup

# torch is not pinned here: CPU machines install the pinned CPU build from requirements/cpu.txt,
# GPU users keep the CUDA build they brought (see the README).
INSTALL_REQUIRES = [
    "torch>=2.5",
    "deepspeed==0.19.8",
    "megatron-core==0.16.1",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "pyyaml==6.0.3",
    "tqdm==4.70.1",
    "numpy>=1.26,<3",
]

EXTRAS = {
    "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0", "ruff==0.17.5"],
    "data": ["datasets==5.2.0"],
    "wandb": ["wandb==0.31.0"],
    "plot": ["matplotlib==3.11.2"],  # `sad3 plot`, `sad3 variance --plot`
    "eval": ["lm-eval==0.4.13"],  # `sad3 lm-eval`: sad3 models as lm-evaluation-harness models
    # GPU-only kernels; built against the user's CUDA toolkit (never `pip install apex`).
    "gpu": ["flash-attn>=2.6"],
}

setup(
    name="sad3",
    version="0.1.0",
    description="Semi-autoregressive discrete diffusion LMs (block diffusion) on DeepSpeed and megatron-core",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sad3_megatron", "sad3_megatron.*"]),
    package_data={"sad3_megatron": ["assets/**/*", "assets/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["sad3=sad3_megatron.cli:main"],
        # read by lm-eval releases after 0.4.13 (`lm_eval --model sad3`); 0.4.13 needs `sad3 lm-eval`
        "lm_eval.models": ["sad3 = sad3_megatron.evaluation.harness:Sad3LM"],
    },
)
