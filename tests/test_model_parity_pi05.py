"""PI0.5 parity with lerobot's pi05 golden outputs (../shared/fixtures/pi05_lerobot_tiny_a) and its layout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, LEROBOT_FIXTURE, ROOT, random_batch, require
from safetensors.torch import load_file, save_file
from test_model_pi05 import tiny_pi05

from ript_ds.model.arch import arch_from_reference_json
from ript_ds.model.pi05 import PI05Policy, make_policy
from ript_ds.model.weights import (
    CANONICAL_ARCH,
    CANONICAL_WEIGHTS,
    CheckpointError,
    detect_model_type,
    infer_arch,
    load_checkpoint,
    load_weights_file,
    save_canonical,
    to_canonical,
)

PI05_FIXTURE = FIXTURES / "pi05_lerobot_tiny_a"
TOOL = ROOT / "tools" / "parity_check.py"
EXPERT = "model.paligemma_with_expert.gemma_expert.model."


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300)


def fixture_weights() -> dict[str, torch.Tensor]:
    return load_file(str(require(PI05_FIXTURE) / "weights.safetensors"))


def fixture_arch():
    return arch_from_reference_json(json.loads((PI05_FIXTURE / "arch.json").read_text()))


def test_parity_tool_on_lerobot_pi05_fixture():
    out = run_tool("--fixture", str(require(PI05_FIXTURE)))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and report["model_type"] == "pi05"
    assert report["loss_max_abs_diff"] <= 1e-4
    assert report["actions_max_abs_diff"] <= 1e-5


def test_time_condition_and_velocity_match_lerobot():
    """The fixture's pi0.5 extras: the adaRMS condition and the training forward's velocity."""
    arch = fixture_arch()
    assert arch.model_type == "pi05" and arch.chunk_size == 8 and arch.expert.mlp_dim == 64
    policy = make_policy(arch)
    assert load_weights_file(policy, PI05_FIXTURE / "weights.safetensors") == "lerobot>=0.4"
    io = load_file(str(PI05_FIXTURE / "io.safetensors"))
    sys.path.insert(0, str(ROOT / "tools"))
    from parity_check import read_io

    batch, _ = read_io(PI05_FIXTURE / "io.safetensors")
    t = io["time"][:, None, None]
    x_t = t * io["noise"] + (1 - t) * io["actions"]
    with torch.no_grad():
        cond = policy.time_condition(io["time"])
        velocity = policy.velocity(batch, x_t, io["time"])
    assert (cond - io["adarms_cond"]).abs().max() <= 1e-6
    assert (velocity - io["velocity"]).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "key",
    [
        EXPERT + "layers.0.input_layernorm.dense.weight",
        EXPERT + "norm.dense.bias",
        "model.time_mlp_out.weight",
    ],
)
def test_parity_tool_fails_on_perturbed_pi05_weights(tmp_path, key):
    weights = fixture_weights()
    weights[key] = weights[key] * 1.01
    save_file(weights, str(tmp_path / "w.safetensors"))
    out = run_tool("--fixture", str(PI05_FIXTURE), "--weights", str(tmp_path / "w.safetensors"))
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["ok"] is False


def test_layout_and_model_type_come_from_the_keys():
    state, layout = to_canonical(fixture_weights())
    assert layout == "lerobot>=0.4" and detect_model_type(list(state)) == "pi05"
    pi0_state, _ = to_canonical(load_file(str(require(LEROBOT_FIXTURE) / "weights.safetensors")))
    assert detect_model_type(list(pi0_state)) == "pi0"
    arch = infer_arch(state, vision_heads=2, chunk_size=8)
    ref = fixture_arch()
    assert arch.model_type == "pi05"
    assert (arch.vlm, arch.expert, arch.vision, arch.vocab_size) == (ref.vlm, ref.expert, ref.vision, 1024)


def _as_openpi_pytorch(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in weights.items()}


@pytest.mark.parametrize("layout", ["lerobot>=0.4", "openpi-pytorch", "canonical"])
def test_pi05_checkpoint_directories_load_with_parity(tmp_path, layout):
    weights = fixture_weights()
    arch = fixture_arch()
    if layout == "canonical":
        policy = make_policy(arch)
        load_weights_file(policy, PI05_FIXTURE / "weights.safetensors")
        save_canonical(policy, tmp_path)
    else:
        save_file(
            weights if layout == "lerobot>=0.4" else _as_openpi_pytorch(weights),
            str(tmp_path / CANONICAL_WEIGHTS),
        )
        (tmp_path / CANONICAL_ARCH).write_text(json.dumps(arch.to_dict()))  # SigLIP heads: not in shapes
    loaded = load_checkpoint(tmp_path)
    assert loaded.layout == layout and isinstance(loaded.policy, PI05Policy)
    out = run_tool("--fixture", str(PI05_FIXTURE), "--weights", str(tmp_path / CANONICAL_WEIGHTS))
    assert out.returncode == 0 and json.loads(out.stdout)["actions_max_abs_diff"] <= 1e-5, out.stderr


def test_pi05_keys_are_strict(tmp_path):
    weights = fixture_weights()
    extra = dict(weights, **{"model.state_proj.weight": torch.zeros(32, 32)})  # pi0's, not pi0.5's
    save_file(extra, str(tmp_path / CANONICAL_WEIGHTS))
    (tmp_path / CANONICAL_ARCH).write_text(json.dumps(fixture_arch().to_dict()))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.state_proj\.weight"):
        load_checkpoint(tmp_path)
    missing = {
        k: v for k, v in weights.items() if k != EXPERT + "layers.1.post_attention_layernorm.dense.bias"
    }
    save_file(missing, str(tmp_path / CANONICAL_WEIGHTS))
    with pytest.raises(
        CheckpointError, match=r"missing keys: .*layers\.1\.post_attention_layernorm\.dense\.bias"
    ):
        load_checkpoint(tmp_path)
    # a pi0 arch file over pi0.5 weights is a mismatch, not a silent reinterpretation
    pi0_arch = dict(fixture_arch().to_dict(), model_type="pi0")
    save_file(weights, str(tmp_path / CANONICAL_WEIGHTS))
    (tmp_path / CANONICAL_ARCH).write_text(json.dumps(pi0_arch))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(tmp_path)


def make_pi05_variant_fixture(directory, cams: int, chunk: int) -> None:
    """The fixture format with other sizes: three cameras (some masked), padded text, another chunk."""
    policy = tiny_pi05(seed=3, chunk_size=chunk)
    arch = policy.arch
    batch = random_batch(arch, b=3, cams=cams, text=9, seed=5)
    batch.image_masks[0, cams - 1] = False
    batch.image_masks[2, 0] = False
    noise = torch.randn(3, chunk, arch.max_action_dim)
    time = torch.tensor([0.1, 0.5, 0.95])
    with torch.no_grad():
        loss = policy.train().loss(batch, noise, time)
        actions = policy.eval().sample_actions(batch, noise, num_steps=arch.num_inference_steps)
    io = {f"image_{i}": batch.images[:, i].contiguous() for i in range(cams)}
    io |= {f"image_mask_{i}": batch.image_masks[:, i].contiguous() for i in range(cams)}
    io |= {
        "lang_tokens": batch.tokens,
        "lang_masks": batch.token_masks,
        "state": batch.state[:, :8].contiguous(),
    }
    io |= {"actions": batch.actions, "noise": noise, "time": time, "loss_per_element": loss}
    save_file(io | {"sampled_actions": actions}, str(directory / "io.safetensors"))
    ref = json.loads((PI05_FIXTURE / "arch.json").read_text())
    fields = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
    v = arch.vision
    arch_json = {
        "policy_type": "pi05",
        "vlm": {k: getattr(arch.vlm, k) for k in fields},
        "expert": {k: getattr(arch.expert, k) for k in fields} | {"use_adarms": True},
        "vision": ref["vision"]
        | {"hidden_size": v.width, "num_hidden_layers": v.depth, "intermediate_size": v.mlp_dim}
        | {"num_attention_heads": v.num_heads, "patch_size": v.patch_size, "image_size": v.image_size},
        "vocab_size": arch.vocab_size,
        "chunk_size": chunk,
    }
    (directory / "arch.json").write_text(json.dumps(arch_json))
    save_canonical(policy, directory)
    shutil.move(directory / CANONICAL_WEIGHTS, directory / "weights.safetensors")


def test_parity_tool_handles_other_pi05_fixture_shapes(tmp_path):
    make_pi05_variant_fixture(tmp_path, cams=3, chunk=5)
    out = run_tool("--fixture", str(tmp_path))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["model_type"] == "pi05" and report["actions_max_abs_diff"] <= 1e-5
