"""Small mp4s of episodes for eyeballing: cameras side by side, a green (success) or red border.

Frames are an episode's stored observations (one per replanning step), so a video costs nothing
extra during rollouts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ript_ds.rl.types import Episode

logger = logging.getLogger(__name__)

SUCCESS_RGB = np.array([0, 200, 0], dtype=np.uint8)
FAILURE_RGB = np.array([220, 0, 0], dtype=np.uint8)
BLOCK = 16  # codecs want frame sides divisible by 16; we pad rather than let ffmpeg rescale


def episode_frames(episode: Episode, min_height: int = 128, border: int = 4) -> np.ndarray:
    """-> [T, H', W', 3] uint8: cameras side by side, upscaled to at least min_height, framed."""
    images = episode.images  # [T, N_cam, H, W, 3]
    if images.shape[0] == 0:
        raise ValueError("episode has no stored observations (it failed at reset)")
    t, n, h, w, _ = images.shape
    scale = max(1, -(-min_height // h))  # nearest-neighbour upscaling keeps tiny renders crisp
    tiles = images.repeat(scale, axis=2).repeat(scale, axis=3)
    row = tiles.transpose(0, 2, 1, 3, 4).reshape(t, h * scale, n * w * scale, 3)
    height, width = _round_up(row.shape[1] + 2 * border), _round_up(row.shape[2] + 2 * border)
    frames = np.empty((t, height, width, 3), dtype=np.uint8)
    frames[:] = SUCCESS_RGB if episode.success else FAILURE_RGB
    frames[:, border : border + row.shape[1], border : border + row.shape[2]] = row
    return frames


def write_episode_video(episode: Episode, path: str | Path, fps: int = 5, max_frames: int = 200) -> Path:
    """Write one episode as an mp4 (at most max_frames frames); returns the path."""
    import imageio.v2 as imageio  # only video writing needs imageio and its ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = episode_frames(episode)[:max_frames]
    with imageio.get_writer(
        path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=BLOCK
    ) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def episode_video_name(ep: Episode) -> str:
    outcome = "success" if ep.success else "failure"
    return f"task{ep.context.task_id}_init{ep.context.init_state_idx}_seed{ep.seed}_{outcome}.mp4"


def write_videos(
    episodes: Sequence[Episode], directory: str | Path, max_videos: int = 4, prefix: str = ""
) -> list[Path]:
    """Videos of the first max_videos episodes that have frames, named by context, seed and outcome."""
    directory = Path(directory)
    paths = []
    for ep in [e for e in episodes if e.images.shape[0] > 0][:max_videos]:
        paths.append(write_episode_video(ep, directory / f"{prefix}{episode_video_name(ep)}"))
    logger.info("wrote %d episode videos to %s", len(paths), directory)
    return paths


def _round_up(x: int) -> int:
    return -(-x // BLOCK) * BLOCK
