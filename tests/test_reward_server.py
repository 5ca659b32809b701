"""The remote reward server and client, over real HTTP on a free local port."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from rlflow.reward_models import (
    RemoteReward,
    RewardServer,
    RewardServerConfig,
    RewardServerError,
    ShapesVerifier,
    build_rewards,
)
from rlflow.reward_models.remote import decode_images, encode_images

from rlflow.data.shapes import render, sample_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see tests/conftest.py


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(seed)
    prompts = sample_prompts(n, generator)
    return render(prompts, generator), prompts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_encoding_round_trip_is_uint8_exact():
    images = torch.rand(3, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    decoded = decode_images(json.loads(json.dumps(encode_images(images))))
    assert decoded.shape == images.shape
    assert (decoded - images).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="needs"):
        decode_images({**encode_images(images), "shape": [3, 3, 5, 8]})


def test_round_trip_equals_local_reward():
    images, prompts = _batch()
    local = ShapesVerifier()
    with RewardServer(ShapesVerifier(), port=0) as server:
        assert server.port > 0 and server.url.startswith("http://127.0.0.1:")
        client = RemoteReward(server.url, timeout_s=10)
        assert client.server_info == {"status": "ok", "reward": "ShapesVerifier"}
        remote = client(images, prompts)
        assert remote.dtype == torch.float32 and remote.shape == (16,)
        assert torch.equal(remote, local(images, prompts))
        # Rendered images are exactly 0/1, so uint8 transport loses nothing; noisy ones are compared
        # against the local reward on the quantised images.
        noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(
            0, 1
        )
        quantised = (noisy * 255).round() / 255
        assert torch.equal(client(noisy, prompts), local(quantised, prompts))
        # Bad input is a 400: reported at once with the server's reason, not retried.
        with pytest.raises(RewardServerError, match="HTTP 400.*shapes grammar"):
            client(images[:1], ["a purple cow"])


def test_components_travel_with_a_weighted_reward():
    images, prompts = _batch(8)
    combo = build_rewards({"shapes_verifier": 1.0, "brightness": 0.5})
    with RewardServer(combo, port=0, name="combo") as server:
        out = RemoteReward(server.url).evaluate(images, prompts)
    local = combo(images, prompts)
    assert torch.allclose(out.total, local.total)
    assert set(out.components) == {"shapes_verifier", "brightness"}
    assert torch.allclose(out.components["brightness"], local.components["brightness"])
    # And a remote reward is itself a component of build_rewards.
    with RewardServer(ShapesVerifier(), port=0) as server:
        remote = build_rewards({"remote": {"url": server.url, "weight": 2.0, "timeout_s": 5}})
        assert torch.equal(remote(images, prompts).total, 2 * ShapesVerifier()(images, prompts))


def test_unreachable_server_fails_fast_with_the_fix():
    url = f"http://127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    with pytest.raises(RewardServerError) as info:
        RemoteReward(url, timeout_s=0.5, retries=2, backoff_s=0.01)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert url in message and "after 3 attempts" in message
    assert "rlflow reward-server --reward shapes_verifier --port" in message
    client = RemoteReward(url, retries=0, check=False)  # check=False defers the failure to the first call
    images, prompts = _batch(2)
    with pytest.raises(RewardServerError, match="after 1 attempts"):
        client(images, prompts)


def test_server_error_is_retried_then_succeeds():
    calls = []

    def flaky(images, prompts):
        calls.append(len(prompts))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return torch.ones(len(prompts))

    images, prompts = _batch(4)
    with RewardServer(flaky, port=0) as server:
        client = RemoteReward(server.url, retries=2, backoff_s=0.01)
        assert torch.equal(client(images, prompts), torch.ones(4))
        assert calls == [4, 4]
        calls.clear()
        always = RewardServer(lambda x, p: (_ for _ in ()).throw(RuntimeError("down")), port=0)
        with always, pytest.raises(RewardServerError, match=r"after 2 attempts.*HTTP 500.*down"):
            RemoteReward(always.url, retries=1, backoff_s=0.01)(images, prompts)


class _CannedHandler(BaseHTTPRequestHandler):
    """Answers every request with the class-level canned body (a misbehaving server)."""

    body: dict = {}

    def _send(self) -> None:
        data = json.dumps(self.body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._send()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"status": "ok", "rewards": [1.0, 2.0]}, r"returned shape \(2,\), expected \(3,\)"),
        ({"status": "ok", "rewards": [1.0, "NaN", 2.0]}, "list of numbers"),
        ({"status": "ok", "rewards": [1.0, float("nan"), 2.0]}, "non-finite value.*batch index 1"),
        ({"status": "ok"}, "without 'rewards'"),
    ],
)
def test_bad_responses_are_rejected(body, fragment):
    handler = type("Handler", (_CannedHandler,), {"body": body})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        client = RemoteReward(f"http://127.0.0.1:{httpd.server_address[1]}", retries=0)
        images, prompts = _batch(3)
        with pytest.raises(RewardServerError, match=fragment):
            client(images, prompts)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_config_and_argument_checks():
    config = RewardServerConfig()
    assert (config.reward, config.host, config.port) == ("shapes_verifier", "127.0.0.1", 8765)
    with pytest.raises(ValueError, match="http://host:port"):
        RemoteReward("127.0.0.1:8765", check=False)
    with (
        RewardServer(ShapesVerifier(), port=0) as server,
        pytest.raises(RewardServerError, match="cannot listen"),
    ):
        RewardServer(ShapesVerifier(), port=server.port)
