"""The pi0.5 discrete-state prompt (lerobot's pi05, openpi's discrete_state_input) and lerobot's config.json.

The prompts, bins and state are pi05_lerobot_tiny_a's, written by lerobot 0.6.1's own
Pi05PrepareStateTokenizerProcessorStep; the reference tokens follow openpi's PaligemmaTokenizer.tokenize with a
state (BOS + the whole prompt, right-padded with 0), on openpi_policy_tiny_a's SentencePiece model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece
from conftest import FIXTURES, require
from safetensors.numpy import load_file

from ript_ds.model.convention import ConventionError, PolicyConvention, load_convention
from ript_ds.model.normalization import FeatureStats, NormStats
from ript_ds.model.processing import Processor, PromptTokenizer, state_bins, state_prompt
from ript_ds.rl.types import Window
from ript_ds.rl.windows import windows_batch

LEROBOT = FIXTURES / "pi05_lerobot_tiny_a"
TOKENIZER = FIXTURES / "openpi_policy_tiny_a" / "tokenizer.model"
LENGTH = 200  # lerobot PI05Config.tokenizer_max_length
PI05 = PolicyConvention(model_type="pi05", discrete_state_input=True, max_token_len=LENGTH, source="test")


@pytest.fixture(scope="module")
def fixture() -> dict:
    io = load_file(str(require(LEROBOT) / "io.safetensors"))
    prompt = json.loads((LEROBOT / "arch.json").read_text())["prompt"]
    return {"state": io["state"], "bins": io["state_bins"], **prompt}


def _openpi_tokens(text: str) -> np.ndarray:
    """openpi's PaligemmaTokenizer.tokenize(prompt, state) after it built `text`: encode(add_bos=True), pad."""
    ids = sentencepiece.SentencePieceProcessor(model_file=str(require(TOKENIZER))).encode(text, add_bos=True)
    return np.array(ids + [0] * (LENGTH - len(ids)), dtype=np.int64)


def _stats(mode: str, dims: int = 8) -> NormStats:
    """Stats that map fixture states to raw ones and back exactly (powers of two), so no bin edge moves."""
    return NormStats(
        state=FeatureStats(
            mean=np.full(dims, 0.5), std=np.full(dims, 2.0), q01=np.full(dims, -3.0), q99=np.full(dims, 5.0)
        ),
        actions=FeatureStats(mean=np.zeros(7), std=np.ones(7), q01=-np.ones(7), q99=np.ones(7)),
        mode=mode,
        eps=0.0,
    )


def _raw(stats: NormStats, normalised: np.ndarray) -> np.ndarray:
    return stats.unnormalize(normalised.astype(np.float64), "state").astype(np.float64)


def test_bins_and_prompts_equal_lerobots(fixture):
    np.testing.assert_array_equal(state_bins(fixture["state"]), fixture["bins"])
    for i, task in enumerate(fixture["tasks"]):
        assert state_prompt(task, fixture["state"][i]) == fixture["prompts"][i]
    # the edges the README names, and the values beyond [-1, 1] (no clipping)
    assert state_bins(np.array([0.0, 1.0, -1.0, -1.5, 7.0, 0.99])).tolist() == [128, 255, 0, -1, 255, 254]


@pytest.mark.parametrize("mode", ["mean_std", "quantile"])
def test_processor_normalises_then_writes_the_state_into_the_prompt(fixture, mode):
    stats = _stats(mode)
    proc = Processor(PromptTokenizer(require(TOKENIZER), LENGTH), stats, 7, convention=PI05)
    for i, task in enumerate(fixture["tasks"]):
        raw = _raw(stats, fixture["state"][i])
        tokens, mask = proc.tokenize(task, raw)
        expected = _openpi_tokens(fixture["prompts"][i])
        np.testing.assert_array_equal(tokens, expected)
        assert mask.sum() == (expected != 0).sum() and mask[: mask.sum()].all()
        assert tokens[0] == proc.tokenizer.bos_id


def test_batch_and_training_windows_take_the_same_prompt(fixture):
    """Rollouts (float64 states) and the update (the window's float32 copy) build one prompt per state."""
    stats = _stats("mean_std")
    proc = Processor(PromptTokenizer(require(TOKENIZER), LENGTH), stats, 7, convention=PI05)
    raw = np.stack([_raw(stats, s) for s in fixture["state"]])  # [2, 8] float64
    images = np.zeros((2, 2, 8, 8, 3), dtype=np.uint8)
    batch = proc.batch(images, raw, fixture["tasks"], device="cpu")
    windows = [
        Window(images[i], raw[i].astype(np.float32), i, np.zeros((4, 7), np.float32), np.ones(4, bool), 0.0)
        for i in range(2)
    ]
    update = windows_batch(proc, windows, dict(enumerate(fixture["tasks"])), "cpu").batch
    for i, prompt in enumerate(fixture["prompts"]):
        np.testing.assert_array_equal(batch.tokens[i].numpy(), _openpi_tokens(prompt))
        np.testing.assert_array_equal(update.tokens[i].numpy(), batch.tokens[i].numpy())
    # one task, two states: two prompts (no cache keyed by the task alone)
    same_task = proc.batch(images, raw, [fixture["tasks"][0]] * 2, device="cpu")
    assert not np.array_equal(same_task.tokens[0].numpy(), same_task.tokens[1].numpy())


