"""Progress bars on the main rank's terminal: rollouts (episodes done / total, env-steps/s) and the
update (micro-steps done / total).

A bar appears only on the main rank and only when its stream (stdout by default) is a terminal, so
log files, SLURM output and launcher pipes never receive bar characters. rl/ knows nothing of tqdm:
`collect()` reports through its `on_progress` callback, and the update's micro-steps are counted by
wrapping the backend that `run_update` drives (one `backward()` per micro-batch).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

EpisodeCallback = Callable[[int, int], None]  # (episodes finished, env steps so far)


def bars_enabled(main_rank: bool, stream: TextIO | None = None) -> bool:
    """True on the main rank when the stream is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return main_rank and bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _bar(total: int, main_rank: bool, stream: TextIO | None, desc: str, unit: str, mininterval: float = 0.1):
    stream = sys.stdout if stream is None else stream
    if total <= 0 or not bars_enabled(main_rank, stream):
        return None
    from tqdm import tqdm

    try:
        width = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # not a file descriptor (io.UnsupportedOperation too)
        width = 0
    # A terminal that reports 0 columns (`script`, some CI ptys) would make tqdm draw nothing.
    sized = {"dynamic_ncols": True} if width > 0 else {"ncols": 100, "nrows": 20}
    return tqdm(
        total=total,
        desc=desc,
        file=stream,
        leave=False,  # the per-iteration log line is the record; bars only show the phase in flight
        mininterval=mininterval,
        bar_format="{desc}: {n_fmt}/{total_fmt} " + unit + " |{bar}| {elapsed}<{remaining}{postfix}",
        **sized,
    )


@contextlib.contextmanager
def episode_bar(
    total: int, main_rank: bool, stream: TextIO | None = None, desc: str = "rollout"
) -> Iterator[EpisodeCallback | None]:
    """Yields collect()'s on_progress callback, or None when no bar is shown."""
    bar = _bar(total, main_rank, stream, desc, "episodes")
    if bar is None:
        yield None
        return
    start = time.perf_counter()

    def update(episodes: int, env_steps: int) -> None:
        rate = env_steps / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{rate:.0f} env-steps/s", refresh=False)
        if episodes != bar.n:
            bar.n = episodes
            bar.refresh()  # an episode ended: always show it
        else:
            bar.update(0)  # only the rate changed: tqdm's own rate limit decides whether to redraw

    try:
        yield update
    finally:
        bar.close()


class _CountingBackend:
    """An update backend that reports every backward() (one per micro-batch); the rest is delegated."""

    def __init__(self, backend: Any, bar: Any):
        self._backend, self._bar = backend, bar

    def backward(self, loss: Any) -> None:
        self._backend.backward(loss)
        self._bar.update(1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


@contextlib.contextmanager
def micro_step_bar(
    backend: Any, total: int, main_rank: bool, stream: TextIO | None = None, desc: str = "update"
) -> Iterator[Any]:
    """Yields the backend to hand run_update: the same object when no bar is shown."""
    # Every micro-step is a forward and backward pass: rare enough to redraw each one.
    bar = _bar(total, main_rank, stream, desc, "micro-steps", mininterval=0.0)
    if bar is None:
        yield backend
        return
    try:
        yield _CountingBackend(backend, bar)
    finally:
        bar.close()
