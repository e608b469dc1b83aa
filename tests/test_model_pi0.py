"""PI0Policy behaviour: full-size shape, KV cache, guidance, checkpointing, precision, loss reduction."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_policy

from ript_ds.model.arch import PI0Arch
from ript_ds.model.flow import reduce_loss, sample_noise_time
from ript_ds.model.pi0 import PI0Policy, count_parameters, sinusoidal_time_embedding, unused_parameter_names


def test_full_size_pi0_on_meta_device():
    with torch.device("meta"):
        policy = PI0Policy(PI0Arch())
    n = count_parameters(policy)
    # PaliGemma 3B (2.92 B incl. the 257152 x 2048 text embedding) + Gemma 300M expert without its
    # token embedding + projections: 3.238 B. With the expert's unused embedding it would be 3.50 B.
    assert 3.23e9 < n < 3.25e9, n
    assert policy.model.dit.embed_tokens is None
    assert not any("dit.embed_tokens" in k for k in policy.state_dict())
    assert policy.arch.chunk_size == 50 and policy.arch.vision.tokens_per_image == 256


def test_time_embedding_is_float64_then_cast():
    t = torch.tensor([0.3, 0.8, 1.0], dtype=torch.float32)
    emb = sinusoidal_time_embedding(t, 32, 4e-3, 4.0)
    frac = torch.linspace(0, 1, 16, dtype=torch.float64)
    ang = t.double()[:, None] * (2 * torch.pi / (4e-3 * 1000.0**frac))
    ref = torch.cat([ang.sin(), ang.cos()], dim=1).float()
    assert emb.dtype == torch.float32
    assert torch.equal(emb, ref)


def test_kv_cache_sampling_equals_recomputed_prefix():
    policy = tiny_policy().eval()
    batch = random_batch(policy.arch)
    batch.image_masks[1, 1] = False  # a masked camera must behave the same on both paths
    noise = torch.randn(3, policy.arch.chunk_size, policy.arch.max_action_dim)
    cached = policy.sample_actions(batch, noise, num_steps=10)
    recomputed = policy.sample_actions(batch, noise, num_steps=10, use_cache=False)
    assert (cached - recomputed).abs().max() <= 1e-5


def test_zero_condition_guidance_equals_plain_model():
    policy = tiny_policy().eval()
    batch = random_batch(policy.arch)
    noise = torch.randn(3, policy.arch.chunk_size, policy.arch.max_action_dim)
    plain = policy.sample_actions(batch, noise)
    guided = {w: policy.sample_actions(batch, noise, guidance=w) for w in (0.0, 1.0, 2.5)}
    for out in guided.values():
        assert torch.equal(out, plain)
    # The doubled 2B-row forward itself agrees with the plain one up to GEMM rounding.
    with torch.no_grad():
        policy.cond_embed.weight[1, 0] = 1e-30  # distinct rows force the batched two-branch path
    doubled = policy.sample_actions(batch, noise, guidance=2.5)
    assert (doubled - plain).abs().max() <= 1e-5


def test_nonzero_condition_is_guided():
    policy = tiny_policy().eval()
    with torch.no_grad():
        policy.cond_embed.weight[1].normal_()
    batch = random_batch(policy.arch)
    noise = torch.randn(3, policy.arch.chunk_size, policy.arch.max_action_dim)
    plain = policy.sample_actions(batch, noise)
    none_only = policy.sample_actions(batch, noise, guidance=0.0)
    cond_only = policy.sample_actions(batch, noise, guidance=1.0)
    strong = policy.sample_actions(batch, noise, guidance=3.0)
    assert (none_only - plain).abs().max() <= 1e-6  # w=0 is the base policy (c=none row is unchanged)
    assert (cond_only - plain).abs().max() > 1e-3
    assert (strong - cond_only).abs().max() > 1e-3
    # w=1 must be the conditional model alone: compare with a direct c=positive velocity at t=1.
    t1 = torch.ones(3)
    v_pos = policy.velocity(batch, noise, t1, torch.ones(3, dtype=torch.long))
    one_step = policy.sample_actions(batch, noise, num_steps=1, guidance=1.0)
    assert (one_step - (noise - v_pos)).abs().max() <= 1e-5
    # ... computed as one branch of B rows (the default of rollouts, eval and serving), not 2B; the 2B
    # formula at w = 1 + 1e-7 is the same within rounding.
    rows: list[int] = []
    original = policy._denoise_cached
    policy._denoise_cached = lambda cache, pad, suffix, ada=None: (
        rows.append(suffix.shape[0]) or original(cache, pad, suffix, ada)
    )
    assert torch.equal(policy.sample_actions(batch, noise, guidance=1.0), cond_only) and set(rows) == {3}
    rows.clear()
    two_branch = policy.sample_actions(batch, noise, guidance=1.0 + 1e-7)
    assert set(rows) == {6} and (two_branch - cond_only).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_identical_gradients():
    policy = tiny_policy().train()
    batch = random_batch(policy.arch)
    noise = torch.randn(3, policy.arch.chunk_size, policy.arch.max_action_dim)
    time = torch.tensor([0.2, 0.5, 0.9])
    cond = torch.tensor([0, 1, 1])

    def grads(model: PI0Policy) -> dict[str, torch.Tensor]:
        model.zero_grad()
        reduce_loss(model.loss(batch, noise, time, cond), None, 7).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(policy)
    ckpt_model = copy.deepcopy(policy)
    ckpt_model.set_gradient_checkpointing(True)
    ckpt = grads(ckpt_model)
    assert plain.keys() == ckpt.keys()
    # Every parameter but the ones PI0 never reads receives a gradient.
    unused = set(unused_parameter_names(policy.arch))
    assert set(plain) == {n for n, _ in policy.named_parameters()} - unused
    worst = max((plain[n] - ckpt[n]).abs().max().item() for n in plain)
    assert worst <= 1e-6, worst


def test_checkpointing_really_recomputes():
    """With checkpointing on, fewer activations are kept alive for backward."""
    policy = tiny_policy(chunk_size=8).train()
    batch = random_batch(policy.arch, b=4)
    noise = torch.randn(4, 8, 32)
    time = torch.full((4,), 0.5)

    def saved_bytes(enabled: bool) -> int:
        policy.set_gradient_checkpointing(enabled)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            policy.loss(batch, noise, time)
        return total

    assert saved_bytes(True) < 0.6 * saved_bytes(False)


def test_bfloat16_keeps_reference_fp32_parts():
    policy = tiny_policy().set_precision(torch.bfloat16)
    dtypes = {n: p.dtype for n, p in policy.named_parameters()}
    assert dtypes["model.vlm.language_model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.dit.layers.1.mlp.down_proj.weight"] == torch.bfloat16
    for fp32 in (
        "model.vlm.vision_tower.encoder.layers.0.mlp.fc1.weight",
        "model.vlm.multi_modal_projector.linear.weight",
        "model.vlm.language_model.layers.0.input_layernorm.weight",
        "model.dit.layers.0.post_attention_layernorm.weight",
        "model.dit.norm.weight",
        "embed_action_time.action_in_proj.weight",
        "action_out_proj.weight",
    ):
        assert dtypes[fp32] == torch.float32, fp32
    ref = tiny_policy()
    batch = random_batch(ref.arch)
    noise = torch.randn(3, ref.arch.chunk_size, ref.arch.max_action_dim)
    time = torch.tensor([0.2, 0.5, 0.9])
    lo = policy.loss(batch, noise, time)
    hi = ref.loss(batch, noise, time)
    assert lo.dtype == torch.float32
    assert (lo - hi).abs().max() / hi.abs().max() < 0.05  # bf16 is loose by nature
    with pytest.raises(ValueError, match="unsupported dtype"):
        policy.set_precision(torch.float16)


def test_reduce_loss_over_valid_steps_and_real_dims():
    per = torch.zeros(2, 3, 4)
    per[0, :, :2] = torch.tensor([[1.0, 3.0], [5.0, 7.0], [100.0, 100.0]])
    per[0, :, 2:] = 1000.0  # padded action dims never count
    per[1] = 9.0
    mask = torch.tensor([[True, True, False], [False, False, False]])
    # sample 0: steps 0,1 over dims 0,1: (1+3+5+7)/4 = 4; sample 1: no valid step -> 0, not NaN
    assert torch.equal(reduce_loss(per, mask, action_dim=2), torch.tensor([4.0, 0.0]))
    assert torch.allclose(reduce_loss(per[:1], None, 2), torch.tensor([(4 + 12 + 200) / 6.0]))


def test_loss_needs_actions():
    policy = tiny_policy()
    batch = random_batch(policy.arch)
    batch.actions = None
    with pytest.raises(ValueError, match="target actions"):
        policy.loss(batch, torch.zeros(3, 8, 32), torch.ones(3))


def test_sample_noise_time_follows_pi0_distributions():
    """The one sampler of training draws (RL update and BC): N(0, 1) noise, Beta(1.5, 1) time."""
    arch = PI0Arch.tiny()
    noise, t = sample_noise_time(arch, 20_000, np.random.default_rng(0))
    assert noise.shape == (20_000, arch.chunk_size, arch.max_action_dim) and noise.dtype == torch.float32
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1.0) < 0.01
    assert t.dtype == torch.float32 and t.min() >= 0.001 and t.max() <= 1.0
    assert abs(t.mean().item() - (0.6 * 0.999 + 0.001)) < 0.01  # Beta(1.5, 1) has mean 0.6
    assert abs((t < 0.5).float().mean().item() - 0.5**1.5) < 0.01  # CDF x^1.5
    again = sample_noise_time(arch, 20_000, np.random.default_rng(0))
    torch.testing.assert_close(t, again[1])
    torch.testing.assert_close(noise, again[0])


def test_bf16_precision_keeps_the_reference_fp32_parts_in_fp32():
    """model.pi0.precision(bf16): the Gemma stacks compute in bf16, while the vision tower, projector,
    state/action/time projections and the output head stay fp32 (what the reference keeps fp32)."""
    from ript_ds.model.pi0 import precision

    policy = tiny_policy().eval()
    seen: dict[str, torch.dtype] = {}
    watch = {
        "vision": policy.model.vlm.multi_modal_projector.linear,
        "action_in": policy.embed_action_time.action_in_proj,
        "time_mlp": policy.embed_action_time.action_time_mlp_out,
        "out": policy.action_out_proj,
        "gemma_q": policy.model.dit.layers[0].self_attn.q_proj,
    }
    for name, module in watch.items():
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    batch = random_batch(policy.arch, b=2)
    noise = torch.randn(2, policy.arch.chunk_size, policy.arch.max_action_dim)
    with precision("cpu", "bfloat16"):
        bf16 = policy.sample_actions(batch, noise, num_steps=2)
    assert seen == {
        "vision": torch.float32,
        "action_in": torch.float32,
        "time_mlp": torch.float32,
        "out": torch.float32,
        "gemma_q": torch.bfloat16,
    }, seen
    with precision("cpu", "float32"):
        fp32 = policy.sample_actions(batch, noise, num_steps=2)
    assert seen["gemma_q"] == torch.float32 and bf16.dtype == fp32.dtype == torch.float32
    assert 0 < (bf16 - fp32).abs().max() < 0.1  # bf16 rounding, nothing else


def test_guidance_with_equal_but_nonzero_condition_rows_keeps_the_condition():
    policy = tiny_policy().eval()
    with torch.no_grad():
        policy.cond_embed.weight.copy_(torch.randn(1, policy.cond_embed.weight.shape[1]).repeat(2, 1))
    batch = random_batch(policy.arch, b=2)
    noise = torch.randn(2, policy.arch.chunk_size, policy.arch.max_action_dim)
    guided = policy.sample_actions(batch, noise, num_steps=2, guidance=1.5)
    plain = policy.sample_actions(batch, noise, num_steps=2, guidance=None)
    with torch.no_grad():
        policy.cond_embed.weight[0].add_(1e-3)  # rows differ: the full two-branch path
    two_branch = policy.sample_actions(batch, noise, num_steps=2, guidance=1.0)  # w=1: conditional only
    assert not torch.allclose(guided, plain)  # the shared non-zero row is still added
    assert torch.allclose(guided, two_branch, atol=1e-5)
