"""Parity with the reference implementations' golden outputs (../shared/fixtures)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import LEROBOT_FIXTURE, ROOT, random_batch, require, tiny_policy
from safetensors.torch import save_file

from ript_ds.model.weights import CANONICAL_WEIGHTS, save_canonical

TOOL = ROOT / "tools" / "parity_check.py"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300)


def test_parity_tool_on_lerobot_fixture():
    out = run_tool("--fixture", str(require(LEROBOT_FIXTURE)))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] is True
    assert report["loss_max_abs_diff"] <= 1e-4
    assert report["actions_max_abs_diff"] <= 1e-5


def test_parity_tool_fails_on_wrong_weights(tmp_path):
    """A perturbed checkpoint must be reported (exit 1, ok false): the tool can fail."""
    from safetensors.torch import load_file

    weights = load_file(str(require(LEROBOT_FIXTURE) / "weights.safetensors"))
    key = "model.paligemma_with_expert.gemma_expert.model.layers.1.mlp.down_proj.weight"
    weights[key] = weights[key] * 1.01
    save_file(weights, str(tmp_path / "w.safetensors"))
    out = run_tool("--fixture", str(LEROBOT_FIXTURE), "--weights", str(tmp_path / "w.safetensors"))
    assert out.returncode == 1
    assert json.loads(out.stdout)["ok"] is False


def test_parity_tool_clear_errors(tmp_path):
    out = run_tool("--fixture", str(tmp_path))
    assert out.returncode == 2 and "arch.json" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "arch.json").write_text((LEROBOT_FIXTURE / "arch.json").read_text())
    renamed = tmp_path / "weights.safetensors"
    from safetensors.torch import load_file

    w = load_file(str(LEROBOT_FIXTURE / "weights.safetensors"))
    w["model.state_proj.weightz"] = w.pop("model.state_proj.weight")
    save_file(w, str(renamed))
    out = run_tool("--fixture", str(tmp_path))
    assert out.returncode == 2
    assert "model.state_proj.weightz" in out.stderr and "Traceback" not in out.stderr


def make_variant_fixture(directory, cams: int, chunk: int) -> None:
    """A fixture of the same format with other sizes: masked cameras, padded text, another chunk."""
    policy = tiny_policy(seed=3, chunk_size=chunk)
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
    io |= {"lang_tokens": batch.tokens, "lang_masks": batch.token_masks, "state": batch.state}
    io |= {"actions": batch.actions, "noise": noise, "time": time, "loss_per_element": loss}
    io |= {"sampled_actions": actions}
    save_file(io, str(directory / "io.safetensors"))
    v, g = arch.vision, arch.vlm

    def gemma(a):
        return {
            k: getattr(a, k) for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
        }

    arch_json = {
        "vlm": gemma(g),
        "expert": gemma(arch.expert),
        "vision": {
            "hidden_size": v.width,
            "num_hidden_layers": v.depth,
            "intermediate_size": v.mlp_dim,
            "num_attention_heads": v.num_heads,
            "patch_size": v.patch_size,
            "image_size": v.image_size,
        },
        "vocab_size": arch.vocab_size,
        "chunk_size": chunk,
    }
    (directory / "arch.json").write_text(json.dumps(arch_json))
    save_canonical(policy, directory)
    (directory / CANONICAL_WEIGHTS).rename(directory / "weights.safetensors")


def test_parity_tool_handles_other_fixture_shapes(tmp_path):
    make_variant_fixture(tmp_path, cams=3, chunk=5)
    out = run_tool("--fixture", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["actions_max_abs_diff"] <= 1e-5


def test_masked_camera_and_padded_text_take_no_attention():
    policy = tiny_policy().eval()
    batch = random_batch(policy.arch)
    batch.image_masks[1, 0] = False
    noise = torch.randn(3, policy.arch.chunk_size, policy.arch.max_action_dim)
    time = torch.tensor([0.3, 0.6, 0.9])
    ref_actions = policy.sample_actions(batch, noise)
    ref_loss = policy.loss(batch, noise, time)
    batch.images[1, 0] = torch.rand_like(batch.images[1, 0])  # pixels of the masked camera
    batch.tokens[~batch.token_masks] = 7  # ids at padded text positions
    assert torch.equal(policy.sample_actions(batch, noise), ref_actions)
    assert torch.equal(policy.loss(batch, noise, time), ref_loss)
    batch.images[0, 0] = torch.rand_like(batch.images[0, 0])  # a visible camera does matter
    assert not torch.equal(policy.sample_actions(batch, noise)[0], ref_actions[0])
