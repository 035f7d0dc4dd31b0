"""TL;DR data: the OpenAI query format, query truncation, dataset loading and row validation.

Three sources give the same typed examples:
- `synthetic`: the builtin task (`core.synthetic`), with posts the gold judge can grade;
- `hub`: `CarperAI/openai_summarize_tldr` (`prompt`, `label`) and `CarperAI/openai_summarize_comparisons`
  (`prompt`, `chosen`, `rejected`) through `datasets.load_dataset`;
- `local`: jsonl/json/parquet files with those fields, or with `prompt`/`reference` as in the shared
  TL;DR dev files.

Whatever the source, comparisons are kept together by post (`post_key`): those on the SFT test posts (the
evaluation prompts) only validate, and the judge's posts are never the training reward model's.
"""

from __future__ import annotations

import codecs
import json
import logging
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import Literal

from rayrlhf.core.config import DataConfig
from rayrlhf.core.synthetic import Post, lead_sentence, make_pairs, make_posts

log = logging.getLogger(__name__)

QUERY_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
# Both the CarperAI form (single newlines) and OpenAI's (blank lines) parse.
_QUERY_RE = re.compile(r"^(SUBREDDIT:.*?\n\s*TITLE:.*?\n\s*POST:\s?)(.*?)(\s*TL;DR:\s*)$", re.DOTALL)


