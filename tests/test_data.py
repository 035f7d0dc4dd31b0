"""Data layer: the synthetic task and its gold judge, query truncation, row validation, real TL;DR files."""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import replace

import pytest

from rayrlhf.core.config import DataConfig
from rayrlhf.core.data import (
    ComparisonExample, DataError, RowChecker, SummaryExample, TLDRData, clean_summary, format_query, judge_split,
    lead_baseline, load_tldr, post_key, read_comparisons, read_summaries, split_pairs, split_posts, split_query,
    truncate_query,
)
from rayrlhf.core.synthetic import Post, judge, make_pairs, make_posts, prefer

# --- synthetic task ---------------------------------------------------------------------------------


def test_synthetic_task_is_deterministic_for_a_seed(tiny_cfg):
    a, b = load_tldr(tiny_cfg.data), load_tldr(tiny_cfg.data)
    assert a == b
    assert len(a.sft_train) == 96 and len(a.sft_test) == 16 and len(a.pairs_valid) == 32
    other = load_tldr(tiny_cfg.data.model_copy(update={"seed": tiny_cfg.data.seed + 1}))
    assert [e.query for e in other.sft_train] != [e.query for e in a.sft_train]
    # splits are drawn from separate streams: no test post is a training post
    assert not {e.query for e in a.sft_test} & {e.query for e in a.sft_train}


def test_synthetic_examples_are_in_the_tldr_format(tiny_cfg):
    data = load_tldr(tiny_cfg.data)
    for ex in data.sft_train[:10]:
        head, post, tail = split_query(ex.query)
        assert head.startswith("SUBREDDIT: r/") and tail == "\n\nTL;DR:"
        assert post == ex.post.body
        assert ex.reference.startswith(" ") and not ex.reference.startswith("  ")
    for p in data.pairs_train[:10]:
        assert p.chosen != p.rejected and p.chosen.startswith(" ")


POST = Post(
    id="hand-0", subreddit="tifu", title="my boss situation",
    body="last week my boss crashed the truck.\nalso my dad bakes bread. my sister got engaged.",
    key_facts=("boss crashed the truck", "sister got engaged"),
    distractors=("dad bakes bread",),
)
# The ideal summary writes each fact as "my <fact>", joined by "and": (4 + 1) + (3 + 1) + 1 = 10 words.
GOOD = "my boss crashed the truck and my sister got engaged."


@pytest.mark.parametrize("summary, coverage, invented, extra, score", [
    # Ideal: 10 words, nothing extra -> 1.0
    (GOOD, 1.0, 0, 0, 1.0),
    # Punctuation and case do not matter (normalised text)
    ("My Boss crashed the truck!!! And my sister got engaged", 1.0, 0, 0, 1.0),
    # One fact missing: coverage 1/2, 5 words < 10 ideal -> 0.5
    ("my boss crashed the truck.", 0.5, 0, 0, 0.5),
    # Padded with the distractor: 10 + "and" + 4 = 15 words, 5 extra -> 1 - 0.05 * 5 = 0.75
    ("my boss crashed the truck and my sister got engaged and my dad bakes bread.", 1.0, 0, 5, 0.75),
    # An invented key fact about someone the post never mentions costs through `invented` only: the
    # three stated facts need 5 + 4 + 4 + 2 = 15 words -> 1 - 0.5 = 0.5
    ("my boss crashed the truck and my sister got engaged and my cousin adopted puppies.", 1.0, 1, 0, 0.5),
    # People swapped: both stated facts invented, nothing covered -> 0 - 0.5 * 2 = -1.0
    ("my boss got engaged and my sister crashed the truck.", 0.0, 2, 0, -1.0),
    # One fact twice: covered once (5 words ideal), 11 words -> 0.5 - 0.05 * 6 = 0.2
    ("my boss crashed the truck and my boss crashed the truck.", 0.5, 0, 6, 0.2),
    # A fact given to the wrong person: coverage 1/2, 1 invented, 5 + 1 + 4 = 10 words -> 0.5 - 0.5 = 0.0
    ("my boss crashed the truck and my cousin got engaged.", 0.5, 1, 0, 0.0),
    # Empty: nothing covered, nothing extra
    ("", 0.0, 0, 0, 0.0),
])
def test_gold_judge_by_hand(summary, coverage, invented, extra, score):
    j = judge(POST, summary)
    assert j.coverage == pytest.approx(coverage)
    assert j.invented == invented
    assert j.extra_words == extra
    assert j.score == pytest.approx(score)


