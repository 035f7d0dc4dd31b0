"""The reward service against a real Ray Serve on 127.0.0.1, with the session's tiny reward model.

One service is started for the module (Ray, Serve and a replica take most of the time); every test talks
HTTP to it. Covered: auth, /health, /v1/model, OpenAPI, /metrics, every class of bad input (4xx with a
message, never 500, and the service keeps serving), scores equal to the in-process `RewardScorer`,
batching across concurrent requests, the client's retry budget, the non-loopback refusal of
`rayrlhf serve`, and PPO end to end with `reward.backend: http`.

Ray and the tiny config come from tests/conftest.py (`ray_local`, `make_tiny_cfg`).
"""

from __future__ import annotations

import os
import secrets

# The service token is in the environment before Ray starts (fixtures run after every module is imported),
# so the replicas and the PPO actors inherit it, as pods get it from their Secret.
TOKEN_ENV = "RAYRLHF_TEST_SERVE_TOKEN"
TOKEN = os.environ.setdefault(TOKEN_ENV, secrets.token_hex(16))
# Serve's proxy guard against malformed X-Request-IDs, as `rayrlhf serve` and the RayService manifest set it
# (serving.proxy imports neither Ray nor torch).
from rayrlhf.serving.proxy import PROXY_CALLBACK  # noqa: E402

os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)

import asyncio  # noqa: E402
import hashlib  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rayrlhf.roles.reward import RewardScorer  # noqa: E402
from rayrlhf.core.config import Config, ServeConfig  # noqa: E402
from rayrlhf.core.data import corpus_text, load_tldr  # noqa: E402
from rayrlhf.core.experience import RolloutBatch  # noqa: E402
from rayrlhf.core.modeling import build_tiny_llama, load_scalar_model, save_checkpoint, train_tokenizer  # noqa: E402
from rayrlhf.core.text import encode_responses  # noqa: E402
from rayrlhf.core.padding import pad_left, pad_right  # noqa: E402
from rayrlhf.core.text import encode_queries  # noqa: E402
from rayrlhf.serving.auth import BearerAuth, TokenError, is_loopback, resolve_token  # noqa: E402
from rayrlhf.serving.client import RemoteRewardScorer, RewardClient, RewardServiceError  # noqa: E402
from rayrlhf.serving.reward_service import OPEN_PATHS, PROTECTED_PATHS  # noqa: E402

# one xdist worker runs every Ray Serve test (pyproject.toml: --dist loadgroup): two Serve instances at once,
# one on each worker's Ray cluster, refused connections
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve")]

SERVE = [f"serve.token_env={TOKEN_ENV}", "serve.max_request_items=16", "serve.max_batch_size=8",
         "serve.batch_wait_timeout_s=0.05", "serve.num_cpus=1"]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg(make_tiny_cfg) -> Config:
    return make_tiny_cfg(*SERVE)


@pytest.fixture(scope="module")
def checkpoints(cfg: Config, tmp_path_factory) -> tuple[Path, Path]:
    """(SFT policy, reward model): an untrained tiny Llama and its scalar-head twin, sharing a tokenizer trained
    on the task. Built in a second; the session's trained `tiny_checkpoints` would cost a minute on a busy
    2-core machine, and nothing here needs a trained reward."""
    root = tmp_path_factory.mktemp("serving_ckpt")
    tok = train_tokenizer(corpus_text(load_tldr(cfg.data)), cfg.model.vocab_size)
    torch.manual_seed(0)
    sft = save_checkpoint(build_tiny_llama(cfg.model, tok), tok, root / "sft")
    return sft, save_checkpoint(load_scalar_model(str(sft), tok, init_head=True), tok, root / "rm")


