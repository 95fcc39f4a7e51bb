"""Sampling with the adaptation switches: the KV-cache path (Alg. 2) equals the recomputed reference,
and both read the context the way the training pass does (token shift, token-causal clean half)."""

import pytest
import torch

from sad3_megatron.core.block_context import CachedContext, RecomputeContext
from sad3_megatron.core.generate import SamplingConfig, generate
from sad3_megatron.core.objectives import BlockDiffusionObjective, Switches
from sad3_megatron.core.schedules import make_schedule

L, BLOCK = 16, 4
CASES = [
    {"shift": True},
    {"clean_attention": "causal"},
    {"shift": True, "clean_attention": "causal"},
]


@pytest.fixture(scope="module")
def network(tiny):
    torch.set_num_threads(1)
    return tiny.network(seed=11).eval()


def draw(network, tiny, switches, **settings):
    logits = []
    config = SamplingConfig(**{"num_tokens": 3 * L, "block_size": BLOCK, "batch_size": 3, "seed": 5, **settings})
    result = generate(network, config, seq_len=L, mask_id=tiny.mask_id, eos_id=None, prompt=[0, 7],
                      logits_hook=lambda s, x: logits.append(x.clone()), **switches)  # fmt: skip
    return result, logits


@pytest.mark.parametrize("switches", CASES)
@pytest.mark.parametrize("settings", [{"sampler": "ancestral", "steps": 3}, {"sampler": "confident", "threshold": 0.05}])
def test_cached_sampling_equals_the_uncached_reference(network, tiny, switches, settings):
    """3×L tokens: the window slides and is re-encoded on the cached path; the prompt ends inside block 0."""
    cached, cached_logits = draw(network, tiny, switches, kv_cache=True, **settings)
    recomputed, recomputed_logits = draw(network, tiny, switches, kv_cache=False, **settings)
    assert [s.tokens for s in cached.samples] == [s.tokens for s in recomputed.samples]
    assert [s.nfe for s in cached.samples] == [s.nfe for s in recomputed.samples]
    assert len(cached_logits) == len(recomputed_logits) > 0
    for a, b in zip(cached_logits, recomputed_logits, strict=True):
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b)) and (a[finite] - b[finite]).abs().max() <= 1e-5


@pytest.mark.parametrize("switches", CASES)
@pytest.mark.parametrize("kind", [CachedContext, RecomputeContext])
def test_sampling_reads_what_training_scores(network, tiny, switches, kind):
    """The block denoiser of sampling, for block 2 given the clean blocks 0-1, equals the training pass's
    prediction for that block (x_t with only block 2 noised): same rows, same attention."""
    x = tiny.tokens(2, L, seed=3)
    start = 2 * BLOCK
    x_t = x.clone()
    x_t[:, start + 1 : start + BLOCK] = tiny.mask_id  # the block's first token masked too, below
    x_t[:, start] = tiny.mask_id
    obj = BlockDiffusionObjective(L, BLOCK, make_schedule("linear"), tiny.mask_id, switches=Switches(**switches))
    with torch.no_grad():
        positions = obj.positions
        tokens = torch.cat([x_t, x], dim=1)
        rows = obj.target_rows[start : start + BLOCK]
        out = network(tokens, positions, obj.mask, num_outputs=obj.num_outputs).logits[:, rows]
        context = kind(network, BLOCK, switches.get("shift", False), 1 if "clean_attention" in switches else None)
        context.prepare(x, 0, start)
        sampled = context.denoise(None, x_t[:, start : start + BLOCK], start)
    finite = torch.isfinite(out)
    assert (sampled[finite] - out[finite]).abs().max() <= 1e-5


def test_shift_needs_a_prompt(network, tiny):
    from sad3_megatron.core.errors import Sad3Error

    with pytest.raises(Sad3Error, match="give a prompt"):
        generate(network, SamplingConfig(num_tokens=8, block_size=BLOCK), seq_len=L, mask_id=tiny.mask_id,
                 eos_id=None, prompt=[], shift=True)  # fmt: skip
