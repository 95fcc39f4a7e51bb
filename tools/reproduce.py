"""Rerun the paper's tables at small scale: train the models a table compares, score them, and
write a markdown report with the paper's numbers beside ours, plus PNG plots.

    python tools/reproduce.py table3 --quick                 # CPU, about a minute: tiny models, a few steps
    python tools/reproduce.py table3 --steps 150             # configs/demo.yaml (tiny, L = 128), CPU minutes
    python tools/reproduce.py table6 --out repro             # reuses table3's runs in the same --out
    python tools/reproduce.py table3 --config configs/lm1b.yaml --steps 0 --set model.preset=small  # GPUs
    python tools/reproduce.py adaptation --quick             # AR -> block diffusion with each recipe, tiny
    python tools/reproduce.py adaptation --steps 500 --adapt-steps 250 --out runs/adaptation   # CPU, demo scale

Tables: table1 (AR vs AR + random batch vs L' = 1, Sec. 4.2), table2 (clipped schedules × L',
PPL and Var. ELBO, Sec. 5.3; Var. ELBO from `sad3 variance` where that command exists), table3
(AR, SEDD, MDLM, L' = 16, 8, 4, plus the T = 1000 D3PM bound of the MDLM weights), table6 (Gen.
PPL and NFEs of samples, scored by the AR run of this --out), adaptation (docs/adaptation.md: an AR model
pretrained on the corpus, adapted with each recipe of configs/adapt/ at L' = 4, against a SAD3-LM trained
from scratch for the same total tokens and the AR model's own NLL). Everything runs through the `sad3`
commands (train, eval, sample, eval-samples, variance), in process. Each stage writes its result
file and is skipped when that file exists; an interrupted training resumes from its last
checkpoint (train.resume=auto), so rerunning the same command picks up where it stopped.
Numbers are comparable with the paper's only in ordering: the paper trains 110M models on LM1B/OWT
for 1M steps, this trains what --config and --steps say on the bundled corpus by default.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from sad3_megatron.cli import main as sad3
from sad3_megatron.config import stage_sequence
from sad3_megatron.evaluation.plots import plot_bars, plot_curves, plot_points, read_run

QUICK = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64", "model.seq_len=32",
    "train.micro_batch_size=4", "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=1",
    "train.warmup_steps=1", "train.save_interval=1000", "train.progress_bar=false",
]  # fmt: skip

# The paper's numbers (test PPL; Table 3 and 1: LM1B, Table 6: OWT, L = 1024, T = 5000).
PAPER_TABLE3 = {"AR": "22.83", "SEDD": "≤ 32.71", "MDLM": "≤ 32.03", "L'=16": "≤ 30.67", "L'=8": "≤ 29.99",
                "L'=4": "≤ 28.33", "D3PM (absorb), T=1000": "≤ 82.34"}  # fmt: skip
PAPER_TABLE1 = {"AR": "22.88", "AR + random batch size": "24.37", "L'=1, linear": "≤ 25.56",
                "L'=1, tuned schedule (full masking)": "22.88"}  # fmt: skip
PAPER_TABLE6 = {"AR": ("34.04", "1024"), "L'=16": ("33.56", "1015"), "SSD-LM": ("36.54", "40K")}
PAPER_TABLE2 = {  # L' -> schedule -> (PPL, Var. ELBO)
    "128": {"U[0,.5]": (31.72, 1.03), "U[.3,.8]": (31.78, 1.35), "U[.5,1]": (31.92, 1.83), "U[0,1]": (31.78, 3.80)},
    "16": {"U[0,.5]": (31.27, 7.90), "U[.3,.8]": (31.19, 3.62), "U[.5,1]": (31.29, 3.63), "U[0,1]": (31.33, 7.39)},
    "4": {"U[0,.5]": (29.23, 32.68), "U[.3,.8]": (29.37, 10.39), "U[.5,1]": (29.16, 8.28), "U[0,1]": (29.23, 23.65)},
}
CLIPPED = {"U[0,.5]": (0.0, 0.5), "U[.3,.8]": (0.3, 0.8), "U[.5,1]": (0.5, 1.0), "U[0,1]": (0.0, 1.0)}


@dataclass
class Model:
    label: str
    name: str  # run directory name under --out/runs
    overrides: list[str]


def table3_models(seq_len: int) -> list[Model]:
    return [
        Model("AR", "ar", ["diffusion.objective=ar"]),
        Model("SEDD", "sedd", ["diffusion.objective=sedd", f"diffusion.block_size={seq_len}"]),
        Model("MDLM", "mdlm", [f"diffusion.block_size={seq_len}"]),
        *(Model(f"L'={b}", f"bd{b}", [f"diffusion.block_size={b}"]) for b in (16, 8, 4)),
    ]


class Reproduction:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.base = [*(QUICK if args.quick else []), *args.set]
        if args.steps:
            self.base.append(f"train.steps={args.steps}")
        self.seq_len = 32 if args.quick else self._config_value("model", "seq_len")
        self.draws = 2 if args.quick else args.draws
        self.max_sequences = 8 if args.quick else args.max_sequences

    def _config_value(self, section: str, key: str):
        from sad3_megatron.config import load_config

        return getattr(getattr(load_config(self.args.config, self.base), section), key)

    # -- stages -------------------------------------------------------------------------------------
    def stage(self, bar: tqdm, description: str, output: Path, run: Callable[[], object]) -> dict:
        """Run one stage unless its output exists; returns the stage's JSON result."""
        bar.set_description(description)
        if not output.is_file():
            result = run()
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result) + "\n")
        bar.update(1)
        return json.loads(output.read_text())

    def run_dir(self, model: Model) -> Path:
        return self.out / "runs" / model.name

    def train(self, model: Model) -> dict:
        run_dir = self.run_dir(model)
        overrides = [
            *self.base,
            *model.overrides,
            f"run.out_dir={run_dir}",
            f"run.name={model.name}",
            "train.resume=auto",
        ]
        self._sad3(["train", self.args.config, *overrides])
        if (run_dir / "preempted").exists():  # a signal stopped it at a checkpoint: this stage is not done
            raise SystemExit(f"reproduce: training {run_dir} was stopped by a signal; run the same command again to resume")
        return {"run_dir": str(run_dir), "overrides": overrides}

    def evaluate(self, model: Model, *extra: str) -> dict:
        argv = ["eval", str(self.run_dir(model)), "--split", "val", "--draws", str(self.draws), "--json", *extra]
        if self.max_sequences:
            argv += ["--max-sequences", str(self.max_sequences)]
        return _last_json(self._sad3(argv))

    def sample(self, model: Model, path: Path) -> dict:
        argv = ["sample", str(self.run_dir(model)), "--steps", str(self.args.sample_steps),  # BOS + sample = L tokens
                "--batch-size", str(self.args.samples), "--ignore-eos", "--stop-rule", "paper", "--out", str(path), "--json"]  # fmt: skip
        self._sad3(argv)
        evaluator = self.run_dir(Model("AR", "ar", []))
        return _last_json(self._sad3(["eval-samples", str(path), "--evaluator", str(evaluator), "--json"]))

    def _sad3(self, argv: list[str]) -> str:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            code = sad3(argv)
        if code != 0:
            raise SystemExit(f"reproduce: `sad3 {' '.join(argv)}` failed with exit code {code}")
        return captured.getvalue()

    # -- tables -------------------------------------------------------------------------------------
    def train_all(self, bar: tqdm, models: list[Model]) -> None:
        for m in models:
            self.stage(bar, f"train {m.label}", self.run_dir(m) / "reproduce_train.json", lambda m=m: self.train(m))

    def table3(self) -> str:
        models = table3_models(self.seq_len)
        bar = tqdm(total=2 * len(models) + 1, desc="table3", file=sys.stderr)
        self.train_all(bar, models)
        rows = {m.label: self.stage(bar, f"eval {m.label}", self.run_dir(m) / "eval.json", lambda m=m: self.evaluate(m))
                for m in models}  # fmt: skip
        mdlm = models[2]
        rows["D3PM (absorb), T=1000"] = self.stage(
            bar, "eval D3PM T=1000", self.run_dir(mdlm) / "eval_d3pm1000.json",
            lambda: self.evaluate(mdlm, "--discrete-steps", "1000"),
        )  # fmt: skip
        bar.close()
        curves = plot_curves([read_run(self.run_dir(m), m.label) for m in models], self.out / "table3_curves.png",
                             "Table 3 models: training loss and held-out bound")  # fmt: skip
        lines = ["| model | paper PPL (LM1B) | ours: NELBO (nats/token) | ours: PPL |", "|---|---|---|---|"]
        for label, r in rows.items():
            relation = "=" if r["exact"] else "≤"
            lines.append(
                f"| {label} | {PAPER_TABLE3[label]} | {r['nelbo_per_token']:.3f} ± {r['std_err']:.3f} | "
                f"{relation} {r['ppl']:.1f} ± {r['ppl_std_err']:.1f} |"
            )
        note = ("D3PM row: the MDLM weights under Eq. 3's T = 1000 discrete-time bound (the paper's D3PM is "
                "Austin et al.'s own 70M model).")  # fmt: skip
        return self._section("Table 3: likelihood at equal compute", lines, [curves], note, rows)

    def table6(self) -> str:
        models = [m for m in table3_models(self.seq_len) if m.label in ("AR", "SEDD", "MDLM", "L'=16", "L'=4")]
        bar = tqdm(total=2 * len(models), desc="table6", file=sys.stderr)
        self.train_all(bar, models)
        rows = {
            m.label: self.stage(bar, f"sample {m.label}", self.run_dir(m) / "gen.json",
                                lambda m=m: self.sample(m, self.run_dir(m) / "samples.json"))
            for m in models
        }  # fmt: skip
        bar.close()
        points = {label: (r["mean_nfe"], r["gen_ppl"]) for label, r in rows.items()}
        plot = plot_points(points, self.out / "table6_gen_ppl_nfe.png", "NFEs per sample", "Gen. PPL (under our AR)",
                           "Table 6: generative perplexity against NFEs")  # fmt: skip
        lines = ["| model | paper Gen. PPL / NFEs (OWT, L = 1024) | ours: Gen. PPL | ours: NFEs | tokens |",
                 "|---|---|---|---|---|"]  # fmt: skip
        for label, r in rows.items():
            paper = " / ".join(PAPER_TABLE6.get(label, ("—", "—")))
            lines.append(f"| {label} | {paper} | {r['gen_ppl']:.1f} | {r['mean_nfe']:.1f} | {r['mean_length']:.0f} |")
        note = (f"{self.args.samples} samples of {self.seq_len} tokens (BOS included) per model, T = {self.args.sample_steps} steps per block "
                "(SEDD: its Euler sampler; others: ancestral), scored by this --out's AR run, which also wrote "
                "the AR samples (so the AR row is optimistic).")  # fmt: skip
        return self._section("Table 6: generative perplexity and NFEs", lines, [plot], note, rows)

    def table1(self) -> str:
        models = [
            Model("AR", "ar", ["diffusion.objective=ar"]),
            Model("AR + random batch size", "ar_random", ["diffusion.objective=ar", "diffusion.ar_random_tokens=true"]),
            Model("L'=1, linear", "bd1_linear", ["diffusion.block_size=1", "diffusion.schedule=linear"]),
            Model("L'=1, tuned schedule (full masking)", "bd1_full",
                  ["diffusion.block_size=1", "diffusion.schedule=clipped", "diffusion.beta=1", "diffusion.omega=1"]),
        ]  # fmt: skip
        bar = tqdm(total=2 * len(models), desc="table1", file=sys.stderr)
        self.train_all(bar, models)
        rows = {m.label: self.stage(bar, f"eval {m.label}", self.run_dir(m) / "eval.json", lambda m=m: self.evaluate(m))
                for m in models}  # fmt: skip
        bar.close()
        runs = [read_run(self.run_dir(m), m.label) for m in models]
        curves = plot_curves(runs, self.out / "table1_curves.png", "Fig. 1: training NLL of single-token models")
        lines = ["| model | paper PPL (LM1B) | ours: held-out NELBO | ours: PPL | train-loss std (2nd half) |",
                 "|---|---|---|---|---|"]  # fmt: skip
        for (label, r), run in zip(rows.items(), runs, strict=True):
            tail = run.train_loss[len(run.train_loss) // 2 :]
            spread = _std(tail)
            relation = "=" if r["exact"] else "≤"
            lines.append(f"| {label} | {PAPER_TABLE1[label]} | {r['nelbo_per_token']:.3f} ± {r['std_err']:.3f} | "
                         f"{relation} {r['ppl']:.1f} | {spread:.3f} |")  # fmt: skip
        note = "The spread of the logged training loss stands in for Fig. 1's training-loss variance."
        return self._section("Table 1: single-token generation", lines, [curves], note, rows)

    def table2(self) -> str:
        blocks = [self.seq_len, 16, 4]
        models = [Model(f"L'={b}, {s}", f"bd{b}_{s.strip('U[]').replace(',', '-').replace('.', '')}",
                        [f"diffusion.block_size={b}", "diffusion.schedule=clipped", f"diffusion.beta={lo}", f"diffusion.omega={hi}"])
                  for b in blocks for s, (lo, hi) in CLIPPED.items()]  # fmt: skip
        bar = tqdm(total=3 * len(models), desc="table2", file=sys.stderr)
        self.train_all(bar, models)
        rows = {}
        for m in models:
            r = self.stage(bar, f"eval {m.label}", self.run_dir(m) / "eval.json", lambda m=m: self.evaluate(m))
            r["variance"] = self.stage(bar, f"variance {m.label}", self.run_dir(m) / "variance.json",
                                       lambda m=m: self.variance(m))  # fmt: skip
            rows[m.label] = r
        bar.close()
        var = {f"L'={b}": {s: _variance_value(rows[f"L'={b}, {s}"]["variance"]) for s in CLIPPED} for b in blocks}
        plots = [
            plot_bars(var, self.out / "table2_variance.png", "Var. ELBO", "Var. ELBO by clipped schedule", log=True)
        ]
        lines = [
            "| L' | schedule | paper PPL / Var. ELBO (LM1B) | ours: PPL | ours: Var. ELBO |",
            "|---|---|---|---|---|",
        ]
        for b in blocks:
            for s in CLIPPED:
                r = rows[f"L'={b}, {s}"]
                paper = PAPER_TABLE2.get(str(b) if b != self.seq_len else "128", {}).get(s)
                paper_text = f"{paper[0]} / {paper[1]}" if paper else "—"
                v = _variance_value(r["variance"])
                v_text = "n/a" if math.isnan(v) else f"{v:.3f}"
                lines.append(f"| {b} | {s} | {paper_text} | ≤ {r['ppl']:.1f} | {v_text} |")
        note = ("Var. ELBO is `sad3 variance RUN --json`'s per_block value (Table 7's scale); n/a where that "
                "command is not available. Paper row L' = 128 is compared with our L' = L.")  # fmt: skip
        return self._section("Table 2: clipped schedules", lines, plots, note, rows)

    def adaptation(self) -> str:
        """AR pretraining, each recipe of configs/adapt/ from its weights, a SAD3-LM from scratch for the same
        total steps, then bounds, Gen. PPL under the AR model, NFEs and confident decoding (docs/adaptation.md)."""
        a = Adaptation(self)
        stages = sum(len(stage_sequence(recipe)) for recipe in ADAPT_RECIPES.values())
        diffusion_models = len(ADAPT_RECIPES) + 1  # each: eval, 1 + len(THRESHOLDS) samplings, confidence
        total = 2 + stages + 2 + diffusion_models * (3 + len(THRESHOLDS))  # + AR's training, eval and sampling
        bar = tqdm(total=total, desc="adaptation", file=sys.stderr)
        self.stage(bar, "train AR", a.run_dir("ar") / "reproduce_train.json",
                   lambda: a.train("ar", [*ADAPT_ARCHITECTURE, "diffusion.objective=ar"]))  # fmt: skip
        base, base_note = a.base_weights()
        total = a.ar_steps + a.adapt_steps
        self.stage(bar, "train scratch", a.run_dir("scratch") / "reproduce_train.json",
                   lambda: a.train("scratch", [*ADAPT_ARCHITECTURE, f"diffusion.block_size={ADAPT_BLOCK}", f"train.steps={total}"]))  # fmt: skip
        runs = {"AR": a.run_dir("ar"), f"scratch L'={ADAPT_BLOCK}": a.run_dir("scratch")}
        for label, recipe in ADAPT_RECIPES.items():
            runs[label] = a.adapt(bar, label, recipe, base)
        rows = {}
        for label, run in runs.items():
            row = {"run": str(run)}
            row["eval"] = self.stage(bar, f"eval {label}", run / "eval.json", lambda r=run: self.evaluate_run(r))
            autoregressive = label == "AR"
            decoding = [("ancestral", [])] if autoregressive else [("ancestral", ["--steps", "1000"])] + [
                (f"confident{t}", ["--sampler", "confident", "--threshold", str(t), "--steps", str(ADAPT_BLOCK)])
                for t in THRESHOLDS]  # fmt: skip
            for tag, settings in decoding:
                row[tag] = self.stage(bar, f"sample {label} {tag}", run / f"gen_{tag}.json",
                                      lambda r=run, t=tag, s=settings: a.sample(r, t, *s))  # fmt: skip
            if not autoregressive:
                row["confidence"] = self.stage(bar, f"confidence {label}", run / "confidence.json",
                                               lambda r=run: a.confidence(r))  # fmt: skip
            rows[label] = row
        bar.close()
        return adaptation_report(self, a, rows, base_note)

    def evaluate_run(self, run: Path) -> dict:
        argv = ["eval", str(run), "--split", "val", "--draws", str(self.draws), "--json"]
        if self.max_sequences:
            argv += ["--max-sequences", str(self.max_sequences)]
        return _last_json(self._sad3(argv))

    def variance(self, model: Model) -> dict:
        try:
            return _last_json(self._sad3(["variance", str(self.run_dir(model)), "--json"]))
        except SystemExit as err:  # the command may not exist in this checkout
            return {"error": str(err)}

    def _section(self, title: str, lines: list[str], plots: list[Path], note: str, rows: dict) -> str:
        (self.out / f"{title.split(':')[0].lower().replace(' ', '')}.json").write_text(json.dumps(rows, indent=1))
        images = "\n".join(f"![{p.stem}]({p.name})" for p in plots)
        return f"## {title}\n\n" + "\n".join(lines) + f"\n\n{note}\n\n{images}\n"


ADAPT_RECIPES = {  # label -> recipe (configs/adapt/): its diffusion switches and curriculum, at demo scale
    "SDAR": "configs/adapt/sdar.yaml",
    "Fast-dLLM v2": "configs/adapt/fast_dllm_v2.yaml",
    "Nemotron": "configs/adapt/nemotron.yaml",
    "LLaDA2 curriculum": "configs/adapt/llada2_curriculum.yaml",
}
ADAPT_BLOCK = 4  # every adapted model ends at L' = 4, as the scratch model
# The AR base and the scratch model: the config's preset as a llama-style decoder (RMSNorm, SwiGLU without
# biases, grouped-query attention), so the base exports as transformers' own LlamaForCausalLM.
ADAPT_ARCHITECTURE = ["model.norm=rmsnorm", "model.mlp=swiglu", "model.mlp_bias=false", "model.num_kv_heads=2"]
THRESHOLDS = (0.9, 0.7, 0.5)  # confident decoding


def recipe_stages(path: str, seq_len: int, steps: int) -> list[tuple[str, list[str]]]:
    """(stage, diffusion overrides) of a recipe at demo scale: its `diffusion:` section and each curriculum
    stage's diffusion keys, block sizes scaled to L (the recipe's L' = L stays L', others are capped at L),
    the last stage at L' = ADAPT_BLOCK, `steps` split over the stages, the [MASK] noise's decay scaled alike."""
    raw = yaml.safe_load(Path(path).read_text())
    recipe_len, recipe_steps = raw["model"]["seq_len"], raw["train"]["steps"]
    names = stage_sequence(path)
    base = {k: v for k, v in raw["diffusion"].items() if k != "schedule_search"}  # the search: see adaptation()
    out = []
    for i, name in enumerate(names):
        keys = {**base, **{k.split(".", 1)[1]: v for k, v in raw["stages"][name].items() if k.startswith("diffusion.")}}
        block = keys.get("block_size", ADAPT_BLOCK)
        keys["block_size"] = ADAPT_BLOCK if i == len(names) - 1 else (seq_len if block == recipe_len else min(block, seq_len))
        stage_steps = steps // len(names) + (steps % len(names) if i == len(names) - 1 else 0)
        if keys.get("mask_embedding_noise"):
            keys["mask_embedding_noise_steps"] = max(1, round(stage_steps * keys["mask_embedding_noise_steps"] / recipe_steps))
        overrides = [f"diffusion.{k}={json.dumps(v)}" for k, v in keys.items()] + [f"train.steps={max(stage_steps, 1)}"]
        if raw["diffusion"].get("schedule_search", "off") != "off":
            overrides += [f"diffusion.schedule_search={raw['diffusion']['schedule_search']}", "diffusion.search_batches=4"]
        out.append((name, overrides))
    return out


class Adaptation:
    """`tools/reproduce.py adaptation`: the stages, each resumable through Reproduction.stage."""

    def __init__(self, repro: Reproduction):
        self.repro, self.out, self.args = repro, repro.out, repro.args
        self.ar_steps = repro._config_value("train", "steps")
        self.adapt_steps = self.args.adapt_steps or max(1, self.ar_steps // 2)
        self.samples = 2 if self.args.quick else self.args.samples

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def train(self, name: str, overrides: list[str]) -> dict:
        return self.repro.train(Model(name, name, [*overrides, f"run.name={name}"]))

    def base_weights(self) -> tuple[str, str]:
        """What the recipes start from: the AR run exported as transformers' own model (no sad3 code), as a
        pretrained base is found in the wild."""
        target = self.out / "ar_transformers"
        if not (target / "config.json").is_file():
            self.repro._sad3(["export", str(self.run_dir("ar")), str(target), "--format", "transformers"])
        return str(target), "the AR run exported by `sad3 export --format transformers` (a LlamaForCausalLM)"

    def adapt(self, bar: tqdm, label: str, recipe: str, base: str) -> Path:
        stages = recipe_stages(recipe, self.repro.seq_len, self.adapt_steps)
        init, name = base, ""
        for stage, overrides in stages:
            name = f"{Path(recipe).stem}-{stage}"
            run = self.run_dir(name)
            start = [f"train.init_from={init}", f"data.tokenizer={base}"]  # the base's tokenizer: the same ids
            self.repro.stage(bar, f"{label}: {stage}", run / "reproduce_train.json",
                             lambda o=overrides, n=name, s=start: self.train(n, [*o, *s]))  # fmt: skip
            init = str(run)
        return self.run_dir(name)

    def sample(self, run: Path, tag: str, *settings: str) -> dict:
        path = run / f"samples_{tag}.json"
        argv = ["sample", str(run), "--batch-size", str(self.samples), "--ignore-eos", "--min-entropy", "0",
                "--seed", "0", "--out", str(path), "--json", *settings]  # fmt: skip
        self.repro._sad3(argv)
        result = _last_json(self.repro._sad3(["eval-samples", str(path), "--evaluator", str(self.run_dir("ar")), "--json"]))
        result["nfe_per_token"] = result["mean_nfe"] / max(result["mean_length"], 1)
        return result

    def confidence(self, run: Path) -> dict:
        """Median top probability of x_θ over fully masked held-out blocks: what confident decoding sees
        at each block's first step (1 NFE per token unless it often exceeds the threshold)."""
        return median_top_probability(run, max_sequences=8 if self.args.quick else 64)


def median_top_probability(run: Path, max_sequences: int) -> dict:
    import torch

    from sad3_megatron.core.likelihood import rows_and_documents
    from sad3_megatron.data.corpus import load_corpus
    from sad3_megatron.engine.build import load_components

    with contextlib.redirect_stdout(io.StringIO()):
        parts, _ = load_components(run, backend="sdpa")
    objective = parts.objective.bound()
    val = load_corpus(parts.cfg.data, parts.tokenizer, parts.cfg.model.seq_len).val
    x, _, _ = rows_and_documents(val, 0, min(max_sequences, len(val)), parts.device)
    x_t = x.clone()
    x_t[:, 1:] = parts.tokenizer.mask_id  # every block fully masked, given its clean prefix (BOS stays)
    with torch.no_grad():
        tokens = torch.cat([x_t, x], dim=1) if objective.doubled else x_t
        logits = parts.model(tokens, objective.positions, objective.mask, num_outputs=objective.num_outputs).logits
        top = logits[:, objective.target_rows].softmax(-1).max(-1).values[:, 1:]
    first = top[:, [i - 1 for i in range(1, top.shape[1] + 1) if i % objective.block_size == 0]]
    return {"median_top_p": top.median().item(), "median_top_p_block_first": first.median().item() if first.numel() else None}


def adaptation_report(repro: Reproduction, a: Adaptation, rows: dict, base_note: str) -> str:
    """The section: the bound / Gen. PPL / NFE table, confident decoding per threshold, plots, notes."""
    curves = plot_curves([read_run(Path(r["run"]), label) for label, r in rows.items()],
                         repro.out / "adaptation_curves.png", "AR pretraining, adaptation and scratch")  # fmt: skip
    points = {}
    lines = ["| model | held-out bound (nats/token) | PPL | Gen. PPL (under AR) | NFEs / token | tokens/s | unigram entropy |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in rows.items():
        e, g = r["eval"], r["ancestral"]
        relation = "=" if e["exact"] else "≤"
        lines.append(f"| {label} | {e['nelbo_per_token']:.3f} ± {e['std_err']:.3f} | {relation} {e['ppl']:.1f} | "
                     f"{g['gen_ppl']:.1f} | {g['nfe_per_token']:.2f} | {g['mean_tokens_per_s']:.0f} | "
                     f"{g['mean_unigram_entropy']:.2f} |")  # fmt: skip
        points[f"{label} (T=1000)" if label != "AR" else "AR"] = (g["nfe_per_token"], g["gen_ppl"])
    confident = ["| model | median top p (first / all) | " + " | ".join(
        f"θ={t}: NFEs/token, tokens/s, Gen. PPL" for t in THRESHOLDS) + " |", "|---|---|" + "---|" * len(THRESHOLDS)]
    for label, r in rows.items():
        if label == "AR":
            g = r["ancestral"]
            cells = [f"1.00, {g['mean_tokens_per_s']:.0f}, {g['gen_ppl']:.1f} (AR decoding)"] * len(THRESHOLDS)
            confident.append("| AR | — | " + " | ".join(cells) + " |")
            continue
        c = r["confidence"]
        cells = []
        for t in THRESHOLDS:
            g = r[f"confident{t}"]
            cells.append(f"{g['nfe_per_token']:.2f}, {g['mean_tokens_per_s']:.0f}, {g['gen_ppl']:.1f}")
            points[f"{label} θ={t}"] = (g["nfe_per_token"], g["gen_ppl"])
        first = "n/a" if c["median_top_p_block_first"] is None else f"{c['median_top_p_block_first']:.2f}"
        confident.append(f"| {label} | {first} / {c['median_top_p']:.2f} | " + " | ".join(cells) + " |")
    plot = plot_points(points, repro.out / "adaptation_gen_ppl_nfe.png", "NFEs per token", "Gen. PPL (under the AR model)",
                       "Gen. PPL against NFEs per token")  # fmt: skip
    note = (f"AR: {a.ar_steps} steps; every recipe starts from {base_note} and trains {a.adapt_steps} steps in all "
            f"(LLaDA2: spread over its curriculum's stages, block sizes scaled to L = {repro.seq_len}); the scratch "
            f"SAD3-LM trains {a.ar_steps + a.adapt_steps} steps at L' = {ADAPT_BLOCK} (the same total tokens). Recipes "
            "keep their diffusion switches and curricula; model, data and optimizer are the base config's for every "
            f"row. Bounds: `sad3 eval --split val` (the true NELBO whatever the training weights; exact for AR). "
            f"Samples: {a.samples} per setting, L tokens with BOS, no stop rule, scored by the AR run; T = 1000 "
            "ancestral steps per block (1 NFE per token), confident decoding with at most L' steps per block. "
            "Median top p: x_θ's largest probability on fully masked held-out blocks (first token of a block / all).")  # fmt: skip
    sections = "\n".join(lines) + "\n\n### Confident decoding\n\n" + "\n".join(confident)
    return repro._section("Adaptation: from an AR checkpoint to a SAD3-LM", [sections], [curves, plot], note, rows)


def _last_json(text: str) -> dict:
    """The JSON object a `sad3 ... --json` printed last (libraries may print on stdout before it,
    e.g. a prompt without a newline)."""
    for line in reversed(text.splitlines()):
        if "{" in line:
            return json.loads(line[line.index("{") :])
    raise SystemExit(f"reproduce: no JSON in the output: {text[-300:]!r}")


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _variance_value(result: dict) -> float:
    value = result.get(
        "per_block", result.get("elbo", {}).get("per_block") if isinstance(result.get("elbo"), dict) else None
    )
    return float(value) if value is not None else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", choices=["table1", "table2", "table3", "table6", "adaptation"])
    parser.add_argument("--out", default="runs/reproduce", help="where runs, results, report.md and plots go")
    parser.add_argument("--config", default="configs/demo.yaml", help="base config of every model")
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps: a CPU smoke run")
    parser.add_argument("--steps", type=int, default=0, help="train.steps for every model (0: the config's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="more overrides")
    parser.add_argument("--draws", type=int, default=8, help="Monte-Carlo draws of t for the bounds")
    parser.add_argument("--max-sequences", type=int, default=0, help="held-out sequences scored (0: all)")
    parser.add_argument("--samples", type=int, default=4, help="table6: samples per model")
    parser.add_argument("--sample-steps", type=int, default=1000, help="table6: T per block")
    parser.add_argument("--adapt-steps", type=int, default=0, help="adaptation: steps of each recipe (0: half of AR's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = args.steps or 4
        args.samples, args.sample_steps = min(args.samples, 2), min(args.sample_steps, 8)
    repro = Reproduction(args)
    sections = [getattr(repro, table)() for table in args.tables]
    header = (f"# sad3: the paper's tables at small scale\n\nCommand: `python tools/reproduce.py {' '.join(argv or sys.argv[1:])}`"
              f"; base config {args.config} with overrides {repro.base or 'none'}.\n")  # fmt: skip
    report = repro.out / "report.md"
    report.write_text(header + "\n" + "\n".join(sections))
    print(f"reproduce: wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