def test_prefer_and_ties():
    assert prefer(POST, GOOD, "my boss crashed the truck.") == 1.0
    assert prefer(POST, "my boss crashed the truck.", GOOD) == 0.0
    assert prefer(POST, GOOD, "my sister got engaged and my boss crashed the truck") == 0.5


def test_label_noise_rate_roughly_as_configured():
    pairs = make_pairs(seed=7, split="noise", n=2000, label_noise=0.2)
    flipped = sum(not p.gold_agrees for p in pairs) / len(pairs)
    assert flipped == pytest.approx(0.2, abs=0.03)  # binomial sd 0.009
    for p in pairs[:200]:
        c, r = judge(p.post, p.chosen).score, judge(p.post, p.rejected).score
        assert (c > r) == p.gold_agrees  # no ties are kept
    assert all(p.gold_agrees for p in make_pairs(seed=7, split="clean", n=300, label_noise=0.0))


def test_make_posts_references_have_mixed_quality():
    scores = [judge(p, ref).score for p, ref in make_posts(3, "train", 200)]
    assert max(scores) == pytest.approx(1.0)  # some references are ideal
    assert min(scores) < 0.5  # and some are not


# --- query truncation -------------------------------------------------------------------------------

def words(text: str) -> int:
    """A hand-checkable token counter: whitespace-separated words."""
    return len(text.split())


# Header tokens: "SUBREDDIT:", "r/test", "TITLE:", "a", "title", "POST:" = 6; tail "TL;DR:" = 1; post = 8.
QUERY = format_query("test", "a title", "one two three\nfour five six\nseven eight")
HEAD = "SUBREDDIT: r/test\n\nTITLE: a title\n\nPOST: "
TAIL = "\n\nTL;DR:"


def test_truncate_query_hand_counted():
    assert words(QUERY) == 15
    assert truncate_query(QUERY, words, 15) == QUERY  # fits: unchanged
    assert truncate_query(QUERY, words, 100) == QUERY
    # Newline cuts give 6+3+1 = 10 and 6+6+1 = 13 tokens: the last one that fits wins.
    assert truncate_query(QUERY, words, 14) == HEAD + "one two three\nfour five six" + TAIL
    assert truncate_query(QUERY, words, 13) == HEAD + "one two three\nfour five six" + TAIL
    assert truncate_query(QUERY, words, 12) == HEAD + "one two three" + TAIL
    assert truncate_query(QUERY, words, 10) == HEAD + "one two three" + TAIL
    # No newline cut fits 9: fall back to the last whitespace that fits ("one two" -> 9 tokens).
    assert truncate_query(QUERY, words, 9) == HEAD + "one two" + TAIL
    assert truncate_query(QUERY, words, 8) == HEAD + "one" + TAIL


def test_truncate_query_errors():
    with pytest.raises(DataError, match="header alone"):
        truncate_query(QUERY, words, 6)
    with pytest.raises(DataError, match="not in the"):
        truncate_query("just some long text without the format", words, 3)


def test_truncate_query_with_the_builtin_tokenizer(tiny_cfg):
    from rayrlhf.core.data import corpus_text
    from rayrlhf.core.modeling import train_tokenizer

    data = load_tldr(tiny_cfg.data)
    tok = train_tokenizer(corpus_text(data), tiny_cfg.model.vocab_size)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    ex = data.sft_train[0]
    head, post, tail = split_query(ex.query)
    first_paragraph = post.split("\n")[0]  # synthetic posts have one paragraph break
    cut = head + first_paragraph.rstrip() + tail
    assert count(cut) < count(ex.query)
    assert truncate_query(ex.query, count, count(ex.query)) == ex.query
    assert truncate_query(ex.query, count, count(cut)) == cut
    # One token less: no newline cut fits, so the first paragraph is cut at a space.
    shorter = truncate_query(ex.query, count, count(cut) - 1)
    assert count(shorter) <= count(cut) - 1
    assert shorter.startswith(head) and shorter.endswith(tail)
    kept = shorter[len(head) : -len(tail)]
    assert first_paragraph.startswith(kept) and first_paragraph[len(kept)] == " "


