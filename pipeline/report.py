"""report.md for a run: stage summaries, evaluation table, sample summaries and PNG training curves."""

from __future__ import annotations

import json
from pathlib import Path

from core.metrics import read_metrics
from core.text import budget_warnings
from pipeline.run_dir import RunDir

PPO_CURVES = ("reward/score_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/clip_fraction",
              "ppo/entropy", "rollout/response_length", "timing/step_s")


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


def write_report(run: RunDir) -> Path:
    stages = run.stages()
    lines = [f"# rayrlhf run report: `{run.path.name}`", ""]
    ev_path = run.path / "eval" / "results.json"
    ev = json.loads(ev_path.read_text()) if ev_path.exists() else {"metrics": {}, "samples": []}
    m = ev["metrics"]
    if m:
        lines += ["## Evaluation on held-out prompts", "",
                  f"{int(m.get('eval/num_prompts', 0))} prompts; responses sampled at the rollout temperature "
                  "with the same seed for both policies.", "", "| metric | SFT | PPO |", "|---|---|---|"]
        for key in ("reward", "judge_score", "kl", "length", "rouge1", "rouge2", "rougeL", "gold_score",
                    "gold_win_vs_reference"):
            s, p = m.get(f"eval/sft_{key}"), m.get(f"eval/ppo_{key}")
            if s is not None or p is not None:
                lines.append(f"| {key} | {_fmt(s) if s is not None else '-'} | {_fmt(p) if p is not None else '-'} |")
        # Reward models prefer longer summaries: every win rate is shown with the two mean lengths beside it.
        lengths = f"mean length PPO {m.get('eval/ppo_length', float('nan')):.1f} vs SFT " \
                  f"{m.get('eval/sft_length', float('nan')):.1f} tokens"
        lines.append("")
        for key, what in (("ppo_reward_win_vs_sft", "Training-reward-model win rate"),
                          ("ppo_judge_win_vs_sft", "Judge win rate"), ("ppo_gold_win_vs_sft", "Gold-judge win rate")):
            if f"eval/{key}" in m:
                lines.append(f"- **{what}, PPO vs SFT: {m[f'eval/{key}']:.3f}** (ties count half; {lengths})")
        if "eval/reference_gold_score" in m:
            lines.append(f"- Reference summaries' mean gold score: {m['eval/reference_gold_score']:.3f}")
        if "eval/ppo_judge_win_vs_sft" in m and "judge" in stages:
            accuracy = stages["judge"].get("judge/valid_accuracy", float("nan"))
            lines.append(f"- The judge is a reward model trained on comparisons disjoint from the training reward "
                         f"model's; its held-out pair accuracy: {accuracy:.3f}")
        lines.append("")
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
                    lines.append(f"- **{name}** (reward {s[f'{name}_reward']:.2f}{extra}): {s[name]}")
            lines.append("")
    path = run.path / "report.md"
    path.write_text("\n".join(lines))
    return path
