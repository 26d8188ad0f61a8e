"""Crash-safe rounds for evolve.py: a round folder appears whole or not at all.

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
from pathlib import Path


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
