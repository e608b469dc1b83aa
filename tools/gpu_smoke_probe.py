"""The in-process half of tools/gpu_smoke.py: the trainer on one config, recording where tensors live.

    python tools/gpu_smoke_probe.py SPEC.json      # SPEC: {"config", "overrides", "ds_config", "result"}

Runs ript_ds.trainer.Trainer (setup, then run: rollouts, update, metrics.jsonl, checkpoint) exactly as
launch/train.py does, with two additions:
- a Recorder that counts, by device, every tensor reaching the model: a forward pre-hook on the module
  DeepSpeed wraps sees what the update feeds it (after DeepSpeed's own input handling), a wrapper on
  PI0Policy.sample_actions sees the rollout batches; at the end every parameter (ZeRO-3: this rank's
  partition) and buffer is counted too, and the dtype a Gemma q_proj computed in (bf16 autocast evidence);
- SmokeTrainer, which marks the first half of every group as successes after each rollout: random weights
  (almost) never succeed, every group would be dropped and no update would run.
The findings go to SPEC["result"] as JSON, also when the run fails (with what was recorded until then).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ProbeSpec:
    config: str  # experiment YAML, relative to the checkout
    overrides: list[str]  # section.key=value
    ds_config: str  # DeepSpeed JSON (the --deepspeed flag)
    result: str  # where the findings are written


def count_devices(obj: Any, into: Counter) -> None:
    """Count the tensors in obj (a tensor, a dataclass such as PI0Batch, a sequence, a dict) by device."""
    import torch

    if isinstance(obj, torch.Tensor):
        into[str(obj.device)] += 1
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            count_devices(getattr(obj, f.name), into)
    elif isinstance(obj, list | tuple):
        for item in obj:
            count_devices(item, into)
    elif isinstance(obj, dict):
        for item in obj.values():
            count_devices(item, into)


@dataclass
class Recorder:
    update_calls: int = 0
    rollout_calls: int = 0
    update_inputs: Counter = field(default_factory=Counter)  # device -> tensors
    update_outputs: Counter = field(default_factory=Counter)
    rollout_inputs: Counter = field(default_factory=Counter)
    proj_dtypes: set[str] = field(default_factory=set)
    layout: dict[str, int] = field(default_factory=dict)  # of the last update batch

    def attach(self, engine) -> None:
        def before(module, args, kwargs) -> None:
            self.update_calls += 1
            count_devices((args, kwargs), self.update_inputs)
            images = getattr(args[0], "images", None) if args else None
            if images is not None:  # [B, N_cam, 3, H, W]
                self.layout = {"rows": int(images.shape[0]), "cameras": int(images.shape[1])}

        engine.wrapped.register_forward_pre_hook(before, with_kwargs=True)
        engine.wrapped.register_forward_hook(lambda m, a, out: count_devices(out, self.update_outputs))
        policy, sample = engine.module, engine.module.sample_actions

        def sample_actions(*args, **kwargs):
            self.rollout_calls += 1
            count_devices((args, kwargs), self.rollout_inputs)
            return sample(*args, **kwargs)

        policy.sample_actions = sample_actions  # an instance attribute: the rollout's policy_fn calls it
        for name, module in policy.named_modules():
            if name.endswith("layers.0.self_attn.q_proj"):  # the first VLM layer's (LoRA-wrapped) projection
                module.register_forward_hook(lambda m, a, out: self.proj_dtypes.add(str(out.dtype)))
                break

    def summary(self, engine) -> dict[str, Any]:
        out: dict[str, Any] = {
            "update_calls": self.update_calls,
            "rollout_calls": self.rollout_calls,
            "update_inputs": dict(self.update_inputs),
            "update_outputs": dict(self.update_outputs),
            "rollout_inputs": dict(self.rollout_inputs),
            "proj_dtypes": sorted(self.proj_dtypes),
            "layout": self.layout,
        }
        if engine is not None:
            params, buffers = Counter(), Counter()
            for p in engine.wrapped.parameters():
                params[str(getattr(p, "ds_tensor", p).device)] += 1  # ZeRO-3: this rank's partition
            for b in engine.wrapped.buffers():
                buffers[str(b.device)] += 1
            out.update(parameters=dict(params), buffers=dict(buffers), engine_device=str(engine.device))
        return out


def force_mixed(episodes: list, k: int) -> list:
    """Episodes come in groups of K consecutive ones (Trainer._requests): the first half of each succeeds."""
    for i, ep in enumerate(episodes):
        if not ep.crashed:
            ep.success = i % k < max(1, k // 2)
    return episodes


def smoke_trainer(cfg, ds_config: str, after_iteration: Callable[[], None]):
    from ript_ds.trainer import Trainer

    class SmokeTrainer(Trainer):
        """The trainer with mixed outcomes forced after each rollout, so the update always runs."""

        def _rollout(self, *args, **kwargs):
            return force_mixed(super()._rollout(*args, **kwargs), self.cfg.ript.rollouts_per_context)

        def iterate(self) -> dict[str, float]:
            metrics = super().iterate()
            after_iteration()
            return metrics

    return SmokeTrainer(cfg, ds_config)


def engine_summary(engine) -> dict[str, Any]:
    named = [(n, p, int(getattr(p, "ds_numel", p.numel()))) for n, p in engine.wrapped.named_parameters()]
    return {
        "stage": engine.stage,
        "bf16": engine.bf16,
        "parameters": sum(k for _, _, k in named),
        "trainable": sum(k for _, p, k in named if p.requires_grad),
        "lora": sum(k for n, _, k in named if "lora_" in n),
    }


def main(argv: list[str] | None = None) -> int:
    from ript_ds.config import load_config

    argv = sys.argv[1:] if argv is None else argv
    spec = ProbeSpec(**json.loads(Path(argv[0]).read_text()))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recorder, trainer, found = Recorder(), None, {"error": None}

    def write() -> None:  # after every iteration too: a run killed at its timeout keeps what it recorded
        found["placement"] = recorder.summary(getattr(trainer, "engine", None))
        Path(spec.result).write_text(json.dumps(found, indent=1))

    try:
        trainer = smoke_trainer(load_config(ROOT / spec.config, spec.overrides), spec.ds_config, write)
        trainer.setup()
        recorder.attach(trainer.engine)
        found["engine"] = engine_summary(trainer.engine)
        trainer.run()  # closes the env pool and the metrics sinks itself
    except BaseException as err:  # SystemExit included: what was recorded until then is still written
        found["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
        if trainer is not None:
            trainer.close()
    finally:
        write()
    return 0 if found["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
