"""The reward server: a reward callable behind HTTP + JSON that survives slow, broken and hostile clients.

::

    rlflow reward-server --reward shapes_verifier --port 8765        # or: serve(RewardServerConfig(...))
    with RewardServer(ShapesVerifier(), port=0) as server: ...       # in-process, e.g. in tests

The client is :class:`rlflow.reward_models.RemoteReward`.

Wire format (JSON)::

    POST /score   {"images": {"shape": [B, 3, H, W], "dtype": "uint8", "data": "<base64 of the bytes>"},
                   "prompts": ["a red circle", ...]}
          200 ->  {"rewards": [r_0, ..., r_{B-1}]}              (+ "components": {name: [...]} when the
                                                                  reward returns a RewardOutput)
          400 ->  {"error": "..."}   the request or the reward rejected the input: not retried
          401 ->  {"error": "..."}   the server wants ``Authorization: Bearer <token>`` and got none / another
          411 / 413 / 431            no Content-Length / body above ``max_request_bytes`` / head above 64 KiB
          500 ->  {"error": "..."}   the reward failed (e.g. out of memory): retried by the client
    GET /health   200 -> {"status": "ok", "reward": "<name>", "max_request_bytes": N}

Images travel as uint8 (0-255, rounded), i.e. exactly what a saved PNG would hold: a remote reward sees the
quantised image, which can differ from a local reward on float images by rounding at its thresholds.

Design. ``http.server.ThreadingHTTPServer`` starts one thread per connection, and that thread blocks reading
its request: 200 clients that connect and send nothing hold 200 threads for as long as they like. Here one
event-loop thread (``selectors``) accepts connections and reads every request without blocking, so a
connection costs a buffer, not a thread. Only a *complete* request (head and body) is handed to one of
``max_workers`` worker threads, which decode it, run the reward and write the answer; ``GET /health`` and
error answers are written by the loop itself. Consequences:

* stalled clients never hold a worker, so healthy clients keep being answered;
* a connection silent for ``read_timeout_s`` is closed (an inactivity timeout, like a socket timeout);
* the body size is checked against ``max_request_bytes`` from Content-Length before a byte of body is read
  (413), the token before the body too (401), and the body buffer never grows past Content-Length;
* at most ``max_connections`` connections are open: a new one evicts the longest-idle one.

The reward runs one call at a time (a lock), because GPU reward models are rarely thread-safe.
Worst-case memory is about ``max_connections * max_request_bytes`` of buffered bodies (only if that many
clients really send that much), plus ~5x one request while a worker decodes it.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import http
import ipaddress
import json
import logging
import math
import os
import queue
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlflow.config import ConfigError, option

from .base import RewardOutput, as_reward_vector

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "TOKEN_ENV",
    "RewardServer",
    "RewardServerConfig",
    "decode_images",
    "encode_images",
    "serve",
]

logger = logging.getLogger(__name__)

TOKEN_ENV = "RLFLOW_REWARD_SERVER_TOKEN"
"""Environment variable holding the shared token (server and client), so it stays out of recipes and ``ps``."""

# 512 MiB: base64 of uint8 images is 4/3 of 3*H*W bytes, i.e. ~120 images of 1024x1024 per request.
DEFAULT_MAX_REQUEST_BYTES = 512 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024  # request line + headers; ours are a few hundred bytes
MAX_HEADERS = 100
# After an error answer sent before the body was read (413, 401, ...), keep reading and discarding for at
# most this long: closing at once would reset the connection while the client is still sending, and it
# would see "connection reset" instead of our answer.
LINGER_S = 2.0
RECV_CHUNK = 1 << 20


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
    """Inverse of :func:`encode_images` (floats in [0, 1]); ``ValueError`` naming the malformed field."""
    if not isinstance(payload, dict) or not {"shape", "dtype", "data"} <= set(payload):
        raise ValueError("'images' must be an object with 'shape', 'dtype' and 'data' (base64 uint8 bytes)")
    shape = payload["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or shape[1] != 3
    ):
        raise ValueError(
            f"'images.shape' must be [B, 3, H, W] (non-negative integers), got {str(shape)[:200]}"
        )
    if payload["dtype"] != "uint8":
        raise ValueError(f"'images.dtype' must be 'uint8', got {str(payload['dtype'])[:100]!r}")
    data = payload["data"]
    if not isinstance(data, str):
        raise ValueError(f"'images.data' must be a base64 string, got {type(data).__name__}")
    size = math.prod(shape)
    # Padded base64 of n bytes is exactly 4 * ceil(n / 3) characters: a wrong size fails before decoding.
    if len(data) != 4 * -(-size // 3):
        raise ValueError(
            f"'images.data' holds {len(data)} base64 characters, but shape {shape} needs {size} bytes "
            f"({4 * -(-size // 3)} characters)"
        )
    try:
        if sys.version_info >= (3, 11):  # reads an ASCII str in place; b64decode would first copy it
            raw = binascii.a2b_base64(data, strict_mode=True)
        else:
            raw = base64.b64decode(data, validate=True)
    except ValueError as exc:  # binascii.Error, and non-ASCII characters
        raise ValueError(f"'images.data' is not valid base64: {exc}") from None
    if len(raw) != size:
        raise ValueError(f"'images.data' holds {len(raw)} bytes, but shape {shape} needs {size}")
    # One float copy (no intermediate uint8 tensor); dividing in place matches ``uint8.float() / 255``.
    images = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).astype(np.float32).reshape(shape))
    return images.div_(255.0)


# ----------------------------------------------------------------------------------------------
# HTTP plumbing
# ----------------------------------------------------------------------------------------------


class _HTTPError(Exception):
    """An answer the loop sends instead of reading (more of) a request."""

    def __init__(self, status: int, message: str, headers: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


@dataclass
class _Request:
    method: str
    path: str  # without query string and trailing slash
    keep_alive: bool
    length: int  # Content-Length
    expect_continue: bool  # the client waits for "100 Continue" before sending the body (curl does)


class _Conn:
    """A client connection while the loop reads it (a worker owns it while answering /score)."""

    __slots__ = ("buffer", "discarded", "last_active", "linger_until", "peer", "request", "sock")

    def __init__(self, sock: socket.socket, peer: str, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.buffer = bytearray()
        self.last_active = now
        self.request: _Request | None = None  # set once the head has been parsed
        self.linger_until: float | None = None  # set after an early error answer: discard, then close
        self.discarded = 0


_ACCEPT = object()
_WAKE = object()


def _response(status: int, body: dict[str, Any], keep_alive: bool, headers: Sequence[str] = ()) -> bytes:
    data = json.dumps(body, allow_nan=False).encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *headers,
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + data


def _head_end(buffer: bytearray) -> tuple[int, int]:
    """(index of the blank line ending the head, its length), or (-1, 0) while incomplete."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := buffer.find(sep)) >= 0]
    return min(ends) if ends else (-1, 0)


