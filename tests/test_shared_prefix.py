"""The shared prefix of training (PI0Policy.loss(..., repeats=R), model/packing.py): one prefix pass per
window for all its suffix branches gives the losses and gradients of the per-branch computation (the
batch stacked R times), for PI0 and PI0.5, with and without per-layer checkpointing; the update's cfg and
fpo objectives use it and match the per-branch objective; a ZeRO-3 DeepSpeed engine runs them too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_batch, randomize, run_single_rank_worker
from test_rl_update import PROMPTS, GradProbe, settings, windows

from ript_ds.model.arch import PI0Arch
from ript_ds.model.normalization import NormStats
from ript_ds.model.pi0 import PI0Batch
from ript_ds.model.pi05 import make_policy
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.rl.update import TorchBackend, run_update

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # fp32; relative to each gradient tensor's largest entry


def policy_of(model_type: str, seed: int = 0):
    """A tiny network with random values everywhere, the condition embedding included (so c matters)."""
    torch.manual_seed(seed)
    policy = randomize(make_policy(PI0Arch.tiny(model_type=model_type)), seed)
    with torch.no_grad():
        policy.cond_embed.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return policy


def stacked(batch: PI0Batch, r: int) -> PI0Batch:
    """The per-branch computation's input: the batch stacked r times (the update's old `_repeat`)."""
    return PI0Batch(
        *(None if t is None else t.repeat(r, *([1] * (t.ndim - 1))) for t in vars(batch).values())
    )


def make_processor(directory: Path) -> Processor:
    tok = PromptTokenizer(build_tiny_tokenizer(directory, list(PROMPTS.values())), 16)
    return Processor(tok, NormStats.identity(8, 7), action_dim=7)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return make_processor(tmp_path_factory.mktemp("tok"))


def loss_and_grads(policy, batch, noise, time, cond, repeats: int, weights):
    policy.zero_grad(set_to_none=True)
    per = policy(batch, noise, time, cond, repeats=repeats)
    (per * weights).sum().backward()  # a generic cotangent: every element's gradient counts differently
    return per.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def worst_relative(a: dict, b: dict) -> float:
    """Largest |a - b| of a tensor over its scale: its largest |b|, floored at 1e-3 of the model's largest,
    since gradients that are zero in exact arithmetic (SigLIP's key biases: a softmax ignores a per-query
    constant) are float noise (~1e-8) in both computations."""
    assert a.keys() == b.keys()
    floor = 1e-3 * max(float(g.abs().max()) for g in b.values())
    return max(float((a[n] - b[n]).abs().max()) / max(float(b[n].abs().max()), floor) for n in b)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("repeats", [2, 4])
@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_shared_prefix_equals_the_per_branch_computation(model_type, repeats, ckpt):
    policy = policy_of(model_type).train()
    arch = policy.arch
    batch = random_batch(arch, b=3)  # texts of 7, 6 and 5 real tokens: padded prefix positions too
    batch.image_masks[1, 1] = False  # and a missing camera
    g = torch.Generator().manual_seed(3)
    rows = repeats * 3
    noise = torch.randn(rows, arch.chunk_size, arch.max_action_dim, generator=g)
    time = torch.rand(rows, generator=g) * 0.9 + 0.05
    cond = torch.randint(0, 2, (rows,), generator=g)
    weights = torch.rand(rows, arch.chunk_size, arch.max_action_dim, generator=g)
    per_ref, grads_ref = loss_and_grads(policy, stacked(batch, repeats), noise, time, cond, 1, weights)
    policy.set_gradient_checkpointing(ckpt)
    per, grads = loss_and_grads(policy, batch, noise, time, cond, repeats, weights)
    assert per.shape == per_ref.shape == (rows, arch.chunk_size, arch.max_action_dim)
    assert float((per - per_ref).abs().max()) <= TOL * float(per_ref.abs().max())
    assert worst_relative(grads, grads_ref) <= TOL
    assert "model.vlm.language_model.layers.0.self_attn.q_proj.weight" in grads  # the prefix got its share


def test_branch_count_must_match_the_rows():
    policy = policy_of("pi0")
    batch = random_batch(policy.arch, b=2)
    noise = torch.randn(6, policy.arch.chunk_size, policy.arch.max_action_dim)
    with pytest.raises(ValueError, match="repeats x batch"):
        policy(batch, noise, torch.rand(6), None, repeats=2)


class _Stacking:
    """The update's old computation: every branch with its own copy of the window (its own prefix)."""

    def forward(self, batch, noise, time, cond, repeats=1):
        return super().forward(stacked(batch, repeats), noise, time, cond)


