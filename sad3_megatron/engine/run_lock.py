"""One training job per run directory: `run.lock`, held by the job's writer rank (global rank 0).

The lock file is created with O_CREAT | O_EXCL (atomic, also on NFS v3+ and Lustre) and holds
{host, pid, started, job, restart}: the Slurm job id and restart count when there are any. While
the job runs, a daemon thread refreshes the file's mtime every `stale_after / 10` seconds (the
heartbeat) and the lock is removed when the job ends (normally, by an error, or at exit).

A lock is stale, and taken over with a warning, when
- its holder ran on this host and that process is gone (os.kill(pid, 0));
- it was written by an earlier run of this same Slurm job (same SLURM_JOB_ID, lower
  SLURM_RESTART_COUNT: a requeued job, which may land on other nodes);
- its holder is on another host and the heartbeat stopped more than `stale_after` seconds ago
  ($SAD3_LOCK_STALE_S, default 600; the hosts' clocks are assumed to agree to well within that).
Otherwise the new job is refused in one line naming the holder. Two jobs judging the same stale lock
at once are serialised by a second O_EXCL file (run.lock.takeover), so only one takes it over.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from sad3_megatron.core.errors import Sad3Error

LOCK = "run.lock"
_HELD: dict[Path, RunLock] = {}  # the locks this process holds, by run directory
STALE_ENV = "SAD3_LOCK_STALE_S"
DEFAULT_STALE_S = 600.0


def _stale_after() -> float:
    try:
        return float(os.environ.get(STALE_ENV, DEFAULT_STALE_S))
    except ValueError:
        raise Sad3Error(f"${STALE_ENV} must be a number of seconds, got {os.environ[STALE_ENV]!r}") from None


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "job": os.environ.get("SLURM_JOB_ID"),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"


def stale_reason(holder: dict, age_s: float, me: dict, stale_after: float) -> str | None:
    """Why the lock `holder` wrote (its file last touched `age_s` ago) no longer holds, or None."""
    if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
        return "this process took it earlier"
    if holder.get("job") and holder.get("job") == me["job"] and int(holder.get("restart", 0)) < me["restart"]:
        return "an earlier run of this requeued Slurm job"
    if holder.get("host") == me["host"]:
        return None if _alive(int(holder.get("pid", -1))) else "that process is gone"
    if age_s > stale_after:
        return f"no heartbeat for {age_s:.0f} s (over ${STALE_ENV}={stale_after:g})"
    return None


class RunLock:
    """The lock on one run directory (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.me = _me()
        self.stale_after = _stale_after()
        self._stop = threading.Event()
        self._held = False

    def acquire(self) -> None:
        """Take the lock, or raise a one-line Sad3Error naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder may vanish between the attempts
            if self._create():
                return self._start_heartbeat()
            holder, age = self._read()
            if holder is None:
                continue
            reason = stale_reason(holder, age, self.me, self.stale_after)
            if reason is None:
                raise Sad3Error(
                    f"run directory {str(self.path.parent)!r} is in use by another sad3 train ({describe(holder)}; "
                    f"{self.path.name}): wait for it, stop it, or use another run.out_dir"
                )
            if self._take_over(holder, reason):
                return self._start_heartbeat()
        raise Sad3Error(f"could not take the lock {str(self.path)!r}: another job is starting there; retry")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _read(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):
            holder = {"host": "?", "pid": -1, "started": "? (unreadable lock)"}
        return holder, age

    def _take_over(self, holder: dict, reason: str) -> bool:
        """Replace a stale lock, one contender at a time (run.lock.takeover, itself dropped when old)."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            if time.time() - guard.stat().st_mtime > 60:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        try:
            if self._read()[0] != holder:
                return False  # it changed meanwhile: judge again
            if reason != "this process took it earlier":
                print(f"sad3: warning: taking over the stale lock {str(self.path)!r} ({describe(holder)}: {reason})", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            return self._create()
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._held = True
        _HELD[self.path.parent.resolve()] = self
        atexit.register(self.release)
        interval = max(self.stale_after / 10, 0.05)
        threading.Thread(target=self._beat, args=(interval,), daemon=True, name="sad3-run-lock").start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a transient filesystem error: the next beat retries

    def release(self) -> None:
        """Drop the lock if this process holds it (idempotent)."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        _HELD.pop(self.path.parent.resolve(), None)
        holder, _ = self._read()
        if holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)


def lock_run(run_dir: Path) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank raises the same one-line error if it can't.
    Returns the lock on rank 0 (None elsewhere)."""
    lock, problem = None, [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except Sad3Error as err:
            lock, problem = None, [str(err)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        if lock is not None:
            lock.release()
        raise Sad3Error(problem[0])
    return lock


def release_run(run_dir: Path) -> None:
    """Release this process's lock on `run_dir`, if it holds one (when setting up a run failed)."""
    lock = _HELD.get(Path(run_dir).resolve())
    if lock is not None:
        lock.release()
