"""Transformers checkpoints in and out: `train.init_from=HF_DIR`, `sad3 import`, `sad3 export --format
transformers|sdar` (engine/hf_import.py, engine/export.py, hf/families.py).

References: tiny random Llama (llama3 rope scaling, untied, GQA; and linear rope scaling with every bias), Qwen2 (q/k/v biases, tied), Qwen3 (QK-norm,
head_dim != hidden / heads; tied, and untied multi-query) and Mistral (GQA) models built and saved by
transformers itself (tests/conftest.py `hf_models`), run by transformers in fp32; the block-diffusion
reference is transformers' model under a hand-written 4-D mask; the SDAR layout is checked against the
names of JetAstra/SDAR's published SDAR-4B-Chat (tests/fixtures/sdar_4b_chat.json)."""

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sad3_megatron.cli import main
from sad3_megatron.config import load_config
from sad3_megatron.core.masks import AttentionMask, doubled_positions
from sad3_megatron.engine.build import build_components, load_components
from sad3_megatron.engine.export import family_tensors
from sad3_megatron.engine.hf_import import apply_init_architecture, load_init_weights
from sad3_megatron.hf.families import hf_pieces, tensor_plan

FAMILIES = ("llama", "llama_linear", "qwen2", "qwen3", "qwen3_untied", "mistral")
ROOT = Path(__file__).resolve().parent.parent
L = 32
VOCAB = 512  # rows of every tiny table (tests/conftest.py HF_VOCAB)


def _cli_json(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def _one_line_error(capsys, *argv: str) -> str:
    capsys.readouterr()  # what came before (fixtures saving models) is not the command's
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def imported(hf_models, tmp_path_factory):
    """`sad3 import` of a family's directory (with extra config overrides), once per module."""
    root, done = tmp_path_factory.mktemp("imported"), {}

    def get(family: str, *overrides: str) -> Path:
        key = (family, overrides)
        if key not in done:
            out = root / f"{family}-{len(done)}"
            assert main(["import", str(hf_models.path(family)), str(out), f"model.seq_len={L}", *overrides]) == 0
            done[key] = out
        return done[key]

    return get


def _trainer_model(directory: Path, *overrides: str):
    """The trainer's megatron-core model (TP = 1) with train.init_from=DIR's streaming load."""
    cfg = load_config("configs/demo.yaml", [f"train.init_from={directory}", f"data.tokenizer={directory}",
                                            "diffusion.objective=ar", "model.dropout=0.0", f"model.seq_len={L}",
                                            *overrides], check_files=False)  # fmt: skip
    cfg = apply_init_architecture(cfg)
    parts = build_components(cfg, torch.device("cpu"), "sdpa")
    load_init_weights(parts.model, str(directory), parts.spec.model, parts.spec.padded_vocab_size, False, None)
    return parts


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_ar_logits_and_gradients_equal_transformers(family, hf_models, rel):
    parts = _trainer_model(hf_models.path(family))
    hf = hf_models.model(family)
    x = torch.randint(3, 480, (2, L), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(2, L, VOCAB, generator=torch.Generator().manual_seed(1))
    reference = hf(x).logits
    ours = parts.model(x, torch.arange(L), AttentionMask.causal(L)).logits[..., :VOCAB]
    assert (ours - reference).abs().max().item() <= 1e-5
    (reference * weights).sum().backward()
    (ours * weights).sum().backward()
    grads = {name: p.grad for name, p in parts.model.named_parameters()}
    plan = tensor_plan(parts.spec.model, VOCAB, parts.spec.padded_vocab_size)
    mapped = family_tensors(grads, hf_pieces(plan), torch.float32)
    assert sorted(mapped) == sorted(name for name, _ in hf.named_parameters())
    for name, p in hf.named_parameters():
        assert rel(mapped[name], p.grad) < 1e-5, name


def test_the_mask_token_takes_a_new_mean_row_past_a_full_table_and_a_padding_row_inside_one(hf_models, imported):
    hf, llama = hf_models.model("llama"), load_file(str(imported("llama") / "model.safetensors"))
    # Llama's tokenizer fills its 512 rows: the mask token is id 512, rows grow to the trainer's padding (640)
    # and start as the mean of the base's rows, in both tables (untied).
    for ours, theirs in (("embedding.embed.weight", hf.model.embed_tokens.weight), ("head.output.weight", hf.lm_head.weight)):
        assert llama[ours].shape == (640, 64) and torch.equal(llama[ours][:VOCAB], theirs.detach())
        assert torch.allclose(llama[ours][VOCAB:], theirs.detach().double().mean(0).float().expand(128, 64), atol=1e-7)
    # Qwen's tokenizer (500 tokens) leaves padding rows: the mask token is 500, nothing is resized.
    qwen = load_file(str(imported("qwen3") / "model.safetensors"))
    assert qwen["embedding.embed.weight"].shape == (VOCAB, 64) and "head.output.weight" not in qwen  # tied
    assert load_components(imported("qwen3"))[0].tokenizer.mask_id == 500


def test_checkpoint_info_describes_an_import_as_weights_only(imported, capsys):
    assert main(["checkpoint", "info", str(imported("mistral"))]) == 0
    out = capsys.readouterr().out
    assert "format: weights-only; intact: yes" in out and "4 heads (2 key/value)" in out and "(swiglu, rmsnorm)" in out
    assert "no training state to resume" in out


@pytest.mark.parametrize("family", FAMILIES)
def test_sad3_eval_of_an_import_is_the_nll_transformers_loss_gives(family, hf_models, imported, tmp_path):
    from sad3_megatron.data.corpus import load_eval_sequences

    words = torch.randint(0, 480, (3, 120), generator=torch.Generator().manual_seed(2))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"w{i}" for i in row.tolist()) for row in words) + "\n")
    result = _cli_json("eval", str(imported(family)), "--data", str(text), "--json", "--batch-size", "4")
    parts, _ = load_components(imported(family))
    rows = torch.as_tensor(load_eval_sequences(parts.tokenizer, L, files=[str(text)], framing=parts.cfg.data.framing)[:])
    with torch.no_grad():
        loss = hf_models.model(family)(rows, labels=rows).loss.item()  # mean NLL of tokens 2..L of every row
    assert result["exact"] and result["tokens"] == rows.shape[0] * (L - 1)
    assert result["nelbo_per_token"] == pytest.approx(loss, rel=1e-5)


