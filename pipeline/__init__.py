"""rayrlhf: SFT -> reward model -> PPO on Ray. Math, data and the driver; no Ray or vLLM at import time."""
