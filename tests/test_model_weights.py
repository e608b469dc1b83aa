"""Checkpoint layouts: detection, explicit key maps, strictness, canonical round trip, norm stats."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import LEROBOT_FIXTURE, random_batch, require, tiny_policy
from safetensors.torch import load_file, save_file

from ript_ds.model.arch import arch_from_reference_json
from ript_ds.model.normalization import FeatureStats, NormStats
from ript_ds.model.weights import CheckpointError, infer_arch, load_checkpoint, save_canonical, to_canonical


def lerobot_weights() -> dict[str, torch.Tensor]:
    return load_file(str(require(LEROBOT_FIXTURE) / "weights.safetensors"))


def fixture_arch():
    return arch_from_reference_json(json.loads((LEROBOT_FIXTURE / "arch.json").read_text()))


def reference_actions(policy) -> torch.Tensor:
    batch = random_batch(policy.arch, b=2, seed=9)
    noise = torch.randn(
        2, policy.arch.chunk_size, policy.arch.max_action_dim, generator=torch.Generator().manual_seed(1)
    )
    return policy.eval().sample_actions(batch, noise)


def as_lerobot_v03(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    old = {}
    for k, v in w.items():
        k = k.replace("paligemma.model.language_model.", "paligemma.language_model.model.")
        k = k.replace("paligemma.model.vision_tower.", "paligemma.vision_tower.")
        k = k.replace("paligemma.model.multi_modal_projector.", "paligemma.multi_modal_projector.")
        k = k.replace("paligemma.lm_head.", "paligemma.language_model.lm_head.")
        old[k] = v
    old["normalize_inputs.buffer_observation_state.mean"] = torch.arange(8.0)
    old["normalize_inputs.buffer_observation_state.std"] = torch.full((8,), 2.0)
    old["normalize_targets.buffer_action.mean"] = torch.ones(7)
    old["normalize_targets.buffer_action.std"] = torch.full((7,), 0.5)
    old["unnormalize_outputs.buffer_action.mean"] = torch.ones(7)
    old["unnormalize_outputs.buffer_action.std"] = torch.full((7,), 0.5)
    return old


def as_openpi_pytorch(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # openpi's pi0_pytorch.py names PI0's MLP action_time_mlp_* (time_mlp_* is PI0.5's, model/pi05.py)
    return {k.removeprefix("model."): v for k, v in w.items()}


def test_three_reference_layouts_load_to_the_same_network(tmp_path):
    w = lerobot_weights()
    layouts = {"lerobot>=0.4": w, "lerobot<=0.3": as_lerobot_v03(w), "openpi-pytorch": as_openpi_pytorch(w)}
    results = {}
    for name, state in layouts.items():
        d = tmp_path / name.replace("<", "lt").replace(">", "gt").replace("=", "")
        d.mkdir()
        save_file(state, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"chunk_size": 8, "num_inference_steps": 10}))
        loaded = load_checkpoint(d, arch=fixture_arch())
        assert loaded.layout == name
        results[name] = reference_actions(loaded.policy)
    assert torch.equal(results["lerobot>=0.4"], results["lerobot<=0.3"])
    assert torch.equal(results["lerobot>=0.4"], results["openpi-pytorch"])


def test_lerobot_v03_buffers_become_norm_stats(tmp_path):
    save_file(as_lerobot_v03(lerobot_weights()), str(tmp_path / "model.safetensors"))
    stats = load_checkpoint(tmp_path, arch=fixture_arch()).norm_stats
    assert stats is not None and stats.mode == "mean_std"
    np.testing.assert_array_equal(stats.state.mean, np.arange(8.0))
    np.testing.assert_array_equal(stats.actions.std, np.full(7, 0.5))


def test_renamed_key_is_named_in_the_error(tmp_path):
    w = lerobot_weights()
    key = "model.paligemma_with_expert.gemma_expert.model.layers.0.mlp.up_proj.weight"
    w[key.replace("up_proj", "upp_proj")] = w.pop(key)
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, arch=fixture_arch())
    msg = str(err.value)
    assert f"missing keys: {key} (1 in all)" in msg
    assert "unexpected keys: " + key.replace("up_proj", "upp_proj") in msg


def test_many_missing_keys_are_listed_first_ten_and_counted(tmp_path):
    w = {k: v for k, v in lerobot_weights().items() if "vision_tower" not in k}
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: .* \.\.\. \(37 in all\)"):
        load_checkpoint(tmp_path, arch=fixture_arch())


def test_shape_mismatch_and_unknown_layout(tmp_path):
    w = lerobot_weights()
    w["model.state_proj.weight"] = torch.zeros(32, 16)
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*model\.state_proj\.weight \(32, 16\)"):
        load_checkpoint(tmp_path, arch=fixture_arch())
    with pytest.raises(CheckpointError, match="unrecognised PI0 checkpoint layout"):
        to_canonical({"encoder.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_lm_heads_are_dropped_by_name_not_renamed():
    state, layout = to_canonical(lerobot_weights())
    assert layout == "lerobot>=0.4"
    assert not any("lm_head" in k for k in state)
    # The input embedding keeps its own values (an automatic rename would have put lm_head there).
    src = lerobot_weights()["model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"]
    assert torch.equal(state["model.vlm.language_model.embed_tokens.weight"], src)


def test_canonical_round_trip_with_stats_and_arch(tmp_path):
    policy = tiny_policy(seed=4)
    with torch.no_grad():
        policy.cond_embed.weight[1].fill_(0.25)  # ours-only weights survive the round trip
    stats = NormStats(
        state=FeatureStats(mean=np.arange(8.0), std=np.ones(8), q01=-np.ones(8), q99=np.ones(8)),
        actions=FeatureStats(mean=np.zeros(7), std=np.full(7, 2.0), q01=-np.ones(7), q99=np.ones(7)),
        mode="quantile",
    )
    save_canonical(policy, tmp_path, stats)
    loaded = load_checkpoint(tmp_path)  # arch comes from pi0_arch.json
    assert loaded.layout == "canonical" and loaded.policy.arch == policy.arch
    for (k, a), (_, b) in zip(policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert loaded.norm_stats == stats
    assert torch.equal(reference_actions(policy), reference_actions(loaded.policy))


def test_infer_arch_from_shapes():
    state, _ = to_canonical(lerobot_weights())
    arch = infer_arch(state, vision_heads=2, chunk_size=8)
    assert arch == fixture_arch()
    with pytest.raises(CheckpointError, match="vision head count"):
        infer_arch(state)


# ------------------------------------------------------------------------------------------ issue 11
def test_lerobot_v03_norm_stats_are_found_by_the_trainer_and_eval_alike(tmp_path):
    from ript_ds.build import build_components
    from ript_ds.config import load_config
    from ript_ds.model.normalization import load_norm_stats

    save_file(as_lerobot_v03(lerobot_weights()), str(tmp_path / "model.safetensors"))
    (tmp_path / "pi0_arch.json").write_text(json.dumps(fixture_arch().to_dict()))
    stats = load_norm_stats(tmp_path)  # no weights handed in: read from the weights file itself
    assert stats is not None
    np.testing.assert_array_equal(stats.state.mean, np.arange(8.0))
    cfg = load_config(None, [f"model.checkpoint={tmp_path}", f"output_dir={tmp_path / 'out'}"])
    evaluator = build_components(cfg).processor.norm_stats  # launch/eval.py: the policy is loaded here
    trainer = build_components(cfg, policy=load_checkpoint(tmp_path).policy).processor.norm_stats
    assert trainer == evaluator == stats


def test_lerobot_v03_norm_stats_in_a_sharded_checkpoint(tmp_path):
    from ript_ds.model.normalization import load_norm_stats

    w = as_lerobot_v03(lerobot_weights())
    buffers = {k: v for k, v in w.items() if k.startswith("normalize_")}
    rest = {k: v for k, v in w.items() if k not in buffers}
    save_file(rest, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(buffers, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in rest}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in buffers}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    stats = load_norm_stats(tmp_path)
    assert stats is not None
    np.testing.assert_array_equal(stats.actions.std, np.full(7, 0.5))
    assert load_checkpoint(tmp_path, arch=fixture_arch()).norm_stats == stats


def test_damaged_weights_files_are_checkpoint_errors(tmp_path):
    from ript_ds.model.weights import inspect_checkpoint, read_safetensors

    save_canonical(tiny_policy(), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    readers = (read_safetensors, lambda p: inspect_checkpoint(p.parent), lambda p: load_checkpoint(p.parent))
    for read in readers:
        with pytest.raises(CheckpointError, match=r"is truncated \(\d+ bytes, its header describes \d+\)"):
            read(weights)
    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        inspect_checkpoint(tmp_path)
    weights.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        read_safetensors(weights)


def test_inspect_checkpoint_reads_only_the_header_and_checks_like_a_load(tmp_path):
    from ript_ds.model.weights import inspect_checkpoint

    save_file(lerobot_weights(), str(tmp_path / "model.safetensors"))
    (tmp_path / "pi0_arch.json").write_text(json.dumps(fixture_arch().to_dict()))
    expected = replace(fixture_arch(), num_inference_steps=3)
    assert inspect_checkpoint(tmp_path, num_inference_steps=3) == expected
    w = lerobot_weights()
    w["model.state_proj.weight"] = torch.zeros(32, 16)
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*model\.state_proj\.weight \(32, 16\)"):
        inspect_checkpoint(tmp_path)


def test_one_key_check_for_every_loader():
    from ript_ds.model.weights import check_state

    expected = {"a.weight": (2, 3), "cond_embed.weight": (2, 4)}
    check_state(expected, {"a.weight": (2, 3)}, "x")  # cond_embed may be absent (zero-initialised)
    with pytest.raises(CheckpointError, match=r"x: shape mismatch .*a\.weight \(1, 3\) vs \(2, 3\)"):
        check_state(expected, {"a.weight": (1, 3)}, "x")  # broadcastable, still refused
    with pytest.raises(CheckpointError, match=r"missing keys: a\.weight .*unexpected keys: b\.weight"):
        check_state(expected, {"b.weight": (2, 3)}, "x")
