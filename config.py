"""The run's settings: one Config dataclass with --key=value overrides, and the settings a model's size needs.

A learning rate sized for SmolLM2-135M on a few steps breaks a larger model (Qwen2.5-Coder-0.5B under the warm-up
at 2e-4 writes degenerate queries and scores 0: docs/qwen.md), so the model picks a named set of settings by its
number of parameters (SETS, size_class) and a flag given on the command line still wins. The defaults of Config
are the 135M set.
"""
import dataclasses
import sys
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from model import EMBEDDED, QWEN, resolve


@dataclass
class Config:
    model: str = EMBEDDED
    settings: str = ""            # the named set of SETS; "" = picked by the model's size (size_class)
    out_dir: str = "runs/evolve"
    seed: int = 0
    corpus: str = ""              # jsonl {id, contents}; "" = the embedded Wikipedia subset
    questions: str = ""           # folder of train/dev/test.jsonl (data/load.py:load_qa); "" = the generated set
    retriever_url: str = ""       # Search-R1 /retrieve endpoint instead of local BM25
    device: str = ""              # "" = cuda if present, else cpu
    rollout_dtype: str = "auto"   # the actor's dtype (bf16 also means bf16 autocast in training); auto: model.bf16_is_faster
    on_search_error: str = "observe"  # observe: the turn reads "Search failed: ..." | stop: the run stops
    max_bad_steps: int = 3        # stop after this many optimizer steps in a row skipped for a non-finite loss
    checkpointing: bool = True    # recompute activations in backward: training's peak -1.2 GB, +35% its time
    lr_warmup_steps: int = 5      # the warm-up's linear lr ramp (GRPO and distillation have none: one lr for all)
    # warm-up
    warmup: str = "auto"          # auto (when the probe's reward is 0) | on | off
    warmup_questions: int = 96
    warmup_lr: float = 2e-4
    warmup_epochs: int = 1        # passes over the scripted traces (16 a step)
    # rounds
    rounds: int = 3
    grpo_steps: int = 1           # GRPO optimizer steps per round, each on its own rollouts (0 = distillation only)
    grpo_questions: int = 16      # questions per GRPO step
    group_size: int = 4           # G: Search-R1 / Search-E1 use 5; 4 keeps a CPU round short
    grpo_lr: float = 2e-5         # the paper's 1e-6 is for 3B; a 135M model on a few steps needs more
    kl_coef: float = 0.001
    distill: str = "opsd"         # opsd (paper) | sft (kept traces) | none (GRPO only)
    distill_questions: int = 24   # training questions rolled out for self-distillation per round
    distill_steps: int = 3        # its optimizer steps per round, the rows split evenly (a fixed budget)
    distill_lr: float = 2e-5      # = grpo_lr: every variant's steps at one lr (this project's choice, not tuned)
    distill_loss: str = "kl"      # kl (the paper's full-vocabulary forward KL) | top1_ce (distill.py)
    kl_clip: float = 0.0          # per-entry clip of the KL's terms; 0 = off
    sibling_rule: str = "efficient"   # efficient | shortest | searched (distill.py)
    student_rule: str = "less_efficient"  # less_efficient | all | most_different (distill.py)
    teacher_shows: str = "queries"    # queries | full | none (the no-hint control)
    # rollouts and evaluation
    max_turns: int = 4
    topk: int = 3
    max_turn_tokens: int = 96
    max_obs_tokens: int = 256
    max_total_tokens: int = 640
    temperature: float = 1.0      # sampling; GRPO's log-probs are taken at the same temperature
    batch_size: int = 64          # rollout slots decoded together
    eval_questions: int = 60      # first N of dev and of test, greedy
    show: int = 2                 # sample trajectories printed per round
    balance_kinds: bool = False   # this project's, for multi-hop: training questions round-robin over kinds


CHOICES = {"distill": ("opsd", "sft", "none"), "warmup": ("auto", "on", "off"), "distill_loss": ("kl", "top1_ce"),
           "on_search_error": ("observe", "stop"), "sibling_rule": ("efficient", "shortest", "searched"),
           "student_rule": ("less_efficient", "all", "most_different"), "teacher_shows": ("queries", "full", "none")}


# Named settings by model size: only the keys that differ from Config's defaults (the 135m set). docs/qwen.md says
# what each 0.5b value rests on (dev measurements, or not yet: then it says so); the 3b set is the paper's lr.
SETS = {
    "135m": {},
    "0.5b": {"warmup": "on", "warmup_lr": 2e-5, "grpo_lr": 2e-6, "distill_lr": 2e-6},
    "3b": {"grpo_lr": 1e-6, "distill_lr": 1e-6},
}
KNOWN = {EMBEDDED: "135m", "smollm2-135m-instruct": "135m", QWEN: "0.5b"}


def size_class(model: str) -> str:
    """The set for a model: by name for the offline ones, else by the parameter count its config gives (a local
    folder, e.g. a checkpoint, or a hub id): up to 300M "135m", up to 1.5B "0.5b", else (or unknown) "3b"."""
    if model.lower() in KNOWN:
        return KNOWN[model.lower()]
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
                resolve(model))).parameters())
    except (OSError, ValueError):
        return "3b"
    return "135m" if n <= 3e8 else "0.5b" if n <= 1.5e9 else "3b"


def parse_config(argv: list[str]) -> Config:
    """Config from --key=value arguments: the model's named set (size_class) first, the arguments over it."""
    fields, given = {f.name: f for f in dataclasses.fields(Config)}, {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in fields:
            sys.exit(f"bad argument {arg!r}: use --key=value with a key from:\n  " + ", ".join(fields))
        given[key] = value
    cfg = Config()
    name = given.get("settings") or size_class(given.get("model", cfg.model))
    if name not in SETS:
        sys.exit(f"invalid config: settings is one of {', '.join(SETS)}")
    for key, value in {**{k: str(v) for k, v in SETS[name].items()}, **given, "settings": name}.items():
        kind = type(getattr(cfg, key))
        try:
            setattr(cfg, key, value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
        except ValueError:
            sys.exit(f"--{key} needs a {kind.__name__}, got {value!r}")
    checks = [(cfg.group_size >= 2 or cfg.grpo_steps == 0, "GRPO needs group_size >= 2"),
              (cfg.rounds >= 0 and cfg.max_turns >= 1, "rounds >= 0 and max_turns >= 1"),
              (cfg.max_bad_steps >= 1, "max_bad_steps >= 1")]
    checks += [(getattr(cfg, k) in v, f"{k} is one of {', '.join(v)}") for k, v in CHOICES.items()]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        sys.exit(f"invalid config: {bad[0]}")
    return cfg
