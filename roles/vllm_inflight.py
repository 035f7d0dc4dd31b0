"""In-flight rollout on vLLM (`rollout.inflight` with `rollout.backend: vllm`): the engine's own step loop.

`VLLMStepDecoder` gives `roles.inflight.InflightEngine` the decoder it drives (`core.decode.ContinuousDecoder`'s
interface) over the in-process vLLM engine: each sample is an engine request (`LLMEngine.add_request`, seeded as
`VLLMBackend.generate` seeds rows), each loop turn one `LLMEngine.step()`, whose scheduler does the continuous
batching; every new token is tagged with the version the engine holds.

A weight load lands between two steps (`VLLMBackend.load_weights` reloads the engine's weights, requests in
progress); then, per `rollout.inflight_kv`: `recompute` preempts every running request
(`reset_prefix_cache(reset_running_requests=True)`), which vLLM prefills again, prompt and tokens so far, under the
new weights; `keep` leaves their KV cache (the engine runs without prefix caching, so no cached prefix of the old
weights is reused). The engine is then probed as after any load (the probe's prompt log-probs against the HF copy
of the weights, `VLLMBackend.verify_engine`), through the same step loop: the probe's requests run beside the
sequences in progress, whose tokens meanwhile carry the new version. A probe beyond tolerance fails the load.
"""

from __future__ import annotations

import torch

from rayrlhf.core.decode import DecodeRequest, Row, Sampled, sampled
from rayrlhf.roles.vllm_backend import VLLMBackend, row_seeds


class VLLMStepDecoder:
    def __init__(self, backend: VLLMBackend, kv: str):
        self.backend, self.kv = backend, kv
        self.engine = backend.llm.llm_engine
        self.max_new_tokens, self.pad_id = backend.cfg.max_new_tokens, backend.tokenizer.pad_token_id
        self.eos_id = backend.tokenizer.eos_token_id
        self.version = 0
        self.requests: list[DecodeRequest] = []
        self.rows: dict[str, tuple[DecodeRequest, Row]] = {}  # engine request id -> its request and row
        self.added = 0
        self.backlog: list[DecodeRequest] = []  # finished while a probe ran, returned by the next `step`
        self.probe: dict[str, object] | None = None  # probe request id -> its finished output (None: running)
        self.steps = 0  # engine steps run

    def __len__(self) -> int:
        return sum(not row.done for req in self.requests for row in req.rows)  # rows still generating

    def add(self, key: object, prompts: list[list[int]], seed: int) -> DecodeRequest:
        req = DecodeRequest(key, [Row(list(p)) for p in prompts], torch.Generator())  # the engine seeds each row
        added = []
        try:
            for row, s in zip(req.rows, row_seeds(seed, len(prompts))):
                rid = f"row-{self.added}"
                self.added += 1
                self.engine.add_request(rid, {"prompt_token_ids": row.prompt}, self.backend.sampling_params(s))
                self.rows[rid] = (req, row)
                added.append(rid)
        except Exception as e:  # a row the engine refuses: the request fails alone, its other rows leave the engine
            self.engine.abort_request(added)
            for rid in added:
                del self.rows[rid]
            raise ValueError(f"vLLM refused a row of the request: {e}") from e
        self.requests.append(req)
        return req

    def step(self) -> list[DecodeRequest]:
        finished, self.backlog = self.backlog, []
        return finished + self._step()

    def weights_changed(self, version: int) -> None:
        """The engine holds `version` (reloaded by `VLLMBackend.load_weights`): reset the KV cache as
        `rollout.inflight_kv` says, then probe the engine through its own steps."""
        self.version = version
        if self.kv == "recompute" and not self.engine.reset_prefix_cache(True):
            raise RuntimeError("vLLM could not preempt its running requests after a weight update")
        prompts, params = self.backend.probe_inputs()
        ids = [f"probe-v{version}-{i}" for i in range(len(prompts))]
        self.probe = dict.fromkeys(ids)
        for rid, p in zip(ids, prompts):
            self.engine.add_request(rid, {"prompt_token_ids": p}, params)
        while any(out is None for out in self.probe.values()):
            self.backlog += self._step()
        outputs, self.probe = [self.probe[rid] for rid in ids], None
        self.backend.last_probe_diff = self.backend.verify_engine(
            f"weights v{version} (in flight)", differences=self.backend.probe_compare(outputs))

    def result(self, req: DecodeRequest) -> Sampled:
        return sampled(req.rows, self.max_new_tokens, self.pad_id)

    def _step(self) -> list[DecodeRequest]:
        self.steps += 1
        for out in self.engine.step():
            if self.probe is not None and out.request_id in self.probe:
                if out.finished:
                    self.probe[out.request_id] = out
                continue
            req, row = self.rows[out.request_id]
            c = out.outputs[0]  # cumulative: every token so far, with the sampled one's log-prob
            for t in range(len(row.tokens), len(c.token_ids)):
                tid = c.token_ids[t]
                row.tokens.append(tid)
                row.logprobs.append(c.logprobs[t][tid].logprob)
                row.versions.append(self.version)
            if out.finished:
                if len(row.tokens) < self.max_new_tokens and row.tokens[-1:] != [self.eos_id]:
                    raise RuntimeError(f"vLLM stopped a row after {len(row.tokens)} of {self.max_new_tokens} tokens "
                                       f"without EOS (finish_reason {c.finish_reason})")
                row.done = True
                del self.rows[out.request_id]
        done = [req for req in self.requests if req.done]
        self.requests = [req for req in self.requests if not req.done]
        return done
