"""One LoRA training step of the full-size PI0 on this CPU, through the trainer's engine build path.

PI0 = PaliGemma (SigLIP so400m/14 at 224 px + Gemma 2B, vocabulary 257152) + the Gemma 300M action expert
(no token embedding), ~3.24 B parameters, random weights. As launch/configs/libero_spatial_lora.yaml:
LoRA rank 32 on every projection of both Gemma stacks (peft), bf16 compute (DeepSpeed torch_autocast, fp32
parameters), per-layer activation checkpointing; ZeRO-3 (ds_configs/zero3.json, so the policy is built
inside zero.Init), 1 rank, built by engine/deepspeed.build_engine from the ExperimentCfg. The step is the
trainer's default cfg objective: one forward of 2 x micro-batch rows (condition positive, then none) at
shared noise and time, backward, optimizer step. Batch: 3 cameras at 224x224, 48 prompt tokens (a tiny
SentencePiece tokenizer trained on the prompt; ids are < 256, far inside the real vocabulary), chunk 50.

Not part of `make test` or CI: it takes minutes and ~15 GiB of RAM. Other people's processes share the
machine, so it first waits (up to --wait-min minutes) for --need-gib of available memory, and a watchdog
ends it (exit 3) if available memory falls below --floor-gib, instead of letting the OOM killer pick.

    python tools/bench/full_size_lora_step.py [--micro-batch 1] [--no-write]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import resource
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from report import write_section

from ript_ds.build import build_policy
from ript_ds.config import load_config
from ript_ds.env.base import ACTION_DIM
from ript_ds.model.flow import reduce_loss
from ript_ds.model.pi0 import PI0Batch
from ript_ds.model.processing import PromptTokenizer, build_tiny_tokenizer
from ript_ds.rl.losses import guided_loss

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "launch" / "configs" / "libero_spatial_lora.yaml"
PROMPT = "pick up the black bowl between the plate and the ramekin and place it on the plate"
GIB = 2**30
log = logging.getLogger("full_size_lora_step")


def meminfo_gib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / GIB
    raise KeyError(key)


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    return 0.0


def wait_for_memory(need_gib: float, wait_min: float) -> float:
    """Available GiB once it reaches need_gib; SystemExit after wait_min minutes without it."""
    deadline = time.monotonic() + wait_min * 60
    while True:
        available = meminfo_gib("MemAvailable")
        if available >= need_gib:
            return available
        if time.monotonic() > deadline:
            raise SystemExit(f"only {available:.1f} GiB available after {wait_min:.0f} min (need {need_gib})")
        log.warning("%.1f GiB available, need %.1f: waiting", available, need_gib)
        time.sleep(60)


@dataclass
class Watchdog:
    """Samples RSS and available memory every second; ends the process below floor_gib available."""

    floor_gib: float
    peak_rss: float = 0.0
    min_available: float = float("inf")
    phase: str = "start"
    peaks: dict[str, float] = field(default_factory=dict)  # phase -> peak RSS GiB sampled in it

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            rss, available = rss_gib(), meminfo_gib("MemAvailable")
            self.peak_rss = max(self.peak_rss, rss)
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            self.min_available = min(self.min_available, available)
            if available < self.floor_gib:
                log.error("%.1f GiB available (RSS %.1f GiB) in %s: stopping", available, rss, self.phase)
                os._exit(3)
            time.sleep(1.0)


def make_batch(rows: int, chunk: int, max_len: int) -> tuple[PI0Batch, torch.Tensor, torch.Tensor]:
    """(batch, noise, time) of `rows` samples: random images and state, the prompt's real token ids."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = PromptTokenizer(build_tiny_tokenizer(tmp, [PROMPT]), max_length=max_len)
        tokens, mask = tokenizer.encode(PROMPT)
    g = torch.Generator().manual_seed(0)
    batch = PI0Batch(
        images=torch.rand(rows, 3, 3, 224, 224, generator=g) * 2 - 1,
        image_masks=torch.ones(rows, 3, dtype=torch.bool),
        tokens=torch.from_numpy(tokens).repeat(rows, 1),
        token_masks=torch.from_numpy(mask).repeat(rows, 1),
        state=torch.randn(rows, 32, generator=g),
        actions=torch.randn(rows, chunk, 32, generator=g),
    )
    return batch, torch.randn(rows, chunk, 32, generator=g), torch.rand(rows, generator=g) * 0.9 + 0.05


def doubled(batch: PI0Batch) -> PI0Batch:
    """Both cfg branches in one forward: every tensor [B, ...] -> [2B, ...]."""
    return PI0Batch(*(t.repeat(2, *([1] * (t.ndim - 1))) for t in vars(batch).values()))


def counts(engine) -> dict[str, int]:
    """Parameter counts: whole model incl. adapters, this rank's share, trainable, LoRA adapters."""
    local, total = engine.partition_numel()
    named = [(n, p, getattr(p, "ds_numel", p.numel())) for n, p in engine.wrapped.named_parameters()]
    return {
        "params": total,
        "local": local,
        "trainable": sum(k for _, p, k in named if p.requires_grad),
        "lora": sum(k for n, _, k in named if "lora_" in n),
    }