# Local data file types, and how `datasets` reads each.
DATA_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file/split and row."""


@dataclass(frozen=True)
class SummaryExample:
    """A query (already in the OpenAI format, not yet truncated) and its reference summary."""

    id: str
    query: str
    reference: str
    post: Post | None = None  # synthetic only: what the gold judge grades against


@dataclass(frozen=True)
class ComparisonExample:
    id: str
    query: str
    chosen: str
    rejected: str
    post: Post | None = None
    gold_agrees: bool | None = None  # synthetic only: label equals the noiseless gold label


@dataclass(frozen=True)
class TLDRData:
    sft_train: list[SummaryExample]
    sft_valid: list[SummaryExample]
    sft_test: list[SummaryExample]
    pairs_train: list[ComparisonExample]  # the training reward model's
    pairs_valid: list[ComparisonExample]
    judge_train: list[ComparisonExample] = field(default_factory=list)  # the judge's, disjoint (data.judge_fraction)
    judge_valid: list[ComparisonExample] = field(default_factory=list)

    def pairs(self, role: Literal["rm", "judge"]) -> tuple[list[ComparisonExample], list[ComparisonExample]]:
        """(train, valid) comparisons of the training reward model or of the judge."""
        return (self.pairs_train, self.pairs_valid) if role == "rm" else (self.judge_train, self.judge_valid)


def format_query(subreddit: str, title: str, post: str) -> str:
    return QUERY_TEMPLATE.format(subreddit=subreddit, title=title, post=post)


def split_query(query: str) -> tuple[str, str, str] | None:
    """(head up to 'POST: ', post body, tail ' TL;DR:') or None if the query is not in the TL;DR format."""
    m = _QUERY_RE.match(query)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def truncate_query(query: str, count_tokens, max_tokens: int) -> str:
    """Cut the post at its last newline that lets the whole query fit `max_tokens` (Huang et al. detail 1).

    If no newline cut fits, the post is cut at the last whitespace that fits; a query whose header alone
    is too long is an error. `count_tokens(text) -> int` is the tokenizer's length function.
    """
    if count_tokens(query) <= max_tokens:
        return query
    parts = split_query(query)
    if parts is None:
        raise DataError(f"query of {count_tokens(query)} tokens exceeds {max_tokens} and is not in the "
                        "SUBREDDIT/TITLE/POST/TL;DR format, so it cannot be cut at the post")
    head, post, tail = parts
    for sep in ("\n", " "):
        cuts = [i for i, c in enumerate(post) if c == sep]
        # Longest prefix first; binary search over cut points since token counts grow with the prefix.
        lo, hi, best = 0, len(cuts) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = head + post[: cuts[mid]].rstrip() + tail
            if count_tokens(candidate) <= max_tokens:
                best, lo = candidate, mid + 1
            else:
                hi = mid - 1
        if best is not None:
            return best
    raise DataError(f"query header alone does not fit max_prompt_tokens={max_tokens}: {head[:80]!r}...")


def clean_summary(text: str) -> str:
    """Summaries get one leading space (detail 2); a leading 'TL;DR:' as in the CarperAI pairs is dropped."""
    text = text.strip()
    if text.startswith("TL;DR:"):
        text = text[len("TL;DR:"):].strip()
    return " " + text


def lead_baseline(query: str) -> str:
    parts = split_query(query)
    return " " + lead_sentence(parts[1] if parts else query)


# --- reading rows ----------------------------------------------------------------------------------

class RowChecker:
    """Counts bad rows, logs the first, or raises on the first when strict."""

    def __init__(self, source: str, strict: bool):
        self.source, self.strict, self.bad, self.first = source, strict, 0, None

    def reject(self, index: int, problem: str) -> None:
        """A row that cannot be read at all (invalid JSON, not UTF-8, a query that cannot be cut)."""
        if self.strict:
            raise DataError(f"{self.source} row {index}: {problem}")
        self.bad += 1
        if self.first is None:
            self.first = f"row {index}: {problem}"

    def check(self, index: int, row: Mapping, fields: tuple[str, ...]) -> bool:
        problem = None
        if not isinstance(row, Mapping):
            problem = f"row is {type(row).__name__}, not an object"
        else:
            for f in fields:
                v = row.get(f)
                if f not in row or v is None:
                    problem = f"field {f!r} is missing"
                elif not isinstance(v, str):
                    problem = f"field {f!r} is {type(v).__name__}, not a string"
                elif not v.strip():
                    problem = f"field {f!r} is empty"
                if problem:
                    break
        if problem is None:
            return True
        self.reject(index, problem)
        return False

    def report(self, total: int) -> None:
        if self.bad:
            log.warning("%s: skipped %d of %d bad rows; first: %s", self.source, self.bad, total, self.first)


def _read_jsonl(path: Path, checker: RowChecker, max_rows: int | None) -> list[tuple[int, object]]:
    """(row index, parsed row) of each line that is UTF-8 JSON; the others go to `checker` (row = non-blank line)."""
    rows = []
    with path.open("rb") as f:
        index = -1
        for line_no, raw in enumerate(f):
            if line_no == 0:  # a BOM (Windows editors write one) would make the file's first row invalid JSON
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            index += 1
            if max_rows is not None and index >= max_rows:
                break
            try:
                rows.append((index, json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError as e:
                checker.reject(index, f"not UTF-8 (byte {e.start} of the line: {e.reason})")
            except json.JSONDecodeError as e:
                checker.reject(index, f"invalid JSON ({e.msg} at column {e.colno})")
    return rows


def _read_rows(cfg: DataConfig, dataset: str, split_or_path: str, strict: bool) -> tuple[RowChecker, list]:
    """The rows of a split or file as (index, row), and the checker that counts its bad rows."""
    import datasets  # heavy import, only for real data

    datasets.disable_progress_bars()  # a bar per file drowns the pipeline's own messages
    if cfg.source == "hub":
        checker = RowChecker(f"{dataset}[{split_or_path}]", strict)
        try:
            ds = datasets.load_dataset(dataset, split=split_or_path)
        except Exception as e:  # the hub is unreachable offline: say so plainly
            raise DataError(f"cannot load {checker.source}: {e}") from e
    else:
        path = Path(split_or_path)
        checker = RowChecker(str(path), strict)
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        kind = DATA_FILE_KINDS.get(path.suffix)
        if kind is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(DATA_FILE_KINDS)})")
        if path.suffix == ".jsonl":  # line by line, so that one bad line is one bad row
            return checker, _read_jsonl(path, checker, cfg.max_rows)
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as e:
            raise DataError(f"cannot read {path}: {e}") from e
    rows = ds.to_list() if cfg.max_rows is None else ds.select(range(min(cfg.max_rows, len(ds)))).to_list()
    return checker, list(enumerate(rows))


def read_summaries(cfg: DataConfig, split_or_path: str) -> list[SummaryExample]:
    checker, rows = _read_rows(cfg, cfg.sft_dataset, split_or_path, cfg.strict)
    out = []
    for i, row in rows:
        # CarperAI calls the reference `label`; the shared dev files call it `reference`.
        ref_field = "label" if isinstance(row, Mapping) and "label" in row else "reference"
        if checker.check(i, row, ("prompt", ref_field)):
            out.append(SummaryExample(f"{checker.source}:{i}", row["prompt"].strip(), clean_summary(row[ref_field])))
    checker.report(len(out) + checker.bad)
    if not out:
        raise DataError(f"{checker.source}: no usable rows")
    return out


def read_comparisons(cfg: DataConfig, split_or_path: str) -> list[ComparisonExample]:
    checker, rows = _read_rows(cfg, cfg.comparisons_dataset, split_or_path, cfg.strict)
    out = []
    for i, row in rows:
        if checker.check(i, row, ("prompt", "chosen", "rejected")):
            out.append(ComparisonExample(f"{checker.source}:{i}", row["prompt"].strip(), clean_summary(row["chosen"]),
                                         clean_summary(row["rejected"])))
    checker.report(len(out) + checker.bad)
    if not out:
        raise DataError(f"{checker.source}: no usable rows")
    return out


def _synthetic_summaries(cfg: DataConfig, split: str, n: int) -> list[SummaryExample]:
    return [SummaryExample(p.id, format_query(p.subreddit, p.title, p.body), " " + ref, p)
            for p, ref in make_posts(cfg.seed, split, n, cfg.synthetic_lengths == "long_tail")]


def _synthetic_pairs(cfg: DataConfig, split: str, n: int) -> list[ComparisonExample]:
    return [ComparisonExample(p.post.id, format_query(p.post.subreddit, p.post.title, p.post.body),
                              " " + p.chosen, " " + p.rejected, p.post, p.gold_agrees)
            for p in make_pairs(cfg.seed, split, n, cfg.label_noise, cfg.synthetic_lengths == "long_tail")]


def _shuffled(items: list, seed: int, salt: str) -> list:
    """A seeded permutation; `salt` gives each split its own, so changing one fraction leaves the others' order."""
    out = list(items)
    random.Random(f"{seed}:{salt}").shuffle(out)
    return out


