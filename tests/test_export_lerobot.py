"""The lerobot-layout export holds exactly what lerobot 0.6.1's PI0Policy loads strictly, reads back
bit for bit, and tools/export.py exports any loadable checkpoint directory (canonical, lerobot).

The expected key set is a rule written from lerobot 0.6.1's module structure (not from our output), and
is itself checked against fixture A, which is lerobot's own `PI0Policy.state_dict()`.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import LEROBOT_FIXTURE, load_script, random_batch, require, tiny_policy
from safetensors.torch import load_file, save_file

from ript_ds.ckpt.export import save_lerobot
from ript_ds.model.arch import PI0Arch, arch_from_reference_json
from ript_ds.model.normalization import FeatureStats, NormStats
from ript_ds.model.weights import CheckpointError, load_checkpoint, read_header, save_canonical

PWE = "model.paligemma_with_expert."


def _linear(keys: dict, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    keys[f"{name}.weight"] = (n_out, n_in)
    if bias:
        keys[f"{name}.bias"] = (n_out,)


def _gemma(keys: dict, prefix: str, a) -> None:
    """lerobot's PiGemmaModel without adaRMS: Gemma attention and MLP without biases, PiGemmaRMSNorm with
    `weight` only; the rotary table is a non-persistent buffer (not in the state dict)."""
    for i in range(a.depth):
        layer = f"{prefix}layers.{i}."
        _linear(keys, layer + "self_attn.q_proj", a.width, a.num_heads * a.head_dim, bias=False)
        _linear(keys, layer + "self_attn.k_proj", a.width, a.num_kv_heads * a.head_dim, bias=False)
        _linear(keys, layer + "self_attn.v_proj", a.width, a.num_kv_heads * a.head_dim, bias=False)
        _linear(keys, layer + "self_attn.o_proj", a.num_heads * a.head_dim, a.width, bias=False)
        _linear(keys, layer + "mlp.gate_proj", a.width, a.mlp_dim, bias=False)
        _linear(keys, layer + "mlp.up_proj", a.width, a.mlp_dim, bias=False)
        _linear(keys, layer + "mlp.down_proj", a.mlp_dim, a.width, bias=False)
        keys[layer + "input_layernorm.weight"] = (a.width,)
        keys[layer + "post_attention_layernorm.weight"] = (a.width,)
    keys[prefix + "norm.weight"] = (a.width,)


def lerobot_pi0_shapes(arch: PI0Arch) -> dict[str, tuple[int, ...]]:
    """lerobot 0.6.1 PI0Policy's state dict (key -> shape), from modeling_pi0.py and pi_gemma.py on
    transformers 5.5.4: `model` is PI0Pytorch, whose `paligemma_with_expert` holds
    - `paligemma`: PaliGemmaForConditionalGenerationWithPiGemma = `model` (PaliGemmaModel: SiglipVisionModel
      `vision_tower.vision_model` without head, `multi_modal_projector.linear`, PiGemmaModel
      `language_model` with `embed_tokens`) and `lm_head` (vocab x width, no bias; transformers 5 ties
      weights only in from_pretrained, so lerobot's module has its own head and loads it strictly);
    - `gemma_expert`: PiGemmaForCausalLM = `model` (PiGemmaModel, `embed_tokens` set to None) and `lm_head`;
    plus five nn.Linear projections. lerobot gives both vocabularies the same size."""
    g, e, v = arch.vlm, arch.expert, arch.vision
    keys: dict[str, tuple[int, ...]] = {}
    _linear(keys, "model.action_in_proj", arch.max_action_dim, e.width)
    _linear(keys, "model.action_out_proj", e.width, arch.max_action_dim)
    _linear(keys, "model.state_proj", arch.max_state_dim, e.width)
    _linear(keys, "model.action_time_mlp_in", 2 * e.width, e.width)
    _linear(keys, "model.action_time_mlp_out", e.width, e.width)
    lm = PWE + "paligemma.model.language_model."
    keys[lm + "embed_tokens.weight"] = (arch.vocab_size, g.width)
    _gemma(keys, lm, g)
    keys[PWE + "paligemma.lm_head.weight"] = (arch.vocab_size, g.width)
    _linear(keys, PWE + "paligemma.model.multi_modal_projector.linear", v.width, g.width)
    vt = PWE + "paligemma.model.vision_tower.vision_model."
    keys[vt + "embeddings.patch_embedding.weight"] = (v.width, 3, v.patch_size, v.patch_size)
    keys[vt + "embeddings.patch_embedding.bias"] = (v.width,)
    keys[vt + "embeddings.position_embedding.weight"] = (v.tokens_per_image, v.width)
    for i in range(v.depth):
        layer = f"{vt}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(keys, layer + "self_attn." + proj, v.width, v.width)
        for norm in ("layer_norm1", "layer_norm2"):
            keys[f"{layer}{norm}.weight"], keys[f"{layer}{norm}.bias"] = (v.width,), (v.width,)
        _linear(keys, layer + "mlp.fc1", v.width, v.mlp_dim)
        _linear(keys, layer + "mlp.fc2", v.mlp_dim, v.width)
    keys[vt + "post_layernorm.weight"], keys[vt + "post_layernorm.bias"] = (v.width,), (v.width,)
    _gemma(keys, PWE + "gemma_expert.model.", e)
    keys[PWE + "gemma_expert.lm_head.weight"] = (arch.vocab_size, e.width)
    return keys


def _header(directory) -> dict[str, tuple[int, ...]]:
    return read_header(directory / "model.safetensors")


def _outputs(policy) -> dict[str, torch.Tensor]:
    arch = policy.arch
    batch = random_batch(arch, b=2, seed=3)
    noise = torch.randn(2, arch.chunk_size, arch.max_action_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return {
            "loss": policy.train().loss(batch, noise, torch.tensor([0.3, 0.8])),
            "actions": policy.eval().sample_actions(batch, noise),
        }


def _assert_same_outputs(a, b) -> None:
    oa, ob = _outputs(a), _outputs(b)
    for name in oa:
        assert torch.equal(oa[name], ob[name]), name


def _stats() -> NormStats:
    return NormStats(
        state=FeatureStats(mean=np.arange(8.0), std=np.full(8, 2.0)),
        actions=FeatureStats(mean=np.ones(7), std=np.full(7, 0.5)),
    )


def test_rule_matches_lerobots_own_state_dict():
    """The rule reproduces fixture A, lerobot 0.6.1's own PI0Policy.state_dict() (keys and shapes)."""
    fixture = require(LEROBOT_FIXTURE)
    arch = arch_from_reference_json(json.loads((fixture / "arch.json").read_text()))
    assert lerobot_pi0_shapes(arch) == read_header(fixture / "weights.safetensors")


def test_lerobot_export_has_exactly_lerobots_keys(tmp_path):
    policy = tiny_policy(seed=2)
    save_lerobot(policy, tmp_path)
    assert _header(tmp_path) == lerobot_pi0_shapes(policy.arch)  # no missing, no unexpected key
    tensors = load_file(str(tmp_path / "model.safetensors"))
    embedding = tensors[PWE + "paligemma.model.language_model.embed_tokens.weight"]
    head = tensors[PWE + "paligemma.lm_head.weight"]
    assert head.dtype == embedding.dtype == torch.float32 and torch.equal(head, embedding)  # tied, exact
    expert_head = tensors[PWE + "gemma_expert.lm_head.weight"]
    assert expert_head.dtype == torch.bfloat16 and not expert_head.any()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["type"] == "pi0" and config["image_resolution"] == [32, 32]


def test_lerobot_export_round_trip_is_bit_identical(tmp_path):
    policy = tiny_policy(seed=2)
    save_lerobot(policy, tmp_path, _stats())
    loaded = load_checkpoint(tmp_path)
    assert loaded.layout == "lerobot>=0.4" and loaded.policy.arch == policy.arch
    assert loaded.norm_stats == _stats()
    ours, back = policy.state_dict(), loaded.policy.state_dict()
    assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)
    _assert_same_outputs(policy, loaded.policy)


