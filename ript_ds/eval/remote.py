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
from ript_ds.serving.client import RemotePolicy, ServerError


def request(obs: Observation, prompt: str) -> dict:
    """Our env observation -> openpi's LIBERO observation dict (examples/libero/main.py)."""
    return {
        "observation/image": np.ascontiguousarray(obs.images[0]),
        "observation/wrist_image": np.ascontiguousarray(obs.images[1]),
        "observation/state": np.asarray(obs.state, dtype=np.float64),
        "prompt": prompt,
    }


def remote_policy_fn(clients: Sequence[RemotePolicy], replan_steps: int, action_dim: int = 7) -> PolicyFn:
    """One request per live env per replanning step; client c serves slots c, c + C, ... in its own thread,
    so C requests are in flight at once (a micro-batching server batches them). A reply that is not an
    action chunk of at least `replan_steps` x `action_dim` finite numbers is a ServerError (one line)."""
    executor = ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="policy-client")

    def policy_fn(observations: list[Observation], tasks: list[TaskSpec], keys: list[NoiseKey]) -> np.ndarray:
        out: list[np.ndarray | None] = [None] * len(observations)

        def serve(c: int) -> None:
            for i in range(c, len(observations), len(clients)):
                reply = clients[c].infer(request(observations[i], tasks[i].instruction))
                out[i] = _chunk(reply["actions"], replan_steps, action_dim, clients[c].address)

        for future in [executor.submit(serve, c) for c in range(min(len(clients), len(observations)))]:
            future.result()  # re-raises a ServerError of any slot
        return np.stack(out)

    return policy_fn


def _chunk(actions, replan_steps: int, action_dim: int, address: str) -> np.ndarray:
    try:
        chunk = np.asarray(actions, dtype=np.float32)
    except (TypeError, ValueError):
        raise ServerError(f"policy server {address} sent actions that are not a numeric array") from None
    if chunk.ndim != 2 or chunk.shape[1] != action_dim or chunk.shape[0] < replan_steps:
        raise ServerError(
            f"policy server {address} sent actions of shape {chunk.shape}; LIBERO needs [H, {action_dim}] with "
            f"H >= {replan_steps} (the replan steps: lower --replan-steps to at most the server's chunk)"
        )
    if not np.isfinite(chunk).all():
        raise ServerError(f"policy server {address} sent non-finite actions")
    return chunk