def _block_diffusion_mask(length: int, block: int) -> torch.Tensor:
    """Suppl. D's mask over [x_t ; x], written out: noisy block b sees itself and clean blocks < b, clean
    block b sees clean blocks <= b (True = attend), as transformers takes a 4-D bool mask."""
    blocks = torch.arange(length) // block
    mask = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    mask[:length, :length] = blocks[:, None] == blocks[None, :]
    mask[:length, length:] = blocks[:, None] > blocks[None, :]
    mask[length:, length:] = blocks[:, None] >= blocks[None, :]
    return mask[None, None]


@pytest.mark.parametrize("family", FAMILIES)
def test_block_diffusion_forward_of_an_import_equals_transformers_under_the_4d_mask(family, hf_models, imported):
    block = 4
    parts, _ = load_components(imported(family, "diffusion.objective=sad3", f"diffusion.block_size={block}"))
    mask_id, hf = parts.tokenizer.mask_id, hf_models.model(family)
    x = torch.randint(3, 480, (2, L), generator=torch.Generator().manual_seed(3))
    x_t = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.5, mask_id, x)
    tokens = torch.cat([x_t, x], 1)
    table = hf.model.embed_tokens.weight.detach()
    if mask_id >= table.shape[0]:  # the new mask row: the mean of the base's rows (docs/hf.md)
        table = torch.cat([table, table.mean(0, keepdim=True)])
    with torch.no_grad():
        ours = parts.model(tokens, doubled_positions(L), AttentionMask.doubled(L, block), num_outputs=L).logits
        reference = hf(inputs_embeds=table[tokens], attention_mask=_block_diffusion_mask(L, block),
                       position_ids=torch.cat([torch.arange(L)] * 2)[None], use_cache=False).logits[:, :L]  # fmt: skip
    kept = torch.arange(VOCAB) != mask_id  # SUBS: [MASK] is never predicted
    assert torch.isinf(ours[..., mask_id]).all()
    assert (ours[..., :VOCAB][..., kept] - reference[..., kept]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_diffusion_run_of_an_import_exports_in_sad3s_layout_with_its_architecture(family, imported, tmp_path):
    from sad3_megatron.hf.modeling_sad3 import Sad3ForMaskedLM

    checkpoint = imported(family, "diffusion.objective=sad3", "diffusion.block_size=4")
    assert main(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["head_dim"]) == ((2, 16) if family == "llama" else (2, 32))
    assert config["tie_word_embeddings"] == (family == "qwen3") and config["training_config"]["model"]["norm"] == "rmsnorm"
    parts, _ = load_components(checkpoint)
    export = Sad3ForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.full((2, 8), parts.tokenizer.mask_id)
    x[:, :4] = torch.randint(3, 480, (2, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = export(x, sad3_mask=AttentionMask.causal(8)).logits[:, 4:]
        reference = parts.model(x, torch.arange(8), AttentionMask.causal(8)).logits[:, 4:]
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    assert (ours[torch.isfinite(ours)] - reference[torch.isfinite(reference)]).abs().max().item() <= 1e-5


LOAD_AS_TRANSFORMERS = """
import sys
import torch
from transformers import AutoModelForCausalLM
out = {}
for original, export in zip(sys.argv[1::2], sys.argv[2::2]):
    ours = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)  # no trust_remote_code
    base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    x = torch.tensor([[1, 5, 17, 300, 42, 7, 480, 2]])
    with torch.no_grad():
        out[export] = {"class": type(ours).__module__ + "." + type(ours).__name__,
                       "difference": (ours(x).logits - base(x).logits).abs().max().item()}
print(json.dumps(out))
"""
IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id"}


def test_import_then_transformers_export_returns_the_original_tensors_and_loads_without_sad3(
    hf_models, imported, tmp_path, without_sad3
):
    from transformers import AutoConfig

    pairs = []
    for family in FAMILIES:
        original, export = hf_models.path(family), tmp_path / family
        assert main(["export", str(imported(family)), str(export), "--format", "transformers"]) == 0
        theirs, ours = load_file(str(original / "model.safetensors")), load_file(str(export / "model.safetensors"))
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs), family
        assert not any(p.suffix == ".py" for p in export.iterdir())
        a, b = AutoConfig.from_pretrained(original).to_dict(), AutoConfig.from_pretrained(export).to_dict()
        assert {k: v for k, v in a.items() if k not in IGNORED_CONFIG_KEYS} == {
            k: v for k, v in b.items() if k not in IGNORED_CONFIG_KEYS}, family  # fmt: skip
        raw = json.loads((export / "config.json").read_text())  # 4.x readers: top-level rope_theta / rope_scaling
        assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"]
        pairs += [str(original), str(export)]
    out = without_sad3(LOAD_AS_TRANSFORMERS, *pairs)
    assert out.pop("loaded") == []
    for family in FAMILIES:
        result = out[str(tmp_path / family)]
        assert result["difference"] == 0.0 and result["class"].startswith("transformers.models."), (family, result)


def test_a_bf16_checkpoint_round_trips_bit_for_bit_in_its_own_dtype(hf_models, tmp_path):
    original = hf_models.path("llama", torch.bfloat16)
    assert main(["import", str(original), str(tmp_path / "sad3"), f"model.seq_len={L}"]) == 0
    stored = load_file(str(tmp_path / "sad3" / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}  # the checkpoint's own dtype (--dtype auto)
    assert main(["export", str(tmp_path / "sad3"), str(tmp_path / "out"), "--format", "transformers"]) == 0
    theirs, ours = load_file(str(original / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs) and all(ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], theirs[k]) for k in theirs)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_sdar_export_has_sdars_config_keys_and_tensor_names_and_loads_both_ways(hf_models, imported, tmp_path, without_sad3):
    fixture = json.loads((ROOT / "tests" / "fixtures" / "sdar_4b_chat.json").read_text())
    checkpoint = imported("qwen3_untied", "diffusion.objective=sad3", "diffusion.block_size=4")
    export = tmp_path / "sdar"
    assert main(["export", str(checkpoint), str(export), "--format", "sdar", "--max-shard-size", "200KB"]) == 0
    config = json.loads((export / "config.json").read_text())
    assert sorted(config) == sorted(fixture["config_json"])
    assert (config["model_type"], config["architectures"], config["rope_scaling"]) == ("sdar", ["SDARForCausalLM"], None)
    assert (config["block_size"], config["mask_token_id"], config["vocab_size"]) == (4, 500, VOCAB)
    assert sorted(config["auto_map"]) == sorted(fixture["config_json"]["auto_map"])
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert sorted(index["metadata"]) == sorted(fixture["safetensors_index"]["metadata"])  # total_size only
    patterns = {re.sub(r"layers\.\d+\.", "layers.{i}.", name) for name in index["weight_map"]}
    assert sorted(patterns) == sorted(fixture["safetensors_index"]["tensor_name_patterns"])
    out = without_sad3(SDAR_LOADER, str(export))
    assert out["module"].startswith("transformers_modules.") and out["class"] == "SdarForCausalLM" and out["loaded"] == []
    assert out["difference"] <= 1e-5 and out["rope_scaling"] is None
    # An SDAR checkpoint imports too (Qwen3's tensors, its tokenizer's own mask token): the same tensors back.
    assert main(["import", str(export), str(tmp_path / "back"), "diffusion.objective=sad3", f"model.seq_len={L}"]) == 0
    back, ours = load_file(str(tmp_path / "back" / "model.safetensors")), load_file(str(checkpoint / "model.safetensors"))
    assert sorted(back) == sorted(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


SDAR_LOADER = """
import sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM
export = sys.argv[1]
config = AutoConfig.from_pretrained(export, trust_remote_code=True)
sdar = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)  # sad3's classes, through auto_map
raw = json.load(open(export + "/config.json"))
fields = {k: v for k, v in raw.items() if k in Qwen3Config.__dataclass_fields__ and k not in ("rope_scaling", "rope_theta")}
qwen3 = Qwen3ForCausalLM.from_pretrained(export, config=Qwen3Config(**fields, rope_parameters={
    "rope_type": "default", "rope_theta": raw["rope_theta"]}), dtype=torch.float32).eval()  # the same tensors, Qwen3's code
x = torch.randint(3, 480, (2, 24), generator=torch.Generator().manual_seed(5))
with torch.no_grad():
    ours = sdar.model(x, torch.arange(24), None).logits  # the network, every token seeing every token
    theirs = qwen3(x, attention_mask=torch.ones(1, 1, 24, 24, dtype=torch.bool), use_cache=False).logits
kept = torch.arange(raw["vocab_size"]) != raw["mask_token_id"]
print(json.dumps({"module": type(sdar).__module__, "class": type(sdar).__name__, "rope_scaling": config.rope_scaling,
                  "difference": (ours[..., kept] - theirs[..., kept]).abs().max().item()}))
"""


def _config_only(hf_models, tmp_path: Path, family: str, **changes) -> Path:
    """A copy of a family's directory whose config.json has `changes` (None deletes a key)."""
    out = tmp_path / f"{family}-changed"
    shutil.copytree(hf_models.path(family), out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return out


@pytest.mark.parametrize(
    "family,changes,field",
    [
        ("qwen3", {"num_experts": 8, "num_experts_per_tok": 2}, "num_experts"),  # mixture of experts
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
        ("mistral", {"sliding_window": 64}, "sliding_window"),  # a window shorter than the context
        ("mistral", {"sliding_window": None, "max_position_embeddings": 8192}, "sliding_window"),  # absent: 4096
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type"),
        ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_parameters.rope_type"),  # legacy key
        ("qwen3", {"vision_config": {"hidden_size": 32}}, "vision_config"),  # multimodal
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("llama", {"architectures": ["GPTNeoXForCausalLM"]}, "architectures"),
    ],
)
def test_unsupported_architectures_are_refused_naming_the_config_field(hf_models, tmp_path, capsys, family, changes, field):
    directory = _config_only(hf_models, tmp_path, family, **changes)
    err = _one_line_error(capsys, "import", str(directory), str(tmp_path / "out"))
    assert f"config.json: {field}=" in err and "not supported" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tamper", ["missing", "unexpected", "mis-shaped"])
def test_a_missing_extra_or_misshaped_tensor_is_named(hf_models, tmp_path, capsys, tamper):
    directory = tmp_path / "qwen2"
    shutil.copytree(hf_models.path("qwen2"), directory)
    tensors = load_file(str(directory / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.bias"
    if tamper == "missing":
        del tensors[name]
    elif tamper == "unexpected":
        name = "model.layers.2.self_attn.k_proj.bias"
        tensors[name] = torch.zeros(32)
    else:
        tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    err = _one_line_error(capsys, "import", str(directory), str(tmp_path / "out"))
    assert f"{tamper}: {name}" in err
    # train.init_from reads the directory the same way (its dry run checks the architecture only).
    with pytest.raises(Exception, match=f"{tamper}: {re.escape(name)}"):
        _trainer_model(directory)


def test_a_pytorch_bin_only_directory_is_refused_with_the_conversion_to_run(hf_models, tmp_path, capsys):
    directory = tmp_path / "bin"
    shutil.copytree(hf_models.path("mistral"), directory)
    torch.save(load_file(str(directory / "model.safetensors")), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    err = _one_line_error(capsys, "import", str(directory), str(tmp_path / "out"))
    assert "pytorch_model.bin" in err and "save_pretrained" in err and "never pickle" in err


def test_the_run_is_checked_against_the_checkpoints_architecture_and_tokenizer(hf_models, capsys):
    qwen3, untied = hf_models.path("qwen3"), hf_models.path("qwen3_untied")
    dry = ["train", "configs/demo.yaml", "--dry-run", "diffusion.objective=ar"]
    err = _one_line_error(capsys, *dry, f"train.init_from={qwen3}", f"data.tokenizer={qwen3}", "model.num_heads=8")
    assert "model.num_heads=8" in err and "num_heads=4" in err
    err = _one_line_error(capsys, *dry, f"train.init_from={qwen3}")  # demo.yaml's tokenizer is bert-base-uncased
    assert "data.tokenizer='bert-base-uncased'" in err and str(qwen3) in err
    err = _one_line_error(capsys, *dry, "--world-size", "2", "parallel.tensor_parallel=2", f"train.init_from={untied}",
                          f"data.tokenizer={untied}")  # fmt: skip
    assert "model.num_kv_heads=1 is not divisible by parallel.tensor_parallel=2" in err
    assert main([*dry, f"train.init_from={qwen3}", f"data.tokenizer={qwen3}"]) == 0
    assert "custom model" in capsys.readouterr().out


def test_zero_keeps_the_imported_weights_through_its_first_step(hf_models, tmp_path):
    """DeepSpeed's ZeRO optimizers copy the weights into fp32 masters at initialize; the weights loaded
    afterwards must reach them, or the first step would put the random initialisation back."""
    from sad3_megatron.engine.trainer import Trainer

    directory = hf_models.path("qwen2")
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 480}" for j in range(200)) for i in range(20)) + "\n")
    cfg = load_config("configs/demo.yaml", [
        f"train.init_from={directory}", f"data.tokenizer={directory}", f"data.train_files=[{text}]", "parallel.zero_stage=1",
        "model.seq_len=16", "train.micro_batch_size=2", "train.lr=1e-6", "train.min_lr=0", "train.warmup_steps=1", "train.ema_decay=0",
        f"run.out_dir={tmp_path / 'run'}", "data.val_fraction=0.2", "data.min_val_sequences=1",
    ])  # fmt: skip
    trainer = Trainer(cfg)
    trainer.train_step(0, False)
    embedding = trainer.engine.module.embedding.embed.weight.detach()
    base = load_file(str(directory / "model.safetensors"))["model.embed_tokens.weight"]
    assert (embedding - base).abs().max().item() < 1e-4  # one step of lr 1e-6 from the base, not from random


@pytest.mark.slow
@pytest.mark.parametrize("layout,families", [("tp2-sp", ("llama", "qwen2", "qwen3", "mistral")), ("tp2", ("qwen3",)),
                                             ("pp2", FAMILIES)])  # fmt: skip
def test_imported_logits_and_gradients_equal_transformers_at_tp2_with_sp_and_through_pp2(hf_models, launch, layout, families):
    """tests/workers/hf_parity.py: the streaming loader into TP = 2 shards (qwen3_untied's one KV head
    cannot be split: refused above) and into two pipeline stages (tied embeddings on both, their
    gradients summed), against transformers on every rank."""
    directories = [str(hf_models.path(f)) for f in families]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={launch.free_port()}",
           "tests/workers/hf_parity.py", layout, *directories]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=launch.env, capture_output=True, text=True, timeout=600)
    report = proc.stdout[-3000:] + proc.stderr[-3000:]  # two ranks print: lines may interleave
    assert proc.returncode == 0 and "hf parity FAILED" not in proc.stdout, report
    assert proc.stdout.count(f"hf parity ok {layout} ") == 2 * len(families), report


@pytest.mark.slow
def test_training_from_a_transformers_directory_matches_one_process_under_zero3_and_pp2(hf_models, launch, tmp_path):
    """`sad3 train ... train.init_from=HF_DIR` end to end: the streaming load under ZeRO-3 (one parameter
    gathered at a time, read by one rank), and through DeepSpeed's pipeline engine with the tied embedding
    on both stages, give the single process's losses and gradient norms step by step (global batch 8)."""
    directory = hf_models.path("qwen2")  # tied, q/k/v biases, GQA
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(" ".join(f"w{(11 * i + 7 * j) % 480}" for j in range(300)) for i in range(40)) + "\n")
    common = ["configs/demo.yaml", f"train.init_from={directory}", f"data.tokenizer={directory}", f"data.train_files=[{text}]",
              "model.seq_len=32", "train.micro_batch_size=4", "train.steps=3", "train.log_interval=1", "train.ema_decay=0",
              "train.eval_interval=1000", "train.progress_bar=false", "train.lr_schedule=constant", "train.warmup_steps=1",
              "train.lr=1e-3"]  # fmt: skip
    layouts = {"single": (["train.grad_accum_steps=2"], 1), "zero3": (["parallel.zero_stage=3"], 2),
               "pp2": (["parallel.pipeline_parallel=2", "parallel.zero_stage=1", "train.grad_accum_steps=2"], 2)}  # fmt: skip
    records = {}
    for name, (overrides, nproc) in layouts.items():
        out = tmp_path / name
        proc = subprocess.run([*launch.train_cmd(nproc), *common, *overrides, f"run.out_dir={out}"], cwd=ROOT, env=launch.env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        records[name] = {r["step"]: r for r in lines if "loss" in r}
    for name in ("zero3", "pp2"):
        assert sorted(records[name]) == sorted(records["single"]) == [1, 2, 3]
        for step, reference in records["single"].items():
            for key in ("loss", "grad_norm"):
                assert records[name][step][key] == pytest.approx(reference[key], rel=1e-5, abs=1e-5), (name, key, step)