def test_clean_summary_and_lead_baseline():
    assert clean_summary("TL;DR: my dog ate it ") == " my dog ate it"
    assert clean_summary("   my dog ate it") == " my dog ate it"
    assert clean_summary(" TL;DR:my dog") == " my dog"
    assert lead_baseline(QUERY) == " one two three\nfour five six\nseven eight"  # no sentence end: whole post
    q = format_query("tifu", "t", "hi reddit. my dog ate it.\nmore text.")
    assert lead_baseline(q) == " hi reddit."


# --- local files: row validation -----------------------------------------------------------------

Q = "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: p\n\nTL;DR:"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _local(**kw) -> DataConfig:
    return DataConfig(source="local", **kw)


SUMMARY_ROWS = [
    {"prompt": Q, "reference": "good one"},
    {"prompt": Q},  # row 1: reference missing
    {"prompt": "   ", "reference": "x"},  # row 2: empty prompt
    {"prompt": Q, "reference": 5},  # row 3: not a string
    {"prompt": Q, "reference": "TL;DR: good two"},
]


def test_bad_rows_are_counted_and_skipped(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "s.jsonl", SUMMARY_ROWS)
    with caplog.at_level(logging.WARNING, logger="rayrlhf.core.data"):
        out = read_summaries(_local(strict=False), str(path))
    assert [e.reference for e in out] == [" good one", " good two"]
    assert [e.id for e in out] == [f"{path}:0", f"{path}:4"]
    assert "skipped 3 of 5 bad rows" in caplog.text
    assert "row 1: field 'reference' is missing" in caplog.text


@pytest.mark.parametrize("bad_row, problem", [
    ({"prompt": Q}, "row 1: field 'reference' is missing"),
    ({"prompt": "  ", "reference": "x"}, "row 1: field 'prompt' is empty"),
    ({"prompt": Q, "reference": 5}, "row 1: field 'reference' is int, not a string"),
])
def test_bad_row_is_an_error_when_strict(tmp_path, bad_row, problem):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"prompt": Q, "reference": "ok"}, bad_row])
    with pytest.raises(DataError) as info:
        read_summaries(_local(strict=True), str(path))
    assert problem in str(info.value) and str(path) in str(info.value)


def _raw_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


UNREADABLE = [
    (b'{"prompt": "SUBREDDIT: r/x\\nPOST: y\\nTL;DR:", "reference": "ok"', "row 1: invalid JSON"),
    ('{"prompt": "caf\u00e9", "reference": "ok"}'.encode("latin-1"), "row 1: not UTF-8"),
]


@pytest.mark.parametrize("line, problem", UNREADABLE)
def test_unreadable_lines_are_skipped_when_lax_and_named_when_strict(tmp_path, caplog, line, problem):
    good = json.dumps({"prompt": Q, "reference": "ok"}).encode()
    path = _raw_lines(tmp_path / "s.jsonl", [good, line, good])
    with caplog.at_level(logging.WARNING, logger="rayrlhf.core.data"):
        out = read_summaries(_local(strict=False), str(path))
    assert [e.id for e in out] == [f"{path}:0", f"{path}:2"]
    assert "skipped 1 of 3 bad rows" in caplog.text and problem in caplog.text
    with pytest.raises(DataError) as info:
        read_summaries(_local(strict=True), str(path))
    assert f"{path} {problem}" in str(info.value)


def test_an_overlong_query_outside_the_tldr_format_is_skipped_when_lax_and_named_when_strict(tmp_path, caplog):
    from transformers import PreTrainedTokenizerFast

    from rayrlhf.core.data import TLDRData
    from rayrlhf.core.modeling import train_tokenizer
    from rayrlhf.core.text import with_encodable_queries

    tok: PreTrainedTokenizerFast = train_tokenizer([Q, "free text " * 50], 300)
    ok = SummaryExample("f.jsonl:0", Q, " ok")
    long = SummaryExample("f.jsonl:1", "free text " * 400, " too long, no POST: to cut")
    data = TLDRData([ok, long], [ok], [ok], [], [])
    cfg = _local(max_prompt_tokens=64)
    with caplog.at_level(logging.WARNING, logger="rayrlhf.core.text"):
        kept = with_encodable_queries(tok, data, cfg)
    assert kept.sft_train == [ok] and kept.sft_valid == [ok]
    assert "sft_train: skipped 1 of 2 rows" in caplog.text and "f.jsonl:1: query of" in caplog.text
    with pytest.raises(DataError, match=r"^f.jsonl:1: query of \d+ tokens exceeds 64"):
        with_encodable_queries(tok, data, _local(max_prompt_tokens=64, strict=True))