@pytest.mark.parametrize(
    "extra",
    [
        PWE + "paligemma.model.lm_head.weight",  # an lm_head somewhere else
        PWE + "gemma_expert.model.lm_head.weight",
        "model.lm_head.weight",
    ],
)
def test_only_the_known_unused_heads_are_dropped(tmp_path, extra):
    policy = tiny_policy(seed=2)
    save_lerobot(policy, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors[extra] = torch.zeros(policy.arch.vocab_size, policy.arch.vlm.width)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    # Named either as a key that maps nowhere or as one the network does not have: never dropped.
    with pytest.raises(CheckpointError, match=r"(map to nothing|unexpected keys): " + re.escape(extra)):
        load_checkpoint(tmp_path)


def _export(args: list[str]) -> int:
    return load_script("tools/export.py").main([str(a) for a in args])


def test_tool_exports_a_canonical_checkpoint(tmp_path, capsys):
    policy = tiny_policy(seed=6)
    save_canonical(policy, tmp_path / "in", _stats())
    assert _export([tmp_path / "in", "--out", tmp_path / "out", "--lerobot", tmp_path / "lr"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layout"] == "canonical" and summary["tag"] is None and summary["norm_stats"] is True
    for name in ("model.safetensors", "pi0_arch.json", "norm_stats.json"):
        assert (tmp_path / "out" / name).exists(), name
    out, lr = load_checkpoint(tmp_path / "out"), load_checkpoint(tmp_path / "lr")
    assert out.layout == "canonical" and lr.layout == "lerobot>=0.4"
    assert out.norm_stats == lr.norm_stats == _stats()
    assert _header(tmp_path / "lr") == lerobot_pi0_shapes(policy.arch)
    _assert_same_outputs(policy, out.policy)
    _assert_same_outputs(policy, lr.policy)


def test_tool_exports_lerobots_own_checkpoint(tmp_path, capsys):
    """Fixture A as lerobot saves it (its own, untied lm_heads), sizes from --arch."""
    fixture = require(LEROBOT_FIXTURE)
    (tmp_path / "in").mkdir()
    shutil.copyfile(fixture / "weights.safetensors", tmp_path / "in" / "model.safetensors")
    arch = arch_from_reference_json(json.loads((fixture / "arch.json").read_text()))
    (tmp_path / "arch.json").write_text(json.dumps(arch.to_dict()))
    args = [
        tmp_path / "in",
        "--out",
        tmp_path / "out",
        "--lerobot",
        tmp_path / "lr",
        "--arch",
        tmp_path / "arch.json",
    ]
    assert _export(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layout"] == "lerobot>=0.4"
    direct = load_checkpoint(tmp_path / "in", arch=arch)
    out = load_checkpoint(tmp_path / "out")
    assert out.layout == "canonical" and out.policy.arch == arch  # pi0_arch.json written
    _assert_same_outputs(direct.policy, out.policy)
    _assert_same_outputs(direct.policy, load_checkpoint(tmp_path / "lr").policy)
    # Every tensor lerobot has comes back unchanged but its two unused heads, which ours regenerates.
    ours, theirs = (
        load_file(str(tmp_path / "lr" / "model.safetensors")),
        load_file(str(tmp_path / "in" / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    changed = sorted(k for k in ours if not torch.equal(ours[k], theirs[k]))
    assert changed == [PWE + "gemma_expert.lm_head.weight", PWE + "paligemma.lm_head.weight"]


def _truncated(tmp_path):
    d = tmp_path / "trunc"
    save_canonical(tiny_policy(seed=1), d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


def _jax_dir(tmp_path):
    (tmp_path / "jax" / "params").mkdir(parents=True)
    (tmp_path / "jax" / "params" / "_METADATA").write_text("{}")
    return tmp_path / "jax"


def _canonical(tmp_path):
    save_canonical(tiny_policy(seed=1), tmp_path / "canon")
    return tmp_path / "canon"


@pytest.mark.parametrize(
    ("make", "extra", "needle"),
    [
        (lambda p: p / "missing", [], "does not exist"),
        (lambda p: p, [], "nothing to export"),
        (_truncated, [], "truncated"),
        (_jax_dir, [], "convert_openpi_jax.py"),
        (_canonical, ["--base", "x"], "--base is for LoRA"),
        (_canonical, ["--arch", "missing.json"], "--arch"),
        (_canonical, ["--out", "SELF"], "is the input checkpoint"),
    ],
)
def test_tool_bad_input_exits_2_with_one_line(tmp_path, capsys, make, extra, needle):
    src = make(tmp_path)
    out = ["--out", tmp_path / "o"] if "--out" not in extra else []
    extra = [src if a == "SELF" else a for a in extra]
    assert _export([src, *out, *extra]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export: ") and needle in err[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
