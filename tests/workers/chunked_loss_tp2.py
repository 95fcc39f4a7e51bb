"""Run under torchrun with 2 processes (gloo): the chunked vocabulary-parallel loss with each rank holding
half of the vocabulary, against plain autograd through the full logits computed on every rank.
Prints "chunked tp2 ok" or the mismatch, and exits non-zero on a mismatch."""

import sys

import torch
import torch.distributed as dist

from sad3_megatron.model.chunked_loss import chunked_vocab_parallel_nll

dist.init_process_group("gloo")
rank = dist.get_rank()
g = torch.Generator().manual_seed(0)
tokens, hidden, vocab = 29, 8, 40
h = torch.randn(tokens, hidden, generator=g, requires_grad=True)
weight = torch.randn(vocab, hidden, generator=g, requires_grad=True)
labels = torch.randint(0, vocab - 1, (tokens,), generator=g)
blocked = torch.tensor([vocab - 1])  # the mask token, in rank 1's half

logits = h @ weight.t()
logits = logits.masked_fill(torch.arange(vocab) == vocab - 1, float("-inf"))
expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
expected.sum().backward()

half = vocab // 2
mine = weight.detach()[rank * half : (rank + 1) * half].clone().requires_grad_(True)
local_blocked = blocked[(blocked >= rank * half) & (blocked < (rank + 1) * half)] - rank * half
h2 = h.detach().clone().requires_grad_(True)
got = chunked_vocab_parallel_nll(h2, mine, labels, local_blocked, rank * half, chunk_tokens=7, group=dist.group.WORLD)
got.sum().backward()
grad_h = h2.grad.clone()
dist.all_reduce(grad_h)  # what copy_to_tensor_model_parallel_region does in backward
errors = [
    (got - expected).abs().max().item(),
    (grad_h - h.grad).abs().max().item(),
    (mine.grad - weight.grad[rank * half : (rank + 1) * half]).abs().max().item(),
]
if max(errors) > 1e-5:
    print(f"chunked tp2 mismatch on rank {rank}: {errors}")
    sys.exit(1)
print("chunked tp2 ok")
dist.barrier()
dist.destroy_process_group()  # before exit: left to the interpreter, gloo's threads may abort the process