def _parse_head(raw: bytes) -> tuple[str, str, str, dict[str, list[str]]]:
    """Request line and headers (names lower-cased); ``_HTTPError`` 400/431/505 on anything malformed."""
    lines = [line.removesuffix("\r") for line in raw.decode("latin-1").split("\n")]
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise _HTTPError(400, f"malformed request line {lines[0][:100]!r}; expected 'METHOD /path HTTP/1.1'")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        status = 505 if version.startswith("HTTP/") else 400
        raise _HTTPError(status, f"unsupported protocol {version[:20]!r}; use HTTP/1.1")
    if len(lines) - 1 > MAX_HEADERS:
        raise _HTTPError(431, f"more than {MAX_HEADERS} header lines")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():  # also refuses obsolete line folding
            raise _HTTPError(400, f"malformed header line {line[:100]!r}")
        headers.setdefault(name.lower(), []).append(value.strip())
    return method, target, version, headers


def _content_length(method: str, headers: dict[str, list[str]], limit: int) -> int:
    if "transfer-encoding" in headers:
        raise _HTTPError(411, "chunked transfer encoding is not supported; send a Content-Length")
    values = set(headers.get("content-length", []))
    if not values:
        if method == "POST":
            raise _HTTPError(411, "a POST needs a Content-Length header")
        return 0
    value = values.pop()
    if values or not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise _HTTPError(400, f"invalid Content-Length {','.join(headers['content-length'])[:50]!r}")
    length = int(value)
    if length > limit:
        raise _HTTPError(
            413,
            f"request body of {length} bytes is above this server's limit of {limit} bytes "
            "(max_request_bytes): score smaller batches, or restart the server with a larger --max_request_bytes",
        )
    return length


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket; ``ConfigError`` naming host:port and the fix when that fails."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(
            f"cannot listen on {where}: unknown host ({exc}); use an address of this machine, e.g. --host 127.0.0.1"
        ) from None
    try:
        sock = socket.create_server(address, family=family, backlog=128)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fix = "the port is already in use (another reward server?); choose another --port (0 picks a free one)"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            fix = "permission denied (ports below 1024 need privileges); choose another --port, e.g. 8765"
        else:
            fix = f"{exc.strerror or exc}; check --host (an address of this machine) and --port"
        raise ConfigError(f"cannot listen on {where}: {fix}") from None
    sock.setblocking(False)
    return sock


