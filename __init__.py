"""rayrlhf: Ray-orchestrated, service-based RLHF (SFT -> reward model -> PPO), TL;DR as the reference workload.

The repository's folders are this package's subpackages (pyproject.toml maps them): `rayrlhf.core` (config, RL
math, data, models; no Ray), `rayrlhf.actors` (the role classes; `rayrlhf.actors.remote` their Ray actors),
`rayrlhf.serving` (the reward service), `rayrlhf.pipeline` (driver, CLI, jobs) and `rayrlhf.configs`.
"""
