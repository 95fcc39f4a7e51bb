"""Fixtures shared by the whole suite. Nothing here imports megatron or DeepSpeed at module level:
tests/core runs without them (see tests/core/conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CORE_TESTS = Path(__file__).resolve().parent / "core"


@pytest.fixture(scope="session", autouse=True)
def single_process_group(request):
    """One gloo rank with megatron-core's parallel state at TP = PP = 1, shared by the tests that build
    the trainer's model; tests/core never starts it (nor imports megatron)."""
    if all(Path(str(item.path)).is_relative_to(CORE_TESTS) for item in request.session.items):
        yield
        return
    from sad3_megatron.engine.distributed import init_distributed

    init_distributed(torch.device("cpu"))
    yield


@dataclass(frozen=True)
class Tiny:
    """Tiny random models over a 50-id vocabulary whose last id is the mask token."""

    vocab: int = 50
    mask_id: int = 49

    def config(self, layers: int = 2, hidden: int = 32, heads: int = 4, backend: str = "sdpa"):
        from sad3_megatron.core.model_config import ModelConfig

        return ModelConfig(num_layers=layers, hidden_size=hidden, num_heads=heads, ffn_hidden_size=2 * hidden,
                           dropout=0.0, attention_backend=backend)  # fmt: skip

    def network(self, seed: int = 0, **sizes):
        """The plain-torch network of core/network.py (no megatron)."""
        from sad3_megatron.core.network import build_network

        torch.manual_seed(seed)
        return build_network(self.config(**sizes), self.vocab, self.mask_id)

    def model(self, seed: int = 0, **sizes):
        """The trainer's megatron-core model at TP = 1."""
        from sad3_megatron.model.build import build_model
        from sad3_megatron.model.transformer import make_spec

        torch.manual_seed(seed)
        config = self.config(**sizes)
        return build_model(make_spec(config, self.vocab, self.mask_id, config.attention_backend), torch.device("cpu"))

    def tokens(self, batch: int, length: int, seed: int = 0) -> torch.Tensor:
        """Random clean tokens (never the mask id)."""
        return torch.randint(0, self.mask_id, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return Tiny()


@pytest.fixture(scope="session")
def rel():
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        """‖a − b‖ / ‖b‖ in float64."""
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    return rel


@pytest.fixture(scope="session")
def dequantized():
    def dequantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """fp8 tensorwise scaling written out in float64: scale the amax to the format's max, round, scale back."""
        t = t.detach().double()
        scale = torch.finfo(dtype).max / t.abs().max()
        return (t * scale).to(dtype).double() / scale

    return dequantized


# Tiny random checkpoints of the four transformers families sad3 imports, built with transformers itself.
HF_VOCAB = 512
HF_COMMON = dict(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 max_position_embeddings=256, rms_norm_eps=1e-6)  # fmt: skip
HF_FAMILIES = {
    # Llama: llama3 rope scaling (original context 64, so positions < 64 hit all three bands), untied, GQA 4:2;
    # the tokenizer fills the table, so the mask token takes a new row.
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), HF_VOCAB),
    # Llama: linear rope scaling, multi-head, attention and MLP biases (q/k/v/o and gate/up/down).
    "llama_linear": ("LlamaForCausalLM", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                     mlp_bias=True, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}), HF_VOCAB),
    # Qwen2: q/k/v biases, tied, GQA; a padded table holds the mask token (no resize).
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6}), HF_VOCAB - 12),
    # Qwen3: QK-norm, head_dim 32 != 64 / 4, tied.
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}), HF_VOCAB - 12),
    # Qwen3: untied, multi-query (one KV head), head_dim 24.
    "qwen3_untied": ("Qwen3ForCausalLM", "Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                     tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}), HF_VOCAB - 12),
    # Mistral: GQA, no sliding window (its class default is 4096).
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6}), HF_VOCAB),
}  # fmt: skip


