"""How far one PPO update was off-policy: the behaviour-vs-proximal mismatch and the importance weights it used.

The learner adds each micro batch of an update's first epoch (every response token once) and reads the figures
once per update: the sums stay tensors on the device until then (a `.item()` per micro batch would be a host
sync each). In a group of ranks the sums are summed over ranks, so the figures are the whole batch's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from rayrlhf.core import ppo_math as pm

SUMS = ("tokens", "abs_diff", "k1", "k3", "units", "w", "w2", "bounded")


class OffPolicyTally:
    """Token sums of one update's mismatch (`ppo_math.mismatch`) and importance weights (`behaviour_weights`)."""

    def __init__(self) -> None:
        self.sums: defaultdict[str, float | torch.Tensor] = defaultdict(float)

    def clear(self) -> None:
        self.sums.clear()

    def add(self, prox: torch.Tensor, behav: torch.Tensor, mask: torch.Tensor,
            weights: pm.BehaviourWeights | None) -> None:
        """One micro batch: log pi_prox and log mu of its response tokens (b, R), their mask, and the weights used."""
        d = pm.mismatch(prox, behav, mask)
        n = mask.sum()
        t = self.sums
        for key, value in (("tokens", n), ("abs_diff", d.abs_diff_mean * n), ("k1", d.kl_k1 * n),
                           ("k3", d.kl_k3 * n)):
            t[key] = t[key] + value
        t["abs_diff_max"] = torch.maximum(torch.as_tensor(t["abs_diff_max"], device=n.device), d.abs_diff_max)
        if weights is not None:
            for key, value in (("units", weights.units.sum()),
                               ("w", pm.masked_sum(weights.unit_weights, weights.units)),
                               ("w2", pm.masked_sum(weights.unit_weights**2, weights.units)),
                               ("bounded", pm.masked_sum(weights.bounded.float(), weights.units))):
                t[key] = t[key] + value

    def metrics(self, with_weights: bool, sum_ranks: Callable[[dict], dict] | None = None,
                max_ranks: Callable[[float], float] | None = None) -> dict[str, float]:
        """`ppo/mismatch_*` (and with `with_weights` `ppo/is_*`) over the tokens added; {} when none were.
        `sum_ranks` / `max_ranks`: a group's collectives (every rank has every key: the same calls on each)."""
        if not self.sums:
            return {}
        sums = {k: float(self.sums[k]) for k in SUMS}
        top = float(self.sums["abs_diff_max"])
        if sum_ranks is not None:
            sums, top = sum_ranks(sums), max_ranks(top)
        n, units = max(sums["tokens"], 1.0), max(sums["units"], 1.0)
        out = {"ppo/mismatch_abs_diff_mean": sums["abs_diff"] / n, "ppo/mismatch_abs_diff_max": top,
               "ppo/mismatch_kl_k1": sums["k1"] / n, "ppo/mismatch_kl_k3": sums["k3"] / n}
        if with_weights:
            out.update({"ppo/is_weight_mean": sums["w"] / units,
                        "ppo/is_ess": sums["w"] ** 2 / max(units * sums["w2"], 1e-12),
                        "ppo/is_bounded_fraction": sums["bounded"] / units})
        return out
