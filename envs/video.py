"""Render policy rollouts of a task to an mp4 (or gif) file.

Headless rendering: MuJoCo needs an OpenGL context; this module defaults ``MUJOCO_GL`` to ``egl`` (GPU
or Mesa EGL, works without a display) *before* MuJoCo is imported. Where EGL is unavailable, set
``MUJOCO_GL=osmesa`` (software rendering; needs the OSMesa library, e.g. ``apt install libosmesa6``, and
usually ``PYOPENGL_PLATFORM=osmesa``) in the environment before starting Python. ``MUJOCO_GL=glfw``
needs a display. Because the variable is read when MuJoCo / PyOpenGL first load, it must be set before
anything imports ``mujoco`` in the process.

mp4 needs ffmpeg (``imageio[ffmpeg]`` ships a binary); a path ending in ``.gif`` is written with Pillow
instead (gif frames are buffered in memory, so keep gifs short; mp4 frames are streamed to ffmpeg).

The camera follows the robot (:func:`rlflow.envs.tasks.make_raw_env`: MuJoCo's tracking camera on the
torso). Frames go to a temporary file that replaces ``path`` only when the video is complete, with a
progress bar; given a ``fingerprint`` (e.g. the policy's weights digest), a finished video with the same
fingerprint and render settings is kept instead of rendered again (``<path>.json`` records them).
"""

from __future__ import annotations

import os

# Must run before mujoco (imported by gymnasium's MuJoCo envs) picks its OpenGL backend.
os.environ.setdefault("MUJOCO_GL", "egl")

import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from .normalization import Normalization  # noqa: E402
from .tasks import TRACKING_CAMERAS, make_raw_env, resolve_task  # noqa: E402
from .wrappers import wrap_env  # noqa: E402