# ----------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------


class RewardServer:
    """Serve ``reward_fn(images, prompts)`` over HTTP (see the module doc for the wire format and design).

    ``port=0`` picks a free port (read it back from :attr:`url`). Use as a context manager, or call
    :meth:`start` / :meth:`stop` (background thread), or :meth:`serve_forever` (blocks the caller).
    ``token``: when set, every request needs ``Authorization: Bearer <token>`` (else 401).
    A port in use or an unusable host raises :class:`~rlflow.config.ConfigError` naming host:port.
    """

    def __init__(
        self,
        reward_fn: Callable[[Tensor, Sequence[str]], Any],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str | None = None,
        token: str | None = None,
        max_workers: int = 8,
        read_timeout_s: float = 30.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_connections: int = 512,
    ) -> None:
        if (
            max_workers < 1
            or max_connections < 1
            or max_request_bytes < 1
            or not 0 < read_timeout_s < math.inf
        ):
            raise ConfigError(
                "reward server needs max_workers >= 1, max_connections >= 1, max_request_bytes >= 1 and a "
                f"finite read_timeout_s > 0; got {max_workers}, {max_connections}, {max_request_bytes}, "
                f"{read_timeout_s}"
            )
        if token is not None and (
            not token or not token.isascii() or not token.isprintable() or " " in token
        ):
            raise ConfigError("the reward server token must be non-empty printable ASCII without spaces")
        self.reward_fn = reward_fn
        self.name = name or type(reward_fn).__name__
        self.host = host
        self.max_workers = int(max_workers)
        self.read_timeout_s = float(read_timeout_s)
        self.max_request_bytes = int(max_request_bytes)
        self.max_connections = int(max_connections)
        self._token = None if token is None else token.encode("ascii")
        self._listener = _listen(host, port)
        if token is None and not _is_loopback(host):
            logger.warning(
                "the reward server listens on %s without a token: anyone who can reach it can use it; "
                "set --token (or %s) and give the same token to the client",
                host,
                TOKEN_ENV,
            )
        self._reward_lock = threading.Lock()  # one reward call at a time
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: dict[socket.socket, _Conn] = {}  # being read; touched by the loop thread only
        self._open = 0  # every client socket, read by the loop or answered by a worker
        self._open_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[_Conn, _Request, bytearray] | None] = queue.SimpleQueue()
        self._returned: queue.SimpleQueue[_Conn] = queue.SimpleQueue()  # keep-alive, back from workers
        self._workers: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._loop_done = threading.Event()
        self._loop_started = False
        self._thread: threading.Thread | None = None
        self._tick = min(0.25, self.read_timeout_s / 4)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def score(self, images: Tensor, prompts: list[str]) -> dict[str, Any]:
        """Run the reward (one call at a time) and build the JSON response body."""
        with self._reward_lock:
            result = self.reward_fn(images, prompts)
        batch = images.shape[0]
        body: dict[str, Any] = {"rewards": as_reward_vector(result, self.name, batch).tolist()}
        if isinstance(result, RewardOutput):
            body["components"] = {
                key: as_reward_vector(value, f"{self.name}/{key}", batch).tolist()
                for key, value in result.components.items()
            }
        return body

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> RewardServer:
        if self._thread is None and not self._loop_started:
            self._thread = threading.Thread(
                target=self._serve, name=f"reward-server-{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` or KeyboardInterrupt (which propagates)."""
        self._serve()

    def stop(self) -> None:
        """Stop accepting, close every connection and release the port (waits briefly for busy workers)."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif self._loop_started:
            self._loop_done.wait()
        deadline = time.monotonic() + 2.0  # a worker inside a slow reward call is a daemon: don't wait long
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        self._workers.clear()
        self._close_returned()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- event loop (one thread) ---------------------------------------------------------------

    def _serve(self) -> None:
        if self._loop_started:
            raise RuntimeError("this RewardServer is already serving (or was stopped)")
        self._loop_started = True
        for i in range(self.max_workers):
            worker = threading.Thread(
                target=self._work, name=f"reward-server-{self.port}-worker-{i}", daemon=True
            )
            worker.start()
            self._workers.append(worker)
        self._selector.register(self._listener, selectors.EVENT_READ, _ACCEPT)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        logger.info(
            "reward server (%s) listening on %s (%s, %d workers)",
            self.name,
            self.url,
            "token required" if self._token else "no token",
            self.max_workers,
        )
        next_sweep = 0.0
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(timeout=self._tick):
                    if key.data is _ACCEPT:
                        self._accept()
                    elif key.data is _WAKE:
                        self._drain_wake()
                    elif key.data.sock in self._conns:  # not dropped earlier in this round
                        self._on_readable(key.data)
                self._take_back()
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + self._tick
        finally:
            for conn in list(self._conns.values()):
                self._drop(conn)
            for _ in self._workers:
                self._jobs.put(None)
            self._loop_done.set()

    def _accept(self) -> None:
        for _ in range(64):  # bounded, so a connect flood cannot starve reading
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.warning(
                        "reward server: cannot accept (%s); dropping the longest-idle connection", exc
                    )
                    if self._evict_idlest():
                        continue
                    time.sleep(0.05)  # nothing to free: don't spin on a listener we cannot accept from
                    return
                continue  # e.g. ECONNABORTED: that client gave up already
            if self._count_open() >= self.max_connections and not self._evict_idlest():
                sock.close()  # every connection is being answered: refuse rather than queue without bound
                continue
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small answers, no Nagle delay
            except OSError:
                pass
            conn = _Conn(sock, f"{address[0]}:{address[1]}", time.monotonic())
            with self._open_lock:
                self._open += 1
            self._conns[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _on_readable(self, conn: _Conn) -> None:
        request = conn.request
        if request is None or conn.linger_until is not None:
            want = 65536
        else:  # the body: never read past Content-Length
            want = min(RECV_CHUNK, request.length - len(conn.buffer))
        try:
            chunk = conn.sock.recv(max(want, 1))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not chunk:  # the client closed its side
            self._drop(conn)
            return
        conn.last_active = time.monotonic()
        if conn.linger_until is not None:
            conn.discarded += len(chunk)
            if conn.discarded > self.max_request_bytes:
                self._drop(conn)
            return
        conn.buffer += chunk
        self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Parse what is buffered; answer or dispatch every complete request (pipelining included)."""
        while True:
            if conn.request is None:
                end, sep = _head_end(conn.buffer)
                if end < 0 or end > MAX_HEAD_BYTES:
                    if len(conn.buffer) > MAX_HEAD_BYTES:
                        self._reject(
                            conn, _HTTPError(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
                        )
                    return
                try:
                    conn.request = self._check_head(bytes(conn.buffer[:end]))
                except _HTTPError as exc:
                    self._reject(conn, exc)
                    return
                del conn.buffer[: end + sep]
                if conn.request.expect_continue and conn.request.length > len(conn.buffer):
                    if not self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n"):
                        return
            request = conn.request
            if len(conn.buffer) < request.length:
                return  # wait for the rest of the body
            if len(conn.buffer) == request.length:  # the usual case: hand over the buffer, no copy
                body, conn.buffer = conn.buffer, bytearray()
            else:  # pipelined bytes of the next request follow (at most one head-sized read)
                body = conn.buffer[: request.length]
                del conn.buffer[: request.length]
            conn.request = None
            if request.path == "/score":
                self._selector.unregister(conn.sock)
                del self._conns[conn.sock]
                self._jobs.put((conn, request, body))
                return
            body.clear()  # GET /health: answered here, no worker needed
            health = {"status": "ok", "reward": self.name, "max_request_bytes": self.max_request_bytes}
            if not self._send(conn, _response(200, health, request.keep_alive)):
                return
            if not request.keep_alive:
                self._drop(conn)
                return
            if not conn.buffer:
                return

    def _check_head(self, raw: bytes) -> _Request:
        """Everything decidable before the body: syntax, route, token, size."""
        method, target, version, headers = _parse_head(raw)
        path = target.split("?", 1)[0].rstrip("/")
        routes = {"/health": "GET", "/score": "POST"}
        if path not in routes:
            raise _HTTPError(404, f"unknown path {target[:100]!r}; use GET /health or POST /score")
        if method != routes[path]:
            raise _HTTPError(
                405, f"{path} takes {routes[path]}, not {method[:20]}", [f"Allow: {routes[path]}"]
            )
        if self._token is not None:
            self._check_token(headers.get("authorization", []))
        length = _content_length(method, headers, self.max_request_bytes)
        connection = ",".join(headers.get("connection", [])).lower()
        keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
        expect_continue = any(v.lower() == "100-continue" for v in headers.get("expect", []))
        return _Request(method, path, keep_alive, length, expect_continue)

    def _check_token(self, values: list[str]) -> None:
        assert self._token is not None
        how = f"send 'Authorization: Bearer <token>' (RemoteReward(token=...) or the {TOKEN_ENV} variable)"
        challenge = ['WWW-Authenticate: Bearer realm="rlflow reward server"']
        if not values:
            raise _HTTPError(401, f"this reward server needs a token: {how}", challenge)
        scheme, _, credential = values[0].partition(" ")
        # compare_digest: the time taken does not reveal how much of a guessed token was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credential.strip().encode("latin-1"), self._token
        ):
            raise _HTTPError(401, f"wrong token for this reward server: {how}", challenge)

    def _reject(self, conn: _Conn, error: _HTTPError) -> None:
        """Answer an error before (all of) the body was read, then linger: discard input, then close."""
        level = logging.INFO if error.status == 401 else logging.DEBUG
        logger.log(level, "reward server: %s %d %s", conn.peer, error.status, error.message)
        conn.buffer = bytearray()
        conn.request = None
        if not self._send(conn, _response(error.status, {"error": error.message}, False, error.headers)):
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)
            return
        conn.linger_until = time.monotonic() + min(LINGER_S, self.read_timeout_s)

    def _send(self, conn: _Conn, data: bytes) -> bool:
        """Send a small answer without blocking the loop; drop the connection if it does not fit."""
        try:
            sent = conn.sock.send(data)
        except OSError:
            sent = -1
        if sent != len(data):  # the peer stopped reading: not worth a thread or a write queue
            self._drop(conn)
            return False
        return True

    def _sweep(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.linger_until is not None:
                expired = now >= conn.linger_until
            else:
                expired = now - conn.last_active > self.read_timeout_s
            if expired:
                logger.debug(
                    "reward server: closing %s (silent for %.1f s)", conn.peer, now - conn.last_active
                )
                self._drop(conn)

    def _evict_idlest(self) -> bool:
        if not self._conns:
            return False
        self._drop(min(self._conns.values(), key=lambda conn: conn.last_active))
        return True

    def _drop(self, conn: _Conn) -> None:
        """Close a connection the loop owns."""
        if self._conns.pop(conn.sock, None) is not None:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.sock.fileno() >= 0:
            conn.sock.close()
            with self._open_lock:
                self._open -= 1
        conn.buffer = bytearray()

    def _count_open(self) -> int:
        with self._open_lock:
            return self._open

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (the loop will wake anyway) or already closed
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _take_back(self) -> None:
        """Keep-alive connections a worker has answered: read their next request."""
        while True:
            try:
                conn = self._returned.get_nowait()
            except queue.Empty:
                return
            if self._stopping.is_set():
                self._close(conn)
                continue
            conn.sock.setblocking(False)
            conn.last_active = time.monotonic()
            self._conns[conn.sock] = conn
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            if conn.buffer:
                self._advance(conn)

    def _close_returned(self) -> None:
        while True:
            try:
                self._close(self._returned.get_nowait())
            except queue.Empty:
                return

    # -- workers (max_workers threads) ----------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            conn, request, body = job
            try:
                status, answer = self._score_request(body)
                del body, job  # the decoded request is gone; don't keep its bytes while sending
                conn.sock.settimeout(self.read_timeout_s)  # a client that does not read cannot hold us
                conn.sock.sendall(_response(status, answer, request.keep_alive))
            except OSError:
                self._close(conn)
                continue
            except Exception:  # noqa: BLE001 (a bug here must not kill the worker)
                logger.exception("reward server: answering %s failed", conn.peer)
                self._close(conn)
                continue
            if request.keep_alive and not self._stopping.is_set():
                self._returned.put(conn)
                self._wake()
            else:
                self._close(conn)

    def _score_request(self, body: bytearray) -> tuple[int, dict[str, Any]]:
        """(status, JSON answer) for a POST /score body; frees the body as soon as it is decoded."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return 400, {"error": f"bad request: the body is not UTF-8 ({exc})"}
        finally:
            body.clear()
        try:
            request = json.loads(text)
        except json.JSONDecodeError as exc:
            return 400, {"error": f"bad request: the body is not valid JSON: {exc}"}
        except RecursionError:
            return 400, {"error": "bad request: the body's JSON is nested too deeply"}
        finally:
            del text
        try:
            if not isinstance(request, dict):
                raise ValueError("the body must be a JSON object with 'images' and 'prompts'")
            images = decode_images(request.pop("images", None))
            prompts = request.get("prompts")
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("'prompts' must be a list of strings")
            if len(prompts) != images.shape[0]:
                raise ValueError(f"got {len(prompts)} 'prompts' for {images.shape[0]} images")
        except (ValueError, TypeError) as exc:
            return 400, {"error": f"bad request: {exc}"}
        try:
            return 200, self.score(images, prompts)
        except (ValueError, TypeError) as exc:
            # Deterministic rejections (prompt outside the reward's grammar, NaN rewards): retrying won't help.
            logger.warning("reward %s rejected a request: %s", self.name, exc)
            return 400, {"error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # noqa: BLE001 (report any failure to the client, keep serving)
            logger.exception("reward %s failed", self.name)
            return 500, {"error": f"{type(exc).__name__}: {exc}"}


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
        "127.0.0.1",
        help="Address to listen on. Anything but loopback should use a token (and a private network).",
    )
    port: int = option(8765, help="TCP port to listen on (0 picks a free one; the URL is logged).")
    token: str | None = option(
        None,
        help=f"Require 'Authorization: Bearer <token>' on every request. Prefer the {TOKEN_ENV} environment "
        "variable (read when this is unset): a --token shows in the process list.",
    )
    max_workers: int = option(
        8, help="Threads that decode and score complete requests (the reward itself runs one call at a time)."
    )
    read_timeout_s: float = option(
        30.0, help="Close a connection that sends nothing for this many seconds (stalled or idle clients)."
    )
    max_request_bytes: int = option(
        DEFAULT_MAX_REQUEST_BYTES,
        help="Largest request body accepted (413 above it, checked before reading).",
    )
    max_connections: int = option(
        512, help="Most open connections; a new one beyond it closes the longest-idle one."
    )


def serve(config: RewardServerConfig) -> None:
    """Serve ``config.reward`` until Ctrl-C (blocks). Unknown rewards and unusable ports raise ``ConfigError``."""
    from .combine import build_reward  # combine imports the client, which imports this module

    token = config.token if config.token is not None else (os.environ.get(TOKEN_ENV) or None)
    reward_fn = build_reward(config.reward)
    server = RewardServer(
        reward_fn,
        config.host,
        config.port,
        name=config.reward,
        token=token,
        max_workers=config.max_workers,
        read_timeout_s=config.read_timeout_s,
        max_request_bytes=config.max_request_bytes,
        max_connections=config.max_connections,
    )
    started, url = time.monotonic(), server.url
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    minutes = (time.monotonic() - started) / 60
    logger.info("done: reward server %s stopped after %.1f min (it listened on %s)", config.reward, minutes, url)
