"""Experiment config: YAML + overrides, types, ranges, unknown keys with hints."""

from __future__ import annotations

import pytest

from ript_ds.config import ConfigError, ExperimentCfg, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "x.yaml"
    cfg_file.write_text("run_name: exp\ntrain:\n  lr: 3.0e-5\nenv:\n  task_ids: [0, 2]\n")
    cfg = load_config(
        cfg_file,
        [
            "train.lr=1e-4",
            "ript.rollouts_per_context=4",
            "model.checkpoint=none",
            "rollout.guidance=2",
            "model.gradient_checkpointing=true",
            "env.task_ids=1,3",
        ],
    )
    assert cfg.run_name == "exp" and cfg.train.lr == 1e-4 and isinstance(cfg.rollout.guidance, float)
    assert cfg.ript.rollouts_per_context == 4 and cfg.model.checkpoint is None
    assert cfg.model.gradient_checkpointing is True and cfg.env.task_ids == [1, 3]
    assert load_config().to_dict() == ExperimentCfg().to_dict()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'lr'?"),
        ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'?"),
        ("train.lr=fast", "train.lr must be float, got 'fast'"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("ript.rollouts_per_context=1", "ript.rollouts_per_context must be >= 2 (RLOO needs K >= 2)"),
        ("ript.loss=ppo", "ript.loss='ppo' is not one of ['cfg', 'awr', 'fpo']"),
        ("model.dtype=float16", "model.dtype='float16' is not one of ['float32', 'bfloat16']"),
        ("rollout.num_envs=2.5", "rollout.num_envs must be int, got '2.5'"),
        ("env.suite=libero_10", "env.kind=synthetic needs env.suite=synthetic"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing must be true or false"),
        ("lr", "override 'lr' must look like section.key=value"),
        ("rollout.noise_scale=0", "rollout.noise_scale=0.0 must be > 0"),
    ],
)
def test_bad_values_give_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train must be a section"):
        load_config(bad)


def test_in_process_envs_are_for_the_synthetic_env_only():
    with pytest.raises(ConfigError, match=r"rollout\.in_process=true is for env\.kind=synthetic only"):
        load_config(None, ["env.kind=libero", "env.suite=libero_spatial", "rollout.in_process=true"])
    assert load_config(None, ["rollout.in_process=true"]).rollout.in_process


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.grad_accum_steps=0", "train.grad_accum_steps must be >= 1"),
        ("rollout.render_device=-1", "rollout.render_device=-1 must be a GPU index >= 0"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("ript.fpo_samples=0", "ript.fpo_samples must be >= 1"),
        ("train.iterations=-1", "train.iterations must be >= 0"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
        ("train.eval_every=-2", "train.eval_every must be >= 0"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
        ("train.collective_timeout_s=0", "train.collective_timeout_s must be > 0"),
        ("ckpt.every=-1", "ckpt.every must be >= 0"),
        ("rollout.step_timeout_s=0", "rollout.step_timeout_s must be > 0"),
        ("rollout.videos_per_iteration=-1", "rollout.videos_per_iteration must be >= 0"),
        ("ript.uncond_weight=-1", "ript.uncond_weight must be >= 0"),
        ("ript.awr_beta=0", "ript.awr_beta must be > 0"),
        ("ript.fpo_clip=0", "ript.fpo_clip must be > 0"),
        ("ript.skip_solved_after=0", "ript.skip_solved_after must be >= 1"),
        ("env.num_eval_init_states=-1", "env.num_eval_init_states must be >= 0"),
        ("env.max_steps=0", "env.max_steps must be >= 1"),
        ("model.num_inference_steps=0", "model.num_inference_steps must be >= 1"),
        ("model.tokenizer_max_length=1", "model.tokenizer_max_length must be >= 2"),
        ("engine.lora.dropout=1", "engine.lora.dropout must be in [0, 1)"),
    ],
)
def test_ranges_are_checked(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_help_config_prints_whole_docs():
    from ript_ds.config import describe_config

    text = describe_config()
    # a doc ending in a parenthesis, and one wrapped by the formatter over several lines
    assert "every N iterations (0 = never)\n" in text
    assert "keep_last (int, default 2): complete checkpoints kept (plus the best)\n" in text
    for line in text.splitlines():
        if line.startswith("  "):
            assert line.count("(") == line.count(")"), line


def test_num_inference_steps_defaults_to_the_checkpoints():
    assert ExperimentCfg().model.num_inference_steps is None
    assert load_config(None, ["model.num_inference_steps=3"]).model.num_inference_steps == 3


def test_a_renamed_key_is_read_under_its_new_name(tmp_path):
    """ript.cfg_alpha became ript.uncond_weight ("cfg" means config in code): an earlier run's
    config.yaml still loads, its checkpoint still resumes, and giving both names is one clear error."""
    from ript_ds.ckpt.manager import check_config

    old = tmp_path / "old.yaml"
    old.write_text("ript:\n  cfg_alpha: 0.3\n")
    assert load_config(old).ript.uncond_weight == 0.3
    assert load_config(None, ["ript.cfg_alpha=0.2"]).ript.uncond_weight == 0.2
    with pytest.raises(ConfigError, match=r"renamed to ript\.uncond_weight: give only"):
        load_config(old, ["ript.uncond_weight=0.1"])
    saved = load_config().to_dict()
    saved["ript"]["cfg_alpha"] = saved["ript"].pop("uncond_weight")
    check_config(saved, load_config().to_dict(), allow=False)  # no "config changed" error
    saved["ript"]["cfg_alpha"] = 0.5
    with pytest.raises(ConfigError, match=r"ript\.uncond_weight: 0\.5 -> 0\.1"):
        check_config(saved, load_config().to_dict(), allow=False)


@pytest.mark.parametrize(
    "name",
    ["debug", "demo", "libero_spatial_lora", "libero_10_full", "debug_pi05", "libero_spatial_pi05_lora"],
)
def test_every_shipped_config_loads_and_builds_its_model_type(name):
    from pathlib import Path

    from ript_ds.build import build_arch

    path = Path(__file__).resolve().parents[1] / "launch" / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    assert build_arch(cfg).model_type == ("pi05" if "pi05" in name else "pi0")
