"""sample_actions latency: prefix KV cache built once vs the prefix recomputed at every denoising step.

Reduced widths (CPU) with PI0's real token counts: 3 cameras x 256 image tokens (224 px, patch 14) +
48 text tokens, a 50-step chunk and 10 denoising steps. The arithmetic limit of the speed-up is about
(prefix + suffix) / suffix cost per step, ~6.5x for real PI0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import write_section

from ript_ds.model.arch import GemmaArch, PI0Arch, VisionArch
from ript_ds.model.pi0 import PI0Batch, PI0Policy


def bench_arch(depth: int) -> PI0Arch:
    # Width ratios as in PI0 (VLM 2x expert, MLP 8x / 4x), scaled down for a CPU.
    return PI0Arch(
        vlm=GemmaArch(width=256, depth=depth, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=32),
        expert=GemmaArch(width=128, depth=depth, mlp_dim=512, num_heads=8, num_kv_heads=1, head_dim=32),
        vision=VisionArch(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=14, image_size=224),
        vocab_size=1024,
    )


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    arch = bench_arch(args.depth)
    policy = PI0Policy(arch).eval()
    b = args.batch
    batch = PI0Batch(
        images=torch.rand(b, 3, 3, 224, 224) * 2 - 1,
        image_masks=torch.ones(b, 3, dtype=torch.bool),
        tokens=torch.randint(1, arch.vocab_size, (b, 48)),
        token_masks=torch.ones(b, 48, dtype=torch.bool),
        state=torch.randn(b, 32),
    )
    noise = torch.randn(b, arch.chunk_size, arch.max_action_dim)
    with torch.inference_mode():
        same = (
            policy.sample_actions(batch, noise) - policy.sample_actions(batch, noise, use_cache=False)
        ).abs()
        cached = timed(lambda: policy.sample_actions(batch, noise), args.repeats)
        recomputed = timed(lambda: policy.sample_actions(batch, noise, use_cache=False), args.repeats)
    ratio = recomputed / cached
    body = (
        f"Config: VLM width 256 / expert 128, depth {args.depth}, SigLIP width 64 at 224 px; "
        f"prefix 3x256 + 48 tokens, chunk 50, 10 steps, batch {b}; {torch.get_num_threads()} threads.\n\n"
        "| variant | median s / sample_actions |\n|---|---|\n"
        f"| prefix recomputed every step | {recomputed:.3f} |\n| prefix KV cache built once | {cached:.3f} |\n\n"
        f"**Speed-up: {ratio:.2f}x** (target >= 5x). "
        f"Max |cached - recomputed| = {same.max().item():.1e}."
    )
    print(body)
    if not args.no_write:
        write_section("sample_latency", "PI0 sampling: prefix KV cache vs recomputation", body)


if __name__ == "__main__":
    main()