@pytest.fixture(scope="module")
def service(ray_local, cfg: Config, checkpoints) -> str:
    from ray import serve

    from rayrlhf.serving.reward_service import start_service

    url = start_service(str(checkpoints[1]), cfg, "127.0.0.1", free_port(), require_token=True)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def http(service: str):
    with httpx.Client(base_url=service, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def texts(cfg: Config) -> tuple[list[str], list[str]]:
    """8 TL;DR queries and summaries (first words of the references: well within data.max_summary_tokens)."""
    data = load_tldr(cfg.data)
    return [e.query for e in data.sft_valid[:8]], [" " + " ".join(e.reference.split()[:6]) for e in data.sft_valid[:8]]


def score_body(prompts, responses, **extra) -> dict:
    return {"items": [{"prompt": p, "response": r} for p, r in zip(prompts, responses)], **extra}


def metric(http: httpx.Client, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`, from this replica's /metrics."""
    text = http.get("/metrics", headers=AUTH).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# --- health, model, schema, auth --------------------------------------------------------------------------


def test_health_is_open_and_names_the_model_by_hash_not_by_path(http: httpx.Client, checkpoints) -> None:
    r = http.get("/health")
    assert r.status_code == 200
    expected = hashlib.sha256((checkpoints[1] / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert r.json() == {"status": "ok", "model": {"version": expected}}
    assert str(checkpoints[1].parent) not in r.text  # where the weights live is for authenticated callers only


def test_model_info_reports_version_and_limits(http: httpx.Client, cfg: Config, checkpoints) -> None:
    info = http.get("/v1/model", headers=AUTH).json()
    expected = hashlib.sha256((checkpoints[1] / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert info["model"] == {"version": expected, "checkpoint": str(checkpoints[1].resolve())}
    assert info["limits"]["max_request_items"] == 16
    assert info["limits"]["max_prompt_tokens"] == cfg.data.max_prompt_tokens
    assert info["limits"]["max_summary_tokens"] == cfg.data.max_summary_tokens
    assert info["batching"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}
    assert info["auth_required"] is True


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}],
                         ids=["missing", "wrong", "basic-scheme", "no-scheme", "longer"])
def test_auth_rejects_without_the_right_token(http: httpx.Client, texts, headers) -> None:
    for method, path, kw in [("POST", "/v1/score", {"json": score_body(*texts)}), ("GET", "/v1/model", {}),
                             ("GET", "/metrics", {}), ("POST", "/v1/score", {"content": b"{not json"})]:
        r = http.request(method, path, headers=headers, **kw)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in r.json()["message"]


def test_right_token_scores(http: httpx.Client, texts) -> None:
    r = http.post("/v1/score", json=score_body(*texts), headers=AUTH)
    assert r.status_code == 200, r.text
    assert len(r.json()["scores"]) == len(texts[0])


def test_openapi_schema_and_docs(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    assert {"/v1/score", "/v1/model", "/health", "/metrics"} <= set(schema["paths"])
    assert set(schema["paths"]) <= OPEN_PATHS | PROTECTED_PATHS  # the metric labels know every route
    assert {"ScoreRequest", "ScoreItem", "ScoreResponse", "ModelInfo", "ErrorResponse"} <= set(schema["components"]["schemas"])
    score = schema["paths"]["/v1/score"]["post"]
    assert score["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ScoreRequest")
    assert {"200", "401", "413", "422"} <= set(score["responses"])
    assert "self" not in str(score.get("parameters", []))
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# --- scores -----------------------------------------------------------------------------------------------


def test_scores_equal_in_process_reward_scorer(http: httpx.Client, cfg: Config, checkpoints, texts) -> None:
    prompts, responses = texts
    data = load_tldr(cfg.data)
    post = data.sft_train[0].query
    # A post far over max_prompt_tokens: the service must cut it at a newline exactly as training did.
    long_prompt = post.replace("\n\nTL;DR:", "\n" + "\n".join([f"line {i} of a long story" for i in range(200)]) + "\n\nTL;DR:")
    prompts, responses = prompts + [long_prompt, prompts[0]], responses + [responses[0], ""]
    r = http.post("/v1/score", json=score_body(prompts, responses), headers={**AUTH, "X-Request-ID": "req-42"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == "req-42" and r.headers["x-request-id"] == "req-42"
    scorer = RewardScorer(str(checkpoints[1]), missing_eos_score=None)
    seqs = encode_responses(scorer.tokenizer, prompts, responses, cfg.data.max_prompt_tokens, cfg.data.max_summary_tokens)
    assert len(seqs[-2]) <= cfg.data.max_prompt_tokens + cfg.data.max_summary_tokens  # the long post was cut
    assert body["scores"] == pytest.approx(scorer.score_token_ids(seqs), abs=1e-5)
    assert body["truncated"] == [False] * len(prompts)
    assert len(set(round(s, 6) for s in body["scores"])) > 1  # not a constant


def test_truncate_responses_cuts_as_training_did(http: httpx.Client, cfg: Config, checkpoints, texts) -> None:
    prompt, long_response = texts[0][0], " word" * (2 * cfg.data.max_summary_tokens)
    assert http.post("/v1/score", json=score_body([prompt], [long_response]), headers=AUTH).status_code == 422
    r = http.post("/v1/score", json=score_body([prompt], [long_response], truncate_responses=True), headers=AUTH)
    assert r.status_code == 200 and r.json()["truncated"] == [True]
    scorer = RewardScorer(str(checkpoints[1]), missing_eos_score=None)
    seqs = encode_responses(scorer.tokenizer, [prompt], [long_response], cfg.data.max_prompt_tokens, cfg.data.max_summary_tokens)
    assert r.json()["scores"] == pytest.approx(scorer.score_token_ids(seqs), abs=1e-5)


# --- bad input --------------------------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
OK_ITEM = {"prompt": "SUBREDDIT: r/test\n\nTITLE: t\n\nPOST: a post\n\nTL;DR:", "response": " a summary"}
BAD_INPUTS = {
    # id: (request kwargs, expected status, text the message must contain)
    "malformed-json": ({"content": b'{"items": [', "headers": JSON}, 422, "JSON"),
    "not-json-content-type": ({"content": b"prompt=x"}, 422, "JSON object"),
    "not-an-object": ({"json": [OK_ITEM]}, 422, "body"),
    "missing-items": ({"json": {}}, 422, "body.items: Field required"),
    "missing-response": ({"json": {"items": [{"prompt": "x"}]}}, 422, "body.items.0.response: Field required"),
    "missing-prompt": ({"json": {"items": [{"response": "x"}]}}, 422, "body.items.0.prompt: Field required"),
    "prompt-wrong-type": ({"json": {"items": [{**OK_ITEM, "prompt": 5}]}}, 422, "body.items.0.prompt"),
    "response-wrong-type": ({"json": {"items": [{**OK_ITEM, "response": ["a"]}]}}, 422, "body.items.0.response"),
    "items-wrong-type": ({"json": {"items": "abc"}}, 422, "body.items"),
    "flag-wrong-type": ({"json": {"items": [OK_ITEM], "truncate_responses": "yes"}}, 422, "truncate_responses"),
    "unknown-field": ({"json": {"items": [OK_ITEM], "responses": []}}, 422, "Extra inputs are not permitted"),
    "empty-prompt": ({"json": {"items": [{**OK_ITEM, "prompt": ""}]}}, 422, "at least 1 character"),
    "blank-prompt": ({"json": {"items": [{**OK_ITEM, "prompt": " \n "}]}}, 422, "prompt must not be blank"),
    "empty-items": ({"json": {"items": []}}, 422, "at least 1 item"),
    "prompt-over-char-limit": ({"json": {"items": [{**OK_ITEM, "prompt": "a" * 65_537}]}}, 422, "at most 65536 characters"),
    "response-over-token-limit": ({"json": {"items": [OK_ITEM, {**OK_ITEM, "response": " word" * 200}]}}, 422,
                                  "items[1].response has"),
    "prompt-not-tldr-and-too-long": ({"json": {"items": [{**OK_ITEM, "prompt": "word " * 2000}]}}, 422,
                                     "SUBREDDIT/TITLE/POST/TL;DR format"),
    "too-many-items": ({"json": {"items": [OK_ITEM] * 17}}, 413, "at most 16 (serve.max_request_items)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_a_4xx_with_a_message(http: httpx.Client, case: str) -> None:
    kwargs, status, text = BAD_INPUTS[case]
    r = http.post("/v1/score", **{**kwargs, "headers": {**AUTH, **kwargs.get("headers", {})}})
    assert r.status_code == status, r.text
    body = r.json()
    assert text in body["message"], body
    assert body["request_id"] == r.headers["x-request-id"]
    assert http.post("/v1/score", json={"items": [OK_ITEM]}, headers=AUTH).status_code == 200  # still serving


@pytest.mark.parametrize("request_id", [b"caf\xc3\xa9-utf8", b"latin\xe9", b"\xff\xfe", b"x" * 129])
def test_a_request_id_that_is_not_printable_ascii_is_a_400_not_a_500(http: httpx.Client, request_id: bytes) -> None:
    # httpx sends header bytes as given, as a client in another language might.
    r = http.post("/v1/score", json={"items": [OK_ITEM]}, headers={**AUTH, "X-Request-ID": request_id})
    assert r.status_code == 400, r.text
    body = r.json()
    assert "X-Request-ID must be 1-128 printable ASCII characters" in body["message"]
    assert body["request_id"].isascii() and len(body["request_id"]) == 32  # a fresh id, not the bad one
    ok = http.post("/v1/score", json={"items": [OK_ITEM]}, headers={**AUTH, "X-Request-ID": "abc-123"})
    assert ok.status_code == 200 and ok.json()["request_id"] == "abc-123"


def test_no_server_errors_after_bad_input(http: httpx.Client) -> None:
    http.post("/v1/score", content=b"\xff\xfe garbage", headers={**AUTH, **JSON})
    assert http.get("/nope", headers=AUTH).status_code == 404
    assert metric(http, "reward_service_errors_total", kind="server") == 0
    assert metric(http, "reward_service_errors_total", kind="client") > 0


# --- metrics and batching ---------------------------------------------------------------------------------


def test_metrics_exposes_requests_latency_errors(http: httpx.Client, texts) -> None:
    http.post("/v1/score", json=score_body(*texts), headers=AUTH)
    http.post("/v1/score", json=score_body(*texts))
    assert metric(http, "reward_service_requests_total", route="/v1/score", status="200") >= 1
    assert metric(http, "reward_service_requests_total", route="/v1/score", status="401") >= 1
    assert metric(http, "reward_service_errors_total", route="/v1/score", kind="client") >= 1
    assert metric(http, "reward_service_request_latency_seconds_count", route="/v1/score") >= 1
    assert metric(http, "reward_service_items_scored_total") >= len(texts[0])
    assert metric(http, "reward_service_batch_size_count") >= 1


def test_concurrent_requests_are_batched_together(http: httpx.Client, service: str, texts) -> None:
    n = 16
    batches_before = metric(http, "reward_service_batch_size_count")

    async def one_each() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service, headers=AUTH, timeout=30) as c:
            return await asyncio.gather(*(c.post("/v1/score", json=score_body([texts[0][i % 8]], [texts[1][i % 8]]))
                                          for i in range(n)))

    responses = asyncio.run(one_each())
    assert [r.status_code for r in responses] == [200] * n
    batches = metric(http, "reward_service_batch_size_count") - batches_before
    assert batches < n, f"{n} one-item requests took {batches} model calls: nothing was batched"


# --- client -----------------------------------------------------------------------------------------------


def test_client_scores_and_splits_batches(service: str, texts, cfg: Config, checkpoints) -> None:
    prompts, responses = texts[0] * 3, texts[1] * 3  # 24 items > max_request_items 16: two requests
    with RewardClient(service, TOKEN, timeout_s=30, max_retries=1) as client:
        out = client.score(prompts, responses)
    assert len(out.scores) == 24 and len(out.request_ids) == 2
    scorer = RewardScorer(str(checkpoints[1]), missing_eos_score=None)
    seqs = encode_responses(scorer.tokenizer, prompts, responses, cfg.data.max_prompt_tokens, cfg.data.max_summary_tokens)
    assert out.scores == pytest.approx(scorer.score_token_ids(seqs), abs=1e-5)


def test_client_retry_budget_against_a_closed_port() -> None:
    client = RewardClient(f"http://127.0.0.1:{free_port()}", "t", timeout_s=2, max_retries=2, backoff_s=0.01)
    with pytest.raises(RewardServiceError, match="after 3 attempts") as e:
        client.score(["p"], ["r"])
    assert e.value.attempts == 3 and e.value.status is None
    assert "ConnectError" in str(e.value)


def test_client_never_retries_a_client_error(service: str) -> None:
    with pytest.raises(RewardServiceError, match="401") as e:
        RewardClient(service, "wrong-token", max_retries=3).model_info()
    assert e.value.status == 401 and e.value.attempts == 1
    with pytest.raises(RewardServiceError, match="422") as e:
        RewardClient(service, TOKEN, max_retries=3).score([""], ["r"])
    assert e.value.attempts == 1 and "at least 1 character" in str(e.value)


def test_client_retries_5xx_and_429_with_one_request_id() -> None:
    calls: list[httpx.Request] = []
    answers = [httpx.Response(503), httpx.Response(429, headers={"Retry-After": "0"}),
               httpx.Response(200, json={"status": "ok", "model": {"version": "v"}})]

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return answers[len(calls) - 1]

    client = RewardClient("http://reward.test", "t", max_retries=2, backoff_s=0.001, transport=httpx.MockTransport(handler))
    assert client.health().model.version == "v"
    assert len(calls) == 3 and len({c.headers["x-request-id"] for c in calls}) == 1
    always_500 = RewardClient("http://reward.test", "t", max_retries=1, backoff_s=0.001,
                              transport=httpx.MockTransport(lambda r: httpx.Response(500, json={"message": "boom"})))
    with pytest.raises(RewardServiceError, match="after 2 attempts.*HTTP 500: boom"):
        always_500.health()


def test_remote_scorer_matches_reward_scorer_on_a_rollout(service: str, cfg: Config, checkpoints, texts) -> None:
    """Same Scores as the in-process role: EOS flags, EOS trick, and the model's scores for ended responses."""
    scorer = RewardScorer(str(checkpoints[1]), missing_eos_score=-1.0)
    tok = scorer.tokenizer
    eos, R = tok.eos_token_id, 12
    prompts = encode_queries(tok, texts[0][:4], cfg.data.max_prompt_tokens)
    bodies = tok([" a short one", " a summary that will run past the budget of twelve tokens easily", "", " ok"],
                 add_special_tokens=False)["input_ids"]
    responses = [(b + [eos])[:R] for b in bodies]  # the second has no EOS within R
    p_ids, p_mask = pad_left(prompts, tok.pad_token_id)
    r_ids, r_mask = pad_right(responses, tok.pad_token_id, width=R)
    batch = RolloutBatch(batch_id=3, shard=1, worker=0, policy_version=0, prompt_indices=[0, 1, 2, 3], prompts=p_ids,
                         prompt_mask=p_mask, responses=r_ids, response_mask=r_mask, logprobs=torch.zeros(4, R))
    local = scorer.score_rollout(batch)
    with RewardClient(service, TOKEN) as client:
        remote = RemoteRewardScorer(client, tok, -1.0).score_rollout(batch)
    assert (remote.batch_id, remote.shard) == (3, 1)
    assert remote.has_eos.tolist() == local.has_eos.tolist() == [True, False, True, True]
    assert remote.scores.dtype == local.scores.dtype == torch.float32
    assert remote.scores.tolist() == pytest.approx(local.scores.tolist(), abs=1e-5)
    assert remote.scores[1].item() == -1.0


# --- start-up rules ---------------------------------------------------------------------------------------


def test_serve_refuses_non_loopback_without_token(checkpoints, capsys) -> None:
    from rayrlhf.pipeline.cli import main

    assert "RAYRLHF_TEST_NO_SUCH_TOKEN" not in os.environ
    rc = main(["serve", "--checkpoint", str(checkpoints[1]), "--host", "0.0.0.0",
               "--set", "serve.token_env=RAYRLHF_TEST_NO_SUCH_TOKEN"])
    assert rc == 2
    assert "refusing to listen on 0.0.0.0 without a bearer token" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["0", "65536", "-1"])
def test_serve_rejects_a_port_out_of_range_instead_of_using_the_default(checkpoints, capsys, port) -> None:
    from rayrlhf.pipeline.cli import main

    assert main(["serve", "--checkpoint", str(checkpoints[1]), "--port", port]) == 2
    assert f"--port {port} is not a TCP port" in capsys.readouterr().err


def test_the_proxy_callback_imports_neither_torch_nor_transformers() -> None:
    """Serve's proxy imports PROXY_CALLBACK as it starts and is killed if not ready within its readiness checks;
    the torch + transformers import (16 s on a busy 2-core machine) once made it miss them."""
    import subprocess
    import sys

    module, name = PROXY_CALLBACK.split(":")
    code = (f"import sys, {module}; middlewares = {module}.{name}(); "
            "print(len(middlewares), sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["2", "[]"], out.stdout


def test_token_sources_and_loopback(tmp_path: Path) -> None:
    assert resolve_token(ServeConfig(token_env="T"), {"T": " abc \n"}) == "abc"
    assert resolve_token(ServeConfig(token_env="T"), {}) is None
    with pytest.raises(TokenError, match="set but empty"):
        resolve_token(ServeConfig(token_env="T"), {"T": " "})
    (tmp_path / "token").write_text("from-file\n")
    assert resolve_token(ServeConfig(token_env="T", token_file=str(tmp_path / "token")), {"T": "env"}) == "from-file"
    with pytest.raises(TokenError, match="cannot read"):
        resolve_token(ServeConfig(token_file=str(tmp_path / "missing")), {})
    auth = BearerAuth("abc")
    assert auth.allows("Bearer abc") and auth.allows("bearer abc")
    assert not auth.allows(None) and not auth.allows("Bearer abd") and not auth.allows("abc")
    assert BearerAuth(None).allows(None)
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "::", "example.com"]))


def test_build_app_takes_replicas_resources_and_token_rule_from_config(checkpoints, tmp_path: Path) -> None:
    from rayrlhf.serving.reward_service import build_app

    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("serve:\n  num_replicas: 3\n  num_cpus: 2\n  num_gpus: 0.5\n  max_batch_size: 16\n")
    d = build_app({"checkpoint": str(checkpoints[1]), "config": str(cfg_file)})._bound_deployment
    assert (d.num_replicas, d.ray_actor_options, d.max_ongoing_requests) == (3, {"num_cpus": 2.0, "num_gpus": 0.5}, 32)
    assert d.init_args[0] == str(checkpoints[1]) and d.init_args[2] is True  # RayService: token required
    with pytest.raises(ValueError, match="checkpoint"):
        build_app({"config": str(cfg_file)})


# --- PPO over HTTP ----------------------------------------------------------------------------------------


def test_ppo_end_to_end_with_http_reward(service: str, make_tiny_cfg, checkpoints, tmp_path: Path) -> None:
    from rayrlhf.pipeline.driver import PPODriver

    cfg = make_tiny_cfg(*[
        "reward.backend=http", f"reward.url={service}", f"reward.token_env={TOKEN_ENV}", "reward.max_retries=1",
        "ppo.steps=2", "ppo.prompts_per_step=4", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8",
        "ppo.micro_batch_size=4", "ppo.ppo_epochs=1", "rollout.max_new_tokens=8",
        # the roles and the service replica (1 CPU) share the session's 4 logical CPUs
        "ppo.num_cpus=0.5", "reference.num_cpus=0.5", "reward.num_cpus=0.1", "rollout.num_cpus=0.5",
    ])
    sft, rm = checkpoints
    driver = PPODriver(cfg, tmp_path / "ppo", sft, rm)
    try:
        result = driver.run()
    finally:
        driver.close()
    assert result["ppo/steps"] == 2
    assert math.isfinite(result["ppo/final_score_mean"]) and math.isfinite(result["ppo/final_kl"])
    assert (tmp_path / "ppo" / "checkpoint" / "config.json").is_file()
    from rayrlhf.core.metrics import read_metrics

    # the service's model runs elsewhere: the reward role's tokens/s is measured here, its MFU is not (not a 0)
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    assert all(r["perf/reward_tokens_per_s"] > 0 and "perf/reward_mfu" not in r for r in rows)
