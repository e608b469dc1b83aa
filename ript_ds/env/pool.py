"""N environments in worker processes, driven by one process, surviving worker crashes and hangs.

The driver sends each slot one command (`send_reset` or `send_step`), then `gather()` waits for all
pending replies at once, or `gather(slots)` for some of them: the others go on stepping in their
workers, which is what lets a pipelined rollout (rl/rollout.py) compute the policy for one group of
slots while another group steps. A worker that dies or overruns `timeout_s` is killed and restarted; its
reply comes back as a `SlotReply` with `failure` set, so one bad simulator never stalls a rollout.
Workers cache one env per task because LIBERO env creation costs seconds.

Workers start with the "spawn" context by default: the driver may hold CUDA, threads or DeepSpeed
state that must not be forked. Workers are daemons, terminated by close(), by leaving the `with`
block (also on exceptions), and by an atexit hook as a last resort; a worker whose driver dies
sees its pipe close and exits.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from ript_ds.env.base import Env, Observation, TaskSpec

logger = logging.getLogger(__name__)

ENV_KINDS = ("synthetic", "libero")
# Preemption signals belong to the driver (ckpt/signals.py), which then stops its workers. SLURM's
# --signal reaches every process of a job step and launch/slurm/*.sbatch signal the ranks' trees, so
# a worker left at the default disposition would die of them mid-episode: workers ignore them.
DRIVER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR1})


@dataclass(frozen=True)
class EnvFactory:
    """Picklable recipe for building an env inside a worker."""

    kind: str  # one of ENV_KINDS
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the env constructor after the task
    max_cached_envs: int = 8  # per worker, least recently used closed first (LIBERO envs hold a renderer)
    # libero: EGL device (physical GPU index, env.libero.render_device_for_rank) its workers render
    # on; None = MuJoCo's default device
    render_device: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ENV_KINDS:
            raise ValueError(f"unknown env kind {self.kind!r}; expected one of {ENV_KINDS}")
        if self.render_device is not None and self.kind != "libero":
            raise ValueError(
                f"render_device is for libero envs; the {self.kind} env does not render on a GPU"
            )

    def configure_process(self) -> None:
        """First thing in a worker: what must be in os.environ before any simulator is imported."""
        if self.render_device is not None:
            # mujoco and robosuite read it at import; every env of this worker renders there.
            os.environ["MUJOCO_EGL_DEVICE_ID"] = str(self.render_device)

    def make(self, task: TaskSpec) -> Env:
        # Imported here, in the worker: LIBERO pulls in mujoco and robosuite, which the driver never needs.
        if self.kind == "synthetic":
            from ript_ds.env.synthetic import SyntheticEnv

            return SyntheticEnv(task, **self.kwargs)
        from ript_ds.env.libero import LiberoEnv

        return LiberoEnv(task, render_gpu_device_id=self.render_device, **self.kwargs)


@dataclass
class SlotReply:
    """A worker's answer to one command. For a reset, executed is 0 and success/done are False."""

    # after the last action of the command (or the reset); None on failure or when the episode
    # ended (done) before that action
    obs: Observation | None
    executed: int  # actions executed by this command
    success: bool
    done: bool
    failure: str | None = None  # why the episode could not go on (crash, timeout, env error)
    # [executed, A] float32, what the env executed (the sent actions clipped to its action space);
    # None when nothing was executed (a reset or a failure)
    actions: np.ndarray | None = None


@dataclass
class PoolStats:
    crashes: int = 0  # worker processes that died during a command
    timeouts: int = 0  # commands that overran timeout_s (worker killed)
    errors: int = 0  # exceptions raised by an env (worker kept, env rebuilt)
    restarts: int = 0


