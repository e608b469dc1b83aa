"""Policy server throughput: 8 concurrent clients, micro-batched, vs one client at a time (requests/s).

The server (ript_ds/serving/server.py) runs in this process on 127.0.0.1; the clients are lightweight
asyncio websockets clients speaking openpi's protocol (the observation packed once per scene, as
openpi_client packs it), each in a closed loop: send, wait for the answer, send again. Observations are
fixtures/openpi_policy_tiny_a's four scenes (224 px images, 8-dim state, prompt). Two models:
- tiny: the fixture's openpi checkpoint converted with tools/convert_openpi_jax.py (chunk 8);
- wide-56px / wide-112px: the same policy (processor, norm stats, tokenizer) with a wider random PI0 (VLM
  256 x 4 layers, expert 128 x 4, SigLIP 128 x 2 at 56 or 112 px: 16 or 64 tokens per camera), where one
  forward costs tens of ms (56 px) or over a hundred (112 px) on a CPU core.
Modes: one client; 8 clients with --max-batch 1 (requests served one at a time); 8 clients micro-batched.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report import write_section
from safetensors.numpy import load_file
from websockets.asyncio.client import connect

from ript_ds.model.arch import GemmaArch, PI0Arch, VisionArch
from ript_ds.model.pi0 import PI0Policy
from ript_ds.serving import Policy, load_policy
from ript_ds.serving.msgpack_numpy import packb, unpackb
from ript_ds.serving.server import PolicyServer, ServerOptions

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("RIPT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
FIXTURE = FIXTURES / "openpi_policy_tiny_a"
OBS_KEYS = ("observation/image", "observation/wrist_image", "observation/state")


def wide_arch(chunk_size: int, image_size: int) -> PI0Arch:
    return PI0Arch(
        vlm=GemmaArch(width=256, depth=4, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=32),
        expert=GemmaArch(width=128, depth=4, mlp_dim=512, num_heads=8, num_kv_heads=1, head_dim=32),
        vision=VisionArch(width=128, depth=2, mlp_dim=256, num_heads=4, patch_size=14, image_size=image_size),
        vocab_size=1024,
        chunk_size=chunk_size,
    )


def build_policies(checkpoint: Path | None, tokenizer: Path, workdir: Path) -> dict[str, Policy]:
    if checkpoint is None:
        checkpoint = workdir / "pi0_libero"
        cmd = [
            sys.executable,
            "tools/convert_openpi_jax.py",
            str(FIXTURE / "pi0_ckpt"),
            "--out",
            str(checkpoint),
        ]
        cmd += ["--openpi-config", "pi0_libero", "--chunk-size", "8"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    tiny = load_policy(checkpoint, tokenizer_path=tokenizer, device="cpu")
    policies = {"tiny": tiny}
    for size in (56, 112):
        torch.manual_seed(0)
        model = PI0Policy(wide_arch(tiny.horizon, size)).eval()
        policies[f"wide-{size}px"] = dataclasses.replace(tiny, model=model)
    return policies


def observations() -> list[bytes]:
    io = load_file(str(FIXTURE / "policy_io.safetensors"))
    prompts = json.loads((FIXTURE / "meta.json").read_text())["inputs"]["prompts"]
    return [
        packb({k: io[f"obs/{s}/{k}"] for k in OBS_KEYS} | {"prompt": p}) for s, p in sorted(prompts.items())
    ]


async def _client(
    url: str, message: bytes, warmup: int, requests: int, start: asyncio.Event, out: dict
) -> None:
    async with connect(url, compression=None, max_size=None) as ws:
        await ws.recv()  # metadata
        for _ in range(warmup):
            await ws.send(message)
            await ws.recv()
        out["ready"] += 1
        await start.wait()
        for _ in range(requests):
            sent = time.perf_counter()
            await ws.send(message)
            result = unpackb(await ws.recv())
            out["latency_ms"].append((time.perf_counter() - sent) * 1e3)
            out["batch"].append(result["policy_timing"]["batch_size"])


async def _measure(url: str, messages: list[bytes], clients: int, total: int, warmup: int) -> dict:
    out: dict = {"ready": 0, "latency_ms": [], "batch": []}
    start = asyncio.Event()
    per_client = max(1, total // clients)
    tasks = [
        asyncio.create_task(_client(url, messages[i % len(messages)], warmup, per_client, start, out))
        for i in range(clients)
    ]
    while out["ready"] < clients:  # every client connected and warmed up: time the steady state only
        await asyncio.sleep(0.01)
    began = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - began
    return {
        "req_s": clients * per_client / wall,
        "p50_ms": statistics.median(out["latency_ms"]),
        "mean_batch": float(np.mean(out["batch"])),
    }


def run_mode(policy: Policy, messages: list[bytes], clients: int, max_batch: int, args) -> dict:
    options = ServerOptions(max_batch=max_batch, batch_window_ms=args.batch_window_ms)
    with PolicyServer(policy, "127.0.0.1", 0, options) as server:
        return asyncio.run(_measure(server.url, messages, clients, args.requests, args.warmup))


def forward_ms(policy: Policy, message: bytes, batch: int) -> float:
    prepared = [policy.prepare(unpackb(message))] * batch
    policy.run(prepared)
    start = time.perf_counter()
    for _ in range(3):
        policy.run(prepared)
    return (time.perf_counter() - start) / 3 * 1e3


def table(results: dict[str, dict], forwards: dict[str, tuple[float, float]], clients: int) -> str:
    rows = [
        "| model | forward ms (batch 1 / batch 8) | mode | requests/s | p50 latency ms | mean batch |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for model, modes in results.items():
        f1, f8 = forwards[model]
        for mode, r in modes.items():
            rows.append(
                f"| {model} | {f1:.0f} / {f8:.0f} | {mode} | {r['req_s']:.1f} | {r['p50_ms']:.0f} | {r['mean_batch']:.2f} |"
            )
        one, batched = modes["1 client"]["req_s"], modes[f"{clients} clients, micro-batched"]["req_s"]
        ratios.append(f"{model} **{batched / one:.2f}x** (forward alone {clients * f1 / f8:.1f}x)")
    return (
        "\n".join(rows)
        + f"\n\n{clients} clients micro-batched vs one client at a time: "
        + ", ".join(ratios)
        + f". Forward alone: {clients} x forward(1) / forward({clients}), timed separately (the load moves"
        " between measurements). Batching pays where a forward is overhead-bound (tiny) and less where a CPU"
        " forward grows with the batch; serving overhead (transport, resize, tokenizing) is batched away too."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="a converted checkpoint (default: convert the fixture)"
    )
    parser.add_argument("--tokenizer", type=Path, default=FIXTURE / "tokenizer.model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="timed requests per mode, over all clients")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per client first")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the cores are shared)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    messages = observations()
    results, forwards = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, policy in build_policies(args.checkpoint, args.tokenizer, Path(tmp)).items():
            forwards[model] = (
                forward_ms(policy, messages[0], 1),
                forward_ms(policy, messages[0], args.clients),
            )
            modes = {
                "1 client": (1, args.clients),
                f"{args.clients} clients, --max-batch 1": (args.clients, 1),
                f"{args.clients} clients, micro-batched": (args.clients, args.clients),
            }
            results[model] = {name: run_mode(policy, messages, c, b, args) for name, (c, b) in modes.items()}
    body = (
        f"Server in-process on 127.0.0.1, clients asyncio websockets in closed loops, {args.requests} timed "
        f"requests per mode after {args.warmup} per client, --batch-window-ms {args.batch_window_ms}, "
        f"{args.threads} torch thread(s); the 2 cores were shared with other jobs.\n\n"
        + table(results, forwards, args.clients)
    )
    print(body)
    if not args.no_write:
        write_section("serve_throughput", f"Policy server: micro-batching {args.clients} clients", body)


if __name__ == "__main__":
    main()
