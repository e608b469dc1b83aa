"""Rank helpers and collectives over torch.distributed (no DeepSpeed here; engine/deepspeed.py wraps it).

Launchers: `deepspeed` and `torchrun` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
`srun` exports SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST instead; we translate
those (MASTER_ADDR = first host of the node list, MASTER_PORT derived from the job id unless set) so one
`srun python launch/train.py` per task works without a wrapper. Plain `python` is world 1: we still make
a 1-rank gloo group, because DeepSpeed wants a process group, and every collective below short-cuts.

Every collective takes the timeout given to `init_distributed` (the process group's default): a rank that
died or stopped answering turns into a `CollectiveError` naming the operation, never an endless hang.
Functions containing a collective say "call on every rank"; calling one on a subset deadlocks the job.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as tdist

logger = logging.getLogger(__name__)

_timeout_s: float = 600.0


class CollectiveError(RuntimeError):
    """A collective failed or timed out: some rank died, hung, or called a different collective."""


# ---------------------------------------------------------------------------------------- rank helpers
def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    if is_initialized():
        return tdist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def world_size() -> int:
    if is_initialized():
        return tdist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    return _timeout_s


class MainRankFilter(logging.Filter):
    """Drops records on every rank but 0, so modules log freely without rank branches.

    A record with `extra={"all_ranks": True}` passes everywhere (per-rank diagnostics, crash reasons).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or is_main()


# ---------------------------------------------------------------------------------------- set-up
def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,010],cpu1' -> 'gpu003' (what `scontrol show
    hostnames | head -1` prints; parsed here because scontrol is not on every compute node)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _export_slurm_env() -> None:
    """Map srun's variables onto the torch.distributed ones, unless a launcher already set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if "SLURM_NTASKS" not in os.environ:  # salloc shell without srun: not a multi-task launch
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    # Same port on every task of the job, different jobs on one node rarely collide.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout: float = 600.0, backend: str | None = None) -> None:
    """Create the default process group (idempotent). Works under deepspeed, torchrun, srun and python.

    backend: None = nccl when CUDA is available, else gloo. `timeout` (seconds) bounds every collective.
    """
    global _timeout_s
    _timeout_s = float(timeout)
    if is_initialized():
        return
    _export_slurm_env()
    if "RANK" not in os.environ:  # plain python: a 1-rank group on a free local port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(seconds=_timeout_s),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    logger.info(
        "distributed: backend=%s world=%d timeout=%.0fs master=%s:%s",
        backend,
        world_size(),
        _timeout_s,
        os.environ.get("MASTER_ADDR"),
        os.environ.get("MASTER_PORT"),
    )


def destroy() -> None:
    if is_initialized():
        tdist.destroy_process_group()


# ---------------------------------------------------------------------------------------- collectives
def _active() -> bool:
    return is_initialized() and tdist.get_world_size() > 1


def _fail(op: str, err: Exception) -> CollectiveError:
    return CollectiveError(
        f"{op} failed on rank {rank()}/{world_size()}: another rank died, hung or called a different "
        f"collective (timeout {_timeout_s:.0f}s): {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    )


def _device() -> torch.device:
    # nccl reduces only CUDA tensors; gloo only CPU ones.
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(name: str = "barrier") -> None:
    """Wait for all ranks. Call on every rank. Under gloo, names the ranks that did not arrive."""
    if not _active():
        return
    try:
        if tdist.get_backend() == "gloo":
            tdist.monitored_barrier(timeout=datetime.timedelta(seconds=_timeout_s), wait_all_ranks=True)
        else:
            tdist.barrier()
    except Exception as err:
        raise _fail(f"barrier {name!r}", err) from err


def all_gather_object(obj: Any, op: str = "all_gather_object") -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects). Call on every rank.
    `op` names the caller's operation in the error message."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    try:
        tdist.all_gather_object(out, obj)
    except Exception as err:
        raise _fail(op, err) from err
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s obj on every rank. Call on every rank (the others' obj is ignored)."""
    if not _active():
        return obj
    box = [obj if rank() == src else None]
    try:
        tdist.broadcast_object_list(box, src=src)
    except Exception as err:
        raise _fail("broadcast_object", err) from err
    return box[0]


def _all_reduce_dict(values: Mapping[str, float], mean: bool) -> dict[str, float]:
    keys = sorted(values)
    if not _active():
        return {k: float(values[k]) for k in keys}
    # Same keys everywhere, or the reduction would silently mix metrics: check the names cheaply first.
    names = all_gather_object(keys, op="all_reduce of metrics")
    if any(n != keys for n in names):
        raise CollectiveError(f"all_reduce of metrics: ranks hold different keys: {names}")
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    try:
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    except Exception as err:
        raise _fail("all_reduce of metrics", err) from err
    if mean:
        buf /= tdist.get_world_size()
    return dict(zip(keys, buf.cpu().tolist(), strict=True))


def all_reduce_sum(values: Mapping[str, float]) -> dict[str, float]:
    """Element-wise sum over ranks of a dict of floats (same keys on every rank). Call on every rank."""
    return _all_reduce_dict(values, mean=False)


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """Element-wise mean over ranks of a dict of floats (same keys on every rank). Call on every rank."""
    return _all_reduce_dict(values, mean=True)
