"""Token plumbing: EOS truncation, positions, padding invariance, and generate/log-prob agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rayrlhf.core.forward import response_logprobs
from rayrlhf.core.padding import flush_right, has_eos, pad_left, pad_right, position_ids, trim_padding, truncate_after_eos
from rayrlhf.core.plan import length_grouped, prompt_ids, token_budget_groups
from rayrlhf.core.sampling import sample
from rayrlhf.core.throughput import forward_flops, shared_prefix_work
from rayrlhf.core.work import WorkMeter

EOS, PAD = 2, 0  # ids for the tests without a model; those with the tiny tokenizer read its own (EOS 1)


def test_truncate_after_eos():
    responses = torch.tensor([[5, EOS, 7, EOS], [5, 6, 7, 8], [EOS, 5, 5, 5]])
    out, mask = truncate_after_eos(responses, EOS, PAD)
    # kept up to and including the first EOS; everything after is padding
    assert out.tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_has_eos_only_counts_eos_inside_the_mask():
    responses = torch.tensor([[5, EOS, PAD], [5, 6, 7], [5, 6, EOS]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])  # row 2's EOS lies in padding
    assert has_eos(responses, mask, EOS).tolist() == [True, False, False]


def test_position_ids_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    # prompt left-padded, response right-padded: positions continue through the response only
    full = torch.tensor([[0, 1, 1, 1, 1, 0]])
    assert position_ids(full).tolist() == [[0, 0, 1, 2, 3, 3]]


def test_pad_left_and_right():
    ids, mask = pad_left([[1, 2], [3], [4, 5, 6]], PAD)
    assert ids.tolist() == [[PAD, 1, 2], [PAD, PAD, 3], [4, 5, 6]]
    assert mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    ids, mask = pad_right([[1, 2], [3]], PAD, width=4)
    assert ids.tolist() == [[1, 2, PAD, PAD], [3, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_trim_padding_drops_only_columns_that_are_padding_in_every_row():
    p, pm = pad_left([[1, 2], [3]], PAD)
    p, pm = F.pad(p, (2, 0), value=PAD), F.pad(pm, (2, 0))  # two more all-pad columns on the left
    r, rm = pad_right([[4, EOS], [5, 6, EOS]], PAD, width=6)
    tp, tpm, tr, trm = trim_padding(p, pm, r, rm)
    assert tp.tolist() == [[1, 2], [PAD, 3]] and tpm.tolist() == [[1, 1], [0, 1]]
    assert tr.tolist() == [[4, EOS, PAD], [5, 6, EOS]] and trm.tolist() == [[1, 1, 0], [1, 1, 1]]
    # prompt side alone; an all-empty response keeps one column so shapes stay valid
    assert [t.shape for t in trim_padding(p, pm)] == [(2, 2), (2, 2)]
    empty = trim_padding(p, pm, r, torch.zeros_like(rm))
    assert empty[2].shape == (2, 1)


def test_length_grouped_cuts_longest_first_and_keeps_every_position_once():
    assert length_grouped([3, 9, 5, 9, 1], 2) == [[1, 3], [2, 0], [4]]
    assert length_grouped([], 4) == []


# --- with the tiny SFT checkpoint ---------------------------------------------------------------------

def test_flush_right_moves_each_rows_real_tokens_to_the_right_end():
    p, pm = pad_left([[1, 2], [3], [4, 5, 6]], PAD)
    r, rm = pad_right([[7, EOS], [8, 9, EOS], [EOS]], PAD)
    ids, mask = torch.cat([p, r], 1), torch.cat([pm, rm], 1)  # [pad.. prompt | response .. pad], 6 columns
    flushed, fmask, index = flush_right(ids, mask)
    # the longest row has 4 real tokens: 4 columns, padding on the left only
    assert flushed.tolist() == [[1, 2, 7, EOS], [3, 8, 9, EOS], [4, 5, 6, EOS]]
    assert fmask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert index.tolist() == [[-1, 0, 1, 2, 3, -1], [-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, -1, -1]]
    short, smask, _ = flush_right(ids[:2, 1:4], mask[:2, 1:4])  # rows of 3 and 2 real tokens
    assert short.tolist() == [[1, 2, 7], [0, 3, 8]] and smask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert position_ids(smask).tolist() == [[0, 1, 2], [0, 0, 1]]


@pytest.mark.slow
def test_flushed_rows_give_the_logits_and_values_of_the_rows_padded_in_place(policy, prompts, tiny_checkpoints):
    """response_logits / token_values compute on rows flushed right: every real position's output equals the
    model's on `[pad.. prompt | response .. pad]` as laid out, padding positions are 0."""
    from rayrlhf.core.modeling import load_scalar_model
    from rayrlhf.core.forward import response_logits, token_values

    model, tok = policy
    responses = [q[: 2 + 3 * i] for i, q in enumerate(prompts)]  # 2..11 tokens
    # as the learner cuts them, and with short prompts and responses padded wider than any whole row (evaluation
    # pads to max_new_tokens): the flushed rows are then narrower than the R + 1 columns asked of the head
    for p, pm, r, rm in (pad_left(prompts, tok.pad_token_id) + pad_right(responses, tok.pad_token_id),
                         pad_left([q[:3] for q in prompts], tok.pad_token_id) + pad_right(responses, tok.pad_token_id, 40)):
        ids, mask = torch.cat([p, r], 1), torch.cat([pm, rm], 1)
        R = r.shape[1]
        with torch.no_grad():
            in_place = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -R - 1 : -1]
            got = response_logits(model, ids, mask, R)
        predicting = torch.cat([pm[:, -1:], rm[:, :-1]], 1).bool()  # the position before each response token is real
        torch.testing.assert_close(got[predicting], in_place[predicting], atol=1e-5, rtol=0)
        assert (got[~predicting] == 0).all()
    p, pm = pad_left(prompts, tok.pad_token_id)
    r, rm = pad_right(responses, tok.pad_token_id)
    ids, mask = torch.cat([p, r], 1), torch.cat([pm, rm], 1)
    with torch.no_grad():
        critic = load_scalar_model(str(tiny_checkpoints.rm), tok).eval()
        hidden = critic.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        values = token_values(critic, ids, mask)
        torch.testing.assert_close(values[mask.bool()], critic.score(hidden)[..., 0][mask.bool()], atol=1e-5, rtol=0)
        assert (values[~mask.bool()] == 0).all()