__all__ = ["finished_video", "record_policy_video", "record_video", "sidecar_path"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


class _FrameSink:
    """Receives frames ``[H, W, 3]`` uint8 and writes them to ``path`` (mp4 streamed, gif buffered)."""

    def __init__(self, path: Path, fps: float) -> None:
        import imageio.v2 as imageio

        self.path = path
        self.fps = fps
        self.count = 0
        self._gif = path.suffix.lower() == ".gif"
        self._frames: list[np.ndarray] = []
        self._writer: Any = None
        if not self._gif:
            # macro_block_size=1: accept any frame size instead of silently resizing to multiples of 16.
            self._writer = imageio.get_writer(str(path), fps=fps, macro_block_size=1)

    def add(self, frame: np.ndarray) -> None:
        if self._gif:
            self._frames.append(frame)
        else:
            self._writer.append_data(frame)
        self.count += 1

    def close(self) -> None:
        if self._gif:
            import imageio.v2 as imageio

            if self._frames:
                # Pillow's gif writer takes the per-frame duration in milliseconds; loop=0 repeats forever.
                imageio.mimsave(str(self.path), self._frames, duration=1000.0 / self.fps, loop=0)
            self._frames = []
        elif self._writer is not None:
            self._writer.close()
            self._writer = None


class _CaptureFrames(gym.Wrapper[Any, Any, Any, Any]):
    """Innermost wrapper that renders after every reset and every raw env step.

    It sits below the chunk wrapper so that a video shows every env step, not one frame per chunk.
    """

    def __init__(self, env: gym.Env[Any, Any], sink: _FrameSink, bar: Any = None) -> None:
        super().__init__(env)
        self._sink = sink
        self._bar = bar

    def _capture(self) -> None:
        frame = self.env.render()
        if frame is not None:
            self._sink.add(np.asarray(frame))
            if self._bar is not None:
                self._bar.update(1)

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        out = self.env.reset(**kwargs)
        self._capture()
        return out

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        out = self.env.step(action)
        self._capture()
        return out


def sidecar_path(path: PathLike) -> Path:
    """Where :func:`record_video` records what a video shows: ``<path>.json`` (``final.mp4.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def finished_video(path: PathLike, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The recorded result of the finished video at ``path`` if it was rendered with ``fingerprint``
    (the caller's entries plus :func:`record_video`'s render settings), else ``None``."""
    path, sidecar = Path(path), sidecar_path(path)
    if not (path.is_file() and path.stat().st_size > 0 and sidecar.is_file()):
        return None
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("fingerprint") != _plain(fingerprint):
        return None
    return recorded


def _plain(value: Mapping[str, Any]) -> Any:
    """``value`` as JSON would give it back (tuples -> lists, numpy scalars -> numbers), for comparisons."""
    return json.loads(
        json.dumps(value, sort_keys=True, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )


def record_video(
    task: str,
    act_fn: Callable[[np.ndarray], np.ndarray],
    path: PathLike,
    *,
    horizon: int = 1,
    normalization: Normalization | None = None,
    episodes: int = 1,
    max_steps: int = 1000,
    fps: float | None = None,
    seed: int = 0,
    width: int = 480,
    height: int = 480,
    fingerprint: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Roll out ``act_fn`` for ``episodes`` episodes and write every env step's frame to ``path``.

    The camera tracks the robot's torso (:func:`rlflow.envs.tasks.make_raw_env`). A progress bar counts the
    frames (on a terminal); the video is written to a temporary file next to ``path`` and moved to ``path``
    when complete, so an interrupted render leaves no partial ``path``.

    Args:
        task: short name or gymnasium id.
        act_fn: maps one observation ``[obs_dim]`` (normalised if ``normalization`` is given) to an
            action chunk ``[horizon, act_dim]`` (normalised likewise).
        path: output file; ``.gif`` writes a gif, anything else (``.mp4``) goes through ffmpeg.
        horizon, normalization: as in :func:`rlflow.envs.tasks.make_env`.
        episodes: number of episodes, all in one file (episode ``k`` is reset with ``seed + k``).
        max_steps: env-step limit per episode (a ``TimeLimit`` truncation).
        fps: frame rate; defaults to the env's ``metadata["render_fps"]`` (real time).
        seed: base reset seed.
        width, height: frame size in pixels.
        fingerprint: what the video shows, e.g. ``{"policy": <weights digest>}``. When given, the result
            and the fingerprint (with the render settings above added) are recorded in ``<path>.json``,
            and a call whose fingerprint matches that of the finished ``path`` returns the recorded result
            (with ``"skipped": True``) without rendering again.

    Returns:
        ``{"returns": [float per episode], "lengths": [env steps per episode], "frames": int}``; returns
        and lengths are the true ones (raw rewards, env steps), from ``RecordEpisodeStatistics``.

    Raises:
        RuntimeError: no OpenGL context could be created (see the module docstring for backends).
    """
    if episodes < 1 or max_steps < 1:
        raise ValueError(
            f"episodes and max_steps must be >= 1, got episodes={episodes}, max_steps={max_steps}"
        )
    out_path = Path(path)
    settings = {
        "task": task,
        "horizon": horizon,
        "episodes": episodes,
        "max_steps": max_steps,
        "fps": fps,
        "seed": seed,
        "width": width,
        "height": height,
        "camera": TRACKING_CAMERAS.get(resolve_task(task)),
    }
    full_fingerprint = None if fingerprint is None else {**dict(fingerprint), "render": settings}
    if full_fingerprint is not None:
        recorded = finished_video(out_path, full_fingerprint)
        if recorded is not None:
            logger.info(
                "%s already shows this policy (%d frames, rendered before); not rendering it again",
                out_path,
                recorded.get("frames", 0),
            )
            return {
                "returns": recorded.get("returns", []),
                "lengths": recorded.get("lengths", []),
                "frames": recorded.get("frames", 0),
                "skipped": True,
            }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_path(out_path)
    sidecar.unlink(missing_ok=True)  # the old record no longer describes what path will hold
    partial = out_path.with_name(f".{out_path.stem}.partial{out_path.suffix}")
    raw = make_raw_env(task, render_mode="rgb_array", max_episode_steps=max_steps, width=width, height=height)
    frame_rate = float(fps if fps is not None else raw.metadata.get("render_fps", 30))
    sink = _FrameSink(partial, frame_rate)
    limit = episodes * (max_steps + 1)
    logger.info(
        "rendering a video of %s (%d episode(s), up to %d frames of %dx%d) to %s",
        task,
        episodes,
        limit,
        width,
        height,
        out_path,
    )
    started = time.perf_counter()
    bar = tqdm(total=limit, desc=f"video {out_path.name}", unit="frame", disable=None, leave=False)
    env = wrap_env(_CaptureFrames(raw, sink, bar), horizon=horizon, normalization=normalization)
    returns: list[float] = []
    lengths: list[int] = []
    complete = False
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            while True:
                obs, _reward, terminated, truncated, info = env.step(np.asarray(act_fn(obs)))
                if terminated or truncated:
                    stats = info["episode"]
                    returns.append(float(stats["r"]))
                    lengths.append(int(stats["l"]))
                    break
        complete = True
    finally:
        bar.close()
        env.close()
        sink.close()
        if complete:
            os.replace(partial, out_path)
        else:
            partial.unlink(missing_ok=True)
    result: dict[str, Any] = {"returns": returns, "lengths": lengths, "frames": sink.count}
    if full_fingerprint is not None:
        record = {"fingerprint": _plain(full_fingerprint), **result}
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
        os.replace(tmp, sidecar)
    logger.info(
        "wrote %d frames (%d episodes, returns %s) of %s to %s in %.0f s",
        sink.count,
        episodes,
        ", ".join(f"{r:.0f}" for r in returns),
        task,
        out_path,
        time.perf_counter() - started,
    )
    return result


def record_policy_video(
    policy: Any,
    task: str,
    path: PathLike,
    *,
    normalization: Normalization,
    seed: int = 0,
    device: Any = "cpu",
) -> dict[str, Any]:
    """One deterministic episode of a robot policy (its ``deterministic_action``) as a video at ``path``.

    What ``rlflow ppo`` renders of its final policy and ``rlflow eval`` of the policy it evaluates. The video
    is fingerprinted with the policy's weights and normalisation (:func:`record_video`), so a video that
    already shows these weights is not rendered again; the noise bounds (``min_std`` / ``max_std``, which
    PPO anneals) are left out of the fingerprint because deterministic actions do not depend on them.
    """
    import torch

    from rlflow.policies.loading import policy_digest

    generator = torch.Generator().manual_seed(seed)

    def act(obs: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
        with torch.no_grad():
            return policy.deterministic_action(obs_t, generator=generator)[0].cpu().numpy()

    fingerprint = {
        "policy": policy_digest(policy, exclude=("min_std", "max_std")),
        "normalization": normalization.to_dict(),
    }
    return record_video(
        task,
        act,
        path,
        horizon=policy.config.horizon,
        normalization=normalization,
        seed=seed,
        fingerprint=fingerprint,
    )
