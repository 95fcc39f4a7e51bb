"""Run under torchrun with 2 processes (gloo): transformers checkpoints loaded by `train.init_from`'s
streaming loader into the trainer's model, at TP = 2 with sequence parallelism (`tp2-sp`) or as two
pipeline stages (`pp2`), against transformers' own fp32 model of each directory (the reference, run on
every rank; `tp2`: without sequence parallelism): the AR logits (causal, [2, 40] random tokens) and one backward's gradients of a fixed
random weighting of the logits, mapped to the checkpoint's tensor names.

    torchrun --nproc_per_node 2 tests/workers/hf_parity.py tp2-sp DIR [DIR ...]

Prints "hf parity ok LAYOUT DIR" per directory on every rank, or the mismatch, and exits non-zero on one."""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import AutoModelForCausalLM

from sad3_megatron.config import load_config
from sad3_megatron.core.masks import AttentionMask
from sad3_megatron.engine.build import build_components
from sad3_megatron.engine.consolidate import gather_tensor_parallel
from sad3_megatron.engine.distributed import shutdown_distributed
from sad3_megatron.engine.export import family_tensors
from sad3_megatron.engine.hf_import import apply_init_architecture, load_init_weights
from sad3_megatron.engine.pipeline import build_pipeline, canonical_name
from sad3_megatron.hf.families import hf_pieces, tensor_plan
from sad3_megatron.model.build import model_parallel_config, prepare_tensor_parallel

LENGTH, TOLERANCE = 40, 1e-5


def reference(directory: str, x: torch.Tensor, weights: torch.Tensor):
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    logits = hf(x).logits
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad for n, p in hf.named_parameters()}


def config(layout: str, directory: str):
    parallel = {"tp2-sp": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
                "tp2": ["parallel.tensor_parallel=2"],
                "pp2": ["parallel.pipeline_parallel=2", "parallel.zero_stage=1"]}[layout]  # fmt: skip
    # The pipeline's stages run the AR objective's layout: L - 1 = LENGTH tokens.
    seq_len = LENGTH + 1 if layout == "pp2" else LENGTH
    overrides = [f"train.init_from={directory}", f"data.tokenizer={directory}", "diffusion.objective=ar",
                 f"model.seq_len={seq_len}", "model.dropout=0.0", "diffusion.block_size=1", *parallel]  # fmt: skip
    return apply_init_architecture(load_config("configs/demo.yaml", overrides, check_files=False))


def tensor_parallel_run(cfg, directory: str, x: torch.Tensor, weights: torch.Tensor):
    """TP = 2 + SP: the whole model on both ranks, each holding its shard; logits gathered."""
    parts = build_components(cfg, torch.device("cpu"), "sdpa")
    model, spec = parts.model, parts.spec
    load_init_weights(model, directory, spec.model, spec.padded_vocab_size, False, None)
    logits = model(x, torch.arange(LENGTH), AttentionMask.causal(LENGTH)).logits[..., : weights.shape[-1]]
    (logits * weights).sum().backward()
    grads = gather_tensor_parallel({n: p.grad for n, p in model.named_parameters()}, model)
    return logits.detach(), grads, spec


def pipeline_run(cfg, directory: str, x: torch.Tensor, weights: torch.Tensor):
    """PP = 2: stage 0 sends its hidden states to stage 1, which computes the logits; backward the other
    way; then the tied embedding's gradient is summed over the stages, as DeepSpeed's engine does."""
    parts = build_components(cfg, torch.device("cpu"), "sdpa", with_model=False)
    spec, objective = parts.spec, parts.objective
    module = build_pipeline(spec, model_parallel_config(False), objective, cfg.run.seed)
    prepare_tensor_parallel(module, False)
    n = spec.model.num_layers
    load_init_weights(module, directory, spec.model, spec.padded_vocab_size, False, n)
    stage, logits = parallel_state.get_pipeline_model_parallel_rank(), None
    if stage == 0:
        h = module(x)
        dist.send(h.detach().contiguous(), 1)
        grad = torch.empty_like(h)
        dist.recv(grad, 1)
        h.backward(grad)
    else:
        h = torch.empty(LENGTH, x.shape[0], spec.model.hidden_size)
        dist.recv(h, 0)
        h.requires_grad_(True)
        logits = module(h).transpose(0, 1)[..., : weights.shape[-1]]
        (logits * weights).sum().backward()
        dist.send(h.grad.contiguous(), 0)
    module.allreduce_tied_weight_gradients()
    grads = {canonical_name(k, n): p.grad for k, p in module.named_parameters()}
    return (None if logits is None else logits.detach()), grads, spec


def compare(layout: str, directory: str) -> list[str]:
    cfg = config(layout, directory)
    x = torch.randint(3, 480, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    vocab = cfg.model.resolved().vocab_rows
    weights = torch.randn(2, LENGTH, vocab, generator=torch.Generator().manual_seed(2))
    ref_logits, ref_grads = reference(directory, x, weights)
    run = pipeline_run if layout == "pp2" else tensor_parallel_run
    logits, grads, spec = run(cfg, directory, x, weights)
    problems = []
    if logits is not None and (logits - ref_logits).abs().max().item() > TOLERANCE:
        problems.append(f"logits differ by {(logits - ref_logits).abs().max().item():.2e}")
    pieces = hf_pieces(tensor_plan(spec.model, vocab, spec.padded_vocab_size))
    local = {name: parts for name, parts in pieces.items() if all(ours in grads for _, ours, _, _ in parts)}
    for name, grad in family_tensors(grads, local, torch.float32).items():
        expected = ref_grads[name]
        error = ((grad - expected).norm() / expected.norm()).item()
        if error > TOLERANCE:
            problems.append(f"gradient of {name} differs by {error:.2e} (relative)")
    return problems if local else ["no gradients compared"]


def main() -> int:
    layout, directories = sys.argv[1], sys.argv[2:]
    failed = False
    for directory in directories:
        problems = compare(layout, directory)
        failed |= bool(problems)
        print(f"hf parity {'ok' if not problems else 'FAILED'} {layout} {directory} {'; '.join(problems)}", flush=True)
    shutdown_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
