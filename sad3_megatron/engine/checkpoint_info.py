"""`sad3 checkpoint info CKPT`: what a checkpoint holds and what resuming it on another layout does
(layout, step, tokens, data position, size, integrity), read from its files without loading any
tensor."""

from __future__ import annotations

import re
from pathlib import Path

GIB = 2**30


def _sizes(ckpt: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in ckpt.rglob("*"):
        if path.is_file():
            kind = path.name.split(".")[0] if path.suffix == ".safetensors" else "deepspeed" if path.suffix == ".pt" else "other"
            sizes[kind] = sizes.get(kind, 0) + path.stat().st_size
    return sizes


def _deepspeed_layout(ckpt: Path) -> dict:
    """What an older checkpoint's DeepSpeed file names say of the layout it was written on."""
    names = [p.name for p in ckpt.glob("*.pt")]
    dp = {m.group(1) for n in names if (m := re.match(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank", n))}
    mp = {m.group(1) for n in names if (m := re.search(r"mp_rank_(\d+)", n))}
    return {"data_parallel": max(len(dp), 1), "model_parallel": max(len(mp), 1), "zero": bool(dp)}


def checkpoint_info(path: str | Path) -> dict:
    """Everything `sad3 checkpoint info` prints, as a dict."""
    from sad3_megatron.engine.checkpoint import (
        checkpoint_problem,
        is_layout_free,
        read_config,
        read_state,
        resolve_checkpoint,
    )
    from sad3_megatron.engine.resume import model_identity

    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    fmt = "layout-free" if is_layout_free(ckpt) else "deepspeed-shards" if any(ckpt.glob("*.pt")) else "weights-only"
    info: dict = {
        "checkpoint": str(ckpt),
        "format": fmt,
        "intact": checkpoint_problem(ckpt) or "yes",
        "sizes": _sizes(ckpt),
        "model": {k.split(".", 1)[1]: v for k, v in model_identity(cfg).items()},  # shape fields, tokenizer
        "objective": cfg.diffusion.objective,
    }
    if info["format"] == "layout-free":
        state = read_state(ckpt)
        lr = state.get("lr_scheduler", {}).get("_last_lr", [None])[0]
        info.update(step=state["step"], tokens=state["tokens"], data=state.get("data"), layout=state.get("layout"))
        info.update(optimizer_steps=state.get("optimizer_steps"), lr=lr, ema_updates=state.get("ema_updates"))
    elif fmt == "deepspeed-shards":
        info.update(step=int(ckpt.name.removeprefix("step_")), layout=_deepspeed_layout(ckpt))
    return info


def _layout_line(layout: dict | None) -> str:
    if not layout:
        return "not recorded"
    sp = ", sequence parallel" if layout.get("sequence_parallel") else ""
    cp = f" × CP {layout['context_parallel']}" if layout.get("context_parallel", 1) > 1 else ""
    return (
        f"world {layout['world_size']} = TP {layout['tensor_parallel']}{cp} × PP {layout['pipeline_parallel']} × "
        f"DP {layout['data_parallel']}{sp}, ZeRO-{layout['zero_stage']}; global batch {layout['global_batch']} = "
        f"micro {layout['micro_batch_size']} × accumulation {layout['grad_accum_steps']} × DP {layout['data_parallel']}"
    )


def info_lines(info: dict) -> list[str]:
    """The human-readable report."""
    m, sizes = info["model"], info["sizes"]
    total = sum(sizes.values())
    parts = ", ".join(f"{k} {v / GIB:.3f}" for k, v in sorted(sizes.items()))
    lines = [
        f"checkpoint {info['checkpoint']}",
        f"  format: {info['format']}; intact: {info['intact']}",
        f"  model: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']} heads ({m['num_kv_heads']} key/value), "
        f"FFN {m['ffn_hidden_size']} ({m['mlp']}, {m['norm']}), L = {m['seq_len']}, tokenizer {m['tokenizer']}, "
        f"objective {info['objective']}",
        f"  size: {total:,} bytes ({total / GIB:.3f} GiB: {parts})",
    ]
    if info["format"] == "weights-only":
        return lines + [
            "  weights only (what `sad3 import` writes): train.init_from starts a run from it on any layout; sad3 "
            "eval, sample and export read it; there is no training state to resume"
        ]
    if info["format"] != "layout-free":
        ds = info["layout"]
        return lines + [
            f"  step {info['step']}; written by an earlier sad3 as DeepSpeed shards of {ds['data_parallel']} data-parallel × "
            f"{ds['model_parallel']} model-parallel rank(s)",
            "  resume: only on the layout it was written on (same DP size, ZeRO stage, TP and PP); every checkpoint "
            "saved after that resume resumes on any layout",
        ]
    data, layout = info.get("data") or {}, info.get("layout") or {}
    rows = data.get("rows", 0)
    return lines + [
        f"  step {info['step']}, tokens {info['tokens']:,}; AdamW steps {info['optimizer_steps']}, next LR {info['lr']}; "
        f"EMA updates {info['ema_updates']}",
        f"  data position: sequence {rows:,} of the training order (token {rows * m['seq_len']:,}), "
        f"global batch {data.get('global_batch')}",
        f"  written on: {_layout_line(layout)}",
        "  resume on another layout: any DP size, ZeRO stage 0-3, TP, PP, sequence and context parallelism; the weights, "
        "Adam moments and step count, LR schedule, EMA, noise schedule, data position and seeds carry over exactly "
        f"(each rank reads its slice of the whole tensors); a global batch other than {data.get('global_batch')} "
        f"goes on from sequence {rows:,}; another model shape or tokenizer is refused",
    ]
