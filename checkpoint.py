"""A run's folder for evolve.py: crash-safe rounds, metrics.jsonl, its plot and the end-of-run tables.

A round folder appears whole or not at all.
A round is written into out/.round_r.tmp, every file is fsynced, then the folder is renamed to out/round_r
(a rename is atomic), so a kill at any instant leaves either no round r or all of it. Only round_<int>
folders holding a metrics.json count as finished: a leftover .round_r.tmp is never loaded, and the next
attempt at round r overwrites it. metrics.jsonl is derived data, rebuilt from every round_r/metrics.json
after each rename and at each start, so a kill between the rename and the rewrite loses and duplicates nothing.

Fault injection, for tests/test_faults.py: NANO_E1_CRASH_AT=<point> makes the process SIGKILL itself (no
cleanup, no flush: exactly kill -9) when it reaches crash_point(<point>); evolve.py names its points
"rollouts:r", "trained:r", "save:r" (temp folder written, not renamed) and "saved:r" (renamed, metrics.jsonl
not yet rebuilt).
"""
import json
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from model import save_policy
from train import check_finite, save_optimizer

PHASES = ("rollout_grpo", "train_grpo", "rollout_distill", "train_distill", "eval", "checkpoint")


def crash_point(name: str):
    if os.environ.get("NANO_E1_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def finished_rounds(out: Path) -> list[int]:
    names = (p.name.removeprefix("round_") for p in out.glob("round_*") if (p / "metrics.json").exists())
    return sorted(int(n) for n in names if n.isdigit())


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)  # a folder too: fsync on it makes its entries (a rename) durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path):
    """Make tmp durable, then atomically make it final (a kill leaves the old state or the new, never half)."""
    for p in tmp.rglob("*"):
        if p.is_file():
            _fsync(p)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)  # only ever a round being redone; rename needs the name free
    tmp.rename(final)
    _fsync(final.parent)


def rebuild_metrics(out: Path) -> list[dict]:
    """metrics.jsonl := one line per finished round, in order, from each round_r/metrics.json (atomically)."""
    rows = [json.loads((out / f"round_{r}" / "metrics.json").read_text()) for r in finished_rounds(out)]
    tmp = out / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in rows))
    _fsync(tmp)
    os.replace(tmp, out / "metrics.jsonl")
    return rows


@contextmanager
def phase(m: dict, name: str):
    """Adds the block's wall time to m[name + "_seconds"]."""
    t0 = time.time()
    yield
    m[f"{name}_seconds"] = round(m.get(f"{name}_seconds", 0.0) + time.time() - t0, 2)


def save_round(policy, opts: dict, tok, out: Path, r: int, metrics: dict):
    """Atomic (checkpoint.py): a temp folder, fsynced and renamed, so a half-written round is never loaded.
    opts: {trainer name: its AdamW}, saved as optimizer_<name>.safetensors; kept for round 0 (every ablation
    variant starts there) and the latest round only."""
    check_finite(policy, f"round {r}")
    tmp = out / f".round_{r}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with phase(metrics, "checkpoint"):
        save_policy(policy, tok, tmp)
        for name, opt in opts.items():
            save_optimizer(opt, policy, tmp / f"optimizer_{name}.safetensors")
    (tmp / "metrics.json").write_text(json.dumps(metrics))
    crash_point(f"save:{r}")
    commit(tmp, out / f"round_{r}")
    crash_point(f"saved:{r}")
    for old in finished_rounds(out):
        if 0 < old < r:
            for f in (out / f"round_{old}").glob("optimizer_*.safetensors"):
                f.unlink()
    rebuild_metrics(out)
    plot(out)


def plot(out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib not installed: no em_by_round.png", file=sys.stderr)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in ("dev_em", "test_em"):
        pts = [(m["round"], m[key]) for m in rows if m.get(key) is not None]
        ax.plot(*zip(*pts), marker="o", label=key)
    ax.set_xlabel("round (0 = after warm-up)"); ax.set_ylabel("exact match"); ax.legend(); ax.grid(alpha=.3)
    fig.tight_layout(); fig.savefig(out / "em_by_round.png", dpi=120); plt.close(fig)


def print_summary(rows: list[dict]):
    print(f"\n{'round':>5} {'dev EM':>7} {'test EM':>8} {'dev 2-hop':>9} {'reward':>7} {'kept':>5} "
          f"{'search/q':>8} {'s':>6}")
    for m in rows:
        test = f"{m['test_em']:.3f}" if m.get("test_em") is not None else "-"
        print(f"{m['round']:>5} {m['dev_em']:>7.3f} {test:>8} {m.get('dev_hop2_em', 0):>9.3f} "
              f"{m['reward_mean']:>7.3f} {m['kept']:>5} {m['searches_per_q']:>8.2f} {m['seconds']:>6.0f}")
    total = sum(m["seconds"] for m in rows)
    print(f"\n{'phase':<16} {'seconds':>8} {'share':>6} {'gen tokens':>11} {'ctx tokens':>11}")
    for name in ("warmup", *PHASES):
        s = sum(m.get(f"{name}_seconds", 0) for m in rows)
        gen = sum(m.get(f"{name}_gen_tokens", 0) for m in rows)
        ctx = sum(m.get(f"{name}_ctx_tokens", 0) for m in rows)
        print(f"{name:<16} {s:>8.0f} {s / max(total, 1e-9):>6.1%} {gen or '':>11} {ctx or '':>11}")
