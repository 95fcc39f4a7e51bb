"""`sad3 lm-eval`: sad3 models as lm-evaluation-harness models, through the real harness (lm-eval
0.4.13, no mocks): the AR export against the harness's own `hf` model request by request, the
diffusion loglikelihood against exact enumeration and (at L' = 1) the AR log-probability written
out, generate_until's stop strings, batches and length errors, and the command's results files."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the `eval` extra; requirements/cpu.txt installs it

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from sad3_megatron.cli import main  # noqa: E402
from sad3_megatron.config import load_config  # noqa: E402
from sad3_megatron.core.errors import Sad3Error  # noqa: E402
from sad3_megatron.core.masks import AttentionMask  # noqa: E402
from sad3_megatron.engine.build import load_components  # noqa: E402
from sad3_megatron.engine.export import export_checkpoint  # noqa: E402
from sad3_megatron.engine.trainer import train  # noqa: E402
from sad3_megatron.evaluation.harness import Sad3LM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "configs" / "lm_eval"
TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.ffn_hidden_size=64",
    "diffusion.block_size=4", "train.micro_batch_size=2", "train.progress_bar=false", "train.eval_interval=1000",
    "train.eval_batches=1", "train.steps=3", "train.lr=1e-2", "train.warmup_steps=1",
]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ar_export(tmp_path_factory, one_thread) -> Path:
    """A GPT-2-tokenized AR baseline, exported (HFLM's default tokenization adds nothing for GPT-2)."""
    root = tmp_path_factory.mktemp("ar")
    train(load_config("configs/demo.yaml", [*TINY, "model.seq_len=64", "diffusion.objective=ar",
                                             "data.tokenizer=gpt2", f"run.out_dir={root / 'run'}"]))  # fmt: skip
    export_checkpoint(root / "run", root / "hf")
    return root / "hf"


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory, one_thread) -> Path:
    """A SAD3-LM (L' = 4, L = 32, the demo's BERT tokenizer), as a run directory."""
    run = tmp_path_factory.mktemp("bd") / "run"
    train(load_config("configs/demo.yaml", [*TINY, "model.seq_len=32", f"run.out_dir={run}"]))
    return run


@pytest.fixture(scope="module")
def tasks() -> TaskManager:
    return TaskManager(include_path=str(TASKS), include_defaults=False)  # the built-in index costs ~20 s


def evaluate(lm, tasks: TaskManager, names: list[str], limit: int) -> dict:
    return lm_eval.simple_evaluate(model=lm, model_args="pretrained=test", tasks=names, task_manager=tasks,
                                   limit=limit, log_samples=True, bootstrap_iters=0)  # fmt: skip


def responses(result: dict, task: str) -> list:
    return [resp[0] for sample in result["samples"][task] for resp in sample["resps"]]


def test_ar_export_scores_as_the_harness_hf_model(ar_export, tasks):
    """Every request of the cloze and rolling-perplexity tasks (and the greedy generations) equal to the
    harness's own `hf` model on the same export, at the same row length: <= 1e-4 per request."""
    from lm_eval.models.huggingface import HFLM

    ours = Sad3LM(pretrained=str(ar_export), batch_size=3, truncation="left")
    hf = HFLM(pretrained=str(ar_export), device="cpu", batch_size=1, trust_remote_code=True, dtype="float32",
              max_length=ours.max_length)  # fmt: skip
    hf.model.generation_config.max_new_tokens = None  # the export's default would override HFLM's max_length
    names = ["sad3_austen_cloze", "sad3_austen_ppl", "sad3_austen_gen"]
    theirs, mine = evaluate(hf, tasks, names, limit=4), evaluate(ours, tasks, names, limit=4)
    cloze_hf, cloze_ours = responses(theirs, "sad3_austen_cloze"), responses(mine, "sad3_austen_cloze")
    assert len(cloze_ours) == 16 and [g for _, g in cloze_ours] == [g for _, g in cloze_hf]
    assert max(abs(a - b) for (a, _), (b, _) in zip(cloze_hf, cloze_ours, strict=True)) <= 1e-4
    rolling_hf, rolling_ours = responses(theirs, "sad3_austen_ppl"), responses(mine, "sad3_austen_ppl")
    assert len(rolling_ours) == 4 and max(abs(a - b) for a, b in zip(rolling_hf, rolling_ours, strict=True)) <= 1e-4
    assert responses(mine, "sad3_austen_gen") == responses(theirs, "sad3_austen_gen")
    assert mine["config"]["sad3"]["loglikelihood"] == "exact log-probability"


