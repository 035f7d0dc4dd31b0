"""SFT and reward-model losses against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from actors.rm import pairwise_loss
from core.sequences import last_token_index, pad_left, pad_right, sequence_scores
from actors.sft import IGNORE, sft_batch, sft_loss
from core.text import EncodedSummary

# Vocabulary of 3 for the hand computations: pad 0, "word" 1, EOS 2.
PAD, W, EOS = 0, 1, 2
ITEMS = [
    EncodedSummary(query_ids=[W, W, W], summary_ids=[PAD, EOS]),  # a summary token may share the pad id
    EncodedSummary(query_ids=[W], summary_ids=[W, W, EOS]),
]


def test_sft_batch_masks_query_and_padding():
    b = sft_batch(ITEMS, PAD)
    assert b["input_ids"].tolist() == [[W, W, W, PAD, EOS], [W, W, W, EOS, PAD]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # labels only on summary tokens (including EOS); the query and right padding are ignored
    assert b["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, PAD, EOS], [IGNORE, W, W, EOS, IGNORE]]


class ConstantLM(nn.Module):
    """Logits [0, 0, ln 2] at every position: p = (1/4, 1/4, 1/2), so -log p = (ln 4, ln 4, ln 2).

    `garbage` adds huge logits at positions whose next token is not a summary token, which must not
    change the loss if the query and padding are masked.
    """

    def __init__(self, garbage: torch.Tensor | None = None):
        super().__init__()
        self.garbage = garbage

    def forward(self, input_ids, attention_mask=None, **_):
        B, T = input_ids.shape
        logits = torch.tensor([0.0, 0.0, math.log(2.0)]).expand(B, T, 3).clone()  # (B, T, V)
        if self.garbage is not None:
            logits = logits + self.garbage
        return SimpleNamespace(logits=logits)


def test_sft_loss_by_hand():
    b = sft_batch(ITEMS, PAD)
    # Row 0 summary [PAD, EOS] -> ln 4 + ln 2 = 3 ln 2; row 1 [W, W, EOS] -> 2 ln 4 + ln 2 = 5 ln 2.
    loss, n = sft_loss(ConstantLM(), b)
    assert n == 5
    assert loss.item() == pytest.approx(8 * math.log(2.0), rel=1e-6)


def test_sft_loss_ignores_logits_that_predict_query_or_padding():
    b = sft_batch(ITEMS, PAD)
    predicts_summary = torch.zeros(2, 5, dtype=torch.bool)
    predicts_summary[:, :-1] = b["labels"][:, 1:] != IGNORE  # logits at t predict token t + 1
    garbage = torch.where(predicts_summary.unsqueeze(-1), 0.0, 1000.0 * torch.tensor([1.0, -3.0, 7.0]))
    loss, n = sft_loss(ConstantLM(garbage), b)
    assert n == 5
    assert loss.item() == pytest.approx(8 * math.log(2.0), rel=1e-6)


def test_sft_loss_sums_so_accumulation_is_exact():
    # Summed per micro-batch, divided by the whole batch's token count: equals the one-batch mean.
    whole, n = sft_loss(ConstantLM(), sft_batch(ITEMS, PAD))
    parts = [sft_loss(ConstantLM(), sft_batch([it], PAD)) for it in ITEMS]
    assert sum(p[1] for p in parts) == n
    assert (sum(p[0] for p in parts) / n).item() == pytest.approx((whole / n).item(), rel=1e-6)


@pytest.mark.parametrize("d, expected", [
    (0.0, math.log(2.0)),  # 0.693147
    (1.0, 0.3132617),  # log(1 + e^-1)
    (-1.0, 1.3132617),  # log(1 + e)
    (10.0, 4.5398899e-05),  # log(1 + e^-10): tiny but positive
])
def test_pairwise_loss_by_hand(d, expected):
    loss = pairwise_loss(torch.tensor([d + 0.5]), torch.tensor([0.5]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_pairwise_loss_is_the_mean_over_pairs_and_pushes_margins_apart():
    rc = torch.tensor([1.0, 0.0], requires_grad=True)
    rr = torch.tensor([0.0, 0.0], requires_grad=True)
    loss = pairwise_loss(rc, rr)
    assert loss.item() == pytest.approx((0.3132617 + math.log(2.0)) / 2, rel=1e-5)
    loss.backward()
    # d/d r_c of -log sigmoid(d) = -(1 - sigmoid(d)); mean over 2 pairs. d=1: -0.268941/2; d=0: -0.5/2.
    assert rc.grad.tolist() == pytest.approx([-0.1344707, -0.25], rel=1e-5)
    assert rr.grad.tolist() == pytest.approx([0.1344707, 0.25], rel=1e-5)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 0]


@pytest.mark.slow
def test_reward_read_at_last_real_token_is_padding_invariant(tiny_checkpoints):
    from core.modeling import load_scalar_model, load_tokenizer

    tok = load_tokenizer(str(tiny_checkpoints.rm))
    model = load_scalar_model(str(tiny_checkpoints.rm), tok).eval()
    texts = ["SUBREDDIT: r/tifu\n\nTITLE: x\n\nPOST: my dad got engaged.\n\nTL;DR: my dad got engaged.",
             "hi",
             "SUBREDDIT: r/relationships\n\nTITLE: z\n\nPOST: my sister crashed my car and i am upset. also my dad plays guitar.\n\nTL;DR:"]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert len({len(s) for s in seqs}) == 3
    with torch.no_grad():
        right = sequence_scores(model, *pad_right(seqs, tok.pad_token_id))
        left = sequence_scores(model, *pad_left(seqs, tok.pad_token_id))
        alone = torch.cat([sequence_scores(model, *pad_right([s], tok.pad_token_id)) for s in seqs])
        # padding to a much longer width changes nothing either
        wide = sequence_scores(model, *pad_right(seqs, tok.pad_token_id, width=max(map(len, seqs)) + 7))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(wide, alone, atol=1e-5, rtol=0)
    assert alone.std() > 0  # the scores are not all the same value
