"""GPU smoke test: what the CPU test suite cannot check, in one script of < 8 minutes on one H100/H200.

    python tools/gpu_smoke.py [--out DIR] [--budget-s 450]      # needs CUDA; exit 2 without it
    python tools/gpu_smoke.py --cpu-check [--out DIR]           # the CPU subset (make test runs it)

Sections, each a subprocess with a timeout taken from one overall budget; a failing section is reported
with its last log lines and the next one still runs:
  train_debug     `deepspeed --num_gpus 1 launch/train.py` on launch/configs/debug.yaml, ZeRO-2, 2 iterations
  eval            launch/eval.py on the checkpoint train_debug wrote (synthetic suite, 2 episodes)
  placement       the trainer in-process (tools/gpu_smoke_probe.py: parameters and every tensor reaching
                  the model counted by device) on the debug config, 1 iteration
  full_size_lora  the same on the full-size PI0 (3.24 B, random weights): LoRA, ZeRO-2, bf16 autocast,
                  activation checkpointing, 2 LIBERO envs (libero_spatial task 0, MUJOCO_GL=egl), 50-step
                  episodes, K = 2, 2 iterations; the tokenizer is built in code (no model hub)
Each prints step times (time/rollout_s, time/update_s) and peak memory (mem/peak_gb, vs tools/
estimate_memory.py for the same setting) from metrics.jsonl and a PASS/FAIL line; then an overall line,
exit code 0 / 1, and DIR/report.json + DIR/report.md (for docs/benchmarks.md). --cpu-check runs the first
three on CPU through the same code without the device assertions (devices are still reported).

The in-process sections force mixed outcomes (half of every group succeeds; see gpu_smoke_probe.py), since
random weights never succeed in LIBERO and no update would run: their success rates are not measurements.
launch/eval.py rebuilds a training checkpoint's arch from pi0_arch.json beside it, which the trainer does
not write for a random-init run: the smoke writes it from the run's config.yaml, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = "launch/configs/debug.yaml"
LORA_CONFIG = "launch/configs/libero_spatial_lora.yaml"
ZERO2 = "ds_configs/zero2.json"
FULL_SUITE = "libero_spatial"
CAMERAS = 2  # both envs render two views (LIBERO agentview + wrist; synthetic top + wrist)
NO_CUDA = 2
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
QUIET_ENV = {"PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}  # as `make`
GIB = 2**30
# Overrides as one string per config section (a list literal would take a line per item).
# Debug: seconds per section on a GPU, and still a full micro-batch of windows.
DEBUG_OVERRIDES = """train.iterations=2 train.eval_every=0 ckpt.every=1 rollout.num_envs=2 env.max_steps=16
    ript.groups_per_iteration=1 ript.max_sampling_rounds=1""".split()  # noqa: SIM905
# Full size (model.arch, the tokenizer and env.suite are added by the section): 2 envs, K = 2, short episodes.
FULL_OVERRIDES = """model.dtype=bfloat16 model.gradient_checkpointing=true engine.lora.enabled=true
    env.kind=libero env.task_ids=[0] env.max_steps=50 rollout.num_envs=2 rollout.videos_per_iteration=0
    ript.rollouts_per_context=2 ript.groups_per_iteration=1 ript.max_sampling_rounds=1
    train.iterations=2 train.eval_every=0 train.micro_batch_size=4 ckpt.every=0""".split()  # noqa: SIM905
CPU_SECTIONS = ["train_debug", "eval", "placement"]


# ------------------------------------------------------------------------------------------ records
@dataclass
class Section:
    name: str
    passed: bool = False
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)  # description -> held
    details: dict[str, Any] = field(default_factory=dict)  # steps, memory, placement, ...
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)  # only when it failed


@dataclass
class Context:
    out: Path
    gpu: bool
    deadline: float
    order: list[str]  # the sections this invocation runs
    full_arch: str = "pi0"
    hide_cuda: bool = False  # --cpu-check on a machine with a GPU

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def expect(self) -> str | None:
        return "cuda" if self.gpu else None

    def timeout_for(self, name: str) -> float:
        _, cap, _ = SECTIONS[name]
        later = self.order[self.order.index(name) + 1 :]
        left = self.deadline - time.monotonic() - sum(SECTIONS[s][2] for s in later)
        return max(0.0, min(cap, left))

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # No rank variables of a caller (e.g. a test under a launcher): each launch is its own 1-rank job.
        env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
        env.update(QUIET_ENV)
        if not self.gpu:
            env["DS_ACCELERATOR"] = "cpu"
        if self.hide_cuda:  # the CPU subset stays on the CPU on a GPU machine too
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env | (extra or {})

    def run(self, section: Section, cmd: list[str], extra_env: dict[str, str] | None = None) -> Path:
        """cmd in its own process group, output to <out>/<section>.log, killed (whole group) at the timeout."""
        timeout = self.timeout_for(section.name)
        section.command = cmd
        log = self.out / f"{section.name}.log"
        if timeout < 10:
            raise RuntimeError(f"not started: {timeout:.0f} s of the budget left")
        start = time.monotonic()
        with log.open("w") as sink:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env(extra_env),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                rc = None
        section.details["subprocess_s"] = round(time.monotonic() - start, 1)
        section.checks[f"finished within {timeout:.0f} s"] = rc is not None
        section.checks["exit code 0"] = rc == 0
        if rc != 0:
            section.log_tail = tail(log)
        return log


# ------------------------------------------------------------------------------------------ helpers
def tail(log: Path, n: int = 25) -> list[str]:
    return log.read_text(errors="replace").splitlines()[-n:] if log.exists() else []


def _stop_group(proc: subprocess.Popen) -> None:
    """The launcher, its ranks and their env workers together: SIGINT first, so `finally` blocks run (a
    torch JIT build killed outright leaves its lock file, and every later build waits on it forever)."""
    os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows of training iterations (iteration 0 is the starting policy's evaluation)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("iteration", 0) >= 1]


def step_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def col(key: str) -> list[float | None]:
        return [r.get(key) for r in rows]

    peaks = [p for p in col("mem/peak_gb") if p is not None]
    return {
        "iterations": [r["iteration"] for r in rows],
        "rollout_s": col("time/rollout_s"),
        "update_s": col("time/update_s"),
        "updates_run": sum(1 for r in rows if r.get("train/skipped") == 0.0),
        "loss": col("train/loss"),
        "peak_gb": max(peaks) if peaks else None,
    }


def timing_checks(section: Section, steps: dict[str, Any], iterations: int) -> None:
    want, logged = list(range(1, iterations + 1)), steps["rollout_s"] + steps["update_s"] + [steps["peak_gb"]]
    section.checks[f"{iterations} iterations in metrics.jsonl"] = steps["iterations"] == want
    section.checks["time/rollout_s, time/update_s, mem/peak_gb logged"] = all(v is not None for v in logged)


def memory_vs_estimate(cfg, ds_path: str, measured_gib: float | None, cameras: int, gpu: bool) -> dict:
    """mem/peak_gb against tools/estimate_memory.py for this config on 1 rank (never fails a section)."""
    from ript_ds.build import build_arch
    from ript_ds.engine.ds_json import load_ds_json
    from ript_ds.memory.zero import Workload

    spec = importlib.util.spec_from_file_location("estimate_memory", ROOT / "tools" / "estimate_memory.py")
    est = importlib.util.module_from_spec(spec)  # tools/ is not a package
    spec.loader.exec_module(est)
    lora = cfg.engine.lora
    workload = Workload(
        micro_batch=cfg.train.micro_batch_size,
        rows_per_window=est.ROWS_PER_WINDOW.get(cfg.ript.loss, cfg.ript.fpo_samples),
        cameras=cameras,
        text_tokens=cfg.model.tokenizer_max_length,
        lora_rank=lora.rank,
        lora_target=lora.target,
        rollout_envs=cfg.rollout.num_envs,
        guidance=cfg.ript.guided,
    )
    _, ds = load_ds_json(ds_path)
    [(_, e)] = est.estimates(
        build_arch(cfg), {ds_path: ds}, workload, [lora.enabled], [cfg.model.gradient_checkpointing], [1]
    )
    out = {
        "measured_gib": measured_gib,
        "measured_is": "torch.cuda.max_memory_allocated" if gpu else "process peak RSS (CPU: not comparable)",
        "predicted_gib": round(e.total / GIB, 3),
        "predicted_peak_in": e.phase,
        "setting": f"{e.zero.name}, LoRA {'on' if lora.enabled else 'off'}, checkpointing "
        f"{'on' if cfg.model.gradient_checkpointing else 'off'}, 1 GPU, micro-batch {workload.micro_batch}",
    }
    if measured_gib:
        out["measured_over_predicted"] = round(measured_gib / (e.total / GIB), 3)
    if cfg.model.dtype != "bfloat16":  # the estimator models training under bf16 autocast only
        out["note"] = f"the estimate assumes bf16 autocast; this run computes in {cfg.model.dtype}"
    return out


def add_memory(section: Section, ctx: Context, config: str, overrides: list[str], cameras: int) -> None:
    from ript_ds.config import load_config

    try:
        cfg = load_config(ROOT / config, overrides)
        measured = section.details["steps"]["peak_gb"]
        section.details["memory"] = memory_vs_estimate(cfg, ZERO2, measured, cameras, ctx.gpu)
    except Exception as err:  # the estimate is a comparison, not a pass criterion: keep the section's result
        section.warnings.append(f"no memory estimate: {type(err).__name__}: {err}")


def _only(devices: dict[str, int] | None, expect: str) -> bool:
    return bool(devices) and all(d.split(":")[0] == expect for d in devices)


def placement_checks(placement: dict[str, Any], expect: str | None) -> dict[str, bool]:
    """The update and the rollout ran (always), and, with `expect`, all they touched was on that device."""
    checks = {
        "an update forward ran": placement.get("update_calls", 0) > 0,
        "rollout sampling ran": placement.get("rollout_calls", 0) > 0,
    }
    if expect:
        for key, what in (
            ("parameters", "every model parameter"),
            ("buffers", "every model buffer"),
            ("update_inputs", "every update batch tensor"),
            ("update_outputs", "the update's per-element loss"),
            ("rollout_inputs", "every rollout batch tensor"),
        ):
            checks[f"{what} on {expect}"] = _only(placement.get(key), expect)
    return checks


# ------------------------------------------------------------------------------------------ sections
def train_debug(ctx: Context, section: Section) -> None:
    overrides = [f"output_dir={ctx.runs}", "run_name=train_debug", *DEBUG_OVERRIDES]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1"]
    cmd = [*launcher, "--master_port", str(_free_port()), "launch/train.py", "--deepspeed", ZERO2]
    ctx.run(section, [*cmd, "--config", DEBUG_CONFIG, *overrides])
    run_dir = ctx.runs / "train_debug"
    steps = step_summary(read_metrics(run_dir))
    section.details["steps"] = steps
    timing_checks(section, steps, 2)
    section.checks["checkpoint written (checkpoints/latest)"] = (run_dir / "checkpoints" / "latest").exists()
    if steps["iterations"] and not steps["updates_run"]:
        section.warnings.append("no mixed group was sampled, so no update ran here (placement forces one)")
    add_memory(section, ctx, DEBUG_CONFIG, overrides, CAMERAS)


def _write_arch_if_missing(run_dir: Path, section: Section) -> None:
    from ript_ds.build import build_arch
    from ript_ds.config import load_config
    from ript_ds.model.weights import CANONICAL_ARCH

    if any((d / CANONICAL_ARCH).exists() for d in (run_dir, run_dir / "checkpoints")):
        return
    arch = build_arch(load_config(run_dir / "config.yaml"))
    (run_dir / CANONICAL_ARCH).write_text(json.dumps(arch.to_dict(), indent=1))
    section.warnings.append(
        f"{run_dir.name} has no {CANONICAL_ARCH}, which launch/eval.py needs to rebuild a random-init arch: "
        "the smoke wrote it from config.yaml (the trainer should write it)"
    )


def eval_debug(ctx: Context, section: Section) -> None:
    run_dir = ctx.runs / "train_debug"
    if not (run_dir / "checkpoints" / "latest").exists():
        raise RuntimeError("train_debug wrote no checkpoint to evaluate")
    _write_arch_if_missing(run_dir, section)
    out = ctx.out / "eval"
    args = ["--suite", "synthetic", "--tasks", "0", "--episodes-per-task", "2", "--num-envs", "2"]
    cmd = [sys.executable, "launch/eval.py", "--checkpoint", str(run_dir / "checkpoints"), *args]
    log = ctx.run(section, [*cmd, "--max-steps", "16", "--out", str(out)])
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    # eval.py logs its device at the end of the "eval <suite> tasks ..." line.
    found = re.findall(r"eval \S+ tasks .*, (\S+)\s*$", "\n".join(tail(log, 400)), re.M)
    device = found[-1] if found else None
    section.checks["results.json with 2 episodes"] = (
        results.get("suites", {}).get("synthetic", {}).get("episodes") == 2
    )
    if ctx.expect:
        section.checks[f"policy on {ctx.expect} (eval log)"] = bool(device) and device.startswith(ctx.expect)
    section.details.update(
        device=device, mean_success=results.get("mean"), rollout_seconds=results.get("rollout_seconds")
    )


def probe(ctx: Context, section: Section, config: str, overrides: list[str], iterations: int, env=None):
    """The trainer in a child process (tools/gpu_smoke_probe.py), then its metrics, placement and memory."""
    result = ctx.out / f"{section.name}.probe.json"
    spec = {"config": config, "overrides": overrides, "ds_config": ZERO2, "result": str(result)}
    spec_path = ctx.out / f"{section.name}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    ctx.run(section, [sys.executable, "tools/gpu_smoke_probe.py", str(spec_path)], env)
    found = json.loads(result.read_text()) if result.exists() else {}
    if found.get("error"):
        section.error = found["error"]
    placement = found.get("placement", {})
    steps = step_summary(read_metrics(ctx.runs / section.name))
    section.details.update(steps=steps, placement=placement, engine=found.get("engine", {}))
    timing_checks(section, steps, iterations)
    section.checks["the update ran every iteration"] = steps["updates_run"] == iterations
    section.checks.update(placement_checks(placement, ctx.expect))
    add_memory(section, ctx, config, overrides, placement.get("layout", {}).get("cameras", CAMERAS))
    section.warnings.append("success rates here are forced (half of every group), not measured")


def placement(ctx: Context, section: Section) -> None:
    overrides = [f"output_dir={ctx.runs}", "run_name=placement", *DEBUG_OVERRIDES, "train.iterations=1"]
    probe(ctx, section, DEBUG_CONFIG, overrides, 1)


def full_size_lora(ctx: Context, section: Section) -> None:
    from ript_ds.env import libero
    from ript_ds.model.processing import build_tiny_tokenizer

    # No model hub: a SentencePiece model trained on the suite's instructions stands in for PaliGemma's.
    texts = [t.instruction for t in libero.suite_tasks(FULL_SUITE)]
    tokenizer = build_tiny_tokenizer(ctx.out / "tokenizer", texts)
    overrides = [
        f"output_dir={ctx.runs}",
        "run_name=full_size_lora",
        f"model.arch={ctx.full_arch}",
        f"model.tokenizer_path={tokenizer}",
        f"env.suite={FULL_SUITE}",
        *FULL_OVERRIDES,
    ]
    gl = "osmesa" if ctx.hide_cuda else "egl"  # robosuite's EGL picks a device from CUDA_VISIBLE_DEVICES
    probe(ctx, section, LORA_CONFIG, overrides, 2, {"MUJOCO_GL": gl, "PYOPENGL_PLATFORM": gl})
    engine = section.details["engine"]
    if ctx.full_arch == "pi0":
        section.checks["full-size PI0 (> 3 B parameters)"] = engine.get("parameters", 0) > 3e9
    frozen = 0.05 if ctx.full_arch == "pi0" else 1.0  # the tiny arch's adapters are a large share of it
    lora, trainable, total = (engine.get(k, 0) for k in ("lora", "trainable", "parameters"))
    section.checks["LoRA adapters train, the base is frozen"] = 0 < lora <= trainable < frozen * total
    section.checks["ZeRO-2"] = engine.get("stage") == 2
    dtypes = section.details["placement"].get("proj_dtypes", [])
    section.checks["bf16 autocast (a Gemma q_proj output)"] = "torch.bfloat16" in dtypes


# name -> (function, cap on its timeout s, s kept back for it while earlier ones run), in run order.
SECTIONS: dict[str, tuple[Callable[[Context, Section], None], float, float]] = {
    "train_debug": (train_debug, 120, 30),
    "eval": (eval_debug, 60, 20),
    "placement": (placement, 120, 30),
    "full_size_lora": (full_size_lora, 300, 120),
}


def run_section(ctx: Context, name: str) -> Section:
    section = Section(name)
    start = time.monotonic()
    try:
        SECTIONS[name][0](ctx, section)
    except Exception as err:  # recorded as this section's failure (with its traceback); the next one runs
        section.error = section.error or f"{type(err).__name__}: {err}"
        section.log_tail += traceback.format_exc().splitlines()[-12:]
    section.seconds = round(time.monotonic() - start, 1)
    section.passed = section.error is None and bool(section.checks) and all(section.checks.values())
    print_section(section)
    return section


# ------------------------------------------------------------------------------------------ report
def _fmt(values: list | None) -> str:
    return ", ".join("-" if v is None else f"{v:.2f}" for v in values or []) or "-"


def print_section(s: Section) -> None:
    out = [f"\n[{s.name}] {'PASS' if s.passed else 'FAIL'} in {s.seconds:.0f} s"]
    out += [f"  {'ok  ' if held else 'FAIL'} {what}" for what, held in s.checks.items()]
    steps, mem, where = s.details.get("steps"), s.details.get("memory"), s.details.get("placement")
    if steps:
        out.append(f"  rollout s/it: {_fmt(steps['rollout_s'])} | update s/it: {_fmt(steps['update_s'])}")
    if mem:
        out.append(
            f"  peak memory {mem['measured_gib'] or 0:.2f} GiB ({mem['measured_is']}) vs estimate "
            f"{mem['predicted_gib']:.2f} GiB ({mem['setting']}, peak in {mem['predicted_peak_in']})"
        )
    if where:
        keys = ("parameters", "buffers", "update_inputs", "update_outputs", "rollout_inputs")
        out.append("  placement: " + "; ".join(f"{k} {where.get(k, {})}" for k in keys))
    if "device" in s.details:
        out.append(f"  eval device: {s.details['device']}, mean success {s.details.get('mean_success')}")
    out += [f"  note: {w}" for w in s.warnings] + ([f"  error: {s.error}"] if s.error else [])
    if not s.passed and s.log_tail:
        out += ["  last log lines:", *(f"    {line}" for line in s.log_tail)]
    print("\n".join(out), flush=True)


def markdown(report: dict[str, Any]) -> str:
    head = "| section | result | s | rollout s/it | update s/it | peak GiB | estimate GiB | placement |"
    lines = [f"{report['mode']} on {report['machine']}, {report['date']}", "", head, "|---" * 8 + "|"]
    for s in report["sections"]:
        steps, mem = s["details"].get("steps") or {}, s["details"].get("memory") or {}
        where = s["details"].get("placement") or {}
        devices = sorted({d for k in ("parameters", "update_inputs") for d in where.get(k, {})})
        lines.append(
            f"| {s['name']} | {'PASS' if s['passed'] else 'FAIL'} | {s['seconds']:.0f} "
            f"| {_fmt(steps.get('rollout_s'))} | {_fmt(steps.get('update_s'))} "
            f"| {_fmt([mem.get('measured_gib')]) if mem else '-'} | {_fmt([mem.get('predicted_gib')]) if mem else '-'} "
            f"| {', '.join(devices) or s['details'].get('device') or '-'} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-check", action="store_true", help="the CPU subset, without device assertions")
    p.add_argument("--out", type=Path, help="report directory (default: runs/gpu_smoke/<time>)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of all sections")
    p.add_argument("--sections", help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--full-arch", choices=["pi0", "tiny"], default="pi0", help="tiny: full_size_lora on CPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    import torch

    gpu = not args.cpu_check
    if gpu and not torch.cuda.is_available():
        print(
            "gpu_smoke: no CUDA device (torch.cuda.is_available() is False); --cpu-check runs the CPU subset",
            file=sys.stderr,
        )
        return NO_CUDA
    order = [s.strip() for s in args.sections.split(",")] if args.sections else None
    order = order or (list(SECTIONS) if gpu else CPU_SECTIONS)
    if bad := [s for s in order if s not in SECTIONS]:
        print(f"gpu_smoke: unknown sections {bad}; valid: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = (args.out or ROOT / "runs" / "gpu_smoke" / dt.datetime.now().strftime("%Y%m%d_%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    ctx = Context(
        out, gpu, start + args.budget_s, order, args.full_arch, not gpu and torch.cuda.is_available()
    )
    print(f"gpu_smoke ({'GPU' if gpu else 'CPU check'}): {', '.join(order)} -> {out}", flush=True)
    sections = [run_section(ctx, name) for name in order]
    passed = all(s.passed for s in sections)
    report = {
        "mode": "gpu" if gpu else "cpu-check",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{torch.cuda.get_device_name(0) if gpu else 'CPU only'}, torch {torch.__version__}",
        "date": dt.date.today().isoformat(),
        "passed": passed,
        "seconds": round(time.monotonic() - start, 1),
        "budget_s": args.budget_s,
        "sections": [asdict(s) for s in sections],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    for s in sections:
        print(f"{'PASS' if s.passed else 'FAIL'} {s.name} ({s.seconds:.0f} s)")
    print(f"{'PASS' if passed else 'FAIL'} overall in {report['seconds']:.0f} s -> {out / 'report.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