def beta(a: int, b: int) -> float:
    return math.gamma(a) * math.gamma(b) / math.gamma(a + b)


def exact_nelbo(model, context: list[int], continuation: list[int], block: int, mask_id: int) -> float:
    """Eq. 7's NELBO of the continuation given the clean context, enumerated: per block, every non-empty
    subset S of its continuation positions F weighs B(|S|, |F| - |S| + 1); each term is one forward of
    the clean prefix and the noisy block (S and the positions past the row masked) under M_BC."""
    x = [*context, *continuation]
    width = -(-len(x) // block) * block
    row = torch.tensor([*x, *[mask_id] * (width - len(x))])
    total = 0.0
    for start in range(0, width, block):
        free = [i for i in range(start, start + block) if len(context) <= i < len(x)]
        for size in range(1, len(free) + 1):
            for subset in itertools.combinations(free, size):
                tokens = row[: start + block].clone()
                tokens[list(subset)] = mask_id
                n = start + block
                logits = model(tokens[None], torch.arange(n), AttentionMask.block_causal(n, block)).logits[0]
                log_p = torch.log_softmax(logits.double(), -1)
                total -= beta(size, len(free) - size + 1) * sum(float(log_p[i, x[i]]) for i in subset)
    return total


def test_diffusion_loglikelihood_is_unbiased_and_exact_at_block_size_one(diffusion_run):
    """Through the harness model's `loglikelihood`: at the model's L' = 4 the mean over seeds of its
    draws matches -NELBO enumerated by hand (context clean before and inside the continuation's
    block); with block_size=1 it is the AR log-probability, one position at a time, in one draw."""
    lm = Sad3LM(pretrained=str(diffusion_run), draws=50)
    request = Instance("loglikelihood", {}, ("it was", " a very happy day"), 0, ("demo", 0, 1))
    context, continuation = lm._encode_pair(*request.args)
    assert len(context) == 3 and len(continuation) == 4  # blocks [CLS] it was | a, then very happy day | [MASK]
    parts, _ = load_components(diffusion_run)
    with torch.no_grad():
        exact = exact_nelbo(parts.model, context, continuation, 4, parts.tokenizer.mask_id)
        ar = sum(-exact_nelbo(parts.model, [*context, *continuation[:i]], [continuation[i]], 1, parts.tokenizer.mask_id)
                 for i in range(len(continuation)))  # fmt: skip
    values = []
    for seed in range(8):
        lm.settings.seed = seed
        values.append(lm.loglikelihood([request], disable_tqdm=True)[0][0])
    mean = sum(values) / len(values)
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    assert abs(mean + exact) < 4 * stderr and 0 < stderr < 0.02 * exact
    exact_lm = Sad3LM(pretrained=str(diffusion_run), block_size=1, draws=50)
    assert exact_lm.loglikelihood([request], disable_tqdm=True)[0][0] == pytest.approx(ar, abs=1e-4)
    assert exact_lm.get_model_info()["sad3"]["loglikelihood"] == "exact log-probability"
    assert lm.get_model_info()["sad3"]["perplexity"] == "upper bound"


def test_generate_until_stops_at_its_stop_string_and_batches(diffusion_run):
    lm = Sad3LM(pretrained=str(diffusion_run), batch_size=4, sampler="confident", threshold=1.0)

    def generate(prompts: list[str], until: list[str], lm=lm) -> list[str]:
        kwargs = {"until": until, "max_gen_toks": 12, "do_sample": False}
        requests = [Instance("generate_until", {}, (p, kwargs), i, ("demo", i, 1)) for i, p in enumerate(prompts)]
        return lm.generate_until(requests, disable_tqdm=True)

    prompts = ["it is a truth universally", "she was the youngest of", "he had a great deal"]
    assert len({len(lm.tok_encode(p)) for p in prompts}) == 1  # one batch: prompts of one length
    free = generate(prompts, [])
    text = next(t for t in free if len(t.split()) >= 2)
    stop = text.split()[1]  # a word the model writes: generation must end just before it
    stopped = generate(prompts, [stop])
    assert stopped == [t.split(stop)[0] for t in free] and stop not in "".join(stopped)
    alone = [generate([p], [])[0] for p in prompts]  # batched (equal prompt lengths together) = one by one
    assert alone == free


def test_a_request_longer_than_a_row_is_an_error_naming_it(diffusion_run):
    lm = Sad3LM(pretrained=str(diffusion_run))
    long = " ".join(["word"] * 40)
    request = Instance("generate_until", {}, (long, {"until": ["."], "max_gen_toks": 8}), 0, ("sad3_austen_gen", 7, 1))
    with pytest.raises(Sad3Error, match=r"sad3_austen_gen doc 7 .* exceed a row of 31 tokens"):
        lm.generate_until([request])
    short = Instance("generate_until", {}, ("word", {"until": ["."], "max_gen_toks": 40}), 0, ("sad3_austen_gen", 3, 1))
    with pytest.raises(Sad3Error, match=r"doc 3 .*max_gen_toks 40"):
        lm.generate_until([short])
    scored = Instance("loglikelihood", {}, (long, " word"), 0, ("sad3_austen_cloze", 5, 1))
    with pytest.raises(Sad3Error, match=r"sad3_austen_cloze doc 5 .*truncation=left"):
        lm.loglikelihood([scored])
    clipped = Sad3LM(pretrained=str(diffusion_run), truncation="left")  # HFLM's left truncation, when asked
    assert clipped.loglikelihood([scored], disable_tqdm=True)[0][0] < 0


def test_chat_template_and_model_args(diffusion_run):
    lm = Sad3LM(pretrained=str(diffusion_run))
    with pytest.raises(Sad3Error, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
    lm.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    with pytest.raises(Sad3Error, match="unknown model_args drawz"):
        Sad3LM(pretrained=str(diffusion_run), drawz=3)
    assert get_model("sad3") is Sad3LM
    declared = {e.name: e.value for e in importlib.metadata.entry_points(group="lm_eval.models")}
    assert declared["sad3"] == f"{Sad3LM.__module__}:{Sad3LM.__name__}"  # for lm-eval releases after 0.4.13


def test_cli_writes_the_harness_results_and_samples(ar_export, diffusion_run, tmp_path, capsys):
    """`sad3 lm-eval DIR` with the harness's own flags on the offline tasks: its standard results JSON
    (model sad3, what was scored, and whether it is a bound) and one samples file per task."""
    out = tmp_path / "out"
    args = ["--tasks", "sad3_austen_cloze", "sad3_austen_ppl", "--include_path", str(TASKS), "--limit", "2",
            "--batch_size", "2", "--output_path", str(out), "--log_samples", "--model_args", "draws=2"]  # fmt: skip
    assert main(["lm-eval", str(diffusion_run), *args]) == 0
    assert "sad3_austen_cloze" in capsys.readouterr().out  # the harness's table
    (results,) = out.glob("*/results_*.json")
    data = json.loads(results.read_text())
    assert data["config"]["model"] == "sad3" and data["config"]["sad3"]["perplexity"] == "upper bound"
    assert data["config"]["sad3"]["draws"] == 2 and data["n-samples"]["sad3_austen_ppl"]["effective"] == 2
    assert {"acc,none", "acc_norm,none"} <= set(data["results"]["sad3_austen_cloze"])
    assert sorted(p.name[: p.name.rindex("_")] for p in out.glob("*/samples_*.jsonl")) == [
        "samples_sad3_austen_cloze", "samples_sad3_austen_ppl"]  # fmt: skip
    assert main(["lm-eval", str(ar_export), "--model", "hf", *args]) == 2
    assert "sets --model sad3 itself" in capsys.readouterr().err