@pytest.fixture(scope="module")
def policy(tiny_checkpoints):
    from rayrlhf.core.modeling import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_checkpoints.sft))
    return load_causal_lm(str(tiny_checkpoints.sft), tok).eval(), tok


@pytest.fixture(scope="module")
def prompts(tiny_cfg, policy) -> list[list[int]]:
    """Four truncated synthetic queries of different lengths."""
    from rayrlhf.core.data import load_tldr
    from rayrlhf.core.text import encode_queries

    _, tok = policy
    queries = [e.query for e in load_tldr(tiny_cfg.data).sft_test]
    ids = encode_queries(tok, queries, tiny_cfg.data.max_prompt_tokens)
    by_len = {len(q): q for q in ids}
    assert len(by_len) >= 4
    return [by_len[n] for n in sorted(by_len)[:: max(1, len(by_len) // 4)][:4]]


@pytest.mark.slow
def test_logprobs_are_padding_invariant(policy, prompts):
    model, tok = policy
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (5, 1, 8, 3)]
    responses[0][-1] = tok.eos_token_id
    p, pm = pad_left(prompts, tok.pad_token_id)
    r, rm = pad_right(responses, tok.pad_token_id, width=10)
    with torch.no_grad():
        batch, _ = response_logprobs(model, p, pm, r, rm, temperature=0.7)
        for i in range(len(prompts)):
            alone, _ = response_logprobs(model, *pad_left([prompts[i]], tok.pad_token_id),
                                         *pad_right([responses[i]], tok.pad_token_id), temperature=0.7)
            n = len(responses[i])
            torch.testing.assert_close(batch[i, :n], alone[0], atol=1e-5, rtol=0)
            assert (batch[i, n:] == 0).all()  # padding positions hold 0
            assert (alone[0] < 0).all()
        # the learner's trimmed micro batches give the same log-probs on the kept columns
        for rows in ([0, 2], [1, 3], [1]):
            tp, tpm, tr, trm = trim_padding(p[rows], pm[rows], r[rows], rm[rows])
            trimmed, _ = response_logprobs(model, tp, tpm, tr, trm, temperature=0.7)
            assert tr.shape[1] == max(len(responses[i]) for i in rows) < r.shape[1]
            torch.testing.assert_close(trimmed, batch[rows, : tr.shape[1]], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_hf_backend_logprobs_equal_reference_recompute(tiny_checkpoints, prompts, monkeypatch):
    from rayrlhf.roles.reference import ReferenceLogprobs
    from rayrlhf.roles.rollout import HFBackend
    from rayrlhf.core.config import RolloutConfig
    from rayrlhf.core.experience import RolloutBatch

    cfg = RolloutConfig(temperature=0.7, max_new_tokens=12)
    backend = HFBackend(str(tiny_checkpoints.sft), cfg)
    rep = [p for p in prompts for _ in range(2)]  # two samples per prompt, adjacent
    responses, rmask, logprobs = backend.generate(rep, seed=3)
    assert responses.shape == rmask.shape == logprobs.shape == (8, 12)
    assert (logprobs[rmask == 0] == 0).all() and (logprobs[rmask == 1] < 0).all()
    # the same seed samples the same responses
    again, _, _ = backend.generate(rep, seed=3)
    assert torch.equal(again, responses)

    p, pm = pad_left(rep, backend.tokenizer.pad_token_id)
    batch = RolloutBatch(batch_id=0, shard=0, worker=0, policy_version=0, prompt_indices=list(range(8)), prompts=p,
                         prompt_mask=pm, responses=responses, response_mask=rmask, logprobs=logprobs)
    ref = ReferenceLogprobs(str(tiny_checkpoints.sft), temperature=0.7, batch_size=3).logprobs(batch)
    assert (ref.logprobs - logprobs).abs().max().item() < 1e-5
    # packed under a token budget (micro batches of several sequences in one row): the same log-probs
    packed = ReferenceLogprobs(str(tiny_checkpoints.sft), temperature=0.7, max_tokens=200).logprobs(batch)
    assert (packed.logprobs - logprobs).abs().max().item() < 1e-5
    # each prompt once for its two samples (micro batches of 4 keep them together): the same log-probs
    shared = ReferenceLogprobs(str(tiny_checkpoints.sft), temperature=0.7, batch_size=4, share_prompts=True)
    assert shared.plan.share_prompts
    assert (shared.logprobs(batch).logprobs - logprobs).abs().max().item() < 1e-5

    from rayrlhf.roles.reward import RewardScorer

    padded = RewardScorer(str(tiny_checkpoints.rm), batch_size=3).score_rollout(batch)
    packed_scores = RewardScorer(str(tiny_checkpoints.rm), max_tokens=200).score_rollout(batch).raw_scores
    assert (packed_scores - padded.raw_scores).abs().max().item() < 1e-5
    # each prompt once for its two samples: the same scores, from less work (MFU counts the work as it ran)
    shared_rm = RewardScorer(str(tiny_checkpoints.rm), batch_size=4, share_prompts=True)
    assert shared_rm.plan.share_prompts
    s = shared_rm.score_rollout(batch)
    assert (s.raw_scores - padded.raw_scores).abs().max().item() < 1e-5 and torch.equal(s.has_eos, padded.has_eos)
    assert (s.scores - padded.scores).abs().max().item() < 1e-5
    lengths, plens = (pm.sum(-1) + rmask.sum(-1)).tolist(), pm.sum(-1).tolist()
    whole_work, _ = shared_prefix_work(shared_rm.model.config, lengths, plens, None)
    once_work, once_attention = shared_prefix_work(shared_rm.model.config, lengths, plens, prompt_ids(p, pm))
    assert once_work < whole_work
    meter = WorkMeter("cpu", "float32")
    shared_rm._score_rollout_rows(p, pm, responses, rmask, meter)
    assert meter.flops == pytest.approx(forward_flops(shared_rm.cost.params, once_work) + once_attention, rel=1e-12)
    assert RewardScorer(str(tiny_checkpoints.rm), max_tokens=200, share_prompts=True).plan.share_prompts is False

    # the generator prefills each prompt once for its two samples and counts that work
    from rayrlhf.roles.rollout import RolloutGenerator
    from rayrlhf.core.experience import RolloutRequest

    import rayrlhf.roles.rollout as rollout_module

    flops = []  # the FLOPs each generate call counted

    class Recording(WorkMeter):
        def stop(self, tokens: int = 0):
            flops.append(self.flops)
            return super().stop(tokens)

    monkeypatch.setattr(rollout_module, "WorkMeter", Recording)
    req = RolloutRequest(batch_id=0, shard=0, prompt_indices=list(range(8)), prompts=rep, seed=3)
    gens = [RolloutGenerator(str(tiny_checkpoints.sft), cfg, share_prompts=share) for share in (False, True)]
    (a, b) = (g.generate(req) for g in gens)
    assert torch.equal(a.responses, b.responses) and (a.logprobs - b.logprobs).abs().max().item() < 1e-5
    assert gens[0].backend.prefill_groups(p, pm) is None and gens[1].backend.prefill_groups(p, pm) == prompt_ids(p, pm)
    # each row's prefill and response whole, or each prompt's tokens but its last once (the rows run the last)
    config, n_params, n_head = gens[0].cost.config, gens[0].cost.params, gens[0].cost.head
    lengths, plens = (pm.sum(-1) + a.response_mask.sum(-1)).tolist(), pm.sum(-1)
    head = 2.0 * n_head * int(a.response_mask.sum())
    for got, prefixes, groups in ((flops[0], [0] * 8, None), (flops[1], (plens - 1).tolist(), prompt_ids(p, pm))):
        tokens, attention = shared_prefix_work(config, lengths, prefixes, groups)
        assert got == pytest.approx(2.0 * n_params * tokens + head + attention)
    assert flops[1] < flops[0]


@pytest.mark.slow
def test_generate_samples_from_the_distribution_logprobs_are_computed_under(policy, prompts):
    """generate's own (KV-cached) logits / T equal response_logprobs' full forward at every sampled token."""
    model, tok = policy
    p, pm = pad_left(prompts, tok.pad_token_id)
    T = 0.7
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=p, attention_mask=pm, max_new_tokens=12, min_new_tokens=12, do_sample=True,
                             temperature=T, top_k=0, top_p=1.0, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
        responses, rmask = truncate_after_eos(out.sequences[:, p.shape[1]:], tok.eos_token_id, tok.pad_token_id)
        step_logits = torch.stack(out.logits, 1).float() / T  # (B, R, V)
        expected = F.log_softmax(step_logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1) * rmask
        got, _ = response_logprobs(model, p, pm, responses, rmask, T)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_greedy_sample_picks_the_argmax_of_the_recomputed_logprobs(policy, prompts):
    model, tok = policy
    p, pm = pad_left(prompts, tok.pad_token_id)
    responses, rmask = sample(model, p, pm, max_new_tokens=12, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                              temperature=1.0, top_p=1.0, greedy=True)
    assert responses.shape == (len(prompts), 12)
    with torch.no_grad():
        ids = torch.cat([p, responses], 1)
        mask = torch.cat([pm, rmask], 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        argmax = logits[:, p.shape[1] - 1 : -1].argmax(-1)  # (B, R)
    assert torch.equal(argmax[rmask == 1], responses[rmask == 1])


def test_sft_gradient_does_not_depend_on_how_the_batch_is_cut(policy, prompts):
    """Length-grouped micro batches, padded or packed (the trainer's), give the one-micro-batch gradient: the
    loss is a token sum divided by the whole batch's token count."""
    import copy

    from rayrlhf.roles.sft import sft_batch, sft_loss
    from rayrlhf.core.text import EncodedSummary

    model, tok = policy
    items = [EncodedSummary(q, q[: 3 + i] + [tok.eos_token_id]) for i, q in enumerate(prompts)]

    def grads(groups: list[list[int]], packed: bool = False) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(model).train()
        batches = [sft_batch([items[i] for i in g], tok.pad_token_id) for g in groups]
        n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        for b in batches:
            (sft_loss(m, b, packed)[0] / n_tokens).backward()
        return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    lengths = [len(e.query_ids) + len(e.summary_ids) for e in items]
    whole = grads([list(range(len(items)))])
    budget = sum(lengths) // 2
    for cut, packed in ((length_grouped(lengths, 2), False), (token_budget_groups(lengths, budget), True)):
        got = grads(cut, packed)
        assert max((whole[k] - got[k]).abs().max().item() for k in whole) < 1e-6, packed


def test_token_budget_groups_respect_the_budget_and_balance():
    lengths = [100, 90, 80, 50, 40, 30, 10]
    groups = token_budget_groups(lengths, 160)
    assert sorted(i for g in groups for i in g) == list(range(7))
    loads = [sum(lengths[i] for i in g) for g in groups]
    assert max(loads) <= 160 and len(groups) == 3  # 400 tokens: the fewest groups of <= 160
    assert token_budget_groups([500, 10], 100) == [[0], [1]]  # too long for the budget: alone
    assert len(token_budget_groups(lengths, 1000, n_groups=4)) == 4  # every rank the same number of passes


def test_packed_forward_equals_the_padded_one(policy, prompts, tiny_checkpoints):
    """Packing (real tokens in one row, positions restarting, attention within each sequence) gives the padded
    batch's log-probs, entropies and values; fp32."""
    from rayrlhf.core.modeling import load_scalar_model
    from rayrlhf.core.forward import response_values

    model, tok = policy
    eos, pad = tok.eos_token_id, tok.pad_token_id
    responses, rmask = pad_right([[5, 6, 7, eos], [8, eos], [9, 10, 11, 12, 13, eos], [14, 15, 16]], pad)
    p, pm = pad_left(prompts, pad)
    padded = response_logprobs(model, p, pm, responses, rmask, 0.7, with_entropy=True)
    packed = response_logprobs(model, p, pm, responses, rmask, 0.7, with_entropy=True, packed=True)
    assert (packed[0] - padded[0]).abs().max() < 1e-5 and (packed[1] - padded[1]).abs().max() < 1e-5
    critic = load_scalar_model(str(tiny_checkpoints.rm), tok).eval()
    v_pad = response_values(critic, p, pm, responses, rmask) * rmask
    v_pack = response_values(critic, p, pm, responses, rmask, packed=True) * rmask
    assert (v_pack - v_pad).abs().max() < 1e-5


def test_packing_is_refused_on_a_model_that_attends_across_packed_sequences():
    """OPT (transformers builds its causal mask without the position restarts) leaks attention across a packed
    row: the probe refuses it, naming the config key; Llama, GPT-NeoX and a Llama scorer pass, in bf16 too."""
    from transformers import (
        GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, OPTConfig,
        OPTForCausalLM,
    )

    from rayrlhf.core.forward import check_packing

    torch.manual_seed(0)
    llama = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=4, num_labels=1, pad_token_id=0)
    for model in (LlamaForCausalLM(llama), LlamaForSequenceClassification(llama).train(),
                  LlamaForCausalLM(llama).to(torch.bfloat16),
                  GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                   intermediate_size=64, num_attention_heads=4))):
        was_training = model.training
        check_packing(model, "ppo.max_tokens_per_micro_batch")
        assert model.training == was_training  # the probe runs in eval mode and restores the caller's
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match=r"^reward.max_tokens_per_micro_batch: opt models attend across the sequences "
                                         r"of a packed micro batch .* unset reward.max_tokens_per_micro_batch to pad"):
        check_packing(opt, "reward.max_tokens_per_micro_batch")