def run(args) -> dict:
    from ript_ds.engine.deepspeed import build_engine  # after the memory check: deepspeed import is slow

    cfg = load_config(CONFIG, [f"train.micro_batch_size={args.micro_batch}"])
    dog = Watchdog(args.floor_gib)
    dog.start()
    out: dict = {"available_before": meminfo_gib("MemAvailable")}
    torch.manual_seed(cfg.train.seed)  # the random weights, so loss and grad norm repeat run to run
    start = time.perf_counter()
    dog.phase = "build"
    engine = build_engine(lambda: build_policy(cfg)[0], cfg, str(ROOT / "ds_configs" / "zero3.json"))
    out["build_s"] = time.perf_counter() - start
    out["rss_after_build"] = rss_gib()
    out.update(counts(engine))
    seen: dict[str, str] = {}  # evidence that autocast runs the Gemma projections in bf16
    probe = engine.module.model.vlm.language_model.layers[0].self_attn.q_proj

    def record(module, inputs, output) -> None:  # returns None: the output stays as it is
        seen.setdefault("q_proj", str(output.dtype))

    hook = probe.register_forward_hook(record)
    b = args.micro_batch
    batch, noise, t = make_batch(b, engine.module.arch.chunk_size, cfg.model.tokenizer_max_length)
    cond = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)])
    engine.train()
    marks = [time.perf_counter()]
    dog.phase = "forward"
    per = engine(doubled(batch), noise.repeat(2, 1, 1), t.repeat(2), cond)  # [2B, H, A]
    both = reduce_loss(per.float(), None, ACTION_DIM)
    loss = guided_loss(both[:b], both[b:], torch.ones(b), cfg.ript.uncond_weight).loss
    marks.append(time.perf_counter())
    dog.phase = "backward"
    engine.backward(loss)
    marks.append(time.perf_counter())
    dog.phase = "step"
    out["grad_norm"] = engine.step()
    marks.append(time.perf_counter())
    dog.phase = "done"
    out["forward_s"], out["backward_s"], out["step_s"] = (y - x for x, y in itertools.pairwise(marks))
    hook.remove()
    out["loss"], out["q_proj_dtype"] = float(loss.detach()), seen.get("q_proj", "not run")
    out["total_s"] = time.perf_counter() - start
    out["ru_maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    out["engine_peak_gb"] = engine.peak_memory_gb()
    out["stage"], out["bf16"] = engine.stage, engine.bf16
    time.sleep(1.5)  # one more watchdog sample
    out["watchdog_peak"], out["min_available"], out["peaks"] = dog.peak_rss, dog.min_available, dog.peaks
    return out


def report(r: dict, args) -> str:
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in r["peaks"].items() if k != "start")
    return (
        f"Full-size PI0 ({(r['params'] - r['lora']) / 1e9:.3f} B parameters, random weights) + "
        f"{r['lora'] / 1e6:.1f} M LoRA (rank 32, every projection of both Gemma stacks; "
        f"{r['trainable'] / 1e6:.1f} M trainable with cond_embed); this rank stores {r['local'] / 1e9:.3f} B. "
        f"ZeRO-{r['stage']} with zero.Init (ds_configs/zero3.json), bf16 autocast with fp32 parameters (a "
        f"VLM q_proj output was {r['q_proj_dtype']}), activation checkpointing, 1 rank, "
        f"{torch.get_num_threads()} threads. Micro-batch {args.micro_batch}: the cfg objective's forward of "
        f"{2 * args.micro_batch} rows, 3 cameras 224x224 + 48 prompt tokens | 51 suffix tokens (chunk 50).\n\n"
        "| measurement | value |\n|---|---|\n"
        f"| engine build (zero.Init, LoRA, deepspeed.initialize) | {r['build_s']:.0f} s |\n"
        f"| forward (2 branches) | {r['forward_s']:.0f} s |\n"
        f"| backward (recomputes checkpointed layers) | {r['backward_s']:.0f} s |\n"
        f"| optimizer step | {r['step_s']:.1f} s |\n"
        f"| **wall time, build + step** | **{r['total_s']:.0f} s** |\n"
        f"| RSS after build | {r['rss_after_build']:.1f} GiB |\n"
        f"| **peak RSS** (getrusage ru_maxrss = engine mem/peak_gb) | **{r['ru_maxrss_gib']:.1f} GiB** |\n"
        f"| peak RSS by phase (1 s samples, GiB) | {peaks} |\n"
        f"| available memory before / lowest during | {r['available_before']:.1f} / "
        f"{r['min_available']:.1f} GiB |\n"
        f"| loss / grad norm | {r['loss']:.4f} / {r['grad_norm']:.4f} |\n\n"
        f"The fp32 base parameters alone are {(r['params'] - r['lora']) * 4 / GIB:.1f} GiB; they fit this "
        "24 GiB machine, so the frozen base stays fp32 as the engine trains it (bf16 base weights were not "
        "needed). The rest of the peak is the interpreter and libraries, the LoRA fp32 master, gradients and "
        "Adam moments, the layers ZeRO-3 gathers for the current module (a copy, even on one rank) and the "
        "activations of the checkpointed layer being recomputed. Memory available to the machine fell to "
        "the low point above with this process at its peak (other processes' use included)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--micro-batch", type=int, default=1, help="windows per micro-batch (x2 rows for cfg)"
    )
    parser.add_argument("--need-gib", type=float, default=17.0, help="available memory to wait for")
    parser.add_argument("--floor-gib", type=float, default=1.0, help="stop below this much available")
    parser.add_argument("--wait-min", type=float, default=30.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.info("%.1f GiB available", wait_for_memory(args.need_gib, args.wait_min))
    result = run(args)
    body = report(result, args)
    print(body)
    if not args.no_write:
        write_section("full_size_lora_step", "Full-size PI0: one LoRA step on CPU (ZeRO-3, bf16)", body)


if __name__ == "__main__":
    main()
