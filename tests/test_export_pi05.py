"""PI0.5 out of ript-ds: the lerobot layout (lerobot's own pi05 key set), tools/export.py, inspect_ckpt and
estimate_memory."""

from __future__ import annotations

import json

import torch
from conftest import FIXTURES, load_script, require
from safetensors import safe_open
from test_model_parity_pi05 import PI05_FIXTURE, fixture_arch, run_tool

from ript_ds.ckpt.export import save_lerobot
from ript_ds.memory.activations import parameter_inventory
from ript_ds.model.arch import PI0Arch
from ript_ds.model.normalization import FeatureStats, NormStats
from ript_ds.model.pi05 import PI05Policy, make_policy
from ript_ds.model.weights import CANONICAL_WEIGHTS, load_checkpoint, load_weights_file, save_canonical


def _shapes(file) -> dict[str, tuple[int, ...]]:
    with safe_open(str(file), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _fixture_policy() -> PI05Policy:
    policy = make_policy(fixture_arch())
    load_weights_file(policy, require(PI05_FIXTURE) / "weights.safetensors")
    return policy


def _stats() -> NormStats:
    def feature(dims: int, q: float) -> FeatureStats:
        return FeatureStats.from_dict(
            {"mean": [0.0] * dims, "std": [1.0] * dims, "q01": [-q] * dims, "q99": [q] * dims}
        )

    return NormStats(state=feature(8, 1.0), actions=feature(7, 2.0), mode="quantile")


def test_lerobot_layout_of_a_pi05_is_lerobots_own(tmp_path):
    policy = _fixture_policy()
    save_lerobot(policy, tmp_path, _stats())
    # the same names and shapes lerobot 0.6.1's PI05Policy saved (strict from_pretrained needs exactly them)
    assert _shapes(tmp_path / CANONICAL_WEIGHTS) == _shapes(PI05_FIXTURE / "weights.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["type"] == "pi05"
    loaded = load_checkpoint(tmp_path)
    assert isinstance(loaded.policy, PI05Policy) and loaded.layout == "lerobot>=0.4"
    a, b = policy.state_dict(), loaded.policy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = run_tool("--fixture", str(PI05_FIXTURE), "--weights", str(tmp_path / CANONICAL_WEIGHTS))
    assert out.returncode == 0, out.stderr


def test_export_tool_on_a_pi05_checkpoint(tmp_path):
    save_canonical(_fixture_policy(), tmp_path / "in", _stats())
    export = load_script("tools/export.py")
    rc = export.main(
        [str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--lerobot", str(tmp_path / "lr")]
    )
    assert rc == 0
    for name, layout in (("out", "canonical"), ("lr", "lerobot>=0.4")):
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.layout == layout and loaded.policy.arch.model_type == "pi05"
        assert loaded.norm_stats.mode == "quantile"
        out = run_tool("--fixture", str(PI05_FIXTURE), "--weights", str(tmp_path / name / CANONICAL_WEIGHTS))
        assert out.returncode == 0 and json.loads(out.stdout)["ok"], out.stderr


def test_inspect_ckpt_names_the_model_type(tmp_path, capsys):
    inspect = load_script("tools/inspect_ckpt.py")
    save_canonical(_fixture_policy(), tmp_path)
    assert inspect.main([str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "pi05" and info["kind"] == "pi05 weights" and info["layout"] == "canonical"
    # the fixture's count less its two unused lm_heads (1024 x (64 + 32)) plus our condition embedding
    assert info["parameters"] == 299_264 - 1024 * (64 + 32) + 2 * 32
    assert inspect.main([str(require(FIXTURES / "pi05_openpi_jax_tiny")), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "pi05" and info["parameters"] == 246_640


def test_estimate_memory_for_the_full_size_pi05(capsys):
    inventory = parameter_inventory(PI0Arch(model_type="pi05"))
    assert sum(p.numel for p in inventory) == 3_353_435_920
    assert not any("state_proj" in p.name for p in inventory)
    dense = [p for p in inventory if p.name.endswith("layernorm.dense.weight")]
    assert len(dense) == 36 and not any(p.low_precision for p in dense)  # kept fp32, as the norms
    estimate = load_script("tools/estimate_memory.py")
    args = ["--ds-config", "ds_configs/zero3.json", "--world-sizes", "8", "--lora", "off"]
    assert estimate.main([*args, "--model-type", "pi05"]) == 0
    pi05 = capsys.readouterr().out
    assert pi05.startswith("PI0.5: 3.353 B parameters") and "816 prefix + 50 suffix tokens" in pi05
    assert estimate.main(args) == 0
    assert capsys.readouterr().out.startswith("PI0: 3.238 B parameters")
