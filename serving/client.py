"""Client of the reward service, and the PPO reward role that uses it (`reward.backend: http`; its Ray actor is
`actors.RemoteRewardWorker`).

`RewardClient` never turns a failure into a score: connection errors, timeouts, 429 and 5xx are retried
within a budget (`max_retries`, exponential backoff), then raise `RewardServiceError`; any other 4xx raises at
once with the service's message (sending the same request again cannot help). Scoring has no side effects,
so a retried POST is safe; it keeps its X-Request-ID, so the service's log shows the attempts of one request.

`RemoteRewardScorer.score_rollout` is `RewardScorer.score_rollout` over HTTP: it decodes a rollout to text,
has the service score it, and applies the EOS trick from the token ids. Scores of responses that ended with
EOS match the in-process scorer (up to re-tokenization of the decoded text); a response without EOS is
scored by the service as if it had ended, which only matters when `reward.missing_eos_score` is null.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import torch
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from rayrlhf.core.experience import RolloutBatch, Scores
from rayrlhf.core.padding import has_eos
from rayrlhf.core.ppo_math import eos_trick
from rayrlhf.serving.api import Health, ModelInfo, ScoreResponse

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class RewardServiceError(RuntimeError):
    """The reward service could not score a request: rejected it (4xx), or failed past the retry budget."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 0, request_id: str | None = None):
        super().__init__(message)
        self.status, self.attempts, self.request_id = status, attempts, request_id


@dataclass(frozen=True)
class ScoredTexts:
    scores: list[float]
    truncated: list[bool]
    model_version: str
    request_ids: list[str]  # one per HTTP request the items were split into


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("message") or body.get("detail") or body)
    except (ValueError, AttributeError):
        return response.text[:500] or response.reason_phrase


