"""report.md for a run: stage summaries, evaluation with intervals and verdicts, sample summaries and PNG
training curves.

Every win rate and mean difference is shown with its 95 % paired bootstrap interval and n (computed by
`roles.evaluate`, keys in its docstring); every held-out accuracy of the reward model and the judge with an
exact binomial test against chance and its Clopper-Pearson interval (`core.stats.accuracy_vs_chance`). A
verdict sentence says when a win rate is not distinguishable from a tie (its interval includes 0.5) and
when an evaluator is not better than chance (p >= 0.05).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rayrlhf.core import stats
from rayrlhf.core.metrics import read_metrics
from rayrlhf.core.text import budget_warnings
from rayrlhf.pipeline.run_dir import RunDir

PPO_CURVES = ("reward/score_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/clip_fraction",
              "ppo/entropy", "rollout/response_length", "timing/step_s",
              # off-policy: how far the rollout's log-probs are from the learner's, and how hard the weights bite
              "ppo/mismatch_abs_diff_mean", "ppo/mismatch_kl_k3", "ppo/is_ess", "ppo/is_bounded_fraction")


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(rows: list[dict], keys: tuple[str, ...], path: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = tuple(k for k in keys if any(k in r for r in rows))
    if not keys:
        return None
    cols = 4 if len(keys) > 4 else len(keys)
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        x, y = _series(rows, key)
        ax.plot(x, y, marker="." if len(x) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# (stage metrics file, role, metric prefix): each role's tokens/s and MFU (core.throughput), logged every step
THROUGHPUT = (("sft", "SFT", "sft/"), ("rm", "reward model", "rm/"), ("judge", "judge", "judge/"),
              ("ppo", "PPO learner", "perf/learner_"), ("ppo", "rollout", "perf/rollout_"),
              ("ppo", "reference", "perf/reference_"), ("ppo", "reward scorer", "perf/reward_"))


def throughput_lines(run: RunDir) -> list[str]:
    """Mean tokens/s and MFU of each role over its steps; MFU against the peak each role measured on its own
    device (a matmul probe on CPU, the datasheet on known GPUs)."""
    rows = []
    for stage, role, prefix in THROUGHPUT:
        series = read_metrics(run.path / stage / "metrics.jsonl")
        figures = {}
        for what in ("tokens_per_s", "mfu"):
            values = [r[f"{prefix}{what}"] for r in series if f"{prefix}{what}" in r]
            figures[what] = sum(values) / len(values) if values else None
        if figures["mfu"] is not None or figures["tokens_per_s"] is not None:
            tps = f"{figures['tokens_per_s']:.1f}" if figures["tokens_per_s"] is not None else "-"
            # no MFU where the role's model runs elsewhere (the reward service over HTTP)
            mfu = f"{100 * figures['mfu']:.1f} %" if figures["mfu"] is not None else "-"
            rows.append(f"| {role} | {tps} | {mfu} |")
    if not rows:
        return []
    return ["## Throughput", "", "Mean over steps; model FLOPs with PaLM's formula (2 per matmul parameter per token "
            "forward, backward as trained; attention over causal pairs; the output head on the positions it scores) "
            "against each role's measured peak.", "", "| role | tokens/s | MFU |", "|---|---|---|",
            *rows, ""]


# (evaluator in result keys, its PPO-vs-SFT win rate in the report, its name, the stage whose accuracy it has)
WIN_RATES = (("reward", "Training-reward-model win rate", "training reward model", "rm"),
             ("judge", "Judge win rate", "judge", "judge"), ("gold", "Gold-judge win rate", "gold judge", None))
# (stage, accuracy key, what the report calls it)
ACCURACIES = (("rm", "rm/valid_accuracy", "Training reward model"),
              ("rm", "rm/valid_gold_accuracy", "Training reward model, against the noiseless gold labels"),
              ("judge", "judge/valid_accuracy", "Judge"),
              ("judge", "judge/valid_gold_accuracy", "Judge, against the noiseless gold labels"))


def _ci(m: dict, key: str) -> str:
    """'[0.551, 0.690], n = 200' for a key written with its interval and count (`roles.evaluate.put_estimate`)."""
    n = int(m.get(f"{key}_n", 0))
    if f"{key}_ci_low" not in m:
        return f"(n = {n}, too few for an interval)"
    return f"[{m[f'{key}_ci_low']:.3f}, {m[f'{key}_ci_high']:.3f}], n = {n}"


def _interval(m: dict, key: str) -> str:
    """'0.620 [0.551, 0.690], n = 200'."""
    return f"{m[key]:.3f} {_ci(m, key)}" if key in m else f"- {_ci(m, key)}"


def _win_verdict(m: dict, key: str) -> str:
    """A plain sentence on a PPO-vs-SFT win rate."""
    if key not in m or f"{key}_ci_low" not in m:
        return "too few prompts to tell"
    e = stats.Estimate(m[key], m[f"{key}_ci_low"], m[f"{key}_ci_high"], int(m[f"{key}_n"]))
    if e.includes(0.5):
        return "not distinguishable from a tie (the interval includes 0.5)"
    return "PPO wins more often than SFT" if e.ci_low > 0.5 else "SFT wins more often than PPO"


def _difference_verdict(m: dict, key: str) -> str:
    if f"{key}_ci_low" not in m:
        return "-"
    low, high = m[f"{key}_ci_low"], m[f"{key}_ci_high"]
    return "no clear difference" if low <= 0 <= high else "PPO higher" if low > 0 else "PPO lower"


def _length_range(low: float | None, high: float | None) -> str:
    if low is None:
        return f"<= {high:g}"
    return f">= {low:g}" if high is None else f"{low:g} to {high:g}"


@dataclass(frozen=True)
class AccuracyLine:
    stage: str  # rm or judge
    key: str  # e.g. rm/valid_accuracy
    what: str
    test: stats.AccuracyTest | None  # None where the number of pairs is unknown


def accuracy_tests(stages: dict, m: dict) -> list[AccuracyLine]:
    """Each held-out accuracy the rm and judge stages logged, tested against chance. n: the stage's
    `<role>/valid_pairs` where it logged one, else the count the evaluation derived from the same data
    (`eval/<role>_valid_pairs`)."""
    out = []
    for stage, key, what in ACCURACIES:
        summary = stages.get(stage, {})
        if key not in summary:
            continue
        n = int(summary.get(f"{stage}/valid_pairs", m.get(f"eval/{stage}_valid_pairs", 0)))
        out.append(AccuracyLine(stage, key, what, stats.accuracy_vs_chance(round(summary[key] * n), n) if n else None))
    return out


def accuracy_lines(tests: list[AccuracyLine]) -> list[str]:
    if not tests:
        return []
    lines = ["## Evaluators: held-out pair accuracy", "",
             "Share of held-out comparisons the model ranks as labelled, at the checkpoint these same pairs chose "
             "(so slightly optimistic); exact (Clopper-Pearson) two-sided 95 % interval; one-sided binomial test "
             "against chance (0.5) and its 95 % lower bound, which is above 0.5 exactly when p < 0.05.", ""]
    for a in tests:
        t = a.test
        if t is None:
            lines.append(f"- {a.what}: number of held-out pairs unknown, so no test")
            continue
        verdict = ("better than chance" if t.better_than_chance else
                   "**not better than chance** (p >= 0.05): what it prefers says nothing about quality")
        lines.append(f"- {a.what}: {t.accuracy:.3f} [{t.ci_low:.3f}, {t.ci_high:.3f}], n = {t.n} pairs; "
                     f"one-sided lower bound {t.lower_bound:.3f}, p = {t.p_value:.2g}: {verdict}")
    if any(a.stage == "judge" for a in tests):
        lines.append("- The judge is a reward model trained on comparisons disjoint from the training reward "
                     "model's.")
    return lines + [""]


def _policy_rows(m: dict) -> list[str]:
    """A table row per metric the evaluation measured: SFT, PPO, their difference with its interval, a verdict."""
    lines = []
    for key in ("reward", "reward_raw", "judge_score", "judge_score_raw", "kl", "length", "eos_rate", "rouge1",
                "rouge2", "rougeL", "gold_score", "gold_win_vs_reference"):
        s, p = f"eval/sft_{key}", f"eval/ppo_{key}"
        if s not in m and p not in m:
            continue
        cells = [_interval(m, k) if f"{k}_n" in m else _fmt(m[k]) if k in m else "-" for k in (s, p)]
        diff = f"eval/ppo_minus_sft_{key}"
        d = _interval(m, diff) if f"{diff}_n" in m else "-"
        lines.append(f"| {key} | {cells[0]} | {cells[1]} | {d} | {_difference_verdict(m, diff)} |")
    return lines


def _win_lines(m: dict, evaluator: str, what: str, stage: str, lengths: str, chance: dict) -> list[str]:
    """One evaluator's PPO-vs-SFT win rate with its verdict, then the same comparison seen without the EOS trick,
    on prompts where both ended, and at equal length."""
    key = f"eval/ppo_{evaluator}_win_vs_sft"
    lines = [f"- **{what}, PPO vs SFT: {m[key]:.3f}** {_ci(m, key)} (ties count half; {lengths}): "
             f"{_win_verdict(m, key)}."]
    if stage in chance and not chance[stage].better_than_chance:
        lines.append("  - This evaluator is not better than chance on held-out pairs: its verdict says nothing "
                     "about quality.")
    slope = m.get(f"{key}_length_slope")
    slope_text = f"; log-odds of a PPO win {slope:+.3f} per token PPO is longer" if slope is not None else ""
    for view, suffix in (("raw scores (no EOS trick)", "_raw"),
                         ("prompts where both responses ended with EOS", "_both_eos"),
                         (f"at equal length (logistic regression of the win on the length difference{slope_text})",
                          "_equal_length"),
                         # a response without EOS has the full budget's length and the missing-EOS score:
                         # length and ending are confounded unless both responses ended
                         ("at equal length, on prompts where both ended with EOS", "_equal_length_both_eos")):
        if f"{key}{suffix}_n" in m:
            lines.append(f"  - {view}: {_interval(m, key + suffix)}: {_win_verdict(m, key + suffix)}")
    return lines


def evaluation_lines(m: dict, length_bins: dict[str, list[dict]], tests: list[AccuracyLine]) -> list[str]:
    """The evaluation section: per-policy figures and PPO - SFT differences, then each evaluator's win rate
    (its scores, raw scores, both-EOS prompts, at equal length, by length difference) with a verdict."""
    lines = ["## Evaluation on held-out prompts", "",
             f"{int(m.get('eval/num_prompts', 0))} prompts; responses sampled at the rollout temperature "
             "with the same seed for both policies. Intervals: 95 %, paired bootstrap over prompts (percentile, "
             "seeded). Ties count half in win rates.", "",
             "| metric | SFT | PPO | PPO - SFT | verdict |", "|---|---|---|---|---|"]
    lines += _policy_rows(m)
    lines += ["", "reward and judge_score: with the EOS trick (a response without EOS scores "
              "reward.missing_eos_score); `_raw`: the model's own score. eos_rate: share of responses that "
              "ended with EOS.", ""]
    lengths = f"mean length PPO {m.get('eval/ppo_length', float('nan')):.1f} vs SFT " \
              f"{m.get('eval/sft_length', float('nan')):.1f} tokens"
    chance = {a.stage: a.test for a in tests if a.key == f"{a.stage}/valid_accuracy" and a.test is not None}
    bins_rows = []
    for evaluator, what, name, stage in WIN_RATES:
        if f"eval/ppo_{evaluator}_win_vs_sft" not in m:
            continue
        lines += _win_lines(m, evaluator, what, stage, lengths, chance)
        for b in length_bins.get(f"ppo_{evaluator}_win_vs_sft", []):
            ci = f"[{b['ci_low']:.3f}, {b['ci_high']:.3f}]" if b["ci_low"] is not None else "(no interval)"
            bins_rows.append(f"| {name} | {_length_range(b['low'], b['high'])} | {b['win']:.3f} {ci} | {b['n']} |")
    if "eval/ppo_eos_rate" in m and "eval/sft_eos_rate" in m:
        lines.append(f"- Ended with EOS: SFT {_interval(m, 'eval/sft_eos_rate')}; PPO "
                     f"{_interval(m, 'eval/ppo_eos_rate')}. Where these differ, a win rate with the EOS trick "
                     f"partly measures ending with EOS: compare the raw-score and both-EOS rows.")
    if "eval/reference_gold_score" in m:
        lines.append(f"- Reference summaries' mean gold score: {m['eval/reference_gold_score']:.3f}")
    lines.append("")
    if bins_rows:
        lines += ["Win rate of PPO by length difference (PPO minus SFT, tokens):", "",
                  "| evaluator | length difference | win rate [95 % CI] | n |", "|---|---|---|---|", *bins_rows, ""]
    return lines


def write_report(run: RunDir) -> Path:
    stages = run.stages()
    lines = [f"# rayrlhf run report: `{run.path.name}`", ""]
    ev_path = run.path / "eval" / "results.json"
    ev = json.loads(ev_path.read_text()) if ev_path.exists() else {"metrics": {}, "samples": []}
    m = ev["metrics"]
    tests = accuracy_tests(stages, m)
    if m:
        lines += evaluation_lines(m, ev.get("length_bins", {}), tests)
    lines += accuracy_lines(tests)
    lines += throughput_lines(run)
    warnings = budget_warnings({k: v for summary in stages.values() for k, v in summary.items()})
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    for stage in ("sft", "rm", "judge", "ppo"):
        if stage in stages:
            lines += [f"## {stage.upper()} summary", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in stages[stage].items()]
            lines.append("")
    plots = []
    ppo_rows = read_metrics(run.path / "ppo" / "metrics.jsonl")
    if (p := plot_curves(ppo_rows, PPO_CURVES, run.path / "ppo_curves.png", "PPO")) is not None:
        plots.append(("PPO training curves", p))
    rm_rows = read_metrics(run.path / "rm" / "metrics.jsonl")
    if (p := plot_curves(rm_rows, ("rm/loss", "rm/train_accuracy", "rm/valid_accuracy", "rm/valid_gold_accuracy"),
                         run.path / "rm_curves.png", "Reward model")) is not None:
        plots.append(("Reward-model training", p))
    sft_rows = read_metrics(run.path / "sft" / "metrics.jsonl")
    if (p := plot_curves(sft_rows, ("sft/loss", "sft/valid_loss", "sft/rougeL", "sft/gold_score"),
                         run.path / "sft_curves.png", "SFT")) is not None:
        plots.append(("SFT training", p))
    for title, p in plots:
        lines += [f"## {title}", "", f"![{title}]({p.name})", ""]
    if ev["samples"]:
        lines += ["## Samples", ""]
        for i, s in enumerate(ev["samples"]):
            lines += [f"### Sample {i + 1}", "", "```", s["query"], "```", "", f"- **reference**: {s['reference']}"]
            for name in ("sft", "ppo"):
                if name in s:
                    extra = "".join(f", {what} {s[f'{name}_{what}']:.2f}" for what in ("judge", "gold")
                                    if f"{name}_{what}" in s)
                    extra += ", no EOS" if s.get(f"{name}_eos") is False else ""
                    lines.append(f"- **{name}** (reward {s[f'{name}_reward']:.2f}{extra}): {s[name]}")
            lines.append("")
    path = run.path / "report.md"
    path.write_text("\n".join(lines))
    return path
