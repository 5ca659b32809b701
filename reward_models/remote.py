"""Score images with a reward running in another process or on another machine, over plain HTTP + JSON.

Server (stdlib ``ThreadingHTTPServer``)::

    rlflow reward-server --reward shapes_verifier --port 8765        # or: serve(RewardServerConfig(...))
    with RewardServer(ShapesVerifier(), port=0) as server: ...       # in-process, e.g. in tests

Client: ``RemoteReward("http://host:8765")`` is a reward callable like any other (it checks ``/health`` at
construction, so an unreachable server fails before training starts).

Wire format (JSON)::

    POST /score   {"images": {"shape": [B, 3, H, W], "dtype": "uint8", "data": "<base64 of the bytes>"},
                   "prompts": ["a red circle", ...]}
          200 ->  {"rewards": [r_0, ..., r_{B-1}]}              (+ "components": {name: [...]} when the
                                                                  reward returns a RewardOutput)
          400 ->  {"error": "..."}   the request or the reward rejected the input: not retried
          500 ->  {"error": "..."}   the reward failed (e.g. out of memory): retried by the client
    GET /health   200 -> {"status": "ok", "reward": "<name>"}

Images travel as uint8 (0-255, rounded), i.e. exactly what a saved PNG would hold: a remote reward sees the
quantised image, which can differ from a local reward on float images by rounding at its thresholds.
The server runs one reward call at a time (a lock), because GPU reward models are rarely thread-safe;
requests still get accepted concurrently. There is no authentication: bind to a loopback or cluster-private
address only.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor

from rlflow.config import option

from .base import RewardOutput, as_reward_vector, check_reward_inputs

__all__ = [
    "RemoteReward",
    "RewardServer",
    "RewardServerConfig",
    "RewardServerError",
    "decode_images",
    "encode_images",
    "serve",
]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 512 * 1024 * 1024  # 512 MB: ~500 1024x1024 images per request; refuse anything larger


class RewardServerError(RuntimeError):
    """The remote reward server could not be reached, or it refused or failed a request."""


# ----------------------------------------------------------------------------------------------
# Wire format
# ----------------------------------------------------------------------------------------------


def encode_images(images: Tensor) -> dict[str, Any]:
    """``[B, 3, H, W]`` floats in [0, 1] -> the JSON-able ``{"shape", "dtype", "data"}`` (uint8, base64)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return {
        "shape": list(array.shape),
        "dtype": "uint8",
        "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii"),
    }


def decode_images(payload: Any) -> Tensor:
    """Inverse of :func:`encode_images` (floats in [0, 1]); ``ValueError`` on any malformed field."""
    if not isinstance(payload, dict) or not {"shape", "dtype", "data"} <= set(payload):
        raise ValueError("'images' must be an object with 'shape', 'dtype' and 'data' (base64 uint8 bytes)")
    shape = payload["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or shape[1] != 3
    ):
        raise ValueError(f"'images.shape' must be [B, 3, H, W] (non-negative integers), got {shape!r}")
    if payload["dtype"] != "uint8":
        raise ValueError(f"'images.dtype' must be 'uint8', got {payload['dtype']!r}")
    try:
        raw = base64.b64decode(payload["data"], validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"'images.data' is not valid base64: {exc}") from None
    if len(raw) != math.prod(shape):
        raise ValueError(f"'images.data' holds {len(raw)} bytes, but shape {shape} needs {math.prod(shape)}")
    array = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    return torch.from_numpy(array.copy()).float() / 255.0


