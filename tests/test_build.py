"""ript_ds/build.py: how a config becomes a policy and a processor, the same way for the trainer,
launch/eval.py and the tools: denoising steps, tokenizer choice, normalization statistics."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import ROOT, load_script, tiny_policy

from ript_ds.build import build_components, build_policy
from ript_ds.config import ConfigError, load_config
from ript_ds.model.arch import PI0Arch
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.processing import build_tiny_tokenizer
from ript_ds.model.weights import save_canonical


def _cfg(tmp_path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path}", *overrides])


def test_configured_denoising_steps_override_the_checkpoint(tmp_path):
    ckpt = save_canonical(PI0Policy(replace(PI0Arch.tiny(), num_inference_steps=4)), tmp_path / "ckpt")
    assert build_policy(_cfg(tmp_path, f"model.checkpoint={ckpt}"))[0].arch.num_inference_steps == 4
    policy = build_policy(_cfg(tmp_path, f"model.checkpoint={ckpt}", "model.num_inference_steps=2"))[0]
    assert policy.arch.num_inference_steps == 2
    assert build_policy(_cfg(tmp_path))[0].arch.num_inference_steps == 10  # a fresh model: PI0's default
    assert build_policy(_cfg(tmp_path, "model.num_inference_steps=3"))[0].arch.num_inference_steps == 3


def test_eval_samples_with_the_requested_steps_and_reports_them(tmp_path, monkeypatch):
    used: list[int] = []
    original = PI0Policy.sample_actions

    def recording(self, batch, noise=None, num_steps=None, *args, **kwargs):
        used.append(num_steps or self.arch.num_inference_steps)
        return original(self, batch, noise, num_steps, *args, **kwargs)

    monkeypatch.setattr(PI0Policy, "sample_actions", recording)
    ckpt = save_canonical(tiny_policy(), tmp_path / "ckpt")  # saved with 10 steps
    eval_cli = load_script("launch/eval.py")
    argv = ["--checkpoint", str(ckpt), "--suite", "synthetic", "--tasks", "0", "--episodes-per-task", "1"]
    argv += ["--max-steps", "4", "--num-envs", "1", "--num-inference-steps", "2"]
    argv += ["--out", str(tmp_path / "o")]
    assert eval_cli.main(argv) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["protocol"]["num_inference_steps"] == 2
    assert used and set(used) == {2}


def test_tokenizer_is_taken_from_the_checkpoint_directory(tmp_path):
    ckpt = save_canonical(tiny_policy(), tmp_path / "ckpt")
    build_tiny_tokenizer(ckpt, ["pick up the red block", "stack them"], vocab_size=64)
    comp = build_components(_cfg(tmp_path, f"model.checkpoint={ckpt}"))
    assert comp.processor.tokenizer.path == ckpt / "tokenizer.model"
    # the trainer's route (policy built by the engine) picks the same file
    comp = build_components(_cfg(tmp_path, f"model.checkpoint={ckpt}"), policy=tiny_policy())
    assert comp.processor.tokenizer.path == ckpt / "tokenizer.model"


def test_tiny_tokenizer_only_for_tiny_models(tmp_path):
    comp = build_components(_cfg(tmp_path))  # model.arch=tiny, no checkpoint: built in code
    assert comp.processor.tokenizer.path == tmp_path / "run" / "tokenizer" / "tokenizer.model"
    policy = PI0Policy(replace(PI0Arch.tiny(), vocab_size=1000))  # more rows than any built-in tiny model
    big = save_canonical(policy, tmp_path / "big")
    with pytest.raises(ConfigError, match=r"holds no tokenizer\.model or tokenizer\.json"):
        build_components(_cfg(tmp_path, f"model.checkpoint={big}"))
    with pytest.raises(ConfigError, match=r"holds no tokenizer\.model or tokenizer\.json"):
        build_components(_cfg(tmp_path, f"model.checkpoint={big}"), policy=policy)  # the trainer's route


def test_warm_start_checkpoint_carries_the_tokenizer_bc_used(tmp_path):
    from ript_ds.synthetic.bc import SyntheticSetup, build_synthetic_setup
    from ript_ds.synthetic.learning import prepare_warm_start, ript_overrides

    setup = SyntheticSetup(n_tasks=3, bc_init_states=2, bc_demos_per_state=1, bc_steps=2, bc_micro_batch=4)
    warm = prepare_warm_start(tmp_path / "warm", seed=0, setup=setup)
    assert (warm.checkpoint / "tokenizer.model").exists()
    overrides = ript_overrides(warm, iterations=1)
    assert not any(o.startswith("model.tokenizer_path=") for o in overrides)  # found in the checkpoint
    demo = ROOT / "launch" / "configs" / "demo.yaml"
    comp = build_components(load_config(demo, [*overrides, f"output_dir={tmp_path}"]))
    assert comp.processor.tokenizer.path == warm.checkpoint / "tokenizer.model"
    _, bc_processor, tasks = build_synthetic_setup(0, setup)
    for task in tasks:
        ours, theirs = comp.processor.tokenize(task.instruction), bc_processor.tokenize(task.instruction)
        assert (ours[0] == theirs[0]).all() and (ours[1] == theirs[1]).all()
