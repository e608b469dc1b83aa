"""Case C of openpi_policy_tiny_a end to end: openpi's pi05_libero policy (quantile normalisation, no delta,
200 prompt tokens, the state never reaching the network) through our converter, policy convention and
`serving.load_policy(...).infer`, against openpi's own Policy.infer (2e-4)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from openpi_policy_fixture import (
    CAMS,
    SCENES,
    TOKENIZER,
    convert,
    load_io,
    load_prompts,
    observation,
)

from ript_ds.model.convention import PolicyConvention, load_convention
from ript_ds.model.pi05 import PI05Policy
from ript_ds.serving import PolicyLoadError, load_policy

ACTION_TOL = 2e-4


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_io()


@pytest.fixture(scope="module")
def prompts() -> dict[str, str]:
    return load_prompts()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """tools/convert_openpi_jax.py --openpi-config pi05_libero on the fixture's orbax checkpoint, as a user
    runs it (the horizon, 10, comes from the preset)."""
    out = tmp_path_factory.mktemp("conv05") / "pi05_libero"
    summary = convert("pi05_ckpt", out, "pi05_libero")
    assert summary["arch"]["model_type"] == "pi05" and summary["policy"]["norm_mode"] == "quantile"
    return out


_obs = observation


def test_infer_equals_openpis_pi05_policy(converted, io, prompts):
    policy = load_policy(converted, tokenizer_path=TOKENIZER, device="cpu")
    assert isinstance(policy.model, PI05Policy)
    assert policy.horizon == 10 and policy.processor.tokenizer.max_length == 200
    worst = 0.0
    for scene in SCENES:
        out = policy.infer(_obs(io, prompts, scene), noise=io["noise/pi05"])
        expected = io[f"pi05_libero/{scene}/actions"]
        assert out["actions"].shape == expected.shape == (10, 7)
        worst = max(worst, float(np.abs(out["actions"] - expected).max()))
    assert worst < ACTION_TOL, worst


def test_the_pi05_network_alone(converted, io, prompts):
    """model_in -> model_out/actions with the stored noise: the network apart from the transforms."""
    policy = load_policy(converted, tokenizer_path=TOKENIZER, device="cpu")
    obs = [policy.prepare(_obs(io, prompts, s)) for s in SCENES]
    batch = policy.processor.batch(
        np.stack([o.images for o in obs]),
        np.stack([o.state for o in obs]),
        [o.prompt for o in obs],
        device="cpu",
    )
    for i, scene in enumerate(SCENES):
        ref = f"pi05_libero/{scene}/model_in"
        np.testing.assert_array_equal(batch.tokens[i].numpy(), io[f"{ref}/tokenized_prompt"])
        assert [bool(m) for m in batch.image_masks[i]] == [bool(io[f"{ref}/image_mask/{c}"][0]) for c in CAMS]
    noise = torch.from_numpy(np.stack([io["noise/pi05"]] * len(SCENES)))
    with torch.no_grad():
        out = policy.model.sample_actions(batch, noise, 10, None).numpy()
    for i, scene in enumerate(SCENES):
        np.testing.assert_allclose(out[i], io[f"pi05_libero/{scene}/model_out/actions"], atol=1e-4)


def test_the_state_never_reaches_pi05_libero(converted, io, prompts):
    """discrete_state_input=False: openpi's case C actions do not depend on the state; ours neither."""
    policy = load_policy(converted, tokenizer_path=TOKENIZER, device="cpu")
    obs = _obs(io, prompts, SCENES[0])
    ref = policy.infer(obs, noise=io["noise/pi05"])["actions"]
    moved = obs | {"observation/state": obs["observation/state"] + 0.5}
    np.testing.assert_array_equal(policy.infer(moved, noise=io["noise/pi05"])["actions"], ref)


def test_conventions_that_do_not_fit_the_weights_are_refused(converted, tmp_path):
    wrong = tmp_path / "wrong"
    shutil.copytree(converted, wrong)
    conv = load_convention(converted)
    PolicyConvention.from_dict({**conv.to_dict(), "model_type": "pi0"}).save(wrong)
    with pytest.raises(PolicyLoadError, match=r"pi0 policy but .* holds pi05 weights"):
        load_policy(wrong, tokenizer_path=TOKENIZER, device="cpu")
    # pi0 with the state in its prompt would see the state twice: refused
    PolicyConvention.from_dict({**conv.to_dict(), "discrete_state_input": True, "model_type": "pi0"}).save(
        wrong
    )
    with pytest.raises(PolicyLoadError, match="discrete_state_input with model_type 'pi0'"):
        load_policy(wrong, tokenizer_path=TOKENIZER, device="cpu")


def test_a_lerobot_pi05_config_puts_the_state_in_the_prompt(converted, io, prompts, tmp_path):
    """lerobot's pi05 config.json: discrete_state_input, the prompt built from the normalised state."""
    lerobot = tmp_path / "lerobot"
    shutil.copytree(converted, lerobot)
    (lerobot / "policy.json").unlink()
    (lerobot / "config.json").write_text(json.dumps({"type": "pi05", "chunk_size": 10}))
    assert load_convention(lerobot).discrete_state_input is True
    policy = load_policy(lerobot, tokenizer_path=TOKENIZER, device="cpu")
    obs = _obs(io, prompts, SCENES[0])
    images = np.zeros((2, 2, 8, 8, 3), dtype=np.uint8)
    states = np.stack([obs["observation/state"], obs["observation/state"] + 0.5])
    batch = policy.processor.batch(images, states, [obs["prompt"]] * 2, device="cpu")
    assert not np.array_equal(batch.tokens[0].numpy(), batch.tokens[1].numpy())
    np.testing.assert_array_equal(
        batch.tokens[0].numpy(), policy.processor.tokenize(obs["prompt"], obs["observation/state"])[0]
    )


def test_the_trainer_builds_pi05_from_the_converted_checkpoint(converted, tmp_path):
    from ript_ds.build import build_policy, check_model
    from ript_ds.config import ConfigError, load_config

    overrides = [
        f"model.checkpoint={converted}",
        f"model.tokenizer_path={TOKENIZER}",
        f"output_dir={tmp_path}",
    ]
    cfg = load_config(None, overrides)
    assert check_model(cfg).model_type == "pi05"
    policy, stats = build_policy(cfg)
    assert isinstance(policy, PI05Policy) and stats.mode == "quantile"
    lerobot = tmp_path / "lerobot"
    shutil.copytree(converted, lerobot)
    (lerobot / "policy.json").unlink()
    (lerobot / "config.json").write_text(json.dumps({"type": "pi05", "chunk_size": 10}))
    cfg = load_config(None, [f"model.checkpoint={lerobot}", *overrides[1:]])
    assert check_model(cfg).model_type == "pi05"  # the state-in-prompt convention is applied, not refused
    (lerobot / "config.json").write_text(json.dumps({"type": "pi05", "use_proprioceptive_memory": True}))
    with pytest.raises(ConfigError, match="use_proprioceptive_memory"):
        check_model(cfg)