# ----------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive; every response sets Content-Length

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/health":
            self._reply(200, {"status": "ok", "reward": self.server.owner.name})
        else:
            self._reply(404, {"error": f"unknown path {self.path!r}; use GET /health or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._reply(404, {"error": f"unknown path {self.path!r}; use GET /health or POST /score"})
            return
        try:
            length = int(self.headers.get("Content-Length", "-1"))
            if not 0 <= length <= MAX_BODY_BYTES:
                raise ValueError(f"Content-Length must be between 0 and {MAX_BODY_BYTES}, got {length}")
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict):
                raise ValueError("the body must be a JSON object with 'images' and 'prompts'")
            images = decode_images(request.get("images"))
            prompts = request.get("prompts")
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("'prompts' must be a list of strings")
            if len(prompts) != images.shape[0]:
                raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            self._reply(400, {"error": f"bad request: {exc}"})
            return
        try:
            self._reply(200, self.server.owner.score(images, prompts))
        except (ValueError, TypeError) as exc:
            # Deterministic rejections (prompt outside the reward's grammar, NaN rewards): retrying won't help.
            logger.warning("reward %s rejected a request: %s", self.server.owner.name, exc)
            self._reply(400, {"error": f"{type(exc).__name__}: {exc}"})
        except Exception as exc:  # noqa: BLE001 (report any failure to the client, keep serving)
            logger.exception("reward %s failed", self.server.owner.name)
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("%s - %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # don't let a hung client keep the process alive at shutdown
    owner: RewardServer


class RewardServer:
    """Serve ``reward_fn(images, prompts)`` over HTTP (see the module doc for the wire format).

    ``port=0`` picks a free port (read it back from :attr:`url`). Use as a context manager, or call
    :meth:`start` / :meth:`stop` (background thread), or :meth:`serve_forever` (blocks the caller).
    """

    def __init__(
        self,
        reward_fn: Callable[[Tensor, Sequence[str]], Any],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str | None = None,
    ) -> None:
        self.reward_fn = reward_fn
        self.name = name or type(reward_fn).__name__
        self.host = host
        self._lock = threading.Lock()
        try:
            self._httpd = _HTTPServer((host, port), _Handler, bind_and_activate=True)
        except OSError as exc:
            raise RewardServerError(
                f"cannot listen on {host}:{port}: {exc}; choose another --port (0 picks a free one)"
            ) from exc
        self._httpd.owner = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def score(self, images: Tensor, prompts: list[str]) -> dict[str, Any]:
        """Run the reward (one call at a time) and build the JSON response body."""
        with self._lock:
            result = self.reward_fn(images, prompts)
        batch = images.shape[0]
        body: dict[str, Any] = {"rewards": as_reward_vector(result, self.name, batch).tolist()}
        if isinstance(result, RewardOutput):
            body["components"] = {
                key: as_reward_vector(value, f"{self.name}/{key}", batch).tolist()
                for key, value in result.components.items()
            }
        return body

    def start(self) -> RewardServer:
        if self._thread is None:
            # A short poll interval makes stop() return within ~0.1 s instead of serve_forever's 0.5 s.
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"reward-server-{self.port}",
                daemon=True,
            )
            self._thread.start()
            logger.info("reward server (%s) listening on %s", self.name, self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` or KeyboardInterrupt (which propagates)."""
        logger.info("reward server (%s) listening on %s", self.name, self.url)
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------


class RemoteReward:
    """A reward callable that asks a :class:`RewardServer`: ``reward(images, prompts) -> Tensor[B]``.

    Connection errors, timeouts and 5xx answers are retried ``retries`` times, waiting
    ``backoff_s * 2**k`` before retry ``k + 1``; then :class:`RewardServerError` names the URL, the number
    of attempts and how to start a server. 4xx answers (bad input) fail at once with the server's message.
    Environment proxy settings are ignored: reward servers live on the local or cluster network.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        check: bool = True,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"reward server url must look like http://host:port, got {url!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(
                f"need timeout_s > 0, retries >= 0, backoff_s >= 0; got {timeout_s}, {retries}, {backoff_s}"
            )
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.server_info: dict[str, Any] | None = self.health() if check else None

    def _fix_hint(self) -> str:
        port = urlparse(self.url).port or 8765
        return f"start it with `rlflow reward-server --reward shapes_verifier --port {port}` (or fix the url)"

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url + path, data=data, headers={"Content-Type": "application/json"}
            )
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code < 500:
                    raise RewardServerError(
                        f"reward server at {self.url} refused {path} (HTTP {exc.code}): {detail}"
                    ) from None
                last = f"HTTP {exc.code}: {detail}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except json.JSONDecodeError as exc:
                raise RewardServerError(
                    f"reward server at {self.url} sent invalid JSON for {path}: {exc}"
                ) from None
            logger.warning(
                "reward server %s%s, attempt %d/%d failed: %s", self.url, path, attempt + 1, attempts, last
            )
        raise RewardServerError(
            f"reward server at {self.url} did not answer {path} after {attempts} attempts "
            f"(timeout {self.timeout_s:g} s each; last error: {last}); is it running? {self._fix_hint()}"
        )

    def health(self) -> dict[str, Any]:
        """GET /health (with retries); raises :class:`RewardServerError` when the server is unreachable."""
        info = self._request("/health")
        if not isinstance(info, dict) or info.get("status") != "ok":
            raise RewardServerError(f"{self.url}/health answered {info!r}, expected {{'status': 'ok', ...}}")
        return info

    def evaluate(self, images: Tensor, prompts: Sequence[str]) -> RewardOutput:
        """Score a batch; ``components`` holds the server's named components (empty if it sent none)."""
        check_reward_inputs(images, prompts, f"RemoteReward({self.url})")
        batch = images.shape[0]
        answer = self._request("/score", {"images": encode_images(images), "prompts": list(prompts)})
        if not isinstance(answer, dict) or "rewards" not in answer:
            raise RewardServerError(
                f"reward server at {self.url} answered without 'rewards': {str(answer)[:200]}"
            )
        try:
            total = as_reward_vector(_numbers(answer["rewards"]), self.url, batch)
            components = {
                str(k): as_reward_vector(_numbers(v), f"{self.url} component {k}", batch)
                for k, v in (answer.get("components") or {}).items()
            }
        except (ValueError, TypeError) as exc:
            raise RewardServerError(f"bad answer from reward server: {exc}") from None
        return RewardOutput(total=total, components=components)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.evaluate(images, prompts).total

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, timeout_s={self.timeout_s:g}, retries={self.retries})"


def _numbers(values: Any) -> Tensor:
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"rewards must be a list of numbers, got {str(values)[:200]}")
    return torch.tensor(values, dtype=torch.float64)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return str(body.get("error", body)) if isinstance(body, dict) else str(body)
    except (ValueError, OSError):
        return str(exc.reason)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


@dataclass
class RewardServerConfig:
    """``rlflow reward-server``: serve one registered reward over HTTP."""

    reward: str = option(
        "shapes_verifier", help="Registered reward to serve (see rlflow.reward_models.REWARDS)."
    )
    host: str = option(
        "127.0.0.1", help="Address to listen on; no authentication, so use loopback or a private network."
    )
    port: int = option(8765, help="TCP port to listen on (0 picks a free one; the URL is logged).")


def serve(config: RewardServerConfig) -> None:
    """Serve ``config.reward`` until Ctrl-C (blocks). Unknown rewards raise ``ConfigError``."""
    from .combine import build_reward  # combine imports this module

    reward_fn = build_reward(config.reward)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the reward server has no authentication and listens on %s", config.host)
    server = RewardServer(reward_fn, config.host, config.port, name=config.reward)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("reward server stopped")
