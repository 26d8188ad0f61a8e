"""A diagnosis, not part of the method: do invalid actions follow <information> blocks that lost their closing tag?

    python docs/cut_blocks.py runs/eval_dev/agent.jsonl [more agent.jsonl ...]

Reads eval.py's trajectories (`python eval.py --model CKPT --data data/cache/questions/dev.jsonl --limit 60
--modes agent --dtype float32 --out_dir DIR` writes DIR/agent.jsonl) and counts, per file, the <information>
blocks, those without </information> (a block cut to max_obs_tokens before search.information kept the tag),
and the invalid actions that come right after a block, split by whether that block was closed. No model runs.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, run from anywhere
from rollout import INVALID as INVALID_TURN  # noqa: E402

INVALID = INVALID_TURN.strip().split(".")[0]  # "My previous action is invalid": what rollout.py appends


def count(records: list[dict]) -> dict:
    c = dict(questions=len(records), blocks=0, unclosed=0, invalid=0, invalid_after_unclosed=0,
             invalid_after_closed=0, invalid_ending_in_answer_tag=0)
    for r in records:
        c["invalid"] += r["invalid_actions"]
        for block in r["response"].split("<information>")[1:]:
            closed = "</information>" in block
            after = (block.split("</information>", 1)[1] if closed else block).split("<information>")[0]
            c["blocks"] += 1
            c["unclosed"] += not closed
            if INVALID in after:  # the policy's next turn after this block was invalid
                c["invalid_after_closed" if closed else "invalid_after_unclosed"] += 1
                c["invalid_ending_in_answer_tag"] += after.split(INVALID)[0].rstrip().endswith("</answer>")
    return c


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            print(path, json.dumps(count([json.loads(line) for line in f if line.strip()])))