def render_threads(num_workers: int) -> str:
    """llvmpipe threads per worker: the cores divided among the workers (at least 1).

    Measured (docs/benchmarks.md, rollout_throughput, 2 cores): 1 worker renders 22% faster with 2
    threads than with 1; with 2 or 4 workers 1 thread each is as fast as llvmpipe's default and does
    not oversubscribe the cores. A user-set LP_NUM_THREADS wins.
    """
    return os.environ.get("LP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(num_workers, 1))))


def _worker_main(conn: Connection, factory: EnvFactory, lp_threads: str) -> None:
    for signum in DRIVER_SIGNALS:  # blocked since the fork (_Worker): pending ones are dropped here
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, DRIVER_SIGNALS)
    os.environ["LP_NUM_THREADS"] = lp_threads  # before any renderer is created in this process
    factory.configure_process()
    envs: OrderedDict[TaskSpec, Env] = OrderedDict()
    current: Env | None = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the driver is gone
            break
        cmd = msg[0]
        if cmd == "close":
            break
        try:
            if cmd == "reset":
                _, task, init_state_idx, seed = msg
                current = None  # if building the env fails, no older env is to blame
                current = _cached_env(envs, task, factory)
                reply = SlotReply(current.reset(init_state_idx, seed), 0, False, False)
            elif cmd == "step":
                reply = run_actions(current, msg[1])
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as exc:
            # The episode is lost but the worker is fine; drop the env since its state is unknown.
            if current is not None:
                envs = OrderedDict((t, e) for t, e in envs.items() if e is not current)
                with contextlib.suppress(Exception):  # it already failed once; the reply says why
                    current.close()
                current = None
            reply = SlotReply(None, 0, False, True, f"env error: {exc!r}\n{traceback.format_exc()}")
        conn.send(reply)
    for env in envs.values():
        env.close()


def _cached_env(envs: OrderedDict[TaskSpec, Env], task: TaskSpec, factory: EnvFactory) -> Env:
    if task in envs:
        envs.move_to_end(task)
        return envs[task]
    while len(envs) >= factory.max_cached_envs:
        envs.popitem(last=False)[1].close()
    envs[task] = factory.make(task)
    return envs[task]


def run_actions(env: Env | None, actions: np.ndarray) -> SlotReply:
    """Step `env` through actions [n, A] until the episode ends; the reply of a step command.

    Only the last action's observation is asked for: the policy sees the env once per chunk, and an
    episode that ends earlier is never observed again (LIBERO skips rendering the others)."""
    if env is None:
        raise RuntimeError("step before any reset")
    executed, result = [], None
    for i, action in enumerate(actions):
        result = env.step(action, observe=i == len(actions) - 1)
        executed.append(result.action)
        if result.done:
            break
    if result is None:
        raise ValueError("step command with zero actions")
    taken = np.asarray(executed, dtype=np.float32)  # [executed, A]
    return SlotReply(result.obs, len(executed), result.success, result.done, actions=taken)


class _Worker:
    def __init__(self, ctx: Any, factory: EnvFactory, slot: int, lp_threads: str = "1") -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, factory, lp_threads), daemon=True, name=f"env-{slot}"
        )
        # The child inherits the signal mask through fork and exec: blocked, the driver's signals stay
        # pending, not fatal, until _worker_main ignores them; this thread gets its own after start().
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, DRIVER_SIGNALS)
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()  # so the driver sees EOF when the worker dies

    def kill(self) -> int | None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()
        return self.process.exitcode

    def stop(self, timeout: float = 2.0) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):  # already dead: kill() below just reaps it
            self.conn.send(("close",))
        self.process.join(timeout=timeout)
        self.kill()


