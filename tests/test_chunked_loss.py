"""The chunked output-layer cross-entropy against plain autograd through full logits."""

import pytest
import torch

from sad3_megatron.model.chunked_loss import chunked_vocab_parallel_nll

TOKENS, HIDDEN, VOCAB = 37, 16, 61


def reference(h, weight, labels, blocked, dtype):
    logits = (h.to(dtype) @ weight.to(dtype).t()).float()
    logits[:, blocked] = float("-inf")
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(TOKENS, HIDDEN, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, requires_grad=True)
    blocked = torch.tensor([3, VOCAB - 1])
    labels = torch.randint(0, VOCAB - 1, (TOKENS,), generator=g)
    labels[labels == 3] = 4
    return h, weight, labels, blocked


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_chunked_nll_and_gradients_equal_full_logits(chunk):
    h, weight, labels, blocked = inputs(0)
    upstream = torch.rand(TOKENS, generator=torch.Generator().manual_seed(1))
    expected = reference(h, weight, labels, blocked, torch.float32)
    (expected * upstream).sum().backward()
    expected_grads = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    got = chunked_vocab_parallel_nll(h, weight, labels, blocked, chunk_tokens=chunk)
    (got * upstream).sum().backward()
    assert (got - expected).abs().max() <= 1e-5
    assert (h.grad - expected_grads[0]).abs().max() <= 1e-5
    assert (weight.grad - expected_grads[1]).abs().max() <= 1e-5


@pytest.mark.slow
def test_two_vocabulary_parallel_ranks_equal_full_logits():
    """TP = 2 over gloo: each rank holds half the vocabulary; loss and gradients equal full logits."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={port}",
           "tests/workers/chunked_loss_tp2.py"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("chunked tp2 ok") == 2, proc.stdout + proc.stderr[-2000:]


def test_bf16_logits_under_autocast_match_a_bf16_reference():
    h, weight, labels, blocked = inputs(3)
    expected = reference(h, weight, labels, blocked, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_vocab_parallel_nll(h, weight, labels, blocked, chunk_tokens=10)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-4


def test_the_model_with_a_chunked_loss_equals_full_logits(tiny):
    """model.loss_chunk_tokens in the transformer: the same Eq. 8 loss and gradients as the full logits."""
    from dataclasses import replace

    from sad3_megatron.core.objectives import BlockDiffusionObjective
    from sad3_megatron.core.schedules import make_schedule
    from sad3_megatron.model.build import build_model

    objective = BlockDiffusionObjective(16, 4, make_schedule("linear"), tiny.mask_id)
    x = tiny.tokens(3, 16)
    results = []
    for chunk in (0, 5):
        model = tiny.model(seed=2)
        if chunk:
            torch.manual_seed(2)
            model = build_model(replace(model.spec, model=replace(model.spec.model, loss_chunk_tokens=chunk)), torch.device("cpu"))
        loss = objective(model, x, torch.Generator().manual_seed(0)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, full_grads), (chunked, chunked_grads) = results
    assert abs(full - chunked) <= 1e-6
    assert full_grads.keys() == chunked_grads.keys()
    for name in full_grads:
        assert (full_grads[name] - chunked_grads[name]).abs().max() <= 1e-6, name
