"""metrics.jsonl (one line per logged step) and a rank-0 progress bar."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sad3_megatron.config import Config
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.likelihood import held_out_words


class MetricsLog:
    def __init__(
        self,
        path: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        progress_bar: bool,
        wandb_mode: str = "off",
        config: Config | None = None,
    ):
        """Append to `path`, first dropping records past `start_step` (left by a run that died after
        logging but before its next checkpoint), so the file always describes one consistent run."""
        self.enabled = enabled
        self.file = None
        if enabled:
            kept = (
                [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
                if path.exists()
                else []
            )
            path.write_text("".join(line + "\n" for line in kept))
            self.file = path.open("a")
        self.wandb = _start_wandb(wandb_mode, path.parent, config) if enabled and wandb_mode != "off" else None
        # disable=None turns the bar off when stdout is not a terminal (CI logs); eval lines are printed instead.
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=None if enabled and progress_bar else True,
            dynamic_ncols=True,
            unit="step",
        )

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = strict_record(record)
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])
        self.file.flush()
        shown = {k: record[k] for k in ("loss", "val_nelbo", "lr", "tokens_per_s") if record.get(k) is not None}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        if record.get("val_nelbo") is not None:
            words = held_out_words(record["val_nelbo"], record["val_ppl"], record.get("val_exact", False))
            self.bar.write(f"step {record['step']}: {words}")

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.file:
            self.file.close()


def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """metrics.jsonl stays strict JSON: a NaN or infinite float becomes null, and its key is listed
    under "nonfinite" (so a NaN loss reads as `"loss": null, "nonfinite": ["loss"]`)."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}


def _start_wandb(mode: str, run_dir: Path, config: Config | None):
    """A wandb run tied to the run directory, so a resumed run continues the same wandb run."""
    try:
        import wandb
    except ImportError:
        raise Sad3Error(
            f"train.wandb={mode} needs the wandb package: pip install -e '.[wandb]', or set train.wandb=off"
        ) from None
    run_id = "sad3-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
    return wandb.init(
        project="sad3", name=config.run.name if config else None, id=run_id, resume="allow", mode=mode,
        dir=str(run_dir), config=config.to_dict() if config else None,
    )  # fmt: skip