def _cut(items: list, fraction: float) -> tuple[list, list]:
    """(the first round(fraction * n) items, the rest); at least one on each side when there are two."""
    k = min(max(round(fraction * len(items)), 1), len(items) - 1) if len(items) > 1 else 0
    return items[:k], items[k:]


def post_key(query: str) -> str:
    """What identifies a post across splits and sources: its query with whitespace runs collapsed and a final
    'TL;DR:' dropped, so that the CarperAI form (single newlines) matches OpenAI's (blank lines) and a comparison
    prompt without 'TL;DR:' matches the SFT prompt with it. Rows carry no post id (a synthetic pair's id names
    the pair's own generated post, never the SFT post of the same text), so the text is the identity."""
    text = " ".join(query.split())
    return text[: -len("TL;DR:")].rstrip() if text.endswith("TL;DR:") else text


def _by_post(pairs: list[ComparisonExample]) -> dict[str, list[ComparisonExample]]:
    """The pairs of each post (by `post_key`), posts in order of first appearance, pairs in their given order."""
    groups: dict[str, list[ComparisonExample]] = {}
    for p in pairs:
        groups.setdefault(post_key(p.query), []).append(p)
    return groups


def _nearest_prefix(sizes: list[int], target: float, at_least: int = 1) -> int:
    """How many leading groups hold nearest `target` items together (the fewer on a tie): at least
    `at_least` and one group on each side when there are two or more groups, as `_cut` does for items."""
    if len(sizes) < 2:
        return 0
    total = [0, *accumulate(sizes)]  # total[k]: items in the first k groups
    return min(range(max(at_least, 1), len(sizes)), key=lambda k: abs(total[k] - target))


