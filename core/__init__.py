"""The foundation of rayrlhf: config, RL math, sequences, typed messages, data, models, checkpoints. No Ray, no vLLM."""
