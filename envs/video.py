"""Render policy rollouts of a task to an mp4 (or gif) file.

Headless rendering: MuJoCo needs an OpenGL context; this module defaults ``MUJOCO_GL`` to ``egl`` (GPU
or Mesa EGL, works without a display) *before* MuJoCo is imported. Where EGL is unavailable, set
``MUJOCO_GL=osmesa`` (software rendering; needs the OSMesa library, e.g. ``apt install libosmesa6``, and
usually ``PYOPENGL_PLATFORM=osmesa``) in the environment before starting Python. ``MUJOCO_GL=glfw``
needs a display. Because the variable is read when MuJoCo / PyOpenGL first load, it must be set before
anything imports ``mujoco`` in the process.

mp4 needs ffmpeg (``imageio[ffmpeg]`` ships a binary); a path ending in ``.gif`` is written with Pillow
instead (gif frames are buffered in memory, so keep gifs short; mp4 frames are streamed to ffmpeg).
"""

from __future__ import annotations

import os

# Must run before mujoco (imported by gymnasium's MuJoCo envs) picks its OpenGL backend.
os.environ.setdefault("MUJOCO_GL", "egl")

import logging  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from .normalization import Normalization  # noqa: E402
from .tasks import resolve_task  # noqa: E402
from .wrappers import wrap_env  # noqa: E402

__all__ = ["record_video"]

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

    def __init__(self, env: gym.Env[Any, Any], sink: _FrameSink) -> None:
        super().__init__(env)
        self._sink = sink

    def _capture(self) -> None:
        frame = self.env.render()
        if frame is not None:
            self._sink.add(np.asarray(frame))

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        out = self.env.reset(**kwargs)
        self._capture()
        return out

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        out = self.env.step(action)
        self._capture()
        return out


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
) -> dict[str, Any]:
    """Roll out ``act_fn`` for ``episodes`` episodes and write every env step's frame to ``path``.

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
    out_path.parent.mkdir(parents=True, exist_ok=True)
    raw = gym.make(
        resolve_task(task), render_mode="rgb_array", max_episode_steps=max_steps, width=width, height=height
    )
    frame_rate = float(fps if fps is not None else raw.metadata.get("render_fps", 30))
    sink = _FrameSink(out_path, frame_rate)
    env = wrap_env(_CaptureFrames(raw, sink), horizon=horizon, normalization=normalization)
    returns: list[float] = []
    lengths: list[int] = []
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
    finally:
        env.close()
        sink.close()
    logger.info("wrote %d frames (%d episodes) of %s to %s", sink.count, episodes, task, out_path)
    return {"returns": returns, "lengths": lengths, "frames": sink.count}
