import pytest
import torch

from sad3_megatron.engine.distributed import init_distributed
from sad3_megatron.model import TransformerSpec, build_model

VOCAB, MASK_ID = 50, 49


@pytest.fixture(scope="session", autouse=True)
def single_process_group():
    """One gloo rank with megatron-core's parallel state at TP = PP = 1, shared by all unit tests."""
    init_distributed(torch.device("cpu"))


def tiny_model(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4, backend: str = "sdpa"):
    torch.manual_seed(seed)
    spec = TransformerSpec(
        layers, hidden, heads, 2 * hidden, vocab_size=VOCAB, mask_id=MASK_ID, dropout=0.0, attention_backend=backend
    )
    return build_model(spec, torch.device("cpu"))


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK_ID, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dequantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 tensorwise scaling written out in float64: scale the amax to the format's max, round, scale back."""
    t = t.detach().double()
    scale = torch.finfo(dtype).max / t.abs().max()
    return (t * scale).to(dtype).double() / scale
