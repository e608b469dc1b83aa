"""DeepSpeed engine costs on CPU, both measured in one run of this script:

1. step time (forward + backward + optimizer) of DeepSpeed ZeRO-2 on 1 rank vs plain PyTorch AdamW on the
   same model, batch, noise and time (target <= 1.10x);
2. per-rank model-state memory (parameters + gradients + Adam moments, bytes each rank holds) of ZeRO-3 on
   2 ranks vs 1 rank (target <= 0.55x), from the engine's partitioned tensors, via 2 real gloo ranks.

    python tools/bench/engine_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import write_section

from ript_ds.config import EngineCfg, TrainCfg
from ript_ds.engine import dist
from ript_ds.model.arch import GemmaArch, PI0Arch, VisionArch
from ript_ds.model.pi0 import PI0Batch, PI0Policy
from ript_ds.rl.update import TorchBackend

ROOT = Path(__file__).resolve().parents[2]
B = 8


def arch() -> PI0Arch:
    # Big enough that optimizer work is visible (about 20 M parameters), small enough for a CPU.
    return PI0Arch(
        vlm=GemmaArch(width=512, depth=4, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64),
        expert=GemmaArch(width=256, depth=4, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=64),
        vision=VisionArch(width=128, depth=2, mlp_dim=256, num_heads=4, patch_size=16, image_size=64),
        vocab_size=2048,
        chunk_size=16,
    )


def data(a: PI0Arch, rows: slice = slice(None)):
    g = torch.Generator().manual_seed(0)
    batch = PI0Batch(
        images=torch.rand(B, 2, 3, 64, 64, generator=g) * 2 - 1,
        image_masks=torch.ones(B, 2, dtype=torch.bool),
        tokens=torch.randint(1, a.vocab_size, (B, 16), generator=g),
        token_masks=torch.ones(B, 16, dtype=torch.bool),
        state=torch.randn(B, 32, generator=g),
        actions=torch.randn(B, a.chunk_size, 32, generator=g),
    )
    noise, t = torch.randn(B, a.chunk_size, 32, generator=g), torch.rand(B, generator=g)
    fields = {k: v[rows] for k, v in vars(batch).items() if v is not None}
    return PI0Batch(**fields), noise[rows], t[rows]


def timed_steps(backend, batch, noise, t, steps: int) -> float:
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        backend.backward(backend.forward(batch, noise, t, None).mean())
        backend.step()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine(config: str, micro: int):
    from ript_ds.engine.deepspeed import DeepSpeedEngine

    train = TrainCfg(micro_batch_size=micro, lr=1e-4, grad_clip=1.0)
    overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    return DeepSpeedEngine(
        lambda: PI0Policy(arch()),
        train,
        EngineCfg(deepspeed_config=str(ROOT / "ds_configs" / config)),
        ds_overrides=overrides,
    )


def model_state_bytes(e) -> int:
    """Bytes this rank holds for parameters, gradients and optimizer state."""
    local, _ = e.partition_numel()
    opt = e._engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    moments = sum(
        v.numel() * v.element_size() for s in inner.state.values() for v in s.values() if torch.is_tensor(v)
    )
    return local * 4 * 2 + moments  # fp32 params + fp32 grads (partitioned like the params) + moments


def worker(out: Path) -> None:
    """One rank of the memory measurement (run under torchrun)."""
    dist.init_distributed(120)
    world = dist.world_size()
    rows = slice(dist.rank() * B // world, (dist.rank() + 1) * B // world)
    e = engine("zero3.json", B // world)
    batch, noise, t = data(arch(), rows)
    e.train()
    e.backward(e.forward(batch, noise, t, None).mean())
    e.step()  # optimizer state exists after the first step
    if dist.rank() == 0:
        out.write_text(json.dumps({"bytes": model_state_bytes(e), "world": world}))
    dist.barrier()


def memory_ratio() -> tuple[int, int]:
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out = Path(tmp) / f"w{world}.json"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(world),
                __file__,
                "--worker",
                str(out),
            ]
            subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=Path(__file__).parent)
            results[world] = json.loads(out.read_text())["bytes"]
    return results[1], results[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    torch.manual_seed(0)
    dist.init_distributed(120)
    a = arch()
    batch, noise, t = data(a)
    policy = PI0Policy(a).train()
    plain = timed_steps(TorchBackend(policy, lr=1e-4, grad_clip=1.0), batch, noise, t, args.steps)
    e = engine("zero2.json", B)
    e.train()
    zero2 = timed_steps(e, batch, noise, t, args.steps)
    n_params = sum(p.numel() for p in policy.parameters())
    one, two = memory_ratio()
    body = (
        f"Model: PI0 with VLM width 512 / expert 256, depth 4, SigLIP 128 at 64 px ({n_params / 1e6:.1f} M "
        f"parameters), fp32, batch {B}, {torch.get_num_threads()} threads.\n\n"
        "| measurement | value |\n|---|---|\n"
        f"| plain PyTorch AdamW step (median of {args.steps}) | {plain:.3f} s |\n"
        f"| DeepSpeed ZeRO-2, 1 rank, same step | {zero2:.3f} s |\n"
        f"| **ZeRO-2 / plain** (target <= 1.10x) | **{zero2 / plain:.2f}x** |\n"
        f"| model-state bytes per rank, ZeRO-3 1 rank | {one / 2**20:.1f} MiB |\n"
        f"| model-state bytes per rank, ZeRO-3 2 ranks | {two / 2**20:.1f} MiB |\n"
        f"| **2 ranks / 1 rank** (target <= 0.55x) | **{two / one:.2f}x** |\n\n"
        "Model state = the rank's partition of fp32 parameters and gradients plus its Adam moments (from the "
        "engine's partitioned tensors, after one step)."
    )
    print(body)
    if not args.no_write:
        write_section("engine_overhead", "DeepSpeed engine: step-time overhead and ZeRO-3 memory", body)


if __name__ == "__main__":
    main()
