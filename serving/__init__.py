"""The reward model as an HTTP service (Ray Serve + FastAPI) and its client.

- `serving.api`: the wire format, typed request/response models shared by the service and the client;
- `serving.text_scoring`: `TextRewardModel`, the plain class that turns {prompt, response} texts into
  reward-model scores exactly as the RM was trained (no Ray, no HTTP);
- `serving.auth`: bearer-token resolution and checking, and the loopback test;
- `serving.proxy`: the middlewares of Serve's HTTP proxy (JSON 400 for a bad X-Request-ID, retryable 503 when a
  replica dies), light to import so the proxy starts fast;
- `serving.reward_service`: the Ray Serve deployment, `build_app` (RayService import path) and `start_service`
  (`rayrlhf serve`);
- `serving.client`: `RewardClient` (timeouts, retry budget, loud failure) and `RemoteRewardScorer`, the PPO
  reward role when `reward.backend` is `http`.
"""