def split_posts(posts: list[SummaryExample], valid_fraction: float, test_fraction: float,
                seed: int) -> tuple[list[SummaryExample], list[SummaryExample], list[SummaryExample]]:
    """(train, valid, test) of one posts file, drawn by a seeded permutation."""
    test, rest = _cut(_shuffled(posts, seed, "posts"), test_fraction)
    valid, train = _cut(rest, valid_fraction / (1 - test_fraction))
    return train, valid, test


def split_pairs(pairs: list[ComparisonExample], valid_fraction: float, held_out: Iterable[str],
                seed: int) -> tuple[list[ComparisonExample], list[ComparisonExample]]:
    """(train, valid) of one comparisons file, by post: all pairs of a post train or all validate, about
    `valid_fraction` of the pairs validating. Posts held out for evaluation (`held_out`: their queries, the SFT
    test prompts) validate first, so no reward model or judge is trained on a post it is evaluated on."""
    held = {post_key(q) for q in held_out}
    groups = _shuffled(list(_by_post(pairs).items()), seed, "pairs")
    groups.sort(key=lambda g: g[0] not in held)  # stable: held-out posts first, each part still shuffled
    n_held = sum(key in held for key, _ in groups)
    if n_held == len(groups):
        raise DataError(f"data.pairs_file: all {len(pairs)} pairs are on posts held out for evaluation; none is "
                        "left to train on")
    k = _nearest_prefix([len(g) for _, g in groups], valid_fraction * len(pairs), at_least=n_held)
    valid = [p for _, g in groups[:k] for p in g]
    if n_held:
        log.info("data.pairs_file: %d pairs on %d posts held out for evaluation only validate", sum(
            len(g) for key, g in groups if key in held), n_held)
    return [p for _, g in groups[k:] for p in g], valid


def hold_out_pairs(train: list[ComparisonExample], valid: list[ComparisonExample], held_out: Iterable[str],
                   key: str) -> tuple[list[ComparisonExample], list[ComparisonExample]]:
    """(train, valid) with the training pairs on posts held out for evaluation (`held_out`: their queries, the
    SFT test prompts) moved to validation, as `split_pairs` does: no reward model or judge is trained on a post
    it is evaluated on. For sources that come with their own train and valid pairs; `key` names the setting
    of the training pairs in errors."""
    held = {post_key(q) for q in held_out}
    moved = [p for p in train if post_key(p.query) in held]
    if not moved:
        return train, valid
    if len(moved) == len(train):
        raise DataError(f"{key}: all {len(train)} training pairs are on posts held out for evaluation (the SFT test "
                        "prompts); none is left to train on")
    log.info("%s: %d of %d training pairs are on posts held out for evaluation: moved to validation", key,
             len(moved), len(train))
    return [p for p in train if post_key(p.query) not in held], valid + moved