def word_tokenizer(n: int):
    """A word-level tokenizer of exactly n tokens (<unk> <s> </s> w0 w1 ...), built with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(n - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_hf_model(family: str, seed: int = 0, **changes):
    """A random fp32 transformers model of `family`, its norms and biases randomised too (HF initialises
    them to 1 and 0, which would hide a mapping that mixes them up)."""
    import transformers

    cls, config_cls, extra, _ = HF_FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**HF_COMMON, **extra, **changes})
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@dataclass
class HFModels:
    """Tiny transformers checkpoints (config.json, model.safetensors, a tokenizer) saved once per session."""

    root: Path

    def path(self, family: str, dtype: torch.dtype = torch.float32) -> Path:
        out = self.root / (family if dtype == torch.float32 else f"{family}-{str(dtype).removeprefix('torch.')}")
        if not (out / "config.json").is_file():
            build_hf_model(family).to(dtype).save_pretrained(out)
            word_tokenizer(HF_FAMILIES[family][3]).save_pretrained(out)
        return out

    def model(self, family: str):
        """The saved model, loaded back in fp32 with the sdpa kernel (the reference)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path(family), dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> HFModels:
    return HFModels(tmp_path_factory.mktemp("hf"))


@dataclass(frozen=True)
class Launch:
    """Training runs as subprocesses: one process (`sad3 train`) or several (torchrun, gloo)."""

    # A 2-layer model on the demo config; global batch 8 in every layout the tests compare.
    overrides: tuple[str, ...] = (
        "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.ffn_hidden_size=128",
        "model.seq_len=32", "diffusion.block_size=4", "train.micro_batch_size=4", "train.log_interval=1",
        "train.eval_interval=1000", "train.progress_bar=false", "train.lr_schedule=constant", "train.warmup_steps=1",
    )  # fmt: skip

    @property
    def env(self) -> dict[str, str]:
        """The test process's environment without its own process-group variables, CPU DeepSpeed, one thread."""
        launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        return {k: v for k, v in os.environ.items() if k not in launcher} | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

    @staticmethod
    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def train_cmd(self, nproc: int) -> list[str]:
        bin_dir = Path(sys.executable).parent
        if nproc == 1:
            return [str(bin_dir / "sad3"), "train"]
        return [str(bin_dir / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={self.free_port()}",
                "-m", "sad3_megatron.cli", "train"]  # fmt: skip

    @staticmethod
    def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
        """Step -> `key` of a run's training records (metrics.jsonl)."""
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r[key] for r in records if "loss" in r}

    def run_train(self, out: Path, overrides: list[str], nproc: int = 1, timeout: int = 600) -> None:
        cmd = self.train_cmd(nproc) + ["configs/demo.yaml", *self.overrides, *overrides, f"run.out_dir={out}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def launch() -> Launch:
    return Launch()


_BLOCKED = ("deepspeed", "megatron", "sad3_megatron")
# As if not installed: importing them fails, and importlib.util.find_spec answers None (transformers
# probes for deepspeed that way when accelerate is installed, and an import hook that raises breaks it).
_BLOCKER = f"""import sys
for _name in {_BLOCKED!r}:
    sys.modules[_name] = None
"""


@pytest.fixture
def without_sad3(tmp_path):
    """Run a Python script in a fresh interpreter that cannot import deepspeed, megatron or sad3_megatron
    (what a user of an export has), offline; returns the JSON object its last line prints, with
    "loaded": the blocked packages found in sys.modules at the end (empty when the script kept away)."""

    def run(script: str, *args: str) -> dict:
        loaded = f"[m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in {_BLOCKED!r}]"
        footer = f"\nprint(json.dumps({{'loaded': {loaded}}}))\n"
        env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
        proc = subprocess.run([sys.executable, "-c", _BLOCKER + "import json\n" + script + footer, *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        *_, result, loaded = proc.stdout.strip().splitlines()
        return {**json.loads(result), **json.loads(loaded)}

    return run


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run fastest (and steadiest on a busy machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