def test_common_prefix_leaves_each_side_a_token_of_its_own():
    from rayrlhf.core.pairs import common_prefix

    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 2  # one side starts the other: it keeps its last token
    assert common_prefix([1, 2], [1, 2]) == 1
    assert common_prefix([7, 2], [1, 2]) == 0


def test_the_work_of_a_shared_prefix_counts_it_once_only_where_it_ran_once():
    """By hand, on a model of one layer, one head of dimension 1 (attention: 4 FLOPs per causal query-key pair)."""
    from types import SimpleNamespace

    from rayrlhf.core.pairs import pair_work
    from rayrlhf.core.plan import response_work

    one = SimpleNamespace(num_attention_heads=1, head_dim=1, hidden_size=1, num_hidden_layers=1)
    # two samples of a 2-token prompt (responses of 1 and 3 tokens) and one of a 3-token prompt (2 tokens)
    p, pm = pad_left([[4, 5], [4, 5], [6, 7, 8]], PAD)
    r, rm = pad_right([[9], [9, 10, 11], [12, 13]], PAD)
    # rows whole: 3 + 5 + 5 positions; 6 + 15 + 15 causal pairs
    assert response_work(one, pm, rm) == (13, 4.0 * 36)
    # the first prompt once (3 pairs), its samples' 3 and 3 + 4 + 5 pairs on its cache; the third row whole
    assert response_work(one, pm, rm, p) == (11, 4.0 * (3 + 3 + 12 + 15))
    # pairs sharing 2 tokens: the start once per pair; a pair sharing nothing makes the whole micro batch whole
    assert pair_work(one, [[1, 2, 3]], [[1, 2, 4, 5]], share=True) == (5, 4.0 * (3 + 3 + 3 + 4))
    assert pair_work(one, [[1, 2, 3], [7, 8]], [[1, 2, 4, 5], [9, 8]], share=True) == (11, 4.0 * (6 + 10 + 3 + 3))
    assert pair_work(one, [[1, 2, 3]], [[1, 2, 4, 5]], share=False) == (7, 4.0 * (6 + 10))


