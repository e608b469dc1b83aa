"""The update phase: objectives wired to the model, accumulation, padding, FPO reference losses."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_policy

from ript_ds.model.normalization import NormStats
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer
from ript_ds.rl.types import Window
from ript_ds.rl.update import TorchBackend, UpdateCfg, run_update

PROMPTS = {0: "move to the red target", 1: "move to the blue target"}


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tok = PromptTokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), list(PROMPTS.values())), 16)
    return Processor(tok, NormStats.identity(8, 7), action_dim=7)


def windows(n: int, advantages, seed: int = 0) -> list[Window]:
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
            )
        )
    return out


def update(policy, processor, ws, **kw):
    cfg = UpdateCfg(**{"micro_batch_size": 4, **kw})
    backend = TorchBackend(policy, lr=1e-2, grad_accum_steps=kw.pop("accum", 1) if "accum" in kw else 1)
    return run_update(backend, policy.arch, processor, ws, PROMPTS, cfg, np.random.default_rng(0))


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
    """Records the accumulated gradient at each boundary instead of stepping (Adam would amplify
    float-noise gradients of ~1e-9 into lr-sized moves and hide what we compare)."""

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.policy.named_parameters() if p.grad is not None}
        self.policy.zero_grad()
        return 0.0


def test_zero_weight_padding_changes_nothing(processor):
    ws = windows(4, [1.0, -1.0])
    padded = ws + [w.as_padding() for w in windows(4, [5.0], seed=9)]
    grads = []
    for wl, size in ((ws, 4), (padded, 8)):
        policy = tiny_policy()
        probe = GradProbe(policy, lr=1e-2)
        run_update(
            probe,
            policy.arch,
            processor,
            wl,
            PROMPTS,
            UpdateCfg(loss="awr", micro_batch_size=size),
            np.random.default_rng(0),
        )
        grads.append(probe.grads)
    # Same real windows in one micro-batch of 4 or of 8 with half padding: the same gradient.
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


def test_fixed_micro_batch_count_pads_and_rejects_overflow(processor):
    stats = update(tiny_policy(), processor, windows(3, [1.0]), loss="awr", micro_batch_size=2)
    assert stats.micro_steps == 2
    policy = tiny_policy()
    backend = TorchBackend(policy, lr=1e-3)
    cfg = UpdateCfg(loss="awr", micro_batch_size=2)
    s = run_update(
        backend,
        policy.arch,
        processor,
        windows(3, [1.0]),
        PROMPTS,
        cfg,
        np.random.default_rng(0),
        num_micro_batches=5,
    )
    assert s.micro_steps == 5 and s.windows == 3
    with pytest.raises(ValueError, match="do not fit"):
        run_update(
            backend,
            policy.arch,
            processor,
            windows(5, [1.0]),
            PROMPTS,
            cfg,
            np.random.default_rng(0),
            num_micro_batches=2,
        )
    with pytest.raises(ValueError, match="no padding window"):
        run_update(backend, policy.arch, processor, [], PROMPTS, cfg, np.random.default_rng(0), 1)


def test_gradient_accumulation_steps(processor):
    policy = tiny_policy()
    backend = TorchBackend(policy, lr=1e-3, grad_accum_steps=2)
    cfg = UpdateCfg(loss="cfg", micro_batch_size=2, epochs=2)
    s = run_update(
        backend, policy.arch, processor, windows(4, [1.0, -1.0]), PROMPTS, cfg, np.random.default_rng(0)
    )
    assert s.micro_steps == 4 and s.optimizer_steps == 2 and s.grad_norm > 0
