"""The variance machinery of Sec. 4.3 / 5.3: Eq. 9 against gradients taken batch by batch and a variance
written out by hand, Var. ELBO against closed forms on a stub denoiser with a designed loss, the
schedule search picking a known minimum, and DP = 2 (gloo) giving the single-process variances."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.objectives import BlockDiffusionObjective
from sad3_megatron.core.schedules import make_schedule, parse_grid, reference_grid
from sad3_megatron.core.variance import GradientSums, batch_gradient, block_losses, elbo_variance
from sad3_megatron.engine.schedule_search import ScheduleSearch

ROOT = Path(__file__).resolve().parent.parent


def test_gradient_variance_equals_eq_9_by_hand(tiny):
    """Eq. 9: (1/(M-1)) Σ_m ‖g_m - ḡ‖² of M independent minibatch gradients, here taken one batch at a time
    with .backward() and stacked, against the streaming sums of diffusion/variance.py."""
    model = tiny.model(seed=5)
    objective = BlockDiffusionObjective(16, 4, make_schedule("clipped", 0.3, 0.8), tiny.mask_id)
    batches = [tiny.tokens(3, 16, seed=m) for m in range(5)]
    stacked = []
    for m, x in enumerate(batches):
        model.zero_grad()
        objective(model, x, torch.Generator().manual_seed(m)).loss.backward()
        stacked.append(torch.cat([p.grad.double().reshape(-1) for p in model.parameters()]))
    g = torch.stack(stacked)
    by_hand = ((g - g.mean(0)) ** 2).sum().item() / (len(batches) - 1)
    sums = GradientSums()
    params = list(model.parameters())
    for m, x in enumerate(batches):
        sums.add(batch_gradient(model, objective, x, torch.Generator().manual_seed(m), params))
    result = sums.result()
    assert result.variance == pytest.approx(by_hand, rel=1e-9) and result.batches == 5
    assert result.parameters == g.shape[1] and result.variance > 0


class ConstantLoss:
    """A stub denoiser whose -log p is `c` at every position: the Eq. 8 term of a block is then c·k/(n t),
    k ~ Binomial(n, t), with closed-form moments."""

    training = False

    def __init__(self, c: float):
        self.c = c

    def __call__(self, tokens, positions, mask, *, num_outputs=None, labels=None, **_):
        return SimpleNamespace(token_nll=torch.full(labels.shape, self.c))

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def clipped_var_elbo(c: float, n: int, beta: float, omega: float) -> float:
    """Var of c·k/(n t), k | t ~ Bin(n, t), t ~ U[β, ω]: E[· | t] = c, so Var = c²/n · (E[1/t] - 1)."""
    return c * c / n * (math.log(omega / beta) / (omega - beta) - 1.0)


def test_var_elbo_matches_the_closed_form_on_a_designed_loss(tiny):
    c, n = 1.5, 4
    objective = BlockDiffusionObjective(64, n, make_schedule("linear"), tiny.mask_id, clean_prefix=0)
    x = torch.zeros(800, 64, dtype=torch.long)
    losses = block_losses(
        ConstantLoss(c), objective, x, torch.Generator().manual_seed(0), make_schedule("clipped", 0.3, 0.8)
    )
    stats = elbo_variance(losses, objective)
    assert stats.per_block == pytest.approx(clipped_var_elbo(c, n, 0.3, 0.8), rel=0.05)
    assert stats.mean == pytest.approx(c, rel=0.01)  # 1/t weights: each block's term has mean c
    # a sequence's per-token NELBO averages its 16 blocks, whose noise is independent
    assert stats.per_sequence == pytest.approx(clipped_var_elbo(c, n, 0.3, 0.8) / 16, rel=0.15)


def test_search_picks_the_known_minimum(tiny):
    """On the designed loss, Var. ELBO ∝ ln(ω/β)/(ω - β) - 1: of these ranges U[0.5, 1] has the least."""
    grid = [(0.1, 0.6), (0.3, 0.8), (0.5, 1.0), (0.45, 0.95)]
    objective = BlockDiffusionObjective(64, 4, make_schedule("linear"), tiny.mask_id, clean_prefix=0)
    search = ScheduleSearch(grid, "elbo", batches=50, batch_size=16)
    result = search.run(
        ConstantLoss(1.0), objective, torch.zeros(800, 64, dtype=torch.long).numpy(), torch.device("cpu")
    )
    for cand, (beta, omega) in zip(result.candidates, grid, strict=True):
        assert cand.variance == pytest.approx(clipped_var_elbo(1.0, 4, beta, omega), rel=0.06)
    assert (result.best.t_min, result.best.t_max) == (0.5, 1.0)
    metrics = result.metrics()
    assert metrics["search/beta"] == 0.5 and metrics["search/omega"] == 1.0 and len(metrics) == len(grid) + 2


def test_reference_grid_and_grid_specs():
    grid = reference_grid(16)
    assert len(grid) == 36 and grid[0] == (0.001, 1.0) and (0.3, 0.8) in grid and (0.45, 0.95) in grid
    assert all(0.5 - 1e-9 <= w - max(b, 0.0) <= 0.9 + 1e-9 or b == 0.001 for b, w in grid)
    assert reference_grid(1) == [(0.001, 1.0), (1.0, 1.0)]
    assert parse_grid("0.3:0.8,0.45:0.95", 4) == [(0.3, 0.8), (0.45, 0.95)]
    with pytest.raises(Sad3Error, match="BETA:OMEGA"):
        parse_grid("0.3-0.8", 4)
    with pytest.raises(Sad3Error, match="beta <= omega"):
        parse_grid("0.8:0.3", 4)


def run_worker(out: Path, nproc: int) -> dict:
    script = str(ROOT / "tests/workers/schedule_search_dp.py")
    if nproc == 1:
        cmd = [sys.executable, script, str(out)]
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [torchrun, f"--nproc_per_node={nproc}", f"--master_port={port}", script, str(out)]
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_search_over_two_data_parallel_ranks_equals_one_process(tmp_path):
    """Each rank scores a disjoint share of the batches (5 batches: 3 and 2); gathered per-block losses and
    all-reduced gradient sums give the single-process variances of both criteria."""
    one = run_worker(tmp_path / "one.json", 1)
    two = run_worker(tmp_path / "two.json", 2)
    for criterion in ("elbo", "grad"):
        assert all(v > 0 for v in one[criterion])
        assert two[criterion] == pytest.approx(one[criterion], rel=1e-6)


@pytest.mark.parametrize(
    "override,message",
    [
        ("diffusion.schedule_search=best", "unknown diffusion.schedule_search"),
        ("diffusion.search_batches=0", "search_batches must be at least 1"),
        ("diffusion.search_grid=0.3-0.8", "BETA:OMEGA"),
        ("diffusion.masking=sometimes", "unknown masking"),
        ("diffusion.masking=count", "integrates t out"),
        ("diffusion.t_floor=1.5", "t floor"),
        ("data.framing=pages", "unknown data.framing"),
    ],
)
def test_bad_variance_and_framing_keys_are_one_line_errors(override, message):
    from sad3_megatron.config import load_config

    with pytest.raises(Sad3Error, match=message):
        load_config(ROOT / "configs/demo.yaml", [override])


def test_search_needs_a_diffusion_objective_and_whole_models():
    from sad3_megatron.config import load_config

    demo = ROOT / "configs/demo.yaml"
    with pytest.raises(Sad3Error, match="objective=ar"):
        load_config(demo, ["diffusion.schedule_search=elbo", "diffusion.objective=ar"])
    with pytest.raises(Sad3Error, match="masking=bernoulli or resample"):
        load_config(demo, ["diffusion.schedule_search=elbo", "diffusion.schedule=linear", "diffusion.masking=count"])
    with pytest.raises(Sad3Error, match="whole gradients"):
        load_config(demo, ["diffusion.schedule_search=grad", "parallel.tensor_parallel=2"])
    cfg = load_config(demo, ["diffusion.schedule_search=grad", "diffusion.search_grid=0.3:0.8,0.45:0.95"])
    search = ScheduleSearch.from_config(cfg)
    assert [(s.t_min, s.t_max) for s in search.schedules] == [(0.3, 0.8), (0.45, 0.95)] and search.criterion == "grad"


@pytest.mark.slow
def test_variance_command_prints_rows_json_and_a_plot(tmp_path, capsys):
    """`sad3 variance` on a 2-step checkpoint: one row per (L', schedule), both variances, and the PNG."""
    from sad3_megatron.cli import main

    small = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.ffn_hidden_size=256"]
    run = tmp_path / "run"
    args = ["train", str(ROOT / "configs/demo.yaml"), *small, "model.seq_len=64", "train.steps=2"]
    assert main([*args, "train.eval_interval=2", "train.progress_bar=false", f"run.out_dir={run}"]) == 0
    capsys.readouterr()
    png = tmp_path / "var.png"
    argv = ["variance", str(run), "--block-size", "4,16", "--schedules", "linear,clipped:0.3:0.8", "--batches", "2"]
    assert main([*argv, "--batch-size", "2", "--json", "--plot", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [(r["block_size"], r["schedule"]) for r in rows] == [
        (4, "linear[0.001,1]"), (4, "clipped[0.3,0.8]"), (16, "linear[0.001,1]"), (16, "clipped[0.3,0.8]")
    ]  # fmt: skip
    assert all(r["elbo"]["per_block"] > 0 and r["grad"]["variance"] > 0 for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["variance", str(run), "--schedules", "clipped"]) == 2
    assert "needs its range" in capsys.readouterr().err


SEARCH_RUN = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64", "model.seq_len=32",
    "train.micro_batch_size=4", "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=2",
    "train.save_interval=2", "train.keep_last=5", "train.steps=6", "train.progress_bar=false", "train.warmup_steps=1",
    "diffusion.schedule_search=elbo", "diffusion.search_batches=3",
    "diffusion.search_grid=0.05:0.55,0.3:0.8,0.5:1.0",
]  # fmt: skip


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_with_the_search_resumes_exactly_after_sigkill(tmp_path):
    """The search's choices are training state: a run killed mid-way (after the step-4 checkpoint)
    and resumed makes the same choices and the same losses as one that was never interrupted, and
    every checkpoint's config records the schedule then in use (what eval, sample and export read)."""
    import signal
    import time

    import yaml

    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # this process's group, not theirs
    env = {k: v for k, v in os.environ.items() if k not in launcher} | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    sad3 = str(Path(sys.executable).parent / "sad3")

    def command(out: Path) -> list[str]:
        return [sad3, "train", "configs/demo.yaml", *SEARCH_RUN, f"run.out_dir={out}"]

    def train(out: Path) -> None:
        proc = subprocess.run(command(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train(tmp_path / "straight")
    victim = tmp_path / "killed"
    proc = subprocess.Popen(command(victim), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (victim / "checkpoints" / "step_0000004" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (victim / "checkpoints" / "step_0000006").exists()  # it died mid-run
    train(victim)

    straight, resumed = records(tmp_path / "straight"), records(victim)
    drop = {"elapsed", "tokens_per_s", "tflops_per_device", "mfu", "max_rss_gib", "max_gpu_mem_gib"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight
    ]
    choices = [(r["step"], r["search/beta"], r["search/omega"]) for r in straight if "search/beta" in r]
    assert [step for step, *_ in choices] == [2, 4, 6]
    for step, beta, omega in choices:
        saved = yaml.safe_load((victim / "checkpoints" / f"step_{step:07d}" / "config.yaml").read_text())["diffusion"]
        assert (saved["schedule"], saved["beta"], saved["omega"]) == ("clipped", beta, omega)
