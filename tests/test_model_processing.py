"""Tokenizer, normalization statistics (modes and sources) and the observation/action adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from ript_ds.model.normalization import FeatureStats, NormStats, load_norm_stats
from ript_ds.model.processing import Processor, PromptTokenizer, build_tiny_tokenizer

PROMPTS = ["pick up the black bowl and place it on the plate", "open the top drawer of the cabinet"]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return PromptTokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), PROMPTS), max_length=64)


def test_sentencepiece_prompt_convention(sp_tokenizer):
    tokens, mask = sp_tokenizer.encode("open_the top drawer\n")
    n = int(mask.sum())
    assert tokens[0] == sp_tokenizer.bos_id == 2
    assert mask[:n].all() and not mask[n:].any() and (tokens[n:] == 0).all()
    # '_' and newlines become spaces; the prompt ends with the tokenized "\n".
    same, _ = sp_tokenizer.encode("open the top drawer")
    assert np.array_equal(tokens, same)
    newline = sp_tokenizer._encode("\n")
    assert list(tokens[n - len(newline) : n]) == newline


def _rebuild_tokenizer(directory: str, rounds: int) -> None:
    for _ in range(rounds):
        build_tiny_tokenizer(directory, PROMPTS)


def test_tiny_tokenizer_is_never_seen_half_written(tmp_path):
    """Every rank builds the tiny tokenizer into the same run directory: a peer that loads it while
    another rank rewrites it must read a whole file (CI failure: a truncated file failed rank 1 alone)."""
    import multiprocessing

    path = build_tiny_tokenizer(tmp_path, PROMPTS)
    writer = multiprocessing.get_context("spawn").Process(target=_rebuild_tokenizer, args=(str(tmp_path), 40))
    writer.start()
    try:
        reads = 0
        while writer.is_alive() or reads == 0:
            PromptTokenizer(path, max_length=16)  # raises on an empty or partial file
            reads += 1
    finally:
        writer.join(timeout=120)
    assert writer.exitcode == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name != "tokenizer.model"], "temporary files left"


def test_tokenizer_json_and_errors(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "\n": 2, "open": 3, "the": 4, "drawer": 5, "[UNK]": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.save(str(tmp_path / "tokenizer.json"))
    t = PromptTokenizer(tmp_path, max_length=6)
    tokens, mask = t.encode("open the drawer")
    assert tokens[:4].tolist() == [1, 3, 4, 5] and mask.sum() >= 4
    with pytest.raises(ValueError, match="over tokenizer max_length=6"):
        t.encode("open the drawer the drawer the drawer")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model or tokenizer\.json"):
        PromptTokenizer(tmp_path / "..")


def stats(mode: str) -> NormStats:
    return NormStats(
        state=FeatureStats(
            mean=np.array([1.0, -2.0]),
            std=np.array([2.0, 4.0]),
            q01=np.array([-1.0, 0.0]),
            q99=np.array([3.0, 10.0]),
        ),
        actions=FeatureStats(
            mean=np.array([0.5]), std=np.array([0.25]), q01=np.array([-2.0]), q99=np.array([2.0])
        ),
        mode=mode,
        eps=0.0,
    )


def test_mean_std_and_quantile_by_hand():
    x = np.array([[3.0, 2.0]])
    np.testing.assert_allclose(stats("mean_std").normalize(x, "state"), [[1.0, 1.0]])  # (3-1)/2, (2+2)/4
    np.testing.assert_allclose(
        stats("quantile").normalize(x, "state"), [[1.0, -0.6]]
    )  # 2*(4/4)-1, 2*(2/10)-1
    for mode in ("mean_std", "quantile"):
        s = stats(mode)
        y = np.random.default_rng(0).normal(size=(5, 1))
        np.testing.assert_allclose(s.normalize(s.unnormalize(y, "actions"), "actions"), y, atol=1e-6)


def test_missing_stat_for_mode_is_an_error():
    s = NormStats(
        state=FeatureStats(mean=np.zeros(2), std=np.ones(2)), actions=FeatureStats(), mode="quantile"
    )
    with pytest.raises(ValueError, match=r"needs state \['q01', 'q99'\]"):
        s.normalize(np.zeros(2), "state")


def test_norm_stats_from_ours_openpi_and_lerobot_processor(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    stats("quantile").save(ours)
    assert load_norm_stats(ours) == stats("quantile")

    openpi = tmp_path / "openpi"
    (openpi / "assets" / "physical-intelligence" / "libero").mkdir(parents=True)
    payload = {
        "norm_stats": {
            "state": {"mean": [1, 2], "std": [3, 4], "q01": [0, 0], "q99": [1, 1]},
            "actions": {"mean": [0], "std": [1], "q01": [-1], "q99": [1]},
        }
    }
    (openpi / "assets" / "physical-intelligence" / "libero" / "norm_stats.json").write_text(
        json.dumps(payload)
    )
    got = load_norm_stats(openpi)  # asset ids may contain a slash
    assert got.eps == 1e-6 and got.state.std.tolist() == [3, 4] and got.actions.q99.tolist() == [1]
    (openpi / "assets" / "other").mkdir()
    (openpi / "assets" / "other" / "norm_stats.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="several openpi norm stats"):
        load_norm_stats(openpi)

    lerobot = tmp_path / "lerobot"
    lerobot.mkdir()
    flat = {
        "observation.state.mean": np.array([1.0, 2.0], np.float32),
        "observation.state.std": np.ones(2, np.float32),
        "action.mean": np.zeros(1, np.float32),
        "action.std": np.full(1, 3.0, np.float32),
    }
    save_file(flat, str(lerobot / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    got = load_norm_stats(lerobot)
    assert got.eps == 1e-8 and got.actions.std.tolist() == [3.0]
    assert load_norm_stats(tmp_path) is None


def test_processor_batch_and_decode(sp_tokenizer):
    norm = NormStats.identity(state_dim=8, action_dim=7)
    proc = Processor(tokenizer=sp_tokenizer, norm_stats=norm, action_dim=7, camera_slots=3)
    images = np.zeros((2, 2, 4, 4, 3), dtype=np.uint8)
    images[0, 0, 0, 0] = [255, 0, 128]
    states = np.arange(16, dtype=np.float32).reshape(2, 8)
    actions = np.ones((2, 5, 7), dtype=np.float32)
    batch = proc.batch(images, states, PROMPTS, actions, device="cpu")
    assert batch.images.shape == (2, 3, 3, 4, 4)
    assert batch.image_masks.tolist() == [[True, True, False]] * 2
    assert batch.images[0, 0, :, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 255 * 2 - 1], abs=1e-6)
    assert batch.images[0, 0, 0, 1, 1].item() == -1.0
    assert batch.state.shape == (2, 32) and batch.state[1, :8].tolist() == list(range(8, 16))
    assert (batch.state[:, 8:] == 0).all()
    assert batch.actions.shape == (2, 5, 32) and (batch.actions[..., 7:] == 0).all()
    decoded = proc.decode_actions(torch.arange(2 * 5 * 32, dtype=torch.float32).reshape(2, 5, 32))
    assert decoded.shape == (2, 5, 7) and decoded[0, 1, 0] == 32.0
