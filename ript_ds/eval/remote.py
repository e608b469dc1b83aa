"""A policy served elsewhere (any openpi-protocol server) as a rollout PolicyFn, so our LIBERO protocol can
evaluate it: `launch/eval.py --policy-server HOST:PORT`, e.g. to compare harnesses on one checkpoint.

Each env slot's observation becomes the dict openpi's LIBERO client sends (agentview and wrist images as our
LIBERO env already renders them: rotated 180 degrees, resized with pad; the 8-dim state as float64; the
task's instruction), and the reply's action chunk [H, 7] is executed like our own policy's.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ript_ds.env.base import Observation, TaskSpec
from ript_ds.rl.rollout import NoiseKey, PolicyFn
from ript_ds.serving.client import RemotePolicy


def request(obs: Observation, prompt: str) -> dict:
    """Our env observation -> openpi's LIBERO observation dict (examples/libero/main.py)."""
    return {
        "observation/image": np.ascontiguousarray(obs.images[0]),
        "observation/wrist_image": np.ascontiguousarray(obs.images[1]),
        "observation/state": np.asarray(obs.state, dtype=np.float64),
        "prompt": prompt,
    }


def remote_policy_fn(clients: Sequence[RemotePolicy]) -> PolicyFn:
    """One request per live env per replanning step; client c serves slots c, c + C, ... in its own thread,
    so C requests are in flight at once (a micro-batching server batches them)."""
    executor = ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="policy-client")

    def policy_fn(observations: list[Observation], tasks: list[TaskSpec], keys: list[NoiseKey]) -> np.ndarray:
        out: list[np.ndarray | None] = [None] * len(observations)

        def serve(c: int) -> None:
            for i in range(c, len(observations), len(clients)):
                reply = clients[c].infer(request(observations[i], tasks[i].instruction))
                out[i] = np.asarray(reply["actions"], dtype=np.float32)

        for future in [executor.submit(serve, c) for c in range(min(len(clients), len(observations)))]:
            future.result()  # re-raises a ServerError of any slot
        return np.stack(out)

    return policy_fn