def test_without_the_state_in_the_prompt_nothing_changes():
    tok = PromptTokenizer(require(TOKENIZER), 48)
    plain = Processor(tok, _stats("mean_std"), 7, convention=PolicyConvention(max_token_len=48))
    tokens, _ = plain.tokenize("open_the top drawer\n", np.ones(8))
    np.testing.assert_array_equal(tokens, plain.tokenize("open the top drawer")[0])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    expected = sp.encode("open the top drawer", add_bos=True) + sp.encode("\n")  # openpi's pi0 format
    assert tokens[: len(expected)].tolist() == expected


def test_what_is_still_refused_is_one_line():
    proc = Processor(PromptTokenizer(require(TOKENIZER), LENGTH), _stats("quantile"), 7, convention=PI05)
    with pytest.raises(ValueError, match="discrete_state_input"):
        proc.tokenize("pick up the red block")  # the prompt needs the state
    pi0 = PolicyConvention(model_type="pi0", discrete_state_input=True, source="x")
    with pytest.raises(ConventionError, match="discrete_state_input with model_type 'pi0'"):
        pi0.check_supported()
    PI05.check_supported()


# ---------------------------------------------------------------------------------------- lerobot config.json
def _features(*images: str, state: int = 8, action: int = 7) -> dict:
    inputs = {f"observation.images.{k}": {"type": "VISUAL", "shape": [3, 256, 256]} for k in images}
    return {
        "input_features": inputs | {"observation.state": {"type": "STATE", "shape": [state]}},
        "output_features": {"action": {"type": "ACTION", "shape": [action]}},
    }


def _read(tmp_path, config: dict) -> PolicyConvention | None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return load_convention(tmp_path)


def test_lerobot_pi05_libero_config(tmp_path):
    """lerobot's LIBERO pi0.5 recipe (docs/source/pi05.mdx): MEAN_STD, n_action_steps 10, empty_cameras 1."""
    config = {
        "type": "pi05",
        **_features("image", "image2"),
        "chunk_size": 50,
        "n_action_steps": 10,
        "empty_cameras": 1,
        "tokenizer_max_length": 200,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
        "use_relative_actions": False,
    }
    conv = _read(tmp_path, config)
    assert conv.model_type == "pi05" and conv.discrete_state_input and conv.norm_mode == "mean_std"
    assert (conv.action_horizon, conv.replan_steps, conv.max_token_len) == (50, 10, 200)
    assert (conv.state_dim, conv.action_dim, conv.delta_action_mask) == (8, 7, ())
    assert conv.image_slots == (("image", "image"), ("image2", "wrist_image"), ("empty_camera_0", None))
    conv.check_supported()
    # PI05Config's own defaults where the file is silent: QUANTILES, 200 tokens, n_action_steps = chunk_size
    bare = _read(tmp_path, {"type": "pi05", "chunk_size": 10})
    assert (bare.norm_mode, bare.max_token_len, bare.replan_steps, bare.image_slots) == (
        "quantile",
        200,
        10,
        (),
    )


def test_lerobot_pi0_config_masks_what_it_cannot_feed(tmp_path):
    """Three image features (openpi's names) and two empty cameras: two fed, three masked, none dropped;
    lerobot <= 0.4 also saved the empty cameras in input_features, which must not double them."""
    config = {
        "type": "pi0",
        **_features("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb", "empty_camera_0"),
        "chunk_size": 50,
        "n_action_steps": 50,
        "empty_cameras": 2,
    }
    conv = _read(tmp_path, config)
    assert conv.image_slots == (
        ("base_0_rgb", "image"),
        ("left_wrist_0_rgb", "wrist_image"),
        ("right_wrist_0_rgb", None),
        ("empty_camera_0", None),
        ("empty_camera_1", None),
    )
    assert conv.norm_mode == "mean_std" and conv.max_token_len == 48 and not conv.discrete_state_input
    # a feature named like an env camera takes that camera, wherever it is listed
    swapped = _read(tmp_path, {"type": "pi0", **_features("wrist_image", "image")})
    assert swapped.image_slots == (("wrist_image", "wrist_image"), ("image", "image"))
    # the masked slots reach the model as zeros with mask False
    proc = Processor(PromptTokenizer(require(TOKENIZER), 48), _stats("mean_std"), 7, convention=conv)
    images = np.full((1, 2, 8, 8, 3), 255, dtype=np.uint8)
    batch = proc.batch(images, np.zeros((1, 8)), ["pick up the red block"], device="cpu")
    assert batch.images.shape[1] == 5 and batch.image_masks[0].tolist() == [True, True, False, False, False]
    assert (batch.images[0, 2:] == -1.0).all() and (batch.images[0, :2] == 1.0).all()


def test_lerobot_relative_actions_and_refusals(tmp_path):
    names = ["x", "y", "z", "rx", "ry", "rz", "gripper"]
    relative = {"type": "pi05", "use_relative_actions": True, "action_feature_names": names, "chunk_size": 10}
    assert _read(tmp_path, relative).delta_action_mask == (True,) * 6 + (False,)
    assert _read(tmp_path, {**relative, "action_feature_names": None}).delta_action_mask == (True,) * 7
    cases = [
        ({"normalization_mapping": {"STATE": "MEAN_STD", "ACTION": "QUANTILES"}}, "STATE MEAN_STD != ACTION"),
        ({"normalization_mapping": {"STATE": "MIN_MAX", "ACTION": "MIN_MAX"}}, "MIN_MAX is not supported"),
        ({"n_action_steps": 20}, "n_action_steps 20 > chunk_size 10"),
        ({"use_proprioceptive_memory": True}, "use_proprioceptive_memory"),
    ]
    for extra, message in cases:
        with pytest.raises(ConventionError, match=message):
            _read(tmp_path, {"type": "pi05", "chunk_size": 10, **extra})
    assert _read(tmp_path, {"type": "act"}) is None  # another lerobot policy: no convention