class RewardClient:
    """Typed calls to the reward service with timeouts and a retry budget.

    timeout_s bounds each attempt (connect, read, write); an attempt that fails with a connection error,
    a timeout, 429 or 5xx is retried up to `max_retries` times after backoff_s * 2**k seconds (at most
    `max_backoff_s`, or the server's Retry-After if that is longer and still within it).
    """

    def __init__(self, base_url: str, token: str | None, timeout_s: float = 30.0, max_retries: int = 3,
                 backoff_s: float = 0.2, max_backoff_s: float = 5.0, transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url, self.max_retries = base_url.rstrip("/"), max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout_s),
                                  transport=transport)
        self._info: ModelInfo | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(self.max_backoff_s, float(retry_after)))
        return delay

    def _request(self, method: str, path: str, json: dict | None = None) -> httpx.Response:
        """One call within the retry budget; returns a 2xx response or raises RewardServiceError."""
        request_id = uuid.uuid4().hex
        t0, last = time.monotonic(), ""
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                response = self._http.request(method, path, json=json, headers={"X-Request-ID": request_id})
            except httpx.TransportError as e:  # refused, reset, DNS, timeouts
                last = f"{type(e).__name__}: {e}"
            else:
                if response.is_success:
                    return response
                message = _server_message(response)
                if response.status_code not in RETRY_STATUSES:
                    raise RewardServiceError(
                        f"reward service rejected {method} {path} ({response.status_code}, request {request_id}): "
                        f"{message}", response.status_code, attempt + 1, request_id)
                last = f"HTTP {response.status_code}: {message}"
            if attempt < self.max_retries:
                delay = self._delay(attempt, response)
                log.warning("reward service %s %s attempt %d/%d failed (%s); retrying in %.2fs", method, path,
                            attempt + 1, self.max_retries + 1, last, delay)
                time.sleep(delay)
        raise RewardServiceError(
            f"reward service at {self.base_url} failed {method} {path} after {self.max_retries + 1} attempts "
            f"in {time.monotonic() - t0:.1f}s (request {request_id}); last error: {last}",
            None, self.max_retries + 1, request_id)

    def _parse(self, model, response: httpx.Response):
        try:
            return model.model_validate_json(response.content)
        except ValidationError as e:
            raise RewardServiceError(f"reward service at {self.base_url} answered {response.request.url.path} with "
                                     f"an unexpected body: {e}") from None

    def health(self) -> Health:
        return self._parse(Health, self._request("GET", "/health"))

    def model_info(self) -> ModelInfo:
        """GET /v1/model (cached: the limits and version of a running service do not change)."""
        if self._info is None:
            self._info = self._parse(ModelInfo, self._request("GET", "/v1/model"))
        return self._info

    def score(self, prompts: Sequence[str], responses: Sequence[str], truncate_responses: bool = False) -> ScoredTexts:
        """Scores of {prompt, response} pairs, sent in requests of at most the service's max_request_items."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        step = self.model_info().limits.max_request_items
        scores: list[float] = []
        truncated: list[bool] = []
        request_ids, versions = [], set()
        for i in range(0, len(prompts), step):
            # Plain JSON, not ScoreRequest: the service validates, so a bad item is its 422 with its message.
            items = [{"prompt": p, "response": r} for p, r in zip(prompts[i : i + step], responses[i : i + step])]
            body = {"items": items, "truncate_responses": truncate_responses}
            out: ScoreResponse = self._parse(ScoreResponse, self._request("POST", "/v1/score", body))
            if len(out.scores) != len(items) or len(out.truncated) != len(items):
                raise RewardServiceError(f"reward service returned {len(out.scores)} scores for {len(items)} items "
                                         f"(request {out.request_id})", request_id=out.request_id)
            scores += out.scores
            truncated += out.truncated
            request_ids.append(out.request_id)
            versions.add(out.model.version)
        if len(versions) > 1:  # replicas with different weights behind one URL: the batch would mix rewards
            raise RewardServiceError(f"reward service answered one batch with model versions {sorted(versions)}")
        return ScoredTexts(scores, truncated, versions.pop() if versions else self.model_info().model.version,
                           request_ids)


def rollout_texts(batch: RolloutBatch, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[str]]:
    """(prompts, responses) as text: prompt tokens under the mask; response tokens before the first EOS, pad
    (and other special tokens) skipped. The service appends EOS itself."""
    eos = tokenizer.eos_token_id
    prompts, responses = [], []
    for p, pm, r, rm in zip(batch.prompts, batch.prompt_mask, batch.responses, batch.response_mask):
        prompts.append(tokenizer.decode(p[pm.bool()].tolist(), skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False))
        ids = r[rm.bool()].tolist()
        ids = ids[: ids.index(eos)] if eos in ids else ids
        responses.append(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return prompts, responses


class RemoteRewardScorer:
    """The PPO reward role over HTTP: same input and output as `roles.reward.RewardScorer.score_rollout`."""

    def __init__(self, client: RewardClient, tokenizer: PreTrainedTokenizerBase, missing_eos_score: float | None):
        self.client, self.tokenizer, self.missing_eos_score = client, tokenizer, missing_eos_score

    def score_rollout(self, batch: RolloutBatch) -> Scores:
        t0 = time.perf_counter()
        prompts, responses = rollout_texts(batch, self.tokenizer)
        # truncate_responses: a response over the RM's summary budget is cut as in RM training rather than
        # failing the PPO step; the EOS trick below already penalises any response that used its whole budget.
        out = self.client.score(prompts, responses, truncate_responses=True)
        if any(out.truncated):
            log.warning("batch %d: %d responses cut to data.max_summary_tokens by the reward service",
                        batch.batch_id, sum(out.truncated))
        raw = torch.tensor(out.scores, dtype=torch.float32)
        eos = has_eos(batch.responses, batch.response_mask, self.tokenizer.eos_token_id)
        return Scores(batch_id=batch.batch_id, shard=batch.shard, scores=eos_trick(raw, eos, self.missing_eos_score),
                      raw_scores=raw, has_eos=eos, seconds=time.perf_counter() - t0)
