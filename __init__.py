"""rayrlhf: Ray-orchestrated, service-based RLHF (SFT -> reward model -> PPO), TL;DR as the reference workload.

The repository's folders are this package's subpackages (pyproject.toml maps them): `rayrlhf.core` (config, RL
math, data, models; no Ray), `rayrlhf.roles` (the plain role classes), `rayrlhf.actors` (their Ray actors),
`rayrlhf.serving` (the reward service), `rayrlhf.pipeline` (driver, CLI, jobs), `rayrlhf.configs` and
`rayrlhf.tools` (k8s validator, config reference).
"""
