"""Adaptation end to end on tiny runs: an AR run imported at L' = 1 with the token shift scores exactly its
transformers NLL; a run with every switch exports a model that scores as the naive per-block loop and samples
as `sad3 sample`; it resumes exactly (the [MASK]-embedding noise included); a block-size curriculum restarts
the schedule search at each stage's L'; the config refuses what the switches cannot do."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from sad3_megatron.cli import main
from sad3_megatron.config import load_config, stage_sequence
from sad3_megatron.core.diffusion_config import DiffusionConfig
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.likelihood import estimate_bound
from sad3_megatron.core.registry import build_objective
from sad3_megatron.core.schedules import evaluation_schedule
from sad3_megatron.data.corpus import load_corpus
from sad3_megatron.engine.build import load_components
from sad3_megatron.engine.checkpoint import read_checkpoint
from sad3_megatron.engine.export import export_checkpoint
from sad3_megatron.engine.mask_noise import MaskEmbeddingNoise, noise_std
from sad3_megatron.engine.trainer import train

ROOT = Path(__file__).resolve().parent.parent
L = 32
TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.ffn_hidden_size=64",
    f"model.seq_len={L}", "diffusion.block_size=4", "train.micro_batch_size=2", "train.progress_bar=false",
    "train.eval_interval=2", "train.eval_batches=1", "train.steps=2", "train.lr=1e-2", "train.warmup_steps=1",
    "train.lr_schedule=constant", "train.log_interval=1",
]  # fmt: skip
SWITCHES = [
    "diffusion.shift=true", "diffusion.complementary_masks=true", "diffusion.clean_attention=causal",
    "diffusion.ar_loss_weight=1.0", "diffusion.diffusion_loss_weight=0.3", "diffusion.loss_weighting=uniform",
    "diffusion.mask_embedding_noise=0.5", "diffusion.mask_embedding_noise_steps=3",
]  # fmt: skip


def run(out: Path, *overrides: str) -> Path:
    train(load_config(ROOT / "configs/demo.yaml", [*TINY, *overrides, f"run.out_dir={out}"]))
    return out


LLAMA = ["model.norm=rmsnorm", "model.mlp=swiglu", "model.mlp_bias=false", "model.num_kv_heads=2"]


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    """A llama-style AR run and its export as transformers' own LlamaForCausalLM (no sad3 code)."""
    root = tmp_path_factory.mktemp("ar")
    path = run(root / "run", "diffusion.objective=ar", *LLAMA)
    export_checkpoint(path, root / "hf", format="transformers")
    return path, root / "hf"


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, ar_run):
    """Every switch, starting from the transformers directory (architecture and tokenizer from it)."""
    root = tmp_path_factory.mktemp("adapted")
    path = run(root / "run", *SWITCHES, f"train.init_from={ar_run[1]}", f"data.tokenizer={ar_run[1]}")
    export_checkpoint(path, root / "hf")
    return path, root / "hf"


def held_out(run_dir: Path, n: int = 4) -> torch.Tensor:
    cfg, _, _ = read_checkpoint(run_dir, use_ema=False)
    parts, _ = load_components(run_dir)
    return torch.as_tensor(load_corpus(cfg.data, parts.tokenizer, L).val[:n])


