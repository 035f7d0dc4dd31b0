"""The plain classes of each role, testable without Ray: rollout generation (HF or vLLM), reference log-probs,
reward scoring, the PPO learner, the SFT and reward-model trainers, evaluation. Their Ray actors are `actors`."""
