"""Worker for tests/test_engine_deepspeed.py: run under torchrun (2 ranks) or plain python (1 rank).

    python tests/ds_worker.py OUT_DIR JOB     JOB = train1 | train2 | offload | die | hang

Each rank writes OUT_DIR/<job>_rank<r>.json. Several engines are built one after another in one launch
so the process start-up and DeepSpeed's import are paid once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from conftest import random_batch, tiny_policy

from ript_ds.build import build_policy
from ript_ds.config import EngineCfg, ExperimentCfg, LoraCfg, ModelCfg, TrainCfg
from ript_ds.engine import dist
from ript_ds.engine.deepspeed import DeepSpeedEngine, all_params_gathered, build_engine
from ript_ds.model.arch import PI0Arch
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.weights import save_canonical

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4
STEPS = 3
NO_PERSIST = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def global_data(step: int):
    """The same global batch on every rank and world size; fixed noise and time per step."""
    arch = PI0Arch.tiny()
    batch = random_batch(arch, b=GLOBAL_BATCH, seed=1)
    g = torch.Generator().manual_seed(100 + step)
    noise = torch.randn(GLOBAL_BATCH, arch.chunk_size, arch.max_action_dim, generator=g)
    t = torch.rand(GLOBAL_BATCH, generator=g) * 0.9 + 0.05
    cond = torch.tensor([1, 0, 1, 1])
    return batch, noise, t, cond


def shard(batch, noise, t, cond):
    n = GLOBAL_BATCH // dist.world_size()
    sl = slice(dist.rank() * n, (dist.rank() + 1) * n)
    fields = {k: v[sl] for k, v in vars(batch).items() if v is not None}
    return type(batch)(**fields), noise[sl], t[sl], cond[sl]


def make_engine(
    config: str,
    overrides=None,
    lora: bool = False,
    ckpt: bool = False,
    timeout: float = 60.0,
    accum: int = 1,
    bf16: bool = False,
):
    micro = GLOBAL_BATCH // dist.world_size() // accum
    train = TrainCfg(micro_batch_size=micro, grad_accum_steps=accum, lr=1e-3, grad_clip=1.0)
    train.collective_timeout_s = timeout
    engine = EngineCfg(deepspeed_config=str(ROOT / "ds_configs" / config), lora=LoraCfg(enabled=lora, rank=4))
    weights = tiny_policy(0).state_dict()
    return DeepSpeedEngine(
        lambda: PI0Policy(PI0Arch.tiny()),
        train,
        engine,
        bf16=bf16,
        gradient_checkpointing=ckpt,
        weights=weights,
        ds_overrides=overrides,
    )


def train_steps(engine: DeepSpeedEngine, steps: range) -> tuple[list[float], list[float]]:
    losses, norms = [], []
    engine.train()
    for step in steps:
        batch, noise, t, cond = shard(*global_data(step))
        dev = engine.device
        loss = engine(batch.to(dev), noise.to(dev), t.to(dev), cond.to(dev)).mean()
        engine.backward(loss)
        norms.append(engine.step())
        losses.append(dist.all_reduce_mean({"loss": loss.item()})["loss"])
    return losses, norms


def sample(engine: DeepSpeedEngine) -> tuple[list[float], bool]:
    batch, *_ = global_data(0)
    batch = batch.to(engine.device)
    with engine.rollout_context() as policy:
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(GLOBAL_BATCH, policy.arch.chunk_size, policy.arch.max_action_dim, generator=g)
        noise = noise.to(engine.device)
        first = policy.sample_actions(batch, noise=noise, guidance=1.0)
        second = policy.sample_actions(
            batch, noise=noise, guidance=1.0
        )  # params must still be gathered for this one
        gathered = all_params_gathered(engine.wrapped)
    assert torch.equal(first, second)
    return first.flatten()[:16].cpu().tolist(), gathered


def rollout_vs_eval_actions() -> dict:
    """A bf16 run's training rollout (engine.rollout_context + the trainer's policy fn) and launch/eval.py's
    path (the checkpoint's policy on its own, dtype from the run) must give the same actions."""
    from ript_ds.env.base import Observation, TaskSpec
    from ript_ds.eval.checkpoint import resolve_dtype  # what launch/eval.py --dtype auto applies
    from ript_ds.model.normalization import NormStats
    from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
    from ript_ds.rl.rollout import NoiseKey, make_pi0_policy_fn
    from ript_ds.rl.types import Context

    task = TaskSpec("synthetic", 0, "t", "reach the red target", 10, 4)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        (run / "checkpoints" / "iter_000001").mkdir(parents=True)
        (run / "config.yaml").write_text("model:\n  dtype: bfloat16\n")
        dtype = resolve_dtype("auto", run / "checkpoints" / "iter_000001")
        tok = PromptTokenizer(build_tiny_tokenizer(tmp, [task.instruction]), 16)
    proc = Processor(tok, NormStats.identity(8, 7), action_dim=7)
    rng = np.random.default_rng(0)
    obs = [
        Observation(rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), rng.normal(size=8))
        for _ in range(2)
    ]
    keys = [NoiseKey(3 + i, Context(0, i), 0) for i in range(2)]
    e = make_engine("zero2.json", bf16=True)
    with e.rollout_context() as policy:
        train_fn = make_pi0_policy_fn(policy, proc, device=e.device, dtype="bfloat16", num_steps=3)
        trained = train_fn(obs, [task] * 2, keys)
    alone = tiny_policy(0).eval()
    actions = {}
    for name in (dtype, "float32"):
        actions[name] = make_pi0_policy_fn(alone, proc, device="cpu", dtype=name, num_steps=3)(
            obs, [task] * 2, keys
        )
    return {
        "dtype": dtype,
        "same_as_eval": bool(np.array_equal(trained, actions[dtype])),
        "fp32_differs": float(np.abs(trained - actions["float32"]).max()),
    }