def test_reference_field_may_be_label_or_reference(tmp_path):
    carper = _write_jsonl(tmp_path / "carper.jsonl", [{"prompt": Q, "label": "from label"}])
    shared = _write_jsonl(tmp_path / "shared.jsonl", [{"prompt": Q, "reference": "from reference"}])
    assert read_summaries(_local(), str(carper))[0].reference == " from label"
    assert read_summaries(_local(), str(shared))[0].reference == " from reference"


def test_comparisons_rows(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": Q, "chosen": "TL;DR: a", "rejected": "TL;DR: b"},
        {"prompt": Q, "chosen": "a", "rejected": ""},
    ])
    out = read_comparisons(_local(), str(path))
    assert [(e.chosen, e.rejected) for e in out] == [(" a", " b")]
    with pytest.raises(DataError, match="row 1: field 'rejected' is empty"):
        read_comparisons(_local(strict=True), str(path))


def test_unusable_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_summaries(_local(), str(tmp_path / "missing.jsonl"))
    txt = tmp_path / "rows.txt"
    txt.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_summaries(_local(), str(txt))
    all_bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": Q}, {"prompt": Q}])
    with pytest.raises(DataError, match="no usable rows"):
        read_summaries(_local(), str(all_bad))


def test_max_rows_caps_each_split(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"prompt": Q, "reference": f"r{i}"} for i in range(10)])
    assert len(read_summaries(_local(max_rows=4), str(path))) == 4


# --- the shared real TL;DR files ----------------------------------------------------------------

def test_shared_tldr_files_load(shared_data, tmp_path):
    posts = str(shared_data / "tldr" / "tldr_posts_dev.jsonl")
    pairs = str(shared_data / "tldr" / "tldr_pairs_dev.jsonl")
    # The first pairs are on the first posts: evaluation prompts from further down the file, or no pair could train.
    lines = (shared_data / "tldr" / "tldr_posts_dev.jsonl").read_text().splitlines(keepends=True)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(lines[-20:]))
    cfg = _local(sft_train=posts, sft_valid=posts, sft_test=str(test), pairs_train=pairs, pairs_valid=pairs,
                 max_rows=20, strict=True)
    data = load_tldr(cfg)
    assert len(data.sft_train) == 20 and len(data.pairs_train) == 20
    for ex in data.sft_train:
        assert split_query(ex.query) is not None  # OpenAI's format parses
        assert ex.reference.startswith(" ") and ex.reference.strip()
        assert ex.post is None
    for p in data.pairs_train:
        assert split_query(p.query) is not None
        assert p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected
    named = re.escape(f"data.pairs_train ({pairs}): all 20 training pairs are on posts held out for evaluation")
    with pytest.raises(DataError, match=named):
        load_tldr(cfg.model_copy(update={"sft_test": posts}))  # evaluation prompts that are the pairs' posts


def test_gpt2_tokenizer_gets_a_dedicated_pad_token(shared_data):
    from transformers import GPT2TokenizerFast

    from rayrlhf.core.modeling import PAD_TOKEN, prepare_tokenizer

    src = shared_data / "tokenizer_gpt2"
    if not (src / "vocab.json").is_file():
        pytest.skip("no shared GPT-2 tokenizer")
    # Positional on purpose: transformers 5 ignores vocab_file=/merges_file= keywords (an empty tokenizer).
    tok = GPT2TokenizerFast(str(src / "vocab.json"), str(src / "merges.txt"))
    assert len(tok) == 50257 and tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.pad_token_id is None and tok.eos_token_id == 50256
    tok = prepare_tokenizer(tok)
    assert tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id == 50257 != tok.eos_token_id
    assert len(tok) == 50258


def test_real_queries_truncate_with_gpt2(shared_data, gpt2_tokenizer_dir):
    from rayrlhf.core.modeling import load_tokenizer
    from rayrlhf.core.text import encode_queries

    tok = load_tokenizer(str(gpt2_tokenizer_dir))
    rows = [json.loads(line) for line in (shared_data / "tldr" / "tldr_posts_dev.jsonl").open()][:24]
    ids = encode_queries(tok, [r["prompt"] for r in rows], 128)
    assert all(len(q) <= 128 for q in ids)
    assert any(len(tok(r["prompt"])["input_ids"]) > 128 for r in rows)  # truncation was exercised
    assert all(tok.decode(q).endswith("\n\nTL;DR:") for q in ids)


