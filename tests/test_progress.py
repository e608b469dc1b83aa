"""Progress bars: silent off a terminal and off the main rank; episode and micro-step counts on a tty;
collect() reports its progress to the callback."""

from __future__ import annotations

import io

import numpy as np

from ript_ds.env.pool import EnvFactory, EnvPool
from ript_ds.env.synthetic import expert_chunk, synthetic_tasks
from ript_ds.progress import bars_enabled, episode_bar, micro_step_bar
from ript_ds.rl.rollout import RolloutRequest, collect
from ript_ds.rl.types import Context


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_when_not_a_terminal_or_not_the_main_rank():
    assert not bars_enabled(True, io.StringIO()) and not bars_enabled(False, FakeTTY())
    assert bars_enabled(True, FakeTTY())
    backend = object()
    for stream, main in [(io.StringIO(), True), (FakeTTY(), False)]:
        with episode_bar(4, main, stream) as on_progress:
            assert on_progress is None
        with micro_step_bar(backend, 4, main, stream) as wrapped:
            assert wrapped is backend
        assert stream.getvalue() == ""


def test_episode_bar_renders_counts_and_env_step_rate():
    stream = FakeTTY()
    with episode_bar(4, True, stream) as on_progress:
        on_progress(1, 40)
        on_progress(3, 120)
    text = stream.getvalue()
    assert "rollout: 1/4 episodes" in text and "rollout: 3/4 episodes" in text, text
    assert "env-steps/s" in text


class _Backend:
    def __init__(self):
        self.losses = []

    def forward(self, x):
        return 2 * x

    def backward(self, loss):
        self.losses.append(loss)


def test_micro_step_bar_counts_backward_passes_and_delegates():
    stream, inner = FakeTTY(), _Backend()
    with micro_step_bar(inner, 3, True, stream) as backend:
        assert backend.forward(3) == 6  # delegated
        for loss in (1.0, 2.0, 3.0):  # one backward per micro-batch, however many optimizer steps
            backend.backward(loss)
    assert inner.losses == [1.0, 2.0, 3.0]
    text = stream.getvalue()
    assert "update: 2/3 micro-steps" in text and "update: 3/3 micro-steps" in text, text


def test_collect_reports_finished_episodes_and_env_steps():
    tasks = synthetic_tasks(n_tasks=2, num_init_states=4, max_steps=15)
    requests = [RolloutRequest(Context(i % 2, i), tasks[i % 2], 10 + i) for i in range(3)]

    def expert(observations, task_specs, keys):
        return np.stack(
            [expert_chunk(o.state, t, horizon=5) for o, t in zip(observations, task_specs, strict=True)]
        )

    calls: list[tuple[int, int]] = []
    with EnvPool(EnvFactory("synthetic", {"difficulty": 0.5}), num_workers=2) as pool:
        result = collect(expert, pool, requests, replan_every=5, on_progress=lambda *a: calls.append(a))
    episodes = [c[0] for c in calls]
    assert episodes == sorted(episodes) and episodes[-1] == 3
    assert calls[-1][1] == result.stats.env_steps == sum(ep.length for ep in result.episodes)