class PerBranch(_Stacking, GradProbe):
    pass


class PerBranchTorch(_Stacking, TorchBackend):
    pass


@pytest.mark.parametrize("loss", ["cfg", "fpo"])
@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_update_objectives_equal_the_per_branch_objective(processor, model_type, loss):
    """run_update's loss, logged terms and every optimizer step's gradient, shared vs per-branch."""
    ws = windows(5, [0.8, -0.3, 0.4])
    cfg = settings(loss=loss, micro_batch_size=3, fpo_samples=4, uncond_weight=0.5)
    results = []
    for probe_type in (GradProbe, PerBranch):
        probe = probe_type(policy_of(model_type, seed=1))
        stats = run_update(probe, probe.policy.arch, processor, ws, PROMPTS, *cfg, seed=7)
        results.append((stats, probe.grads))
    (shared, shared_grads), (ref, ref_grads) = results
    assert shared.loss == pytest.approx(ref.loss, rel=TOL) and ref.loss != 0.0
    assert shared.extra == pytest.approx(ref.extra, rel=TOL)
    assert (shared.loss_cond, shared.loss_uncond) == pytest.approx((ref.loss_cond, ref.loss_uncond), rel=TOL)
    assert len(shared_grads) == len(ref_grads) == 2
    for step, step_ref in zip(shared_grads, ref_grads, strict=True):
        assert worst_relative(step, step_ref) <= TOL


# ---------------------------------------------------------------------------- ZeRO-3 engine, 1 rank
def engine_worker(out: Path) -> None:
    """One plain-python process (DeepSpeed's start-up paid once): the cfg and fpo updates through a ZeRO-3
    engine (every parameter partitioned, per-layer checkpointing) vs the per-branch update in torch."""
    from ds_worker import NO_PERSIST

    from ript_ds.config import EngineCfg
    from ript_ds.engine.deepspeed import DeepSpeedEngine

    processor = make_processor(out / "tok")
    weights = policy_of("pi0", seed=1).state_dict()
    result = {}
    for loss in ("cfg", "fpo"):
        ript, train = settings(loss=loss, micro_batch_size=3, fpo_samples=4, lr=0.0)
        engine = DeepSpeedEngine(
            lambda: make_policy(PI0Arch.tiny()),
            train,
            EngineCfg(deepspeed_config=str(ROOT / "ds_configs" / "zero3.json")),
            gradient_checkpointing=True,
            weights=weights,
            ds_overrides=NO_PERSIST,
        )
        engine.train()
        ws = windows(5, [0.8, -0.3, 0.4])
        stats = run_update(engine, PI0Arch.tiny(), processor, ws, PROMPTS, ript, train, seed=7)
        reference = policy_of("pi0", seed=1)
        per_branch = PerBranchTorch(reference, lr=0.0)
        ref = run_update(per_branch, reference.arch, processor, ws, PROMPTS, ript, train, seed=7)
        result[loss] = {
            "loss": [stats.loss, ref.loss],
            "grad_norm": [stats.grad_norm, ref.grad_norm],
            "extra": [stats.extra, ref.extra],
            "stage": engine.stage,
        }
    (out / "result.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def engine_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("shared_prefix_engine")
    run_single_rank_worker(__file__, out)
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("loss", ["cfg", "fpo"])
def test_zero3_engine_runs_the_shared_prefix_update(engine_report, loss):
    r = engine_report[loss]
    assert r["stage"] == 3
    assert r["loss"][0] == pytest.approx(r["loss"][1], rel=TOL) and r["loss"][1] != 0.0
    assert r["grad_norm"][0] == pytest.approx(r["grad_norm"][1], rel=TOL) and r["grad_norm"][1] > 0
    assert r["extra"][0] == pytest.approx(r["extra"][1], rel=TOL)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    engine_worker(Path(sys.argv[1]))