def test_budgets_that_do_not_fit_the_references_are_measured_and_warned_about(tmp_path):
    from rayrlhf.core.modeling import train_tokenizer
    from rayrlhf.core.text import budget_warnings, reference_budget
    from rayrlhf.pipeline.report import write_report
    from rayrlhf.pipeline.run_dir import RunDir

    refs = [" one two three", " one two three four five six seven eight nine ten eleven twelve", " ok"]
    examples = [SummaryExample(f"f:{i}", Q, r) for i, r in enumerate(refs)]
    tok = train_tokenizer([Q, *refs], 300)
    lengths = sorted(len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in refs)
    budget = reference_budget(tok, examples, max_summary_tokens=lengths[1], max_new_tokens=lengths[0])
    assert budget == {"sft/references_cut_fraction": 1 / 3, "sft/references_beyond_response_budget": 2 / 3,
                      "sft/reference_tokens_median": float(lengths[1])}
    warnings = budget_warnings({**budget, "ppo/eos_fraction_mean": 0.1})
    assert len(warnings) == 3
    assert "33% of the SFT references (with EOS) exceed data.max_summary_tokens" in warnings[0]
    assert "67% of the SFT references (with EOS) are longer than rollout.max_new_tokens" in warnings[1]
    assert "90% of the PPO rollouts ended without EOS" in warnings[2]
    fitting = reference_budget(tok, examples, max_summary_tokens=lengths[2], max_new_tokens=lengths[2])
    assert budget_warnings({**fitting, "ppo/eos_fraction_mean": 0.9}) == []
    run = RunDir(tmp_path)
    run.record("sft", budget)
    run.record("ppo", {"ppo/eos_fraction_mean": 0.1})
    report = write_report(run).read_text()
    assert "## Warnings" in report and "90% of the PPO rollouts ended without EOS" in report


def _posts(n: int) -> list[SummaryExample]:
    return [SummaryExample(f"p{i}", f"SUBREDDIT: r/x\n\nTITLE: t{i}\n\nPOST: body {i}\n\nTL;DR:", f" ref {i}")
            for i in range(n)]


def _pairs(posts: list[SummaryExample]) -> list[ComparisonExample]:
    return [ComparisonExample(f"c{i}", e.query, " good", " bad") for i, e in enumerate(posts)]


def test_one_posts_file_splits_into_disjoint_seeded_parts():
    posts = _posts(200)
    train, valid, test = split_posts(posts, 0.05, 0.1, seed=7)
    assert (len(train), len(valid), len(test)) == (170, 10, 20)
    assert sorted(e.id for e in train + valid + test) == sorted(e.id for e in posts)  # a partition
    assert split_posts(posts, 0.05, 0.1, seed=7) == (train, valid, test)  # deterministic
    assert split_posts(posts, 0.05, 0.1, seed=8)[2] != test
    assert split_posts(posts, 0.2, 0.1, seed=7)[2] == test  # the held-out posts do not move with valid_fraction


def test_pairs_on_held_out_posts_never_train():
    posts = _posts(100)
    _, _, test = split_posts(posts, 0.1, 0.1, seed=0)
    held_out = {e.query for e in test}
    train, valid = split_pairs(_pairs(posts), 0.05, held_out, seed=0)
    assert len(train) + len(valid) == 100 and not {p.id for p in train} & {p.id for p in valid}
    assert not any(p.query in held_out for p in train)
    assert len(valid) == 10  # the 10 on held-out posts, though 5% would be 5
    train, valid = split_pairs(_pairs(posts), 0.3, held_out, seed=0)
    assert len(valid) == 30 and held_out <= {p.query for p in valid}
    with pytest.raises(DataError, match="none is left to train on"):
        split_pairs(_pairs(posts[:10]), 0.2, {e.query for e in posts[:10]}, seed=0)


def test_the_judge_gets_comparisons_disjoint_from_the_reward_models():
    posts = _posts(60)
    data = TLDRData(posts, posts, posts, _pairs(posts[:40]), _pairs(posts[40:]))
    split = judge_split(data, 0.5, seed=3)
    assert (len(split.judge_train), len(split.pairs_train), len(split.judge_valid), len(split.pairs_valid)) == \
        (20, 20, 10, 10)
    ids = lambda xs: {p.query for p in xs}  # noqa: E731
    assert not ids(split.judge_train) & ids(split.pairs_train)
    assert not ids(split.judge_valid) & ids(split.pairs_valid)
    assert split.pairs("judge") == (split.judge_train, split.judge_valid)
    assert split.pairs("rm") == (split.pairs_train, split.pairs_valid)
    with pytest.raises(DataError, match="too few pairs"):
        judge_split(replace(data, pairs_valid=_pairs(posts[:1])), 0.5, seed=3)


