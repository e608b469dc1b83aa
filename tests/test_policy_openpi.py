"""openpi's whole LIBERO policy chain (fixtures/openpi_policy_tiny_a): the observation dict openpi's client
sends -> input transforms -> tiny pi0 -> output transforms -> env actions, against ript-ds's converter, policy
convention and `serving.load_policy(...).infer`. Cases: A pi0_libero (delta actions), B the same model
with delta off; C (pi05_libero, quantile): its transforms around the network here, end to end through the
pi0.5 model in tests/test_policy_openpi_pi05.py. The README of the fixture lists what each mistake moves; parity is 2e-4."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from openpi_policy_fixture import CAMS, FIXTURE, SCENES, convert, load_io, load_prompts, observation

from ript_ds.model.convention import ConventionError, PolicyConvention, load_convention, preset
from ript_ds.serving import PolicyInputError, load_policy

ACTION_TOL = 2e-4


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_io()


@pytest.fixture(scope="module")
def prompts() -> dict[str, str]:
    return load_prompts()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """tools/convert_openpi_jax.py --openpi-config pi0_libero on the fixture's orbax checkpoint, as a user runs
    it; the absolute variant (case B) is the same checkpoint with the delta mask cleared by hand."""
    out = tmp_path_factory.mktemp("conv")
    delta = out / "pi0_libero"
    summary = convert("pi0_ckpt", delta, "pi0_libero", "--chunk-size", "8")
    assert summary["policy"]["delta_action_mask"] == [True] * 6 + [False]
    absolute = out / "pi0_absolute"
    shutil.copytree(delta, absolute)
    conv = load_convention(delta)
    PolicyConvention.from_dict({**conv.to_dict(), "delta_action_mask": []}).save(absolute)
    return {"pi0_libero": delta, "pi0_absolute": absolute}


_obs = observation


@pytest.mark.parametrize("case", ["pi0_libero", "pi0_absolute"])
def test_infer_equals_openpis_policy(converted, io, prompts, case):
    policy = load_policy(converted[case], tokenizer_path=FIXTURE / "tokenizer.model", device="cpu")
    assert policy.horizon == 8 and policy.processor.tokenizer.max_length == 48
    for scene in SCENES:
        out = policy.infer(_obs(io, prompts, scene), noise=io["noise/pi0"])
        expected = io[f"{case}/{scene}/actions"]
        assert out["actions"].shape == expected.shape == (8, 7)
        err = np.abs(out["actions"] - expected).max()
        assert err < ACTION_TOL, (case, scene, err)
        assert out["policy_timing"]["infer_ms"] > 0


def test_every_stage_of_the_input_chain(converted, io, prompts):
    """Where a mismatch would start: resized uint8 images, slots and masks, normalised state, tokens."""
    from ript_ds.env.libero import resize_with_pad

    policy = load_policy(converted["pi0_libero"], tokenizer_path=FIXTURE / "tokenizer.model", device="cpu")
    for scene in SCENES:
        ref = f"pi0_libero/{scene}"
        prepared = policy.prepare(_obs(io, prompts, scene))
        for i, cam in enumerate(CAMS[:2]):
            np.testing.assert_array_equal(prepared.images[i], io[f"{ref}/stage/resized_image_u8/{cam}"])
        raw = io[f"obs/{scene}/observation/image"]
        np.testing.assert_array_equal(
            resize_with_pad(raw, 32, 32), io[f"{ref}/stage/resized_image_u8/{CAMS[0]}"]
        )
        batch = policy.processor.batch(
            prepared.images[None], prepared.state[None], [prepared.prompt], device="cpu"
        )
        for i, cam in enumerate(CAMS):
            image = batch.images[0, i].permute(1, 2, 0).numpy()
            np.testing.assert_allclose(image, io[f"{ref}/model_in/image/{cam}"], atol=1e-6)
            assert bool(batch.image_masks[0, i]) == bool(io[f"{ref}/model_in/image_mask/{cam}"][0]), cam
        np.testing.assert_allclose(batch.state[0].numpy(), io[f"{ref}/model_in/state"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(batch.tokens[0].numpy(), io[f"{ref}/model_in/tokenized_prompt"])
        np.testing.assert_array_equal(
            batch.token_masks[0].numpy(), io[f"{ref}/model_in/tokenized_prompt_mask"]
        )


def test_the_network_alone(converted, io, prompts):
    """model_in -> model_out/actions with the stored noise: separates the network from the transforms."""
    policy = load_policy(converted["pi0_absolute"], tokenizer_path=FIXTURE / "tokenizer.model", device="cpu")
    obs = [policy.prepare(_obs(io, prompts, s)) for s in SCENES]
    batch = policy.processor.batch(
        np.stack([o.images for o in obs]),
        np.stack([o.state for o in obs]),
        [o.prompt for o in obs],
        device="cpu",
    )
    noise = torch.from_numpy(np.stack([io["noise/pi0"]] * len(SCENES)))
    with torch.no_grad():
        out = policy.model.sample_actions(batch, noise, 10, None).numpy()
    for i, scene in enumerate(SCENES):
        np.testing.assert_allclose(out[i], io[f"pi0_absolute/{scene}/model_out/actions"], atol=1e-4)


def test_training_windows_use_the_same_action_frame(converted, io, prompts):
    """Executed env actions -> model space (delta relative to the window's state, then normalised) is the
    exact inverse of what infer applies: openpi's DeltaActions/AbsoluteActions pair."""
    policy = load_policy(converted["pi0_libero"], tokenizer_path=FIXTURE / "tokenizer.model", device="cpu")
    proc = policy.processor
    scene = SCENES[0]
    state = io[f"obs/{scene}/observation/state"]
    env_actions = io[f"pi0_libero/{scene}/actions"].astype(np.float32)
    images = policy.prepare(_obs(io, prompts, scene)).images
    batch = proc.batch(images[None], state[None], [prompts[scene]], env_actions[None], device="cpu")
    back = proc.decode_actions(batch.actions, state[None])[0]
    np.testing.assert_allclose(back, env_actions, atol=1e-5)
    relative = env_actions[:, :6] - state[None, :6].astype(np.float32)  # DeltaActions, by hand
    stats = proc.norm_stats.actions
    expected = (relative - stats.mean[:6]) / (stats.std[:6] + 1e-6)
    np.testing.assert_allclose(batch.actions[0, :, :6].numpy(), expected, atol=1e-5)


def test_presets_and_lerobot_config():
    pi0 = preset("pi0_libero")
    assert pi0.delta_action_mask == (True,) * 6 + (False,) and pi0.norm_mode == "mean_std"
    assert pi0.action_horizon == 50 and pi0.max_token_len == 48
    assert [s for _, s in pi0.image_slots] == ["image", "wrist_image", None]
    pi05 = preset("pi05_libero")
    assert pi05.norm_mode == "quantile" and not pi05.delta_action_mask and pi05.max_token_len == 200
    with pytest.raises(ConventionError, match="pi0-FAST"):
        preset("pi0_fast_libero")
    with pytest.raises(ConventionError, match="presets: "):
        preset("pi0_libro")


def test_bad_requests_are_one_clear_line(converted, io, prompts):
    policy = load_policy(converted["pi0_libero"], tokenizer_path=FIXTURE / "tokenizer.model", device="cpu")
    good = _obs(io, prompts, SCENES[0])
    cases = [
        ({k: v for k, v in good.items() if k != "observation/state"}, "lacks \\['observation/state'\\]"),
        (good | {"observation/image": good["observation/image"].astype(np.float32)}, "must be uint8"),
        (good | {"observation/state": np.zeros(7)}, "has 7 dims"),
        (good | {"prompt": 3}, "must be a string"),
        (good | {"prompt": "pick " * 60}, "over tokenizer max_length=48"),
    ]
    for obs, message in cases:
        with pytest.raises(PolicyInputError, match=message):
            policy.infer(obs)
    with pytest.raises(PolicyInputError, match="noise must be float"):
        policy.infer(good, noise=np.zeros((50, 32)))
    # a different image size is resized with pad, as openpi's ResizeImages does
    small = good | {k: v[::2, ::2] for k, v in good.items() if k.endswith("image")}
    assert policy.infer(small, noise=io["noise/pi0"])["actions"].shape == (8, 7)


def test_the_trainer_and_eval_build_the_same_processor(converted, tmp_path):
    """build.build_components (trainer, launch/eval.py) reads the same policy.json as load_policy."""
    from ript_ds.build import build_processor, checkpoint_norm_stats
    from ript_ds.config import load_config

    ckpt = converted["pi0_libero"]
    cfg = load_config(
        None,
        [
            f"model.checkpoint={ckpt}",
            f"model.tokenizer_path={FIXTURE / 'tokenizer.model'}",
            f"output_dir={tmp_path}",
        ],
    )
    policy = load_policy(ckpt, tokenizer_path=FIXTURE / "tokenizer.model", device="cpu")
    proc = build_processor(cfg, [], checkpoint_norm_stats(cfg), policy.model.arch)
    assert proc.convention == policy.processor.convention == preset("pi0_libero").with_horizon(8)
    assert proc.tokenizer.max_length == 48 and proc.norm_stats.mode == "mean_std"


def test_policy_convention_tool_writes_and_refuses(tmp_path):
    tool = [sys.executable, "tools/policy_convention.py", str(tmp_path)]
    ok = subprocess.run(
        [*tool, "--openpi-config", "pi0_libero", "--set", "replan_steps=10", "--write"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    conv = load_convention(tmp_path)
    assert conv.replan_steps == 10 and conv.delta_action_mask == (True,) * 6 + (False,)
    for args, message in (
        (["--set", "bogus=1"], "unknown policy convention keys"),
        (["--openpi-config", "pi0_fast_libero"], "pi0-FAST"),
    ):
        bad = subprocess.run([*tool, *args], cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_a_converted_checkpoint_served_and_evaluated_on_real_libero(converted, tmp_path):
    """The acceptance path: convert (--openpi-config pi0_libero) -> serve (openpi's protocol) -> our LIBERO
    protocol through `launch/eval.py --policy-server`, one episode of one real task."""
    import libero  # noqa: F401  (the libero extra: a broken install fails, never skips)

    from ript_ds.serving.server import PolicyServer, ServerOptions

    policy = load_policy(converted["pi0_libero"], tokenizer_path=FIXTURE / "tokenizer.model", device="cpu")
    out = tmp_path / "out"
    with PolicyServer(policy, "127.0.0.1", 0, ServerOptions()) as server:
        cmd = [sys.executable, "launch/eval.py", "--policy-server", f"127.0.0.1:{server.port}"]
        cmd += ["--suite", "libero_goal", "--tasks", "0", "--episodes-per-task", "1", "--num-envs", "1"]
        cmd += ["--max-steps", "10", "--camera-size", "64", "--image-size", "32", "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["policy"]["kind"] == "policy_server" and results["checkpoint"] is None
    assert results["policy"]["metadata"]["policy"]["preset"] == "pi0_libero"
    (episode,) = results["episode_records"]
    assert episode["failure_reason"] is None and episode["length"] == 10
    assert results["protocol"]["image_size"] == 32 and results["suites"]["libero_goal"]["episodes"] == 1
    bad = subprocess.run(
        [sys.executable, "launch/eval.py", "--policy-server", "nohost", "--suite", "libero_goal"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_quantile_chain_of_pi05_libero_around_the_network(io, prompts):
    """Case C (pi05_libero: quantile normalisation, no delta, 200 prompt tokens) on every transform around
    the network: state in, tokens, and model_out -> env actions. The pi0.5 network is its own issue."""
    from ript_ds.model.normalization import load_norm_stats
    from ript_ds.model.processing import Processor, PromptTokenizer

    conv = preset("pi05_libero")
    stats = load_norm_stats(FIXTURE / "pi05_ckpt", mode=conv.norm_mode)
    assert stats.mode == "quantile"
    proc = Processor(
        PromptTokenizer(FIXTURE / "tokenizer.model", conv.max_token_len), stats, 7, convention=conv
    )
    for scene in SCENES:
        ref = f"pi05_libero/{scene}"
        images = np.stack([io[f"{ref}/stage/resized_image_u8/{cam}"] for cam in CAMS[:2]])
        state = io[f"obs/{scene}/observation/state"]
        batch = proc.batch(images[None], state[None], [prompts[scene]], device="cpu")
        np.testing.assert_allclose(batch.state[0].numpy(), io[f"{ref}/model_in/state"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(batch.tokens[0].numpy(), io[f"{ref}/model_in/tokenized_prompt"])
        assert [bool(m) for m in batch.image_masks[0]] == [True, True, False]
        model_out = torch.from_numpy(io[f"{ref}/model_out/actions"][None])
        actions = proc.decode_actions(model_out, state[None])[0]
        np.testing.assert_allclose(actions, io[f"{ref}/actions"], atol=1e-5)
        # z-score instead of quantile moves the actions (the mistake the README's table measures)
        wrong = Processor(proc.tokenizer, dataclasses.replace(stats, mode="mean_std"), 7, convention=conv)
        assert np.abs(wrong.decode_actions(model_out, state[None])[0] - io[f"{ref}/actions"]).max() > 1e-2