def test_an_imported_ar_model_at_l1_with_shift_scores_its_transformers_nll_exactly(ar_run, tmp_path):
    """A LlamaForCausalLM directory (transformers' own model, no remote code): its loss on held-out rows
    equals the block-diffusion bound of its `sad3 import` at L' = 1 with the token shift, before any training."""
    from transformers import AutoModelForCausalLM

    from sad3_megatron.engine.hf_import import import_checkpoint

    run_dir, export = ar_run
    x = held_out(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(export)
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        nll = hf(input_ids=x, labels=x).loss.item()  # mean over the L - 1 next-token targets
    parts, _ = load_components(import_checkpoint(export, tmp_path / "imported").out_dir)  # megatron model
    objective = build_objective(DiffusionConfig(block_size=1, shift=True), L, parts.tokenizer.mask_id)
    bound = estimate_bound(parts.model, objective, x, torch.device("cpu"), batch_size=2, draws=4)
    assert bound.exact and bound.draws == 1
    assert bound.nelbo_per_token == pytest.approx(nll, abs=1e-5)


def test_a_run_with_every_switch_exports_what_it_trained(adapted):
    """config.json keeps the switches; nelbo() is the bound of the naive per-block loop (same noise draw);
    generate_blocks() draws what `sad3 sample` draws from the checkpoint."""
    from transformers import AutoModelForMaskedLM

    run_dir, export = adapted
    diffusion = json.loads((export / "config.json").read_text())["training_config"]["diffusion"]
    assert diffusion["shift"] and diffusion["complementary_masks"] and diffusion["clean_attention"] == "causal"
    hf = AutoModelForMaskedLM.from_pretrained(export, trust_remote_code=True)
    x = held_out(run_dir, 2)
    got = hf.nelbo(x, draws=1, seed=0)["nelbo_per_token"]
    parts, _ = load_components(run_dir)
    bound = parts.objective.bound()
    assert bound.switches.loss_weighting == "elbo" and bound.switches.ar_loss_weight == 0
    with torch.no_grad():
        noised = bound.noise(x, torch.Generator().manual_seed(0), evaluation_schedule())
        expected = bound.loss(parts.model, x, noised, naive=True).loss.item()
    assert got == pytest.approx(expected, abs=1e-5)

    settings = {"num_tokens": 12, "steps": 3, "batch_size": 2, "seed": 3, "sampler": "confident", "threshold": 0.5}
    from_export = hf.generate_blocks(**settings)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["sample", str(run_dir), "--num-tokens", "12", "--steps", "3", "--batch-size", "2", "--seed", "3",
                     "--sampler", "confident", "--threshold", "0.5", "--json"]) == 0  # fmt: skip
    cli = json.loads(out.getvalue().strip().splitlines()[-1])
    assert [s.tokens for s in from_export.samples] == [s["tokens"] for s in cli["samples"]]