def job_train(out: Path, world: int) -> dict:
    result: dict = {}
    t0 = time.time()
    e = make_engine("zero2.json")
    result["z2"], result["z2_norms"] = train_steps(e, range(STEPS))
    result["z2_sample"], _ = sample(e)
    result["ds_config"] = e.ds_config
    result["lr"] = e.lr
    result["peak_gb"] = e.peak_memory_gb()
    result["t_z2"] = time.time() - t0
    e = make_engine("zero0.json")  # no ZeRO: DeepSpeed's own all-reduce, skipped on one rank
    result["z0"], result["z0_norms"] = train_steps(e, range(STEPS))
    result["z0_backward_allreduce"] = e._engine.enable_backward_allreduce
    e.save(out / f"ckpt_z0_{world}", "s3", {"step": 3})
    result["z0_step4"], _ = train_steps(e, range(STEPS, STEPS + 1))
    e.load(out / f"ckpt_z0_{world}", "s3")
    result["z0_step4_resumed"], _ = train_steps(e, range(STEPS, STEPS + 1))
    if world == 1:
        result["precision"] = rollout_vs_eval_actions()
    if world == 1:  # the same global batch in two accumulated micro-batches
        e = make_engine("zero2.json", accum=2)
        result["accum"], result["accum_norms"] = [], []
        for step in range(STEPS):
            batch, noise, t, cond = global_data(step)
            micro_losses = []
            for half in (slice(0, 2), slice(2, 4)):
                part = type(batch)(**{k: v[half] for k, v in vars(batch).items() if v is not None})
                loss = e(part, noise[half], t[half], cond[half]).mean()
                e.backward(loss / 2)  # the caller owns the normalization (rl/update.py) ...
                micro_losses.append(loss.item())
            result["accum_norms"].append(e.step())  # ... and the boundary: one step per global batch
            result["accum"].append(sum(micro_losses) / 2)
        return result

    e = make_engine("zero3.json", NO_PERSIST)
    local, total = e.partition_numel()
    result["z3_partition"] = [local, total]
    result["z3_sample_before"] = sample(e)[0]
    result["z3"], _ = train_steps(e, range(STEPS))
    result["z3_sample"], result["z3_gathered_in_rollout"] = sample(e)
    result["z3_released_after"] = not any(p.numel() for p in e.wrapped.parameters())
    e.save(out / "ckpt", "step3", {"step": 3, "note": "hi"})
    result["z3_step4"], _ = train_steps(e, range(STEPS, STEPS + 1))
    client_state = e.load(out / "ckpt", "step3")
    result["client_state"] = {k: v for k, v in client_state.items() if k in ("step", "note")}
    result["client_state_keys"] = sorted(client_state)
    result["z3_step4_resumed"], _ = train_steps(e, range(STEPS, STEPS + 1))

    if dist.is_main():  # ZeRO-3 from a checkpoint directory through build_engine (the trainer's path)
        save_canonical(tiny_policy(0), out / "pi0")
    dist.barrier()
    cfg = ExperimentCfg(model=ModelCfg(checkpoint=str(out / "pi0")))
    cfg.train = TrainCfg(micro_batch_size=GLOBAL_BATCH // 2, lr=1e-3, grad_clip=1.0)
    e = build_engine(lambda: build_policy(cfg)[0], cfg, str(ROOT / "ds_configs" / "zero3.json"))
    result["z3_from_checkpoint"], _ = train_steps(e, range(STEPS))

    e = make_engine("zero3.json", NO_PERSIST, ckpt=True)
    result["z3_gc"], _ = train_steps(e, range(STEPS))

    e = make_engine("zero3.json", NO_PERSIST, lora=True)
    before = e.full_state_dict()
    result["lora_loss"], _ = train_steps(e, range(STEPS))
    after = e.full_state_dict()
    result["lora_changed"] = sorted(k for k in before if not torch.equal(before[k], after[k]))
    result["lora_trainable"] = sorted(k for k, p in e.wrapped.named_parameters() if p.requires_grad)
    e.save_adapters(out / "adapter")
    e.save(out / "ckpt_lora", "s3")  # frozen base weights left out of the DeepSpeed checkpoint
    result["lora_step4"], _ = train_steps(e, range(STEPS, STEPS + 1))
    e.load(out / "ckpt_lora", "s3")
    result["lora_step4_resumed"], _ = train_steps(e, range(STEPS, STEPS + 1))
    result["t_total"] = time.time() - t0
    return result


def main() -> None:
    # the `deepspeed` launcher inserts --local_rank=N (LOCAL_RANK is in the environment as well)
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, job = Path(args[0]), args[1]
    logging.basicConfig(level=logging.WARNING)
    if job in ("train1", "train2"):
        dist.init_distributed(60.0)
        result = job_train(out, dist.world_size())
    elif job == "offload":  # ZeRO-3 with optimizer and parameters on CPU (DeepSpeedCPUAdam, JIT-built)
        dist.init_distributed(60.0)
        e = make_engine("zero3_offload.json", NO_PERSIST)
        result = {"optimizer": type(e._engine.optimizer.optimizer).__name__}
        result["losses"], _ = train_steps(e, range(STEPS))
        result["sample"], result["gathered"] = sample(e)
    elif job == "die":  # rank 1 vanishes (exit code 0, so torchrun does not tear rank 0 down for us)
        e = make_engine("zero2.json", timeout=20.0)
        train_steps(e, range(1))
        if dist.rank() == 1:
            os._exit(0)
        dist.all_reduce_mean({"x": 1.0})
        result = {"survived": True}
    elif job == "hang":  # rank 1 stays alive but never joins the collective
        dist.init_distributed(10.0)
        if dist.rank() == 1:
            time.sleep(120)
        dist.barrier("after work")
        result = {"survived": True}
    else:
        raise SystemExit(f"unknown job {job}")
    (out / f"{job}_rank{dist.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
