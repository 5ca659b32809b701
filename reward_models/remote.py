"""Score images with a reward running in another process or on another machine, over plain HTTP + JSON.

Client: ``RemoteReward("http://host:8765")`` is a reward callable like any other (it checks ``/health`` at
construction, so an unreachable server fails before training starts). Every failure -- server down, too
slow, answering garbage, the wrong number of rewards, NaN -- raises :class:`RewardServerError` with one line
naming the URL, what was wrong and the fix (the CLI prints it and exits with status 2).

The server (:class:`RewardServer`, ``rlflow reward-server``) and the wire format live in
:mod:`rlflow.reward_models.reward_server`; they are re-exported here.

Tokens: when the server was started with ``--token`` (or ``RLFLOW_REWARD_SERVER_TOKEN``), give the client the
same token (``token=`` or the same environment variable, which keeps it out of recipes and saved configs);
it travels as ``Authorization: Bearer <token>``, in clear text over http: use it on trusted networks only.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from rlflow.errors import RewardServerError

from .base import RewardOutput, as_reward_vector, check_reward_inputs
from .reward_server import (
    TOKEN_ENV,
    RewardServer,
    RewardServerConfig,
    decode_images,
    encode_images,
    serve,
)

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

# An answer is a few numbers per image; anything this large is not a reward server talking.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class RemoteReward:
    """A reward callable that asks a :class:`RewardServer`: ``reward(images, prompts) -> Tensor[B]``.

    Connection errors, timeouts and 5xx answers are retried ``retries`` times, waiting
    ``backoff_s * 2**k`` before retry ``k + 1``; then :class:`RewardServerError` names the URL, the number
    of attempts and the fix. 4xx answers (bad input, wrong token) and malformed answers fail at once.
    ``token`` (default: the ``RLFLOW_REWARD_SERVER_TOKEN`` environment variable) is sent as a bearer token.
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
        token: str | None = None,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"reward server url must look like http://host:port, got {url!r}")
        if not timeout_s > 0 or retries < 0 or backoff_s < 0:
            raise ValueError(
                f"need timeout_s > 0, retries >= 0, backoff_s >= 0; got {timeout_s}, {retries}, {backoff_s}"
            )
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        if token is not None and (
            not token or not token.isascii() or not token.isprintable() or " " in token
        ):
            raise ValueError("the reward server token must be non-empty printable ASCII without spaces")
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self._token = token  # never in repr or messages
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
        self.server_info: dict[str, Any] | None = None
        if check:
            self.server_info = self.health()

    def _start_hint(self) -> str:
        port = urlparse(self.url).port or 8765
        return f"start it with `rlflow reward-server --reward shapes_verifier --port {port}` (or fix the url)"

    def _refused(self, path: str, code: int, detail: str) -> str:
        message = f"reward server at {self.url} refused {path} (HTTP {code}): {detail}"
        if code == 401:
            given = "a token" if self._token else "no token"
            return (
                f"{message}; this client sent {given}: pass the server's token as "
                f"rewards: {{remote: {{token: ...}}}} or set {TOKEN_ENV}"
            )
        if code == 413:
            return (
                f"{message}; score smaller batches, or restart the server with a larger --max_request_bytes"
            )
        if code in (404, 405):
            return f"{message}; is {self.url} an rlflow reward server? {self._start_hint()}"
        return message

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        del body
        limit = (self.server_info or {}).get("max_request_bytes")
        if data is not None and isinstance(limit, int) and len(data) > limit:
            raise RewardServerError(
                f"a {path} request of {len(data)} bytes is above the limit of the reward server at {self.url} "
                f"({limit} bytes); score smaller batches, or restart the server with a larger --max_request_bytes"
            )
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        attempts = self.retries + 1
        last, timed_out = "", False
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    raw = response.read(MAX_RESPONSE_BYTES + 1)
                    content_type = response.headers.get("Content-Type", "")
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                exc.close()
                if exc.code < 500:
                    raise RewardServerError(self._refused(path, exc.code, detail)) from None
                last, timed_out = f"HTTP {exc.code}: {detail}", False
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
                timed_out = isinstance(reason, TimeoutError)
            else:
                return self._parse(path, raw, content_type)
            logger.warning(
                "reward server %s%s, attempt %d/%d failed: %s", self.url, path, attempt + 1, attempts, last
            )
        if timed_out:
            fix = (
                f"it is too slow or stuck: raise timeout_s (now {self.timeout_s:g} s), score smaller batches, "
                "or check the server's log"
            )
        elif last.startswith("HTTP 5"):
            fix = "its reward keeps failing: check the server's log"
        else:
            fix = f"is it running? {self._start_hint()}"
        raise RewardServerError(
            f"reward server at {self.url} did not answer {path} after {attempts} attempts "
            f"(timeout {self.timeout_s:g} s each; last error: {last}); {fix}"
        )

    def _parse(self, path: str, raw: bytes, content_type: str) -> dict[str, Any]:
        not_ours = f"is {self.url} an rlflow reward server? {self._start_hint()}"
        if len(raw) > MAX_RESPONSE_BYTES:
            raise RewardServerError(
                f"reward server at {self.url} answered {path} with more than {MAX_RESPONSE_BYTES} bytes; {not_ours}"
            )
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            start = raw[:60].decode("utf-8", "replace")
            raise RewardServerError(
                f"reward server at {self.url} answered {path} with something that is not JSON "
                f"(Content-Type {content_type or 'none'!r}, starting {start!r}); {not_ours}"
            ) from None
        if not isinstance(answer, dict):
            raise RewardServerError(
                f"reward server at {self.url} answered {path} with {type(answer).__name__} JSON, "
                f"expected an object; {not_ours}"
            )
        return answer

    def health(self) -> dict[str, Any]:
        """GET /health (with retries); raises :class:`RewardServerError` when the server is unreachable."""
        info = self._request("/health")
        if info.get("status") != "ok":
            raise RewardServerError(
                f"reward server at {self.url} answered /health with {str(info)[:200]}, expected "
                f"{{'status': 'ok', ...}}; is {self.url} an rlflow reward server? {self._start_hint()}"
            )
        return info

    def evaluate(self, images: Tensor, prompts: Sequence[str]) -> RewardOutput:
        """Score a batch; ``components`` holds the server's named components (empty if it sent none)."""
        check_reward_inputs(images, prompts, f"RemoteReward({self.url})")
        batch = images.shape[0]
        answer = self._request("/score", {"images": encode_images(images), "prompts": list(prompts)})
        fix = "the served reward is broken or this is not an rlflow reward server: check the server's log"
        if "rewards" not in answer:
            raise RewardServerError(
                f"reward server at {self.url} answered /score without 'rewards': {str(answer)[:200]}; {fix}"
            )
        try:
            total = as_reward_vector(_numbers(answer["rewards"]), self.url, batch)
            components = answer.get("components") or {}
            if not isinstance(components, dict):
                raise ValueError(f"'components' must be an object, got {str(components)[:100]}")
            named = {
                str(k): as_reward_vector(_numbers(v), f"{self.url} component {k}", batch)
                for k, v in components.items()
            }
        except (ValueError, TypeError) as exc:
            raise RewardServerError(
                f"reward server at {self.url} sent a bad answer to /score: {exc}; {fix}"
            ) from None
        return RewardOutput(total=total, components=named)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.evaluate(images, prompts).total

    def __repr__(self) -> str:
        token = ", token=<set>" if self._token else ""
        return f"RemoteReward({self.url!r}, timeout_s={self.timeout_s:g}, retries={self.retries}{token})"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would forward the Authorization header (the token) to the new host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _numbers(values: Any) -> Tensor:
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"rewards must be a list of numbers, got {str(values)[:200]}")
    return torch.tensor(values, dtype=torch.float64)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's ``error`` message, or the start of whatever else it sent."""
    try:
        raw = exc.read(64 * 1024)
    except (OSError, http.client.HTTPException):
        return str(exc.reason)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        text = raw[:100].decode("utf-8", "replace").strip()
        return f"{exc.reason} ({text!r})" if text else str(exc.reason)
    return str(body.get("error", body))[:500] if isinstance(body, dict) else str(body)[:500]