def test_a_prefix_runs_once_exactly_only_with_a_full_cache_and_no_active_dropout():
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from rayrlhf.core.plan import prefix_runs_once_exactly

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=50)
    llama = LlamaForCausalLM(LlamaConfig(**small))
    assert prefix_runs_once_exactly(llama.train()) and prefix_runs_once_exactly(llama.eval())
    # a sliding-window cache keeps only the last positions of a long prompt
    assert not prefix_runs_once_exactly(MistralForCausalLM(MistralConfig(**small, sliding_window=8)))
    assert prefix_runs_once_exactly(MistralForCausalLM(MistralConfig(**small, sliding_window=None)))
    llama.model.layers[0].mlp.dropout = torch.nn.Dropout(0.1)  # as LoRA's lora_dropout adds one
    assert not prefix_runs_once_exactly(llama.train()) and prefix_runs_once_exactly(llama.eval())


@pytest.mark.parametrize("lora", [False, True])
def test_pair_scores_with_the_shared_prefix_run_once_equal_each_side_scored_whole(prompts, tiny_checkpoints, lora):
    """pair_scores runs each pair's shared start once and both continuations on its cached keys and values: the
    scores and the gradient of the pairwise loss are those of scoring every side whole, fp32."""
    from rayrlhf.roles.rm import pairwise_loss
    from rayrlhf.core.config import LoraConfig
    from rayrlhf.core.modeling import apply_lora, load_scalar_model, load_tokenizer
    from rayrlhf.core.forward import sequence_scores
    from rayrlhf.core.pairs import pair_scores

    tok = load_tokenizer(str(tiny_checkpoints.rm))
    torch.manual_seed(0)
    model = load_scalar_model(str(tiny_checkpoints.rm), tok)
    if lora:
        model = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), "SEQ_CLS")
        for n, p in model.named_parameters():
            if "lora_B" in n:  # peft starts B at 0: make the adapters matter
                torch.nn.init.normal_(p, std=0.02)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # posts of different lengths; summaries of different lengths; one side the start of the other
    eos = tok.eos_token_id
    chosen = [q + [5, 6, 7, eos] for q in prompts] + [prompts[0] + [8, 9]]
    rejected = [q + [9, eos] for q in prompts[:2]] + [q + [10, 11, 12, 13, 14, eos] for q in prompts[2:]]
    rejected += [prompts[0] + [8, 9, 10, eos]]

    def loss_and_grads(shared: bool):
        model.zero_grad()
        if shared:
            rc, rr = pair_scores(model, chosen, rejected, tok.pad_token_id)
        else:
            ids, mask = pad_right(chosen + rejected, tok.pad_token_id)
            r = sequence_scores(model, ids, mask)
            rc, rr = r[: len(chosen)], r[len(chosen):]
        loss = pairwise_loss(rc, rr)
        loss.backward()
        return rc.detach(), rr.detach(), [p.grad.clone() for p in params]

    whole, shared = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(shared[0], whole[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[1], whole[1], atol=1e-5, rtol=0)
    for g_shared, g_whole in zip(shared[2], whole[2]):
        torch.testing.assert_close(g_shared, g_whole, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in shared[2])


def test_length_grouped_keeps_a_prompts_samples_together():
    lengths, prompts = [10, 30, 12, 28, 20, 21], [0, 1, 0, 1, 2, 2]
    assert length_grouped(lengths, 2, prompts) == [[1, 3], [5, 4], [2, 0]]
    assert sorted(i for g in length_grouped(lengths, 4, prompts) for i in g) == list(range(6))


@pytest.mark.parametrize("lora", [False, True])
def test_each_prompt_run_once_gives_the_logprobs_values_and_gradients_of_whole_rows(policy, prompts, tiny_checkpoints,
                                                                                  lora):
    """share_prompts runs each distinct prompt of a micro batch once and its samples' responses on its cached keys
    and values: log-probs, entropies, values and their gradients equal the whole rows', fp32."""
    from rayrlhf.core.config import LoraConfig
    from rayrlhf.core.modeling import apply_lora, load_causal_lm, load_scalar_model
    from rayrlhf.core.forward import response_values
    from rayrlhf.core.plan import prompt_ids

    _, tok = policy
    torch.manual_seed(0)
    models = [load_causal_lm(str(tiny_checkpoints.sft), tok), load_scalar_model(str(tiny_checkpoints.rm), tok)]
    if lora:
        models = [apply_lora(m, LoraConfig(r=4, alpha=8), task) for m, task in zip(models, ("CAUSAL_LM", "SEQ_CLS"))]
        for m in models:
            for n, w in m.named_parameters():
                if "lora_B" in n:  # peft starts B at 0: make the adapters matter
                    torch.nn.init.normal_(w, std=0.02)
    policy_model, critic = (m.train() for m in models)
    # two samples of three prompts and one of the fourth; responses of 1 to 6 tokens, one without EOS
    rows = [0, 0, 1, 1, 2, 3, 2]
    eos = tok.eos_token_id
    responses = [[5, 6, 7, eos], [8, eos], [9, 10, 11, 12, 13, eos], [14], [15, 16, 17, 18, 19, 20], [eos], [21, eos]]
    p, pm = pad_left([prompts[i] for i in rows], tok.pad_token_id)
    r, rm = pad_right(responses, tok.pad_token_id)
    ids = prompt_ids(p, pm)
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[4] == ids[6] and len(set(ids)) == 4

    def run(share: bool):
        for m in models:
            m.zero_grad()
        logp, entropy = response_logprobs(policy_model, p, pm, r, rm, 0.7, with_entropy=True, share_prompts=share)
        values = response_values(critic, p, pm, r, rm, share_prompts=share) * rm
        (logp.sum() + 0.1 * entropy.sum() + (values ** 2).sum()).backward()
        grads = [w.grad.clone() for m in models for w in m.parameters() if w.requires_grad]
        return logp.detach(), entropy.detach(), values.detach(), grads

    whole, shared = run(False), run(True)
    for got, want in zip(shared[:3], whole[:3]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for got, want in zip(shared[3], whole[3]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in shared[3][-2:])  # the critic's head (and its last adapter) learned


@pytest.mark.slow
def test_generate_with_each_prompt_prefilled_once_samples_what_generate_samples(policy, prompts, monkeypatch):
    """share_prompts prefills each distinct prompt once and generates its samples on copies of its cache: the
    same tokens (greedy, and sampled with the same seed) and the same behaviour log-probs as generate's own
    prefill of every row, fp32; only where a prompt repeats."""
    import rayrlhf.core.sampling as seq

    model, tok = policy
    calls = []
    prefill = seq.prefill_distinct_prompts
    monkeypatch.setattr(seq, "prefill_distinct_prompts", lambda *a: calls.append(a[1].shape[0]) or prefill(*a))
    rows = [0, 0, 1, 2, 1, 3, 3, 3]  # prompts of different lengths, repeated 1 to 3 times, not adjacent
    p, pm = pad_left([prompts[i] for i in rows], tok.pad_token_id)
    kw = dict(max_new_tokens=10, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, top_p=1.0)
    assert seq.prefills_prompts_once(model, p, pm) and not seq.prefills_prompts_once(model, p[:4][[0, 2, 3]], pm[:4][[0, 2, 3]])
    greedy = [sample(model, p, pm, temperature=1.0, greedy=True, **kw) for _ in range(2)]
    assert calls == []  # sample (evaluation) runs every row
    for share in (False, True):
        torch.manual_seed(5)
        greedy.append(seq._generate(model, p, pm, kw["max_new_tokens"], kw["eos_id"], kw["pad_id"], 1.0, 1.0, True,
                                    with_logprobs=True, share_prompts=share)[:2])
    assert calls == [8]
    for got in greedy[1:]:
        assert torch.equal(got[0], greedy[0][0]) and torch.equal(got[1], greedy[0][1])
    sampled = []
    for share in (False, True):
        torch.manual_seed(7)
        sampled.append(seq.sample_with_logprobs(model, p, pm, temperature=0.7, share_prompts=share, **kw))
    assert calls == [8, 8]
    (r0, m0, lp0), (r1, m1, lp1) = sampled
    assert torch.equal(r0, r1) and torch.equal(m0, m1)
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    # distinct prompts: nothing to share, generate runs as it would
    torch.manual_seed(7)
    seq.sample_with_logprobs(model, p[[0, 2, 3]], pm[[0, 2, 3]], temperature=0.7, share_prompts=True, **kw)
    assert calls == [8, 8]
    # prompts all of one length (generate drops the all-ones mask) and a one-token prompt (its cached columns are
    # all padding): the same tokens and log-probs again
    for batch in ([prompts[1]] * 3, [prompts[2], [prompts[2][0]], prompts[2], [prompts[2][0]]]):
        bp, bpm = pad_left(batch, tok.pad_token_id)
        got = []
        for share in (False, True):
            torch.manual_seed(3)
            got.append(seq.sample_with_logprobs(model, bp, bpm, temperature=0.7, share_prompts=share, **kw))
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
        torch.testing.assert_close(got[1][2], got[0][2], atol=1e-5, rtol=0)
    assert calls == [8, 8, 3, 4]
    # generate with a cache of its own (here static) refuses a given one: then every row runs its own prefill
    model.generation_config.cache_implementation = "static"
    try:
        assert not seq.prefills_prompts_once(model, p, pm)
    finally:
        model.generation_config.cache_implementation = None


def test_response_scores_with_each_prompt_run_once_equal_the_whole_rows(policy, prompts, tiny_checkpoints):
    """The reward at each row's last token, each distinct prompt run once: the whole rows' scores, fp32, for
    responses that fill the width, stop early or are empty (the score is then read at the prompt's last token)."""
    from rayrlhf.core.modeling import load_scalar_model
    from rayrlhf.core.forward import response_scores, sequence_scores

    _, tok = policy
    rm = load_scalar_model(str(tiny_checkpoints.rm), tok).eval()
    rows = [0, 0, 1, 1, 2, 3, 2]
    eos = tok.eos_token_id
    responses = [[5, 6, 7, eos], [8, eos], [9, 10, 11, 12, 13, eos], [], [15, 16, 17, 18, 19, 20], [eos], [21, eos]]
    p, pm = pad_left([prompts[i] for i in rows], tok.pad_token_id)
    r, rm_ = pad_right(responses, tok.pad_token_id)
    with torch.no_grad():
        whole = sequence_scores(rm, torch.cat([p, r], 1), torch.cat([pm, rm_], 1))
        one_by_one = torch.stack([sequence_scores(rm, torch.tensor([prompts[i] + resp]), torch.ones(1, len(prompts[i]) + len(resp),
                                                                                        dtype=torch.long))[0]
                                  for i, resp in zip(rows, responses)])
        shared = response_scores(rm, p, pm, r, rm_, share_prompts=True)
        plain = response_scores(rm, p, pm, r, rm_)
    torch.testing.assert_close(whole, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    assert torch.equal(plain, whole)


def test_generate_samples_softmax_of_logits_over_t_whatever_the_checkpoints_generation_config():
    """A checkpoint's generation_config (repetition penalty, suppressed and banned tokens, no-repeat n-grams, top-k,
    min-p, a minimum length, ...) must not shape sampling: the behaviour log-probs, the learner and the reference
    all assume softmax(logits / T). 4000 one-token draws of one prompt against that distribution (chi-square), the
    recorded log-probs equal to it, and greedy picking its argmax, on a tiny Llama whose logits are peaked enough
    that every processor above would show."""
    from scipy.stats import chisquare
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from rayrlhf.core.sampling import sample_with_logprobs

    V, T, N = 32, 0.7, 4000
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.25)  # logits of std ~1 (the initialisation's are ~0.1: near uniform)
    prompt = [5, 9, 5, 7, 3, 11, 5]
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        model.lm_head.weight[[5, 9, 7]] += 2.0 * h / h.norm() ** 2  # prompt tokens likely next: repetition shows
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    p = F.softmax(logits / T, -1)  # (V,) the distribution the log-probs are computed under
    top = p.argsort(descending=True).tolist()
    eos, pad = top[1], 0  # EOS likely: a minimum length would ban it
    assert p[top[0]] > 0.2 and p[top[5:]].sum() > 0.1, "want a peaked distribution with a visible tail"
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.5, top_k=5, top_p=0.8, min_p=0.2, repetition_penalty=1.3, no_repeat_ngram_size=2,
        suppress_tokens=top[:1], begin_suppress_tokens=top[2:3], bad_words_ids=[[top[3]]], min_new_tokens=2,
        sequence_bias={(top[-1],): 8.0}, eos_token_id=eos, pad_token_id=pad)

    ids, mask = pad_left([prompt] * N, pad)
    torch.manual_seed(1)
    responses, rmask, logprobs = sample_with_logprobs(model, ids, mask, max_new_tokens=1, eos_id=eos, pad_id=pad,
                                                      temperature=T, top_p=1.0)
    first = responses[:, 0]
    torch.testing.assert_close(logprobs[:, 0], p.log()[first], atol=1e-4, rtol=0)  # recorded = softmax(logits / T)
    observed = torch.bincount(first, minlength=V).double()
    expected = N * p.double()
    common = expected >= 5  # chi-square wants at least 5 expected draws per cell: the rest pooled in one
    obs = torch.cat([observed[common], observed[~common].sum(0, keepdim=True)])
    exp = torch.cat([expected[common], expected[~common].sum(0, keepdim=True)])
    stat, pvalue = chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item())
    assert pvalue > 1e-3, f"sampled frequencies differ from softmax(logits / T): chi-square {stat:.1f}, p {pvalue:.2g}"

    # greedy (evaluation, SFT's ROUGE samples), on the model and under peft (a LoRA SFT policy): the argmax, which the
    # file's suppress_tokens bans
    from rayrlhf.core.config import LoraConfig
    from rayrlhf.core.modeling import apply_lora

    for m in (model, apply_lora(model, LoraConfig(r=4, alpha=8), "CAUSAL_LM")):  # LoRA B starts at 0: same logits
        greedy, _ = sample(m, ids[:2], mask[:2], max_new_tokens=1, eos_id=eos, pad_id=pad, temperature=T, top_p=1.0,
                           greedy=True)
        assert greedy[:, 0].tolist() == [top[0]] * 2
    assert model.generation_config.suppress_tokens == top[:1]  # the checkpoint's own is left as it was
