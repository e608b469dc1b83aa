"""The update phase: objectives wired to the model, accumulation, padding, FPO reference losses."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_policy

from ript_ds.config import RiptCfg, TrainCfg
from ript_ds.model.flow import reduce_loss, sample_noise_time
from ript_ds.model.normalization import NormStats
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.rl.types import Window
from ript_ds.rl.update import TorchBackend, plan_update, run_update, window_refs

PROMPTS = {0: "move to the red target", 1: "move to the blue target"}


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tok = PromptTokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), list(PROMPTS.values())), 16)
    return Processor(tok, NormStats.identity(8, 7), action_dim=7)


def windows(n: int, advantages, seed: int = 0, keyed: bool = True) -> list[Window]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.arange(8) < 8 - (i % 3)
        actions = rng.normal(size=(8, 7)).astype(np.float32) * mask[:, None]
        out.append(
            Window(
                images=rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8),
                state=rng.normal(size=8).astype(np.float32),
                task_id=i % 2,
                actions=actions,
                action_mask=mask,
                advantage=float(advantages[i % len(advantages)]),
                key=(1000 + seed, i) if keyed else None,
            )
        )
    return out


def settings(**kw) -> tuple[RiptCfg, TrainCfg]:
    """(ript, train) config sections from one set of keywords (the update reads both)."""
    train_keys = {f.name for f in dataclasses.fields(TrainCfg)}
    train = TrainCfg(**{k: v for k, v in kw.items() if k in train_keys})
    return RiptCfg(**{k: v for k, v in kw.items() if k not in train_keys}), train


def global_plan(shards, rank, cfg: tuple[RiptCfg, TrainCfg], seed):
    return plan_update(shards, rank, cfg[1], seed, cfg[0].loss)


def update(policy, processor, ws, **kw):
    cfg = settings(**{"micro_batch_size": 4, **kw})
    return run_update(TorchBackend(policy, lr=1e-2), policy.arch, processor, ws, PROMPTS, *cfg, seed=0)


def test_cfg_conditional_term_only_for_positive_advantages(processor):
    neg = tiny_policy()
    stats = update(neg, processor, windows(6, [-0.5, -1.0]), loss="cfg")
    assert stats.loss_cond == 0.0 and stats.loss_uncond > 0 and stats.optimizer_steps == 2
    # c=positive never appeared in a loss term: its embedding row got no gradient and did not move.
    assert torch.equal(neg.cond_embed.weight[1], torch.zeros_like(neg.cond_embed.weight[1]))
    pos = tiny_policy()
    stats = update(pos, processor, windows(6, [0.5, -0.5]), loss="cfg")
    assert stats.loss_cond > 0 and pos.cond_embed.weight[1].abs().sum() > 0


class GradProbe(TorchBackend):
    """Records the accumulated gradient at each optimizer step instead of stepping (Adam would amplify
    float-noise gradients of ~1e-9 into lr-sized moves and hide what we compare). world_size: the
    data-parallel average this probe stands for (its gradients are later averaged by the test)."""

    def __init__(self, policy, world_size: int = 1):
        super().__init__(policy, lr=1e-2)
        self.world_size, self.grads = world_size, []

    def step(self):
        self.grads.append(
            {n: p.grad.clone() for n, p in self.policy.named_parameters() if p.grad is not None}
        )
        self.policy.zero_grad()
        return 0.0


def test_zero_weight_padding_changes_nothing(processor):
    ws = windows(4, [1.0, -1.0])
    grads = []
    for size in (4, 8):  # one micro-batch of 4, or of 8 with nothing else in it
        policy = tiny_policy()
        probe = GradProbe(policy)
        run_update(
            probe, policy.arch, processor, ws, PROMPTS, *settings(loss="awr", micro_batch_size=size), 0
        )
        grads.append(probe.grads[0])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_all_objectives_reduce_their_loss_over_epochs(processor):
    ws = windows(8, [1.0, 0.5])
    for loss in ("cfg", "awr", "fpo"):
        policy = tiny_policy(seed=2)
        first = update(copy.deepcopy(policy), processor, ws, loss=loss, epochs=1).loss
        later = update(policy, processor, ws, loss=loss, epochs=6).loss
        assert later < first, (loss, first, later)


def test_fpo_ratio_starts_at_one(processor):
    stats = update(tiny_policy(), processor, windows(4, [1.0, -1.0]), loss="fpo", fpo_samples=3)
    # The first micro-batch is evaluated with the rollout-time parameters: ratio exactly 1 there;
    # afterwards it moves, but stays near 1 after one small step.
    assert 0.5 < stats.extra["fpo/ratio"] < 2.0
    assert set(stats.extra) == {"fpo/ratio", "fpo/clip_frac"}


def test_every_objective_reports_its_keys_even_with_only_padding(processor):
    """A rank that kept no group runs padding only; its totals must carry the same keys as the others'
    (the trainer sums them over ranks), all zero."""
    policy = tiny_policy()
    real = [window_refs(windows(3, [1.0]))]
    for loss in ("cfg", "awr", "fpo"):
        cfg = settings(loss=loss, micro_batch_size=2, fpo_samples=2)
        plan = global_plan([[], *real], 0, cfg, seed=0)  # rank 0 of 2 holds nothing
        pad = windows(1, [0.0])[0]
        stats = run_update(GradProbe(policy, 2), policy.arch, processor, [], PROMPTS, *cfg, 0, plan, pad)
        full = run_update(GradProbe(policy), policy.arch, processor, windows(3, [1.0]), PROMPTS, *cfg, 0)
        assert stats.sums.keys() == full.sums.keys(), loss
        assert all(v == 0.0 for v in stats.sums.values()), (loss, stats.sums)
        assert stats.micro_steps == plan.micro_steps == 2 and stats.optimizer_steps == 1


def test_plan_is_independent_of_the_rank_layout():
    refs = window_refs(windows(11, [1.0]))
    cfg = settings(micro_batch_size=2, grad_accum_steps=2, epochs=2)
    one = global_plan([refs], 0, settings(micro_batch_size=4, grad_accum_steps=2, epochs=2), seed=3)
    # Two ranks, windows split unevenly (8 + 3), same global batch (2 x 2 x 2 = 4 x 2 x 1).
    shards = [refs[:8], refs[8:]]
    plans = [global_plan(shards, r, cfg, seed=3) for r in (0, 1)]
    for e in range(2):
        for s, step in enumerate(one.steps[e]):
            keys_1 = sorted(refs[i].key for mb in step.micro_batches for i in mb if i >= 0)
            keys_2 = sorted(
                shards[r][i].key
                for r in (0, 1)
                for mb in plans[r].steps[e][s].micro_batches
                for i in mb
                if i >= 0
            )
            assert keys_1 == keys_2 and plans[0].steps[e][s].normalizer == step.normalizer
            assert len(plans[0].steps[e][s].micro_batches) == len(plans[1].steps[e][s].micro_batches)
    assert one.optimizer_steps == 4 and plans[0].micro_steps == plans[1].micro_steps


def test_step_loss_is_the_mean_over_the_steps_windows(processor):
    """Hand-computed awr value with beta large (weights 1): L = sum_b l_b / B over the step's windows, l_b
    the window's error averaged over its valid steps and real dims at its own (noise, time) draw; windows
    of 8, 7 and 6 valid steps weigh the same."""
    policy = tiny_policy()
    ws = windows(5, [0.3, -0.2])  # valid steps 8, 7, 6, 8, 7
    cfg = settings(loss="awr", micro_batch_size=2, grad_accum_steps=3, awr_beta=1e9)
    stats = run_update(GradProbe(policy), policy.arch, processor, ws, PROMPTS, *cfg, seed=4)
    per_window = []
    for w in ws:
        noise, t = sample_noise_time(policy.arch, 1, np.random.default_rng([4, 0, *w.key]))
        batch = processor.batch(
            w.images[None], w.state[None], [PROMPTS[w.task_id]], w.actions[None], device="cpu"
        )
        with torch.no_grad():
            per = policy(batch, noise, t)
        per_window.append(float(reduce_loss(per, torch.from_numpy(w.action_mask[None]), 7)[0]))
    assert stats.optimizer_steps == 1 and stats.micro_steps == 3
    assert stats.loss == pytest.approx(sum(per_window) / len(per_window), rel=1e-5)


@pytest.mark.parametrize("loss", ["cfg", "awr", "fpo"])
def test_two_rank_gradient_equals_one_rank_however_windows_fall(processor, loss):
    """Data parallelism by hand: each rank's gradient from its own windows, averaged over ranks, equals
    the 1-rank gradient of the same global batch, even with every window on one rank."""
    ws = windows(6, [0.7, -0.4, 0.2])
    one_cfg = settings(loss=loss, micro_batch_size=4, fpo_samples=2)
    two_cfg = settings(loss=loss, micro_batch_size=2, fpo_samples=2)
    policy = tiny_policy()
    ref = GradProbe(copy.deepcopy(policy))
    one = run_update(ref, policy.arch, processor, ws, PROMPTS, *one_cfg, seed=5)
    for split in (3, 6, 0):  # balanced, all on rank 0, all on rank 1
        shards = [ws[:split], ws[split:]]
        refs = [window_refs(s) for s in shards]
        totals = {}
        probes = []
        for r in (0, 1):
            probe = GradProbe(copy.deepcopy(policy), world_size=2)
            plan = global_plan(refs, r, two_cfg, seed=5)
            st = run_update(probe, policy.arch, processor, shards[r], PROMPTS, *two_cfg, 5, plan, ws[0], r)
            probes.append(probe)
            totals = {k: totals.get(k, 0.0) + v for k, v in st.sums.items()}
        assert totals["loss"] / st.optimizer_steps == pytest.approx(one.loss, abs=1e-5), split
        assert len(probes[0].grads) == len(ref.grads) == st.optimizer_steps
        for s, grads in enumerate(ref.grads):
            for name, g in grads.items():
                avg = (probes[0].grads[s][name] + probes[1].grads[s][name]) / 2
                assert torch.allclose(avg, g, atol=1e-6, rtol=1e-4), (split, s, name)


def test_gradient_accumulation_steps_end_the_update_on_a_step(processor):
    policy = tiny_policy()
    cfg = settings(loss="cfg", micro_batch_size=2, grad_accum_steps=2, epochs=2)
    ws = windows(5, [1.0, -1.0])  # 3 micro-batches per epoch: the last optimizer step has only one
    s = run_update(TorchBackend(policy, lr=1e-3), policy.arch, processor, ws, PROMPTS, *cfg, seed=0)
    assert s.micro_steps == 6 and s.optimizer_steps == 4 and s.grad_norm > 0


def test_no_windows_and_no_padding_is_an_error(processor):
    policy = tiny_policy()
    with pytest.raises(ValueError, match="no padding window"):
        run_update(TorchBackend(policy, lr=1e-3), policy.arch, processor, [], PROMPTS, *settings(), 0)


def test_micro_batches_are_built_on_the_backend_device(processor):
    """No CPU default on the update path: masks, advantages, weights and the model batch are made on the
    backend's device (the engine's accelerator in training); "meta" stands in for a GPU here."""
    from ript_ds.rl.update import _Batcher

    ws = windows(3, [1.0])
    mb = _Batcher(processor, PROMPTS, ws[0].as_padding(), torch.device("meta"))(
        ws, window_refs(ws), np.array([0, 2, -1])
    )
    inputs = mb.inputs
    tensors = [inputs.step_mask, inputs.advantage, inputs.weight]
    tensors += [v for v in vars(inputs.batch).values() if v is not None]
    assert {t.device.type for t in tensors} == {"meta"}
