"""The builtin TL;DR-style task: Reddit-like posts, human-style references and a programmatic gold judge.

Every post holds two *key facts* ("my landlord raised rent") among *distractors* — mundane sentences
about other people ("my dad bakes bread"). A good TL;DR states every key fact, invents none
and adds nothing else. References imitate human writers of uneven quality: some are good, some miss a
fact, some are padded with a distractor, some add a fact about a person the post never mentions. Comparison
pairs are labelled by the gold judge, then flipped with probability `label_noise` (annotator disagreement).

Each person has one key event of their own (the landlord raises rent, the cousin moves to Denver): which
facts a post holds is random, but who did what is not. Binding an event to one of several people named in
the post would need an induction circuit that the builtin 2-layer model does not form on a CPU budget
(measured: binding at chance after 4500 SFT steps, no previous-token head), and then SFT and PPO would only
trade coin flips; with the pairing fixed the task measures what RLHF is for — going beyond demonstrations of
uneven quality. The judge still counts a key event told of the wrong person as invented.

The judge stays available to evaluation, so a run can show that PPO raised *true* quality, not only the
learned reward. Everything is deterministic given the seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SUBREDDITS = ("relationships", "personalfinance", "AskReddit", "tifu", "legaladvice")
# Each word appears in one phrase only, and a post never names a person twice, so a summary can be
# written by copying spans of the post; what a summariser must learn is *which* spans.
SUBJECTS = ("boss", "sister", "roommate", "girlfriend", "dad", "neighbor", "landlord", "coworker", "brother", "cousin")
# Each person's own key event, in the order of SUBJECTS.
KEY_EVENTS = (
    "fired everyone", "got engaged", "owes money", "stopped calling", "crashed the truck", "adopted puppies",
    "raised rent", "lied constantly", "failed chemistry", "moved to denver",
)
EVENT_OF = dict(zip(SUBJECTS, KEY_EVENTS))
MUNDANE_EVENTS = (
    "likes pizza", "drinks coffee", "plays guitar", "watches movies", "reads novels", "loves hiking",
    "collects stamps", "bakes bread",
)
KEY_FRAMES = ("my {fact}.", "last week my {fact}.", "i just found out that my {fact}.", "worse still my {fact}.",
              "my {fact} and i am upset.")
DISTRACTOR_FRAMES = ("also my {fact}.", "my {fact} anyway.", "by the way my {fact}.")
OPENERS = ("hi reddit.", "long time lurker here.", "throwaway account.", "this is a weird one.")
TITLES = ("need advice about my {subject}", "what should i do about my {subject}", "my {subject} situation",
          "am i overreacting")

# Two key facts per post: enough for every failure mode, and a good summary's length does not depend on the
# post, which keeps the task learnable for a ~1M-parameter reward model on a CPU budget.
KEY_FACTS_PER_POST = 2
# Share of each reference quality among human-written references (good ones are the minority, as on Reddit).
REFERENCE_QUALITIES = (("good", 0.25), ("missing", 0.30), ("verbose", 0.30), ("wrong", 0.15))
@dataclass(frozen=True)
class Post:
    """One synthetic post with the facts the gold judge grades against."""

    id: str
    subreddit: str
    title: str
    body: str
    key_facts: tuple[str, ...]
    distractors: tuple[str, ...]


@dataclass(frozen=True)
class Judgement:
    """Gold-judge verdict on one summary; `score` is what comparisons and win rates use."""

    coverage: float  # fraction of the post's key facts stated
    invented: int  # key-fact statements that are not in the post
    extra_words: int  # words beyond what stating the key facts needs
    score: float


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


ALL_KEY_FACTS = tuple(f"{s} {e}" for s in SUBJECTS for e in KEY_EVENTS)


def judge(post: Post, summary: str) -> Judgement:
    """Coverage of key facts, faithfulness (no invented facts) and brevity, in one score.

    score = coverage - 0.5 * invented - 0.05 * extra_words. extra_words counts words beyond what stating
    each fact the summary makes once takes ("my <fact>", joined by "and"): padding and repetition cost,
    an invented fact costs through `invented` alone. Matching is on normalised text (punctuation ignored).
    """
    text = f" {_norm(summary)} "
    facts = set(post.key_facts)
    covered = [f for f in facts if f" {f} " in text]
    invented = [f for f in ALL_KEY_FACTS if f not in facts and f" {f} " in text]
    stated = covered + invented
    ideal_words = sum(len(f.split()) + 1 for f in stated) + max(len(stated) - 1, 0)
    extra_words = max(0, len(text.split()) - ideal_words)
    coverage = len(covered) / len(facts)
    return Judgement(coverage, len(invented), extra_words, coverage - 0.5 * len(invented) - 0.05 * extra_words)


def prefer(post: Post, a: str, b: str) -> float:
    """1 if the judge prefers a, 0 if b, 0.5 on a tie."""
    sa, sb = judge(post, a).score, judge(post, b).score
    return 0.5 if abs(sa - sb) < 1e-9 else float(sa > sb)


# The long-tailed variant (`data.synthetic_lengths: long_tail`): 1 to 8 key facts per post, P(k) ~ k^-1.5, so a
# good summary runs from ~6 tokens to ~8x that, most posts short, a few long (mean ~2.3 facts): the response-length
# spread where generating a batch to its slowest sequence wastes most.
LONG_TAIL_FACTS = tuple(range(1, 9))
LONG_TAIL_WEIGHTS = tuple(k ** -1.5 for k in LONG_TAIL_FACTS)


def make_post(rng: random.Random, index: int, split: str, facts: int = KEY_FACTS_PER_POST) -> Post:
    n_distractors = min(rng.randint(2, 3), len(SUBJECTS) - 1 - facts)  # someone left unmentioned (`write_summary`)
    people = rng.sample(SUBJECTS, facts + n_distractors)
    subjects = people[:facts]
    key_facts = tuple(f"{s} {EVENT_OF[s]}" for s in subjects)
    distractors = tuple(f"{s} {e}" for s, e in zip(people[facts:], rng.sample(MUNDANE_EVENTS, n_distractors)))
    sentences = [rng.choice(KEY_FRAMES).format(fact=f) for f in key_facts]
    sentences += [rng.choice(DISTRACTOR_FRAMES).format(fact=d) for d in distractors]
    rng.shuffle(sentences)
    if rng.random() < 0.5:
        sentences.insert(0, rng.choice(OPENERS))
    # Paragraph breaks give query truncation real newlines to cut at.
    cut = rng.randint(1, len(sentences) - 1)
    body = " ".join(sentences[:cut]) + "\n" + " ".join(sentences[cut:])
    title = rng.choice(TITLES).format(subject=subjects[0])
    return Post(f"{split}-{index}", rng.choice(SUBREDDITS), title, body, key_facts, distractors)


def write_summary(rng: random.Random, post: Post, quality: str) -> str:
    """A human-style TL;DR of the given quality: good, missing, verbose or wrong."""
    facts = list(post.key_facts)
    rng.shuffle(facts)
    if quality == "missing":
        facts.pop()
    elif quality == "verbose":
        facts.insert(rng.randint(0, len(facts)), rng.choice(post.distractors))
    elif quality == "wrong":
        # An invented fact: the key event of someone the post never mentions.
        mentioned = {s for s in SUBJECTS for f in post.key_facts + post.distractors if f.startswith(s + " ")}
        stranger = rng.choice([s for s in SUBJECTS if s not in mentioned])
        facts[rng.randrange(len(facts))] = f"{stranger} {EVENT_OF[stranger]}"
    elif quality != "good":
        raise ValueError(f"unknown summary quality {quality!r}")
    return " and ".join(f"my {f}" for f in facts) + "."


def _quality(rng: random.Random) -> str:
    names, weights = zip(*REFERENCE_QUALITIES)
    return rng.choices(names, weights)[0]


def _facts(lengths: random.Random | None) -> int:
    """Key facts of the next post: two, or drawn from the long tail (a stream of its own, so that the default
    task's posts stay what they were)."""
    return KEY_FACTS_PER_POST if lengths is None else lengths.choices(LONG_TAIL_FACTS, LONG_TAIL_WEIGHTS)[0]


def make_posts(seed: int, split: str, n: int, long_tail: bool = False) -> list[tuple[Post, str]]:
    """n posts of one split, each with a human-style reference summary."""
    rng = random.Random(f"{seed}-{split}-posts")
    lengths = random.Random(f"{seed}-{split}-lengths") if long_tail else None
    out = []
    for i in range(n):
        post = make_post(rng, i, split, _facts(lengths))
        out.append((post, write_summary(rng, post, _quality(rng))))
    return out


@dataclass(frozen=True)
class Pair:
    post: Post
    chosen: str
    rejected: str
    gold_agrees: bool  # False where label noise flipped the gold preference


def make_pairs(seed: int, split: str, n: int, label_noise: float, long_tail: bool = False) -> list[Pair]:
    """n comparisons on fresh posts, labelled by the gold judge with `label_noise` flips; no ties."""
    rng = random.Random(f"{seed}-{split}-pairs")
    lengths = random.Random(f"{seed}-{split}-pair-lengths") if long_tail else None
    pairs: list[Pair] = []
    while len(pairs) < n:
        post = make_post(rng, len(pairs), f"{split}-pair", _facts(lengths))
        a, b = (write_summary(rng, post, _quality(rng)) for _ in range(2))
        p = prefer(post, a, b)
        if p == 0.5:
            continue
        better, worse = (a, b) if p == 1.0 else (b, a)
        flip = rng.random() < label_noise
        pairs.append(Pair(post, worse if flip else better, better if flip else worse, not flip))
    return pairs


def lead_sentence(body: str) -> str:
    """The lead baseline: the post's first sentence."""
    first = re.split(r"(?<=[.!?])\s", body.strip(), maxsplit=1)[0]
    return first.strip()