def judge_split(data: TLDRData, fraction: float, seed: int) -> TLDRData:
    """Give the judge the pairs, train and valid alike, of a seeded `fraction` of the posts and the training reward
    model those of the others: no post is compared for both, so the judge is independent of the reward model
    even where a post has many pairs (the hub comparisons), and each gets about `fraction` of the pairs.

    The posts of the training pairs are drawn first (nearest `fraction` of the training pairs), then the posts
    that only validate (nearest `fraction` of the validation pairs, counting those the first posts brought). Each
    side keeps its pairs in the order their posts were drawn: with one pair per post (the shared TL;DR files, the
    synthetic task) this is the same split, order included, as the draw by pair that it replaced."""
    train, valid = _by_post(data.pairs_train), _by_post(data.pairs_valid)
    train_posts = _shuffled(list(train), seed, "judge-train")
    judge = set(train_posts[: _nearest_prefix([len(train[k]) for k in train_posts], fraction * len(data.pairs_train))])
    brought = sum(len(valid.get(k, ())) for k in judge)
    valid_posts = _shuffled([k for k in valid if k not in train], seed, "judge-valid")
    target = fraction * len(data.pairs_valid) - brought
    judge |= set(valid_posts[: _nearest_prefix([len(valid[k]) for k in valid_posts], target)])

    def pairs_of(groups: dict[str, list[ComparisonExample]], order: list[str], judged: bool) -> list[ComparisonExample]:
        """The pairs of the judge's (or the others') posts, in the order the posts were drawn."""
        return [p for k in order if (k in judge) == judged for p in groups.get(k, ())]

    valid_order = valid_posts + [k for k in train_posts if k in valid]
    judge_train, rm_train = pairs_of(train, train_posts, True), pairs_of(train, train_posts, False)
    judge_valid, rm_valid = pairs_of(valid, valid_order, True), pairs_of(valid, valid_order, False)
    if not all((judge_train, rm_train, judge_valid, rm_valid)):
        raise DataError(f"data.judge_fraction {fraction}: too few pairs on distinct posts ({len(data.pairs_train)} "
                        f"train on {len(train)} posts, {len(data.pairs_valid)} valid on {len(valid)} posts) to give "
                        "both the reward model and the judge some of each")
    log.info("judge: %d train / %d valid pairs on %d posts; reward model: %d / %d on the other %d posts",
             len(judge_train), len(judge_valid), len(judge), len(rm_train), len(rm_valid),
             len(train.keys() | valid.keys()) - len(judge))
    return replace(data, pairs_train=rm_train, pairs_valid=rm_valid, judge_train=judge_train, judge_valid=judge_valid)


def load_tldr(cfg: DataConfig) -> TLDRData:
    """All splits of the configured source, as typed examples (queries not yet truncated). For every source,
    comparisons on the SFT test posts only validate, and the judge's posts are disjoint from the reward model's."""
    if cfg.source == "synthetic":
        posts = tuple(_synthetic_summaries(cfg, split, n) for split, n in (
            ("train", cfg.num_train_posts), ("valid", cfg.num_valid_posts), ("test", cfg.num_test_posts)))
        pairs = _synthetic_pairs(cfg, "train", cfg.num_train_pairs), _synthetic_pairs(cfg, "valid", cfg.num_valid_pairs)
        pairs = hold_out_pairs(*pairs, (e.query for e in posts[2]), "data.num_train_pairs")
    else:
        if cfg.posts_file:
            posts = split_posts(read_summaries(cfg, cfg.posts_file), cfg.valid_fraction, cfg.test_fraction, cfg.seed)
        else:
            posts = tuple(read_summaries(cfg, path) for path in (cfg.sft_train, cfg.sft_valid, cfg.sft_test))
        held_out = [e.query for e in posts[2]]
        if cfg.pairs_file:
            pairs = split_pairs(read_comparisons(cfg, cfg.pairs_file), cfg.pairs_valid_fraction, held_out, cfg.seed)
        else:
            key = (f"data.pairs_train ({cfg.comparisons_dataset}[{cfg.pairs_train}])" if cfg.source == "hub"
                   else f"data.pairs_train ({cfg.pairs_train})")
            pairs = hold_out_pairs(read_comparisons(cfg, cfg.pairs_train), read_comparisons(cfg, cfg.pairs_valid),
                                   held_out, key)
    data = TLDRData(*posts, *pairs)
    return judge_split(data, cfg.judge_fraction, cfg.seed) if cfg.judge_fraction > 0 else data


def corpus_text(data: TLDRData) -> Iterable[str]:
    """Training text for the builtin tokenizer (train splits only)."""
    for ex in data.sft_train:
        yield ex.query + ex.reference
    for ex in data.pairs_train:
        yield ex.query + ex.chosen + ex.rejected