_LIVE_POOLS: weakref.WeakSet[EnvPool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()


class EnvPool:
    """`num_workers` env slots; see the module docstring. Not thread-safe: one driver."""

    # Commands run in the workers while the driver goes on: a rollout can overlap policy and env steps.
    runs_in_background = True

    def __init__(
        self,
        factory: EnvFactory,
        num_workers: int,
        timeout_s: float = 30.0,  # per command; LIBERO's first reset of a task builds the env (~7 s)
        start_method: str = "spawn",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.factory, self.timeout_s = factory, timeout_s
        self.stats = PoolStats()
        self._ctx = mp.get_context(start_method)
        self.lp_threads = render_threads(num_workers)
        self._workers: list[_Worker | None] = [
            _Worker(self._ctx, factory, i, self.lp_threads) for i in range(num_workers)
        ]
        self._pending: dict[int, float] = {}  # slot -> deadline (monotonic seconds)
        _LIVE_POOLS.add(self)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def pids(self) -> list[int]:
        """Current worker process ids (tests and diagnostics)."""
        return [w.process.pid for w in self._workers if w is not None]

    def send_reset(self, slot: int, task: TaskSpec, init_state_idx: int, seed: int) -> None:
        self._send(slot, ("reset", task, init_state_idx, seed))

    def send_step(self, slot: int, actions: np.ndarray) -> None:
        """Queue up to len(actions) steps [n, A]; the worker stops early when the episode ends."""
        self._send(slot, ("step", np.asarray(actions, dtype=np.float32)))

    def _send(self, slot: int, msg: tuple) -> None:
        worker = self._workers[slot]
        if worker is None:
            raise RuntimeError("EnvPool is closed")
        if slot in self._pending:
            raise RuntimeError(f"slot {slot} already has a command pending; gather() first")
        self._pending[slot] = time.monotonic() + self.timeout_s
        # A worker that died since its last reply fails the send; gather() sees it dead and reports it.
        with contextlib.suppress(BrokenPipeError, OSError):
            worker.conn.send(msg)

    def gather(self, slots: Iterable[int] | None = None) -> dict[int, SlotReply]:
        """Wait for the pending commands of `slots` (None: all); never longer than timeout_s past the
        latest of their sends. Slots with nothing pending are skipped; the others keep running."""
        wanted = set(self._pending) if slots is None else set(slots) & set(self._pending)
        replies: dict[int, SlotReply] = {}
        while wanted:
            by_conn = {self._workers[s].conn: s for s in wanted}
            by_sentinel = {self._workers[s].process.sentinel: s for s in wanted}
            wait_s = max(0.0, min(self._pending[s] for s in wanted) - time.monotonic())
            for ready in wait([*by_conn, *by_sentinel], timeout=wait_s):
                slot = by_conn.get(ready, by_sentinel.get(ready))
                if slot in replies:  # both its pipe and its sentinel fired
                    continue
                replies[slot] = self._receive(slot)
                del self._pending[slot]
                wanted.discard(slot)
            now = time.monotonic()
            for slot in [s for s in wanted if self._pending[s] <= now]:
                self.stats.timeouts += 1
                replies[slot] = self._restart(slot, f"timeout after {self.timeout_s:g} s")
                del self._pending[slot]
                wanted.discard(slot)
        return replies

    def _receive(self, slot: int) -> SlotReply:
        worker = self._workers[slot]
        try:
            if worker.conn.poll():
                reply = worker.conn.recv()
                if reply.failure is not None:
                    self.stats.errors += 1
                    logger.warning("env slot %d: %s", slot, reply.failure)
                return reply
        except (EOFError, OSError):
            pass
        self.stats.crashes += 1
        worker.process.join(timeout=5)  # the sentinel fired or the pipe closed: it is exiting
        return self._restart(slot, f"worker crashed (exit {worker.process.exitcode})")

    def _restart(self, slot: int, reason: str) -> SlotReply:
        code = self._workers[slot].kill()
        logger.warning("env slot %d: %s (exit code %s); restarting its worker", slot, reason, code)
        self._workers[slot] = _Worker(self._ctx, self.factory, slot, self.lp_threads)
        self.stats.restarts += 1
        return SlotReply(None, 0, False, True, reason)

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        workers, self._workers = self._workers, [None] * len(self._workers)
        self._pending.clear()
        for worker in workers:
            if worker is not None:
                worker.stop()
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if any(w is not None for w in getattr(self, "_workers", [])):
            self.close()
