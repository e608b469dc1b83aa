"""tools/gpu_smoke.py: its CPU subset end to end, the no-CUDA exit, and the device checks it applies on a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")


def _import(relative: str):
    """A tools/ script as a module, registered first: @dataclass resolves its annotations via sys.modules."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


smoke = _import("tools/gpu_smoke.py")
probe = _import("tools/gpu_smoke_probe.py")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {
        **env,
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions"),
        "PYTHONWARNINGS": "ignore",
    } | extra


def test_without_cuda_the_full_mode_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "tools/gpu_smoke.py", "--out", str(tmp_path)],
        cwd=ROOT,
        env=_env(CUDA_VISIBLE_DEVICES=""),  # hides a GPU if the test machine has one
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-check" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not list(tmp_path.iterdir())  # nothing ran


def test_placement_checks_demand_cuda_only_on_a_gpu() -> None:
    on_cpu = {
        "update_calls": 4,
        "rollout_calls": 8,
        "parameters": {"cpu": 89},
        "buffers": {"cpu": 7},
        "update_inputs": {"cpu": 36},
        "update_outputs": {"cpu": 4},
        "rollout_inputs": {"cpu": 96},
    }
    assert all(smoke.placement_checks(on_cpu, None).values())  # --cpu-check: ran, devices not asserted
    gpu = smoke.placement_checks(on_cpu, "cuda")
    assert gpu["an update forward ran"] and not gpu["every model parameter on cuda"]
    mixed = {k: ({"cuda:0": 3} if isinstance(v, dict) else v) for k, v in on_cpu.items()}
    mixed["update_inputs"] = {"cuda:0": 30, "cpu": 6}  # one CPU tensor in the update batch is a failure
    gpu = smoke.placement_checks(mixed, "cuda")
    assert gpu["every model parameter on cuda"] and not gpu["every update batch tensor on cuda"]
    assert not smoke.placement_checks({}, "cuda")["every rollout batch tensor on cuda"]  # nothing recorded


def test_force_mixed_makes_every_group_mixed() -> None:
    class Ep:
        def __init__(self, crashed: bool = False) -> None:
            self.crashed, self.success = crashed, False

    episodes = [Ep() for _ in range(8)] + [Ep(crashed=True)]
    probe.force_mixed(episodes, 4)
    assert [e.success for e in episodes] == [True, True, False, False] * 2 + [False]


@pytest.mark.slow
def test_cpu_check_runs_train_eval_placement_and_writes_the_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "tools/gpu_smoke.py", "--cpu-check", "--out", str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("PASS overall")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "cpu-check" and report["passed"]
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == ["train_debug", "eval", "placement"]
    assert all(s["passed"] and all(s["checks"].values()) for s in sections.values())

    steps = sections["train_debug"]["details"]["steps"]
    assert steps["iterations"] == [1, 2] and len(steps["rollout_s"]) == len(steps["update_s"]) == 2
    memory = sections["train_debug"]["details"]["memory"]
    assert memory["measured_gib"] > 0 and memory["predicted_gib"] > 0 and "ZeRO-2" in memory["setting"]

    assert sections["eval"]["details"]["device"] == "cpu"
    assert (tmp_path / "eval" / "results.json").exists()

    placement = sections["placement"]["details"]["placement"]
    assert placement["update_calls"] > 0 and placement["rollout_calls"] > 0
    for key in ("parameters", "update_inputs", "update_outputs", "rollout_inputs"):
        assert set(placement[key]) == {"cpu"}, key  # CUDA hidden: everything stayed on the CPU
    assert sections["placement"]["details"]["steps"]["updates_run"] == 1  # forced mixed outcomes

    table = (tmp_path / "report.md").read_text()
    assert "| train_debug | PASS |" in table and "| placement | PASS |" in table
