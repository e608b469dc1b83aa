"""LIBERO rendering on this rank's GPU: which EGL device, and what an env worker process sees.

Without a GPU nothing is set (MuJoCo's default device, llvmpipe on a CPU machine). With GPUs, the
default is the GPU torch uses on this rank, cuda:LOCAL_RANK, as its physical index: EGL enumerates
every GPU whatever CUDA_VISIBLE_DEVICES says, and robosuite 1.4 requires MUJOCO_EGL_DEVICE_ID to be
one of CUDA_VISIBLE_DEVICES. No GPU is needed here: visible devices are faked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT

from ript_ds.build import build_arch, build_env_factory
from ript_ds.config import ConfigError, load_config
from ript_ds.env import libero as L
from ript_ds.env.base import Observation, TaskSpec
from ript_ds.env.pool import EnvFactory, EnvPool

TASK = TaskSpec("libero_spatial", 0, "t", "pick it up", max_steps=5, num_init_states=1)


@pytest.mark.parametrize(
    ("environ", "gpus", "configured", "expected"),
    [
        ({}, 0, None, None),  # no GPU: MuJoCo's default, nothing set
        ({"CUDA_VISIBLE_DEVICES": ""}, 0, None, None),
        ({"LOCAL_RANK": "1"}, 4, None, 1),  # every GPU visible: the local rank is the index
        ({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,6"}, 2, None, 6),  # mapped to the physical one
        ({"SLURM_LOCALID": "0", "CUDA_VISIBLE_DEVICES": "3"}, 1, None, 3),  # srun binding one GPU per task
        ({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,6"}, 2, 4, 4),  # explicit wins
        ({}, 0, 2, 2),  # explicit, no GPU visible to torch (e.g. a CPU-only torch): still honoured
    ],
)
def test_render_device_for_rank(environ, gpus, configured, expected):
    assert L.render_device_for_rank(configured, gpus, environ) == expected


def test_render_device_for_rank_rejects_what_robosuite_would_reject():
    with pytest.raises(ValueError, match="not one of CUDA_VISIBLE_DEVICES"):
        L.render_device_for_rank(5, 2, {"CUDA_VISIBLE_DEVICES": "4,6"})
    with pytest.raises(ValueError, match="not a GPU index"):
        L.render_device_for_rank(None, 1, {"CUDA_VISIBLE_DEVICES": "GPU-8f3c2a"})
    with pytest.raises(ValueError, match="LOCAL_RANK 2"):
        L.render_device_for_rank(None, 2, {"LOCAL_RANK": "2"})
    with pytest.raises(ValueError, match=">= 0"):
        L.render_device_for_rank(-1, 2, {})


def test_build_env_factory_renders_on_this_ranks_gpu(monkeypatch, tmp_path):
    cfg = load_config(None, ["env.kind=libero", "env.suite=libero_spatial", f"output_dir={tmp_path}"])
    arch = build_arch(cfg)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert build_env_factory(cfg, arch).render_device == 6
    cfg = load_config(None, ["env.kind=libero", "env.suite=libero_spatial", "rollout.render_device=4"])
    assert build_env_factory(cfg, arch).render_device == 4
    cfg = load_config(None, ["env.kind=libero", "env.suite=libero_spatial", "rollout.render_device=5"])
    with pytest.raises(ConfigError, match=r"rollout\.render_device"):
        build_env_factory(cfg, arch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cfg = load_config(None, ["env.kind=libero", "env.suite=libero_spatial"])
    assert build_env_factory(cfg, arch).render_device is None
    assert build_env_factory(load_config(None, []), arch).render_device is None  # synthetic: no renderer


class RecordingEnv:
    """Stands in for LiberoEnv in a forked worker: records what the worker built it with."""

    action_dim = 7

    def __init__(self, task: TaskSpec, **kwargs) -> None:
        self.task = task
        record = {"env": os.environ.get("MUJOCO_EGL_DEVICE_ID"), "kwargs": kwargs}
        with open(os.environ["RECORD_TO"], "w") as f:
            json.dump(record, f)

    def reset(self, init_state_idx: int, seed: int) -> Observation:
        return Observation(images=np.zeros((2, 4, 4, 3), np.uint8), state=np.zeros(8, np.float32))

    def close(self) -> None:
        pass


@pytest.mark.parametrize("device", [6, None])
def test_worker_sees_the_device_in_its_environment_and_env_kwargs(monkeypatch, tmp_path, device):
    record = tmp_path / "record.json"
    monkeypatch.setenv("RECORD_TO", str(record))
    monkeypatch.delenv("MUJOCO_EGL_DEVICE_ID", raising=False)
    monkeypatch.setattr(L, "LiberoEnv", RecordingEnv)  # fork: the worker inherits the patch
    factory = EnvFactory("libero", {"camera_size": 64}, render_device=device)
    with EnvPool(factory, num_workers=1, start_method="fork") as pool:
        pool.send_reset(0, TASK, 0, 0)
        assert pool.gather()[0].failure is None
    seen = json.loads(record.read_text())
    assert seen["env"] == (None if device is None else str(device))
    assert seen["kwargs"] == {"camera_size": 64, "render_gpu_device_id": device}
    assert "MUJOCO_EGL_DEVICE_ID" not in os.environ  # set in the worker, not in the driver
    with pytest.raises(ValueError, match="libero"):
        EnvFactory("synthetic", render_device=0)


@pytest.mark.libero
def test_libero_env_passes_the_device_to_robosuite():
    # A fresh process: MUJOCO_EGL_DEVICE_ID must be set before mujoco is imported. CUDA_VISIBLE_DEVICES
    # is faked (this machine's only EGL device is device 0) so robosuite's visibility check runs.
    script = textwrap.dedent(
        """
        import os
        from ript_ds.env import libero as L
        env = L.LiberoEnv(L.get_task("libero_spatial", 0), camera_size=32, model_image_size=32,
                          render_gpu_device_id=0)
        obs = env.reset(0, seed=7)
        print("SEEN", os.environ["MUJOCO_EGL_DEVICE_ID"], env.libero_env.env.render_gpu_device_id,
              int(obs.images.std() > 1))
        try:
            L.LiberoEnv(L.get_task("libero_spatial", 0), render_gpu_device_id=1)
        except RuntimeError as err:
            print("REFUSED", err)
        env.close()
        """
    )
    env = {**os.environ, "MUJOCO_GL": "egl", "CUDA_VISIBLE_DEVICES": "0,1", "PYTHONWARNINGS": "ignore"}
    env.pop("MUJOCO_EGL_DEVICE_ID", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SEEN 0 0 1" in proc.stdout, proc.stdout
    assert "REFUSED" in proc.stdout and "MUJOCO_EGL_DEVICE_ID" in proc.stdout
