"""Every refusal of config.validate: one Sad3Error line naming the key (checked through load_config)."""

import pytest

from sad3_megatron.config import load_config
from sad3_megatron.core.errors import Sad3Error

DEMO = "configs/demo.yaml"


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.preset=huge"], "unknown model.preset 'huge'"),
        (["model.seq_len=0"], "model.seq_len must be positive"),
        (["model.attention_backend=warp"], "unknown model.attention_backend 'warp'"),
        (["model.dropout=1.0"], "model.dropout must be in [0, 1)"),
        (["diffusion.objective=gpt"], "unknown diffusion.objective 'gpt'"),
        (["diffusion.block_size=0"], "diffusion.block_size=0 does not divide"),
        (["diffusion.block_size=5"], "diffusion.block_size=5 does not divide model.seq_len=128"),
        (["diffusion.schedule=zigzag"], "unknown noise schedule 'zigzag'"),
        (["diffusion.beta=0.9", "diffusion.omega=0.2"], "beta <= omega"),
        (["diffusion.beta=-0.1"], "0 <= beta, omega <= 1"),
        (["diffusion.beta=0", "diffusion.omega=0"], "omega > 0"),
        (["train.lr_schedule=step"], "unknown train.lr_schedule 'step'"),
        (["train.precision=fp16"], "unknown train.precision 'fp16'"),
        (["train.wandb=maybe"], "unknown train.wandb 'maybe'"),
        (["train.global_batch_size=-1"], "train.global_batch_size must be 0"),
        (["train.device=tpu"], "unknown train.device 'tpu'"),
        (["train.steps=0"], "train.steps must be at least 1"),
        (["train.micro_batch_size=0"], "train.micro_batch_size must be at least 1"),
        (["train.grad_accum_steps=0"], "train.grad_accum_steps must be at least 1"),
        (["train.log_interval=0"], "train.log_interval must be at least 1"),
        (["train.eval_interval=0"], "train.eval_interval must be at least 1"),
        (["train.save_interval=0"], "train.save_interval must be at least 1"),
        (["train.keep_last=0"], "train.keep_last must be at least 1"),
        (["train.eval_batches=0"], "train.eval_batches must be at least 1"),
        (["train.max_skipped_steps=0"], "train.max_skipped_steps must be at least 1"),
        (["train.lr=0"], "train.lr must be positive"),
        (["train.min_lr=1"], "train.min_lr in [0, lr]"),
        (["train.ema_decay=1"], "train.ema_decay must be in [0, 1)"),
        (["data.val_fraction=0"], "data.val_fraction must be in (0, 1)"),
        (["data.packing=tight"], "unknown data.packing 'tight'"),
        (["parallel.zero_stage=4"], "parallel.zero_stage must be 0, 1, 2 or 3"),
        (["parallel.tensor_parallel=0"], "must be at least 1"),
        (["parallel.sequence_parallel=true"], "it needs parallel.tensor_parallel >= 2"),
        (["parallel.sequence_parallel=true", "parallel.tensor_parallel=3", "model.num_heads=3",
          "model.hidden_size=96"], "divisible by parallel.tensor_parallel (3)"),  # fmt: skip
        (["parallel.pipeline_parallel=2", "parallel.zero_stage=2"], "allows ZeRO stage 0 or 1"),
        (["model.hidden_size=130"], "model.hidden_size=130 is not divisible by model.num_heads=4"),
        (["model.hidden_size=12", "model.num_heads=4"], "even head dimension"),
        (["parallel.tensor_parallel=3"], "model.num_heads=4 is not divisible by parallel.tensor_parallel=3"),
        (["data.recipe=/no/such/recipe.yaml"], "data.recipe='/no/such/recipe.yaml' not found"),
        (["data.train_files=/no/such/*.txt"], "not found"),
    ],
)
def test_each_refusal_names_the_key(overrides, needle):
    with pytest.raises(Sad3Error) as err:
        load_config(DEMO, overrides)
    message = str(err.value)
    assert needle in message and "\n" not in message, message


def test_a_too_short_split_is_refused_with_the_fix(tmp_path):
    """A corpus with too little text for the held-out split, and one too short for a sequence."""
    from sad3_megatron.data.corpus import load_corpus
    from sad3_megatron.data.tokenizers import load_tokenizer

    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"Paragraph {i} has a few words in it." for i in range(40)))
    tokenizer = load_tokenizer("bert-base-uncased")
    cfg = load_config(DEMO, [f"data.train_files={small}", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(Sad3Error, match="the held-out split has .* raise data.val_fraction or add text"):
        load_corpus(cfg.data, tokenizer, cfg.model.seq_len)


def test_a_corpus_too_short_for_one_sequence_is_refused(tmp_path):
    from sad3_megatron.data.corpus import load_corpus
    from sad3_megatron.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("bert-base-uncased")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Too short.")
    cfg = load_config(DEMO, [f"data.train_files={tiny}", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(Sad3Error, match="too few for one sequence of 128"):
        load_corpus(cfg.data, tokenizer, cfg.model.seq_len)


def test_sedd_is_configured_as_one_block_without_pipeline_stages():
    cfg = load_config("configs/demo.yaml", ["diffusion.objective=sedd", "diffusion.block_size=128"])
    assert cfg.diffusion.objective == "sedd"
    with pytest.raises(Sad3Error, match="set diffusion.block_size=128"):
        load_config("configs/demo.yaml", ["diffusion.objective=sedd"])
    with pytest.raises(Sad3Error, match="pipeline_parallel=1"):
        load_config(
            "configs/demo.yaml",
            ["diffusion.objective=sedd", "diffusion.block_size=128", "parallel.pipeline_parallel=2"],
        )
