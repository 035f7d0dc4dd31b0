"""SFT and reward-model losses against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rayrlhf.roles.rm import pairwise_loss
from rayrlhf.core.forward import sequence_scores
from rayrlhf.core.padding import flush_right, last_token_index, pad_left, pad_right
from rayrlhf.roles.sft import IGNORE, sft_batch, sft_loss
from rayrlhf.core.text import EncodedSummary

# Vocabulary of 3 for the hand computations: pad 0, "word" 1, EOS 2.
PAD, W, EOS = 0, 1, 2
ITEMS = [
    EncodedSummary(query_ids=[W, W, W], summary_ids=[PAD, EOS]),  # a summary token may share the pad id
    EncodedSummary(query_ids=[W], summary_ids=[W, W, EOS]),
]


def test_sft_batch_masks_query_and_padding():
    b = sft_batch(ITEMS, PAD)
    # queries left-padded, summaries right-padded after them: the summaries take the last 3 positions
    assert b["input_ids"].tolist() == [[W, W, W, PAD, EOS, PAD], [PAD, PAD, W, W, W, EOS]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    # labels only on summary tokens (including EOS and a summary token equal to the pad id); padding ignored
    assert b["labels"].tolist() == [[PAD, EOS, IGNORE], [W, W, EOS]]


class ConstantLM(nn.Module):
    """Logits [0, 0, ln 2] at every position: p = (1/4, 1/4, 1/2), so -log p = (ln 4, ln 4, ln 2).

    `garbage` adds huge logits at positions whose next token is not a summary token, which must not
    change the loss if the query and padding are masked. Like a Hugging Face LM, it returns only the last
    `logits_to_keep` positions.
    """

    def __init__(self, garbage: torch.Tensor | None = None):
        super().__init__()
        self.garbage = garbage

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        B, T = input_ids.shape
        logits = torch.tensor([0.0, 0.0, math.log(2.0)]).expand(B, T, 3).clone()  # (B, T, V)
        if self.garbage is not None:
            logits = logits + self.garbage
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def test_sft_loss_by_hand():
    b = sft_batch(ITEMS, PAD)
    # Row 0 summary [PAD, EOS] -> ln 4 + ln 2 = 3 ln 2; row 1 [W, W, EOS] -> 2 ln 4 + ln 2 = 5 ln 2.
    loss, n = sft_loss(ConstantLM(), b)
    assert n == 5
    assert loss.item() == pytest.approx(8 * math.log(2.0), rel=1e-6)


def test_sft_loss_ignores_logits_that_predict_query_or_padding():
    b = sft_batch(ITEMS, PAD)
    T, S = b["input_ids"].shape[1], b["labels"].shape[1]
    predicts_summary = torch.zeros(2, T, dtype=torch.bool)
    predicts_summary[:, T - S - 1 : T - 1] = b["labels"] != IGNORE  # logits at t predict token t + 1
    # the model sees the rows flushed right (forward.response_logits): mark the same positions there
    flushed, _, index = flush_right(b["input_ids"], b["attention_mask"])
    rows, cols = predicts_summary.nonzero(as_tuple=True)
    marked = torch.zeros(flushed.shape, dtype=torch.bool)
    marked[rows, index[rows, cols]] = True
    assert (index[rows, cols] >= 0).all() and int(marked.sum()) == 5
    garbage = torch.where(marked.unsqueeze(-1), 0.0, 1000.0 * torch.tensor([1.0, -3.0, 7.0]))
    loss, n = sft_loss(ConstantLM(garbage), b)
    assert n == 5
    assert loss.item() == pytest.approx(8 * math.log(2.0), rel=1e-6)


def test_sft_loss_sums_so_accumulation_is_exact():
    # Summed per micro-batch, divided by the whole batch's token count: equals the one-batch mean.
    whole, n = sft_loss(ConstantLM(), sft_batch(ITEMS, PAD))
    parts = [sft_loss(ConstantLM(), sft_batch([it], PAD)) for it in ITEMS]
    assert sum(p[1] for p in parts) == n
    assert (sum(p[0] for p in parts) / n).item() == pytest.approx((whole / n).item(), rel=1e-6)


def test_sft_loss_equals_right_padded_full_logits_on_a_llama():
    """The left-padded layout with only the summary logits gives the loss and gradients of the plain layout
    (right padding, logits at every position) on a real Llama, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0))
    items = [EncodedSummary(query_ids=[5, 6, 7, 8], summary_ids=[9, 10, 2]),
             EncodedSummary(query_ids=[11, 12], summary_ids=[13, 2]),
             EncodedSummary(query_ids=[14, 15, 16], summary_ids=[17, 18, 19, 20, 2])]
    loss, n = sft_loss(model, sft_batch(items, 0))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    ids, mask = pad_right([e.query_ids + e.summary_ids for e in items], 0)
    labels = torch.full_like(ids, IGNORE)
    for i, e in enumerate(items):
        labels[i, len(e.query_ids) : len(e.query_ids) + len(e.summary_ids)] = torch.tensor(e.summary_ids)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                                              reduction="sum")
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    assert n == 10
    assert loss.item() == pytest.approx(plain.item(), abs=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(grads, plain_grads)) <= 1e-5


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
    from rayrlhf.core.modeling import load_scalar_model, load_tokenizer

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
