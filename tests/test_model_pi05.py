"""PI05Policy: full-size shape, the adaptive norms, and the PI0 interface (cache, guidance, checkpointing,
precision, LoRA targets) unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import random_batch, randomize

from ript_ds.config import LoraCfg
from ript_ds.engine.lora import lora_target_names
from ript_ds.model.arch import PI0Arch
from ript_ds.model.flow import reduce_loss
from ript_ds.model.pi0 import PI0Policy, count_parameters, precision, unused_parameter_names
from ript_ds.model.pi05 import AdaptiveNorm, PI05Policy, make_policy


def tiny_pi05(seed: int = 0, **arch_kwargs) -> PI05Policy:
    torch.manual_seed(seed)
    return randomize(PI05Policy(PI0Arch.tiny(model_type="pi05", **arch_kwargs)), seed)


def expected_pi05_parameters(a: PI0Arch) -> int:
    """By hand from the architecture (openpi pi0.py with pi05=True; gemma.py; siglip.py)."""
    v = a.vision
    siglip = v.patch_size**2 * 3 * v.width + v.width + v.tokens_per_image * v.width  # patches, positions
    siglip += v.depth * (2 * 2 * v.width + 4 * (v.width**2 + v.width) + 2 * v.width * v.mlp_dim)
    siglip += v.depth * (v.mlp_dim + v.width) + 2 * v.width  # MLP biases; post-LN
    projector = v.width * a.vlm.width + a.vlm.width

    def attention_mlp(g) -> int:
        q_o = 2 * g.width * g.num_heads * g.head_dim
        k_v = 2 * g.width * g.num_kv_heads * g.head_dim
        return q_o + k_v + 3 * g.width * g.mlp_dim

    e = a.expert
    vlm = a.vocab_size * a.vlm.width + a.vlm.depth * (attention_mlp(a.vlm) + 2 * a.vlm.width) + a.vlm.width
    adaptive_norm = e.width * 3 * e.width + 3 * e.width  # Dense(D -> 3D) with bias, no scale vector
    expert = e.depth * (attention_mlp(e) + 2 * adaptive_norm) + adaptive_norm  # no token embedding
    heads = 2 * (a.max_action_dim * e.width) + e.width + a.max_action_dim  # action_in_proj, action_out_proj
    heads += 2 * (e.width * e.width + e.width)  # time_mlp_in, time_mlp_out; no state_proj
    return siglip + projector + vlm + expert + heads + 2 * e.width  # + our condition embedding


def test_full_size_pi05_on_meta_device():
    arch = PI0Arch(model_type="pi05")
    with torch.device("meta"):
        policy = make_policy(arch)
    assert isinstance(policy, PI05Policy)
    n = count_parameters(policy)
    assert n == expected_pi05_parameters(arch) == 3_353_435_920, n
    # PI0 + 37 adaptive norms (116.5 M) - its norm scales, state_proj and the wider action-time MLP
    with torch.device("meta"):
        assert n - count_parameters(make_policy(PI0Arch())) == 115_385_344
    assert policy.model.dit.embed_tokens is None  # never the 257152 x 1024 expert embedding
    keys = policy.state_dict()
    assert not any("dit.embed_tokens" in k or "state_proj" in k or "action_time_mlp" in k for k in keys)
    assert not any(k.startswith("model.dit.") and k.endswith("layernorm.weight") for k in keys)
    assert keys["model.dit.norm.dense.weight"].shape == (3072, 1024)
    assert keys["model.dit.layers.17.input_layernorm.dense.bias"].shape == (3072,)


def test_arch_model_type_round_trip_and_old_files_are_pi0():
    arch = PI0Arch.tiny(model_type="pi05")
    assert PI0Arch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    old = PI0Arch.tiny().to_dict()
    del old["model_type"]  # every pi0_arch.json written before pi0.5
    assert PI0Arch.from_dict(old).model_type == "pi0"
    with pytest.raises(ValueError, match="model_type"):
        PI0Arch(model_type="pi0_fast")
    with pytest.raises(ValueError, match="make_policy"):
        PI0Policy(arch)
    with pytest.raises(ValueError, match="make_policy"):
        PI05Policy(PI0Arch.tiny())
    assert type(make_policy(PI0Arch.tiny())) is PI0Policy


def test_adaptive_norm_formula_and_init():
    torch.manual_seed(0)
    norm = AdaptiveNorm(4, eps=1e-6)
    assert "RMSNorm" not in type(norm).__name__  # transformers' _init_weights zeroes those by name
    x, cond = torch.randn(2, 3, 4), torch.randn(2, 4)
    y, gate = norm(x, cond)  # zero init: scale = shift = gate = 0
    assert torch.equal(gate, torch.zeros(2, 1, 4))
    torch.testing.assert_close(y, x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6))
    with torch.no_grad():
        norm.dense.weight.normal_()
        norm.dense.bias.normal_()
    y, gate = norm(x, cond)
    scale, shift, g = (norm.dense(cond)[:, None]).chunk(3, dim=-1)  # in that order
    normed = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y, normed * (1 + scale) + shift)
    torch.testing.assert_close(gate, g)


def test_fresh_pi05_has_zero_modulations_and_no_state_input():
    policy = PI05Policy(PI0Arch.tiny(model_type="pi05"))
    dense = [m.dense for m in policy.modules() if isinstance(m, AdaptiveNorm)]
    assert len(dense) == 2 * policy.arch.expert.depth + 1
    assert all(torch.count_nonzero(d.weight) == 0 and torch.count_nonzero(d.bias) == 0 for d in dense)
    policy = tiny_pi05().eval()
    batch = random_batch(policy.arch)
    noise = torch.randn(3, policy.arch.chunk_size, policy.arch.max_action_dim)
    ref = policy.sample_actions(batch, noise, num_steps=3)
    batch.state = torch.randn_like(batch.state)  # pi0.5's network never reads the state
    assert torch.equal(policy.sample_actions(batch, noise, num_steps=3), ref)
    assert policy.embed_suffix(batch.state, noise, torch.ones(3), None).shape == (3, 8, 32)  # H tokens


def test_time_enters_through_the_norms_only():
    policy = tiny_pi05().eval()
    x_t = torch.randn(2, policy.arch.chunk_size, policy.arch.max_action_dim)
    a = policy.embed_suffix(None, x_t, torch.tensor([0.1, 0.2]), None)
    b = policy.embed_suffix(None, x_t, torch.tensor([0.7, 0.9]), None)
    assert torch.equal(a, b)
    batch = random_batch(policy.arch, b=2)
    v1 = policy.velocity(batch, x_t, torch.tensor([0.1, 0.2]))
    v2 = policy.velocity(batch, x_t, torch.tensor([0.7, 0.9]))
    assert (v1 - v2).abs().max() > 1e-3


def test_kv_cache_sampling_equals_recomputed_prefix():
    policy = tiny_pi05().eval()
    batch = random_batch(policy.arch)
    batch.image_masks[1, 1] = False
    noise = torch.randn(3, policy.arch.chunk_size, policy.arch.max_action_dim)
    cached = policy.sample_actions(batch, noise, num_steps=10)
    recomputed = policy.sample_actions(batch, noise, num_steps=10, use_cache=False)
    assert (cached - recomputed).abs().max() <= 1e-5


def test_masked_camera_and_padded_text_take_no_attention():
    policy = tiny_pi05().eval()
    batch = random_batch(policy.arch)
    batch.image_masks[1, 0] = False
    noise = torch.randn(3, policy.arch.chunk_size, policy.arch.max_action_dim)
    time = torch.tensor([0.3, 0.6, 0.9])
    ref_actions, ref_loss = policy.sample_actions(batch, noise), policy.loss(batch, noise, time)
    batch.images[1, 0] = torch.rand_like(batch.images[1, 0])
    batch.tokens[~batch.token_masks] = 7
    assert torch.equal(policy.sample_actions(batch, noise), ref_actions)
    assert torch.equal(policy.loss(batch, noise, time), ref_loss)


def test_guidance_with_the_condition_embedding():
    policy = tiny_pi05().eval()
    batch = random_batch(policy.arch)
    noise = torch.randn(3, policy.arch.chunk_size, policy.arch.max_action_dim)
    plain = policy.sample_actions(batch, noise)
    assert all(torch.equal(policy.sample_actions(batch, noise, guidance=w), plain) for w in (0.0, 2.0))
    with torch.no_grad():
        policy.cond_embed.weight[1].normal_()
    none_only = policy.sample_actions(batch, noise, guidance=0.0)
    cond_only = policy.sample_actions(batch, noise, guidance=1.0)
    assert (none_only - plain).abs().max() <= 1e-6  # w=0: the base policy
    assert (cond_only - plain).abs().max() > 1e-3  # the embedding reaches pi0.5's action tokens
    v_pos = policy.velocity(batch, noise, torch.ones(3), torch.ones(3, dtype=torch.long))
    one_step = policy.sample_actions(batch, noise, num_steps=1, guidance=1.0)
    assert (one_step - (noise - v_pos)).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_identical_gradients():
    policy = tiny_pi05().train()
    batch = random_batch(policy.arch)
    noise = torch.randn(3, policy.arch.chunk_size, policy.arch.max_action_dim)
    time, cond = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 1, 1])

    def grads(model: PI0Policy) -> dict[str, torch.Tensor]:
        model.zero_grad()
        reduce_loss(model.loss(batch, noise, time, cond), None, 7).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(policy)
    ckpt_model = copy.deepcopy(policy)
    ckpt_model.set_gradient_checkpointing(True)
    ckpt = grads(ckpt_model)
    unused = set(unused_parameter_names(policy.arch))
    assert set(plain) == set(ckpt) == {n for n, _ in policy.named_parameters()} - unused
    assert "model.dit.norm.dense.weight" in plain and "embed_action_time.time_mlp_in.weight" in plain
    assert max((plain[n] - ckpt[n]).abs().max().item() for n in plain) <= 1e-6


def test_bfloat16_keeps_the_norms_and_projections_in_fp32():
    policy = tiny_pi05().set_precision(torch.bfloat16)
    dtypes = {n: p.dtype for n, p in policy.named_parameters()}
    assert dtypes["model.dit.layers.1.mlp.down_proj.weight"] == torch.bfloat16
    for name in (
        "model.dit.layers.0.input_layernorm.dense.weight",
        "model.dit.layers.1.post_attention_layernorm.dense.bias",
        "model.dit.norm.dense.weight",
        "embed_action_time.time_mlp_in.weight",
        "embed_action_time.action_in_proj.weight",
        "action_out_proj.weight",
        "cond_embed.weight",
    ):
        assert dtypes[name] == torch.float32, name
    ref = tiny_pi05().eval()
    batch = random_batch(ref.arch, b=2)
    noise = torch.randn(2, ref.arch.chunk_size, ref.arch.max_action_dim)
    with precision("cpu", "bfloat16"):
        bf16 = ref.sample_actions(batch, noise, num_steps=2)
    fp32 = ref.sample_actions(batch, noise, num_steps=2)
    assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max() < 0.2


def test_lora_targets_are_the_same_projections_as_pi0():
    pi0, pi05 = PI0Policy(PI0Arch.tiny()), PI05Policy(PI0Arch.tiny(model_type="pi05"))
    for target in ("both", "vlm", "expert"):
        lora = LoraCfg(enabled=True, target=target)
        assert lora_target_names(pi05, lora) == lora_target_names(pi0, lora)


def test_zero_init_names_cover_the_adaptive_norms():
    """The engine re-zeroes these under ZeRO-3 (zero.Init swallows __init__'s zeros): the condition
    embedding and every adaptive-norm parameter (whose nn.Linear init would otherwise be random there)."""
    policy = PI05Policy(PI0Arch.tiny(model_type="pi05"))
    names = set(policy.zero_init_names())
    params = dict(policy.named_parameters())
    assert all(torch.count_nonzero(params[n]) == 0 for n in names)
    adaptive = {
        f"{m}.{n}"
        for m, mod in policy.named_modules()
        if isinstance(mod, AdaptiveNorm)
        for n, _ in mod.named_parameters()
    }
    assert names == adaptive | {"cond_embed.weight"} and len(adaptive) == 2 * (
        2 * policy.arch.expert.depth + 1
    )
    assert PI0Policy(PI0Arch.tiny()).zero_init_names() == ("cond_embed.weight",)
