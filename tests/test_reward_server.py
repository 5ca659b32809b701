"""The remote reward server and client, over real HTTP on a free local port."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
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
from rlflow.reward_models.reward_server import DEFAULT_MAX_REQUEST_BYTES, TOKEN_ENV

from rlflow.cli import Command, main
from rlflow.config import ConfigError, option
from rlflow.worlds.shapes.prompts import sample_prompts
from rlflow.worlds.shapes.render import render

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
        assert client.server_info == {
            "status": "ok",
            "reward": "ShapesVerifier",
            "max_request_bytes": DEFAULT_MAX_REQUEST_BYTES,
        }
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
    with RewardServer(ShapesVerifier(), port=0) as server:
        # A port in use is a config problem: one line naming host:port and the fix (the CLI exits with 2).
        with pytest.raises(
            ConfigError, match=rf"cannot listen on 127\.0\.0\.1:{server.port}: .*in use.*--port"
        ):
            RewardServer(ShapesVerifier(), port=server.port)


# ----------------------------------------------------------------------------------------------
# Robustness: bad clients (server side)
# ----------------------------------------------------------------------------------------------


def _exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Send raw bytes, read until the server closes: (status, JSON body of the first answer, all bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, json.loads(rest[:length]), received


def _post(body: bytes, extra: str = "") -> bytes:
    return (
        f"POST /score HTTP/1.1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n".encode()
        + body
    )


def test_stalled_clients_neither_hold_threads_nor_block_healthy_ones():
    images, prompts = _batch(4)
    expected = ShapesVerifier()(images, prompts)
    threads_before = threading.active_count()
    stalled: list[socket.socket] = []
    with RewardServer(ShapesVerifier(), port=0, max_workers=4, read_timeout_s=3.0) as server:
        try:
            for i in range(200):  # silent, half a head, half a body
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                if i % 3 == 1:
                    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
                elif i % 3 == 2:
                    sock.sendall(b'POST /score HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{"images": ')
                stalled.append(sock)
            start = time.perf_counter()
            client = RemoteReward(server.url, timeout_s=5, retries=0)
            for _ in range(3):
                assert torch.equal(client(images, prompts), expected)
            assert time.perf_counter() - start < 3
            assert server._count_open() >= 200  # the stalled ones were all still connected meanwhile
            # The loop thread and the workers only, not a thread per connection.
            assert threading.active_count() <= threads_before + 1 + 4
            # The read timeout closes every stalled connection.
            for sock in stalled:
                try:
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass
            assert time.perf_counter() - start < 8
        finally:
            for sock in stalled:
                sock.close()
    assert threading.active_count() <= threads_before


def test_size_limit_is_checked_before_the_body_is_read():
    images, prompts = _batch(4)  # ~16 KB of JSON
    with RewardServer(ShapesVerifier(), port=0, max_request_bytes=1000) as server:
        # The answer comes although no body byte was sent: the server never waits for (or reads) it.
        head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n"
        status, body, _ = _exchange(server.port, head)
        assert (
            status == 413
            and "limit of 1000 bytes" in body["error"]
            and "--max_request_bytes" in body["error"]
        )
        # The client knows the limit from /health and says so before sending...
        with pytest.raises(
            RewardServerError, match=r"above the limit .* \(1000 bytes\); score smaller batches"
        ):
            RemoteReward(server.url)(images, prompts)
        # ...and without /health it gets the server's 413 (which lingers so the client can read it).
        with pytest.raises(RewardServerError, match=r"HTTP 413.*max_request_bytes"):
            RemoteReward(server.url, check=False)(images, prompts)
        assert RemoteReward(server.url).health()["max_request_bytes"] == 1000  # and it still serves


@pytest.mark.parametrize(
    ("request_bytes", "status", "fragment"),
    [
        (b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n", 411, "Content-Length"),
        (b"POST /score HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n", 400, "invalid Content-Length"),
        (b"POST /score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411, "chunked"),
        (b"GET /nope HTTP/1.1\r\n\r\n", 404, "GET /health or POST /score"),
        (b"GET /score HTTP/1.1\r\n\r\n", 405, "takes POST"),
        (b"hello\r\n\r\n", 400, "malformed request line"),
        (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70000, 431, "head larger"),
    ],
)
def test_malformed_http_is_answered_not_dropped(request_bytes, status, fragment):
    with RewardServer(ShapesVerifier(), port=0) as server:
        got, body, _ = _exchange(server.port, request_bytes)
        assert got == status and fragment in body["error"]


def test_malformed_json_and_schema_are_400_naming_the_problem():
    images, prompts = _batch(2)
    good = {"images": encode_images(images), "prompts": prompts}
    cases = [
        (b"[" * 100_000, "nested too deeply"),
        (b'{"a": ' * 100_000, "nested too deeply"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({**good, "prompts": 3}).encode(), "'prompts'"),
        (json.dumps({"prompts": prompts}).encode(), "'images'"),
        (json.dumps({**good, "images": {**good["images"], "data": "!!!!" * 3072}}).encode(), "'images.data'"),
        (json.dumps({**good, "images": {**good["images"], "shape": [2, 3, 64]}}).encode(), "'images.shape'"),
        (json.dumps({**good, "prompts": prompts[:1]}).encode(), "1 'prompts' for 2 images"),
    ]
    with RewardServer(ShapesVerifier(), port=0, max_workers=2) as server:
        for payload, fragment in cases:
            status, body, _ = _exchange(server.port, _post(payload))
            assert status == 400 and fragment in body["error"], (payload[:40], body)
        assert torch.equal(RemoteReward(server.url)(images, prompts), ShapesVerifier()(images, prompts))


def test_keep_alive_and_pipelined_requests():
    with RewardServer(ShapesVerifier(), port=0) as server:
        two = b"GET /health HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\nConnection: close\r\n\r\n"
        status, body, received = _exchange(server.port, two)
        assert status == 200 and body["status"] == "ok" and received.count(b"HTTP/1.1 200 OK") == 2


def test_token_is_required_when_set(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    images, prompts = _batch(2)
    with RewardServer(ShapesVerifier(), port=0, token="s3cret-token") as server:
        with pytest.raises(RewardServerError, match=rf"HTTP 401.*needs a token.*sent no token.*{TOKEN_ENV}"):
            RemoteReward(server.url)
        with pytest.raises(RewardServerError, match="HTTP 401.*wrong token"):
            RemoteReward(server.url, token="guess")
        client = RemoteReward(server.url, token="s3cret-token")
        assert torch.equal(client(images, prompts), ShapesVerifier()(images, prompts))
        assert "s3cret" not in repr(client)
        monkeypatch.setenv(TOKEN_ENV, "s3cret-token")  # the environment variable works as well
        assert RemoteReward(server.url).health()["status"] == "ok"
        # The token is checked before the body (or its size): an unauthenticated client gets nothing in.
        status, body, received = _exchange(
            server.port, b"POST /score HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n"
        )
        assert status == 401 and b"WWW-Authenticate: Bearer" in received


def test_public_host_without_token_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="rlflow.reward_models"):
        RewardServer(ShapesVerifier(), host="0.0.0.0", port=0).stop()
        assert "without a token" in caplog.text
        caplog.clear()
        RewardServer(ShapesVerifier(), host="0.0.0.0", port=0, token="t").stop()
        RewardServer(ShapesVerifier(), host="localhost", port=0).stop()
        assert "without a token" not in caplog.text


@dataclass
class _ClientConfig:
    url: str = option("http://127.0.0.1:9", help="Reward server URL.")


def _client_entry(config: _ClientConfig) -> None:
    RemoteReward(config.url, timeout_s=0.5, retries=0)


def test_cli_reports_server_errors_in_one_line(capsys):
    with RewardServer(ShapesVerifier(), port=0) as server:
        assert main(["reward-server", "--port", str(server.port)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rlflow reward-server: error: cannot listen on 127.0.0.1:") and "--port" in err
        assert "\n" not in err
    url = f"http://127.0.0.1:{_free_port()}"
    commands = {"score": Command(f"{__name__}:_ClientConfig", f"{__name__}:_client_entry", "Score.")}
    assert main(["score", "--url", url], commands=commands) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlflow score: error: reward server at {url} did not answer") and "\n" not in err


# ----------------------------------------------------------------------------------------------
# Robustness: bad servers (client side)
# ----------------------------------------------------------------------------------------------


class _RawHandler(BaseHTTPRequestHandler):
    """Answers every request with raw canned bytes, after an optional delay."""

    status = 200
    content_type = "text/html"
    payload = b""
    delay = 0.0

    def _send(self) -> None:
        time.sleep(self.delay)
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def do_GET(self) -> None:  # noqa: N802
        self._send()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    ("attrs", "fragment"),
    [
        (
            {"payload": b"<html><body>It works!</body></html>"},
            r"not JSON \(Content-Type 'text/html', starting '<html>",
        ),
        ({"payload": b"[1, 2, 3]", "content_type": "application/json"}, "list JSON, expected an object"),
        ({"payload": b"[" * 100_000}, "not JSON"),
        ({"payload": b'{"status": "busy"}'}, r"answered /health with .*busy.* an rlflow reward server"),
        (
            {"status": 404, "payload": b"<h1>Not Found</h1>"},
            r"\(HTTP 404\): Not Found \('<h1>.*an rlflow reward server",
        ),
        ({"status": 502, "payload": b"bad gateway"}, r"after 2 attempts.*HTTP 502.*check the server's log"),
        ({"delay": 1.0, "payload": b"{}"}, r"after 2 attempts.*timed out.*raise timeout_s \(now 0.3 s\)"),
    ],
)
def test_misbehaving_servers_give_one_clear_line(attrs, fragment):
    handler = type("Handler", (_RawHandler,), attrs)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        start = time.perf_counter()
        with pytest.raises(RewardServerError, match=fragment) as info:
            RemoteReward(url, timeout_s=0.3, retries=1, backoff_s=0.01)
        assert time.perf_counter() - start < 5
        assert url in str(info.value) and "\n" not in str(info.value)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
