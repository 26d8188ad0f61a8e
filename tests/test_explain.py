"""explain.py: the numbers it reports are distill.py's own (opsd_loss and its diagnostics, forward_kl on the first
pair), and its views colour every generated token of the student and grey the <information> it is not trained on.
Hand-built trajectories (test_distill.group), the tiny random model sharpened so that the hint matters."""
import copy
import re

import torch

from distill import SPANS, DistillConfig, opsd_loss, opsd_pairs
from explain import analyse, report, shade, to_html, to_text
from test_distill import group, make_traj

SUMMARY = re.compile(r"pairs (\d+), mean KL ([-\d.e+]+), argmax differs on ([\d.]+)% of tokens")


def test_reported_numbers_are_opsd_loss_and_its_diagnostics(tok, peaked):
    g, cfg = group(tok), DistillConfig()
    policy, teacher = copy.deepcopy(peaked), copy.deepcopy(peaked)  # the teacher: a frozen copy, as in training
    res = analyse(policy, teacher, tok, g, cfg)
    pairs = opsd_pairs(tok, g, cfg)
    diag = dict(disagree=0, **{f"{k}_{s}": 0 for k in ("kl", "n") for s in SPANS})
    loss = opsd_loss(policy, teacher, pairs, tok.pad_token_id, cfg, diag).item()
    n = sum(diag[f"n_{s}"] for s in SPANS)
    assert res["n_pairs"] == len(pairs) == 3 and res["n_tokens"] == n
    assert res["mean_kl"] > 1e-3 and abs(res["mean_kl"] - loss / n) <= 1e-5 * loss / n
    assert diag["disagree"] > 0 and abs(res["disagree"] - diag["disagree"] / n) <= 1e-6
    # the summary line, the report's last, says the same numbers
    last = to_text(report(tok, g, res, cfg), color=False).rstrip("\n").splitlines()[-1]
    m = SUMMARY.fullmatch(last)
    assert m and int(m[1]) == 3 and abs(float(m[2]) - loss / n) <= 1e-3 * loss / n
    assert abs(float(m[3]) - 100 * diag["disagree"] / n) <= 0.05


def test_per_token_kl_is_the_kl_of_two_plain_forwards_of_the_first_pair(tok, peaked):
    """The shown student is the first of select_students (the sibling is g[2]: g[0]). Its per-token KL, computed
    here without distill.py: one unpadded forward of the privileged prompt + the student's response, one of the
    plain prompt + the same response, the KL of the positions predicting the policy's own tokens."""
    g, cfg = group(tok), DistillConfig(autocast_bf16=False)
    teacher = copy.deepcopy(peaked)
    with torch.no_grad():
        for p in teacher.parameters():      # a teacher unlike the student: any misalignment shows up in the KL
            p.add_(0.02 * torch.randn_like(p))
    res = analyse(peaked, teacher, tok, g, cfg)
    student = g[0]
    assert res["pairs"][0].student is student
    resp, mask = student.token_ids[student.prompt_len:], torch.tensor(student.loss_mask[student.prompt_len:]).bool()

    def logp(model, prompt):
        ids = torch.tensor([list(prompt) + resp])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]   # position i predicts response token i
        return logits[mask].float().log_softmax(-1)
    t, s = logp(teacher, res["pairs"][0].teacher_prompt), logp(peaked, student.token_ids[:student.prompt_len])
    kl = (t.exp() * (t - s)).sum(-1)
    assert len(res["kl"]) == int(mask.sum()) and float(kl.max()) > 1e-3
    torch.testing.assert_close(torch.tensor(res["kl"]), kl, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(res["p_teacher"], t.exp(), rtol=1e-3, atol=1e-6)


def test_html_has_one_span_per_generated_token_and_greys_the_information(tok, peaked):
    g, cfg = group(tok), DistillConfig()
    res = analyse(peaked, copy.deepcopy(peaked), tok, g, cfg)
    page = to_html(report(tok, g, res, cfg))
    spans = re.findall(r'<span class="g" title="KL ([\d.]+)" style="background:([^"]+)">(.*?)</span>', page, re.S)
    student = g[0]
    assert len(spans) == sum(student.loss_mask) == len(res["kl"])
    assert [float(k) for k, _, _ in spans] == [round(x, 4) for x in res["kl"]]
    generated = "".join(t for _, _, t in spans)
    assert "&lt;search&gt;" in generated and "information" not in generated
    masked = re.findall(r'<span class="m"[^>]*>(.*?)</span>', page, re.S)
    assert len(masked) == 2 and all("&lt;information&gt;Doc 1 (Paris)" in m for m in masked)  # g[0] searched twice
    assert ".m{color:#999}" in page and "<mark>" in page  # greyed; the hint marked in the teacher's prompt
    assert [bg for _, bg, _ in spans] == [shade(x)[1] or "none" for x in res["kl"]]  # coloured by its own KL
    assert shade(0.005) == (None, None) and shade(0.05)[0] == 230 and shade(5.0) == (196, "#ff0000")


def test_terminal_view_plain_and_ansi(tok, peaked):
    g, cfg = group(tok), DistillConfig()
    pieces = report(tok, g, analyse(peaked, copy.deepcopy(peaked), tok, g, cfg), cfg)
    plain, ansi = to_text(pieces, color=False), to_text(pieces, color=True)
    assert "\x1b[" not in plain and "\x1b[48;5;" in ansi and "\x1b[38;5;245m" in ansi  # KL colours, grey masks
    assert "«\n\n<information>" not in plain and "«<information>Doc 1" in plain  # newlines outside the marks
    assert ">>>A correct and efficient solution searched for: 'france capital'" in plain
    assert re.search(r"#2 reward 1 .*<- sibling \(efficient", plain) and "student (shown below)" in plain


def test_no_correct_trajectory_no_analysis(tok, tiny):
    wrong = [make_traj(tok, "q", ["x"], "Lyon", 0.0), make_traj(tok, "q", [], "Nice", 0.0)]
    assert analyse(tiny, tiny, tok, wrong, DistillConfig()) is None