def test_eval_reports_the_true_bound_and_says_so(adapted):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(adapted[0]), "--split", "val", "--draws", "1", "--max-sequences", "2"]) == 0
    line = out.getvalue()
    assert "the true bound (Eq. 7 weights) of a model trained with shift" in line and "loss_weighting=uniform" in line


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_with_every_switch_resumes_exactly(tmp_path, ar_run):
    """4 steps at once against 2 steps then a resume to 4: the masks, the complementary copy and the
    [MASK]-embedding noise (decaying over 3 steps) are functions of (seed, step), so losses and weights agree."""
    common = [*SWITCHES, f"train.init_from={ar_run[0]}", "train.eval_interval=100", "train.ema_decay=0"]
    straight = run(tmp_path / "straight", *common, "train.steps=4")
    run(tmp_path / "resumed", *common, "train.steps=2")
    resumed = run(tmp_path / "resumed", *common, "train.steps=4")
    losses = {m["step"]: m["loss"] for m in metrics(straight) if "loss" in m}
    again = {m["step"]: m["loss"] for m in metrics(resumed) if "loss" in m}
    assert losses == again and len(losses) == 4
    assert [m["mask_noise_std"] for m in metrics(straight) if "loss" in m] == pytest.approx([0.5, 1 / 3, 1 / 6, 0.0])
    a, b = read_checkpoint(straight, use_ema=False)[1], read_checkpoint(resumed, use_ema=False)[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mask_embedding_noise_is_seeded_decays_and_trains_only(tiny):
    network = tiny.network(seed=0)
    noise = MaskEmbeddingNoise(network, tiny.mask_id, std=1.0, steps=4, seed=lambda step, k: 1000 * step + k)
    tokens = torch.tensor([[3, tiny.mask_id, 5, tiny.mask_id]])
    clean = network.embedding.embed.weight[tokens[0]].detach()

    def embedded(step: int) -> torch.Tensor:
        noise.begin(step)
        return network.embedding(tokens)[:, 0].detach()  # [s, b, h] -> the row's [s, h]

    first, again, later = embedded(1), embedded(1), embedded(2)
    assert torch.equal(first, again) and not torch.equal(first, later)
    assert torch.equal(first[[0, 2]], clean[[0, 2]]) and not torch.equal(first[1], clean[1])  # [MASK] only
    assert (first[1] - clean[1]).std().item() == pytest.approx(noise_std(1.0, 4, 1), rel=0.5)
    assert torch.equal(embedded(4), clean)  # decayed to 0 at step N
    network.eval()
    assert torch.equal(embedded(0), clean)  # evaluation never sees it
    noise.remove()


@pytest.mark.slow
def test_a_block_size_curriculum_restarts_the_search_at_each_stage(tmp_path, ar_run):
    """Two stages run one after another (as launchers/adapt.sh does): L' = 1 from the AR weights, then L' = 4
    from stage 1's. Stage 2's search scores the L' = 4 grid from stage 2's own starting range (nothing of
    stage 1's schedule carries over), and each stage's checkpoint records its L'."""
    recipe = tmp_path / "curriculum.yaml"
    recipe.write_text(yaml.safe_dump({
        "curriculum": ["one", "four"],
        "stages": {
            "one": {"diffusion.block_size": 1, "diffusion.beta": 1.0, "diffusion.omega": 1.0},
            "four": {"diffusion.block_size": 4, "diffusion.beta": 0.45, "diffusion.omega": 0.95},
        },
        "diffusion": {"schedule_search": "elbo", "search_batches": 1},
    }))  # fmt: skip
    assert stage_sequence(recipe) == ["one", "four"]
    init = ar_run[0]
    for stage in stage_sequence(recipe):
        tiny = [o for o in TINY if not o.startswith("diffusion.block_size")]  # overrides win over stages
        cfg = load_config(recipe, [*tiny, f"run.out_dir={tmp_path / stage}", f"train.init_from={init}"], stage=stage)
        cfg.data = load_config(ROOT / "configs/demo.yaml").data
        train(cfg)
        init = tmp_path / stage
    searched = {stage: [m for m in metrics(tmp_path / stage) if "search/beta" in m] for stage in ("one", "four")}
    grid = {stage: sum(k.startswith("search/var_") for k in searched[stage][0]) for stage in searched}
    assert grid == {"one": 2, "four": 36}  # the reference grids of L' = 1 and L' = 4
    for stage, block in (("one", 1), ("four", 4)):
        cfg, _, _ = read_checkpoint(tmp_path / stage, use_ema=False)
        assert cfg.diffusion.block_size == block
    started = load_config(tmp_path / "four" / "config.yaml")
    assert (started.diffusion.beta, started.diffusion.omega) == (0.45, 0.95)


def test_resuming_a_run_at_another_block_size_is_refused(tmp_path):
    """A new L' is a new stage: its schedule-search state and clipped range belong to the old L'."""
    run(tmp_path / "run", "train.steps=1")
    with pytest.raises(Sad3Error, match="a new L' is a new stage"):
        run(tmp_path / "run", "train.steps=2", "diffusion.block_size=8")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["diffusion.ar_loss_weight=1"], "needs diffusion.clean_attention=causal"),
        (["diffusion.objective=ar", "diffusion.shift=true"], "diffusion.shift is a switch of the block-diffusion"),
        (["diffusion.mask_embedding_noise=0.1"], "mask_embedding_noise_steps"),
        (["diffusion.clean_attention=diagonal"], "unknown diffusion.clean_attention 'diagonal'"),
        (["diffusion.loss_weighting=none"], "choose one of elbo, uniform"),
        (["diffusion.diffusion_loss_weight=0"], "diffusion.diffusion_loss_weight > 0"),
    ],
)
def test_the_config_refuses_what_the_switches_cannot_do(overrides, message):
    with pytest.raises(Sad3Error, match=message):
        load_config(ROOT / "configs/demo.yaml", overrides)
