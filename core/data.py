"""TL;DR data: the OpenAI query format, query truncation, dataset loading and row validation.

Three sources give the same typed examples:
- `synthetic`: the builtin task (`core.synthetic`), with posts the gold judge can grade;
- `hub`: `CarperAI/openai_summarize_tldr` (`prompt`, `label`) and `CarperAI/openai_summarize_comparisons`
  (`prompt`, `chosen`, `rejected`) through `datasets.load_dataset`;
- `local`: jsonl/json/parquet files with those fields, or with `prompt`/`reference` as in the shared
  TL;DR dev files.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.config import DataConfig
from core.synthetic import Post, lead_sentence, make_pairs, make_posts

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
    pairs_train: list[ComparisonExample]
    pairs_valid: list[ComparisonExample]


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
        for raw in f:
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
            for p, ref in make_posts(cfg.seed, split, n)]


def _synthetic_pairs(cfg: DataConfig, split: str, n: int) -> list[ComparisonExample]:
    return [ComparisonExample(p.post.id, format_query(p.post.subreddit, p.post.title, p.post.body),
                              " " + p.chosen, " " + p.rejected, p.post, p.gold_agrees)
            for p in make_pairs(cfg.seed, split, n, cfg.label_noise)]


def load_tldr(cfg: DataConfig) -> TLDRData:
    """All splits of the configured source, as typed examples (queries not yet truncated)."""
    if cfg.source == "synthetic":
        return TLDRData(
            _synthetic_summaries(cfg, "train", cfg.num_train_posts),
            _synthetic_summaries(cfg, "valid", cfg.num_valid_posts),
            _synthetic_summaries(cfg, "test", cfg.num_test_posts),
            _synthetic_pairs(cfg, "train", cfg.num_train_pairs),
            _synthetic_pairs(cfg, "valid", cfg.num_valid_pairs),
        )
    return TLDRData(
        read_summaries(cfg, cfg.sft_train),
        read_summaries(cfg, cfg.sft_valid),
        read_summaries(cfg, cfg.sft_test),
        read_comparisons(cfg, cfg.pairs_train),
        read_comparisons(cfg, cfg.pairs_valid),
    )


def corpus_text(data: TLDRData) -> Iterable[str]:
    """Training text for the builtin tokenizer (train splits only)."""
    for ex in data.sft_train:
        yield ex.query + ex.reference
    for ex in data.pairs_train:
        yield ex.query + ex.chosen + ex.rejected