def test_a_recipe_reads_one_posts_file_and_one_pairs_file(shared_data):
    posts = str(shared_data / "tldr" / "tldr_posts_dev.jsonl")
    pairs = str(shared_data / "tldr" / "tldr_pairs_dev.jsonl")
    cfg = _local(posts_file=posts, pairs_file=pairs, valid_fraction=0.05, test_fraction=0.1, pairs_valid_fraction=0.15,
                 judge_fraction=0.5)
    data = load_tldr(cfg)
    assert (len(data.sft_train), len(data.sft_valid), len(data.sft_test)) == (1020, 60, 120)
    test = {e.query for e in data.sft_test}
    trained_on = data.pairs_train + data.judge_train
    assert not any(p.query in test for p in trained_on)  # no reward model or judge sees an evaluation post
    assert len(trained_on) + len(data.pairs_valid) + len(data.judge_valid) == 1000
    assert abs(len(data.pairs_train) - len(data.judge_train)) <= 1
    assert not _post_keys(data.pairs_train + data.pairs_valid) & _post_keys(data.judge_train + data.judge_valid)


# --- comparisons are split by post: the judge's posts, the evaluation posts ---------------------------

def _many_pairs(posts: list[SummaryExample], seed: int = 0) -> list[ComparisonExample]:
    """3 to 5 comparisons of each post, as in the hub comparisons (several summaries of one post compared)."""
    rng = random.Random(seed)
    return [ComparisonExample(f"c{i}.{j}", e.query, f" good {j}", f" bad {j}")
            for i, e in enumerate(posts) for j in range(rng.randint(3, 5))]


def _post_keys(pairs: list[ComparisonExample]) -> set[str]:
    return {post_key(p.query) for p in pairs}


def _carper(query: str, tldr: bool) -> str:
    """A query in the CarperAI form: single newlines; its comparison prompts end before 'TL;DR:' (the summaries
    carry it), its SFT prompts with it."""
    query = query.replace("\n\n", "\n")
    return query if tldr else query.removesuffix("\nTL;DR:")


def _ids(pairs: list[ComparisonExample]) -> list[str]:
    return sorted(p.id for p in pairs)


def test_post_key_matches_one_post_in_any_of_its_forms():
    openai = format_query("tifu", "a title", "one two\nthree")
    assert post_key(openai) == post_key(_carper(openai, True)) == post_key(_carper(openai, False))
    assert post_key(openai) == post_key(f"  {openai}\n")
    assert post_key(openai) != post_key(format_query("tifu", "a title", "one two\nfour"))
    assert post_key(openai) != post_key(format_query("tifu", "another title", "one two\nthree"))


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_the_judge_and_the_reward_model_share_no_post_when_posts_have_many_pairs(fraction):
    posts = _posts(80)
    train, valid = _many_pairs(posts[:60]), _many_pairs(posts[60:], seed=1)
    valid += _many_pairs(posts[:4], seed=2)  # a few posts compared in both splits
    data = TLDRData(posts, posts, posts, train, valid)
    split = judge_split(data, fraction, seed=3)
    (rm_train, rm_valid), (judge_train, judge_valid) = split.pairs("rm"), split.pairs("judge")
    assert not _post_keys(rm_train + rm_valid) & _post_keys(judge_train + judge_valid)
    assert _ids(rm_train + judge_train) == _ids(train) and _ids(rm_valid + judge_valid) == _ids(valid)
    # The fraction of the pairs, to within the nearest cut between whole posts (at most 5 pairs each).
    assert abs(len(judge_train) - fraction * len(train)) <= 2.5
    assert abs(len(judge_valid) - fraction * len(valid)) <= 2.5
    assert judge_split(data, fraction, seed=3) == split  # deterministic for a seed
    assert _post_keys(judge_split(data, fraction, seed=4).judge_train) != _post_keys(judge_train)


def test_synthetic_pairs_split_by_post_and_never_train_on_an_evaluation_post(tiny_cfg):
    data = load_tldr(tiny_cfg.data.model_copy(update={"judge_fraction": 0.5}))
    whole = load_tldr(tiny_cfg.data)
    assert not _post_keys(data.pairs_train + data.pairs_valid) & _post_keys(data.judge_train + data.judge_valid)
    assert not _post_keys(data.pairs_train + data.judge_train) & {post_key(e.query) for e in data.sft_test}
    assert abs(len(data.judge_train) - len(whole.pairs_train) / 2) <= 1  # one pair per synthetic post
    assert load_tldr(tiny_cfg.data.model_copy(update={"judge_fraction": 0.5})) == data


def test_pairs_on_evaluation_posts_never_train_from_five_files(tmp_path, caplog):
    posts = _posts(40)  # 0-9 evaluation posts, 10-14 validation, 15-39 training
    train, valid = _many_pairs(posts[:30]), _many_pairs(posts[30:], seed=1)

    def summaries(name: str, chunk: list[SummaryExample]):
        return str(_write_jsonl(tmp_path / name, [{"prompt": e.query, "reference": e.reference} for e in chunk]))

    def comparisons(name: str, pairs: list[ComparisonExample]):  # in the CarperAI form: the same posts must match
        return str(_write_jsonl(tmp_path / name, [{"prompt": _carper(p.query, False), "chosen": "TL;DR:" + p.chosen,
                                                   "rejected": "TL;DR:" + p.rejected} for p in pairs]))

    cfg = _local(sft_train=summaries("train.jsonl", posts[15:]), sft_valid=summaries("valid.jsonl", posts[10:15]),
                 sft_test=summaries("test.jsonl", posts[:10]), pairs_train=comparisons("pt.jsonl", train),
                 pairs_valid=comparisons("pv.jsonl", valid), judge_fraction=0.5)
    with caplog.at_level(logging.INFO, logger="rayrlhf.core.data"):
        data = load_tldr(cfg)
    evaluated = {post_key(e.query) for e in posts[:10]}
    on_evaluated = [p for p in train if post_key(p.query) in evaluated]
    assert not _post_keys(data.pairs_train + data.judge_train) & evaluated
    assert len(data.pairs_train + data.judge_train) == len(train) - len(on_evaluated)
    assert len(data.pairs_valid + data.judge_valid) == len(valid) + len(on_evaluated)  # moved to validation
    assert (f"data.pairs_train ({cfg.pairs_train}): {len(on_evaluated)} of {len(train)} training pairs are on posts "
            "held out for evaluation: moved to validation") in caplog.text
    assert not _post_keys(data.pairs_train + data.pairs_valid) & _post_keys(data.judge_train + data.judge_valid)


def test_one_pairs_file_with_many_pairs_per_post_splits_by_post(tmp_path, caplog):
    posts, pairs = _posts(100), _many_pairs(_posts(100))
    cfg = _local(posts_file=str(_write_jsonl(tmp_path / "posts.jsonl", [
                     {"prompt": e.query, "reference": e.reference} for e in posts])),
                 pairs_file=str(_write_jsonl(tmp_path / "pairs.jsonl", [
                     {"prompt": p.query, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])),
                 valid_fraction=0.1, test_fraction=0.1, pairs_valid_fraction=0.15, judge_fraction=0.5)
    with caplog.at_level(logging.INFO, logger="rayrlhf.core.data"):
        data = load_tldr(cfg)
    evaluated = {post_key(e.query) for e in data.sft_test}
    assert not _post_keys(data.pairs_train + data.judge_train) & evaluated
    assert len(data.pairs_train + data.pairs_valid + data.judge_train + data.judge_valid) == len(pairs)
    on_evaluated = sum(post_key(p.query) in evaluated for p in pairs)
    assert f"data.pairs_file: {on_evaluated} pairs on 10 posts held out for evaluation only validate" in caplog.text
    # train and valid by post too, and the judge's posts apart from the reward model's
    assert not _post_keys(data.pairs_train + data.judge_train) & _post_keys(data.pairs_valid + data.judge_valid)
    assert not _post_keys(data.pairs_train + data.pairs_valid) & _post_keys(data.judge_train + data.judge_valid)
    assert abs(len(data.judge_train) - len(data.pairs_train + data.judge_train) / 2) <= 2.5
    assert load_tldr(cfg) == data


def test_many_pairs_per_post_on_held_out_posts_validate_first():
    posts = _posts(50)
    pairs = _many_pairs(posts)
    held_out = [e.query for e in posts[:5]]
    train, valid = split_pairs(pairs, 0.2, held_out, seed=0)
    assert _ids(train + valid) == _ids(pairs)
    assert not _post_keys(train) & _post_keys(valid)
    assert {post_key(q) for q in held_out} <= _post_keys(valid)
    assert abs(len(valid) - 0.2 * len(pairs)) <= 2.5
    assert split_pairs(pairs, 0.2, held_out, seed=0) == (train, valid)
    with pytest.raises(DataError, match="data.pairs_file: all .* pairs are on posts held out for evaluation"):
        split_pairs(pairs, 0.2, [e.query for e in posts], seed=0)


def test_hub_rows_go_through_the_same_held_out_and_judge_splits(monkeypatch, caplog):
    """The hub cannot be reached offline: its rows come from memory, in the CarperAI forms (which differ between
    the SFT prompts and the comparison prompts of one post)."""
    from rayrlhf.core import data as data_module

    cfg = DataConfig(source="hub", judge_fraction=0.5)
    posts = _posts(60)  # 0-9 the test split, 10-19 valid, 20-59 train
    train, valid = _many_pairs(posts[:45]), _many_pairs(posts[45:], seed=1)
    sft = {split: [{"prompt": _carper(e.query, True), "label": e.reference} for e in chunk]
           for split, chunk in (("train", posts[20:]), ("valid", posts[10:20]), ("test", posts[:10]))}
    comparisons = {split: [{"prompt": _carper(p.query, False), "chosen": "TL;DR:" + p.chosen,
                            "rejected": "TL;DR:" + p.rejected} for p in chunk]
                   for split, chunk in (("train", train), ("valid1", valid))}
    rows = {cfg.sft_dataset: sft, cfg.comparisons_dataset: comparisons}

    def read_rows(cfg: DataConfig, dataset: str, split: str, strict: bool) -> tuple[RowChecker, list]:
        return RowChecker(f"{dataset}[{split}]", strict), list(enumerate(rows[dataset][split]))

    monkeypatch.setattr(data_module, "_read_rows", read_rows)
    with caplog.at_level(logging.INFO, logger="rayrlhf.core.data"):
        data = load_tldr(cfg)
    evaluated = {post_key(e.query) for e in data.sft_test}
    on_evaluated = sum(post_key(p.query) in evaluated for p in train)
    assert len(evaluated) == 10 and on_evaluated > 0
    assert not _post_keys(data.pairs_train + data.judge_train) & evaluated
    assert len(data.pairs_train + data.judge_train) == len(train) - on_evaluated
    assert (f"data.pairs_train (CarperAI/openai_summarize_comparisons[train]): {on_evaluated} of {len(train)} training "
            "pairs are on posts held out for evaluation: moved to validation") in caplog.text
    assert not _post_keys(data.pairs_train + data.pairs_valid) & _post_keys(data.judge_train + data.judge_valid)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_byte_order_mark_does_not_cost_a_lax_file_its_first_row(tmp_path, suffix):
    """Windows editors start UTF-8 files with a BOM: the first row is read, not skipped as invalid JSON."""
    rows = [{"prompt": Q, "reference": "first"}, {"prompt": Q, "reference": "second"}]
    body = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    path = tmp_path / f"s{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [e.reference for e in read_summaries(_local(strict=False), str(path))] == [" first", " second"]
    assert len(read_summaries(_local(strict=True), str(path))) == 2


def test_the_long_tailed_variant_spreads_key_facts_from_one_to_eight():
    """`data.synthetic_lengths: long_tail`: 1-8 key facts per post, most posts one fact, a few eight (a good summary
    ~8x as long); every reference quality still has what it needs (a distractor, an unmentioned person)."""
    import collections

    from rayrlhf.core.synthetic import make_pairs, make_posts

    posts = make_posts(5, "train", 2000, long_tail=True)
    counts = collections.Counter(len(p.key_facts) for p, _ in posts)
    assert set(counts) == set(range(1, 9)) and counts[1] > 800 and 20 < counts[8] < 100
    assert all(judge(p, ref).coverage <= 1 for p, ref in posts)
    assert len(make_pairs(5, "train", 200, 0.1, long_tail=True)) == 200
    # the default task is drawn as before
    assert [p.body for p, _ in make_posts(5, "train", 20)] != [p.body for p, _ in posts[:20]]
    assert all(len(p.key_facts) == 2 for p, _ in make_posts(5, "train", 200))
