"""Read a DeepSpeed checkpoint tag (as DeepSpeedEngine.save writes it) back into one fp32 state dict.

Offline, one process, no engine: DeepSpeed's zero_to_fp32 rebuilds the fp32 master weights from the
per-rank optimizer partitions (ZeRO-1/2/3); without ZeRO partitions the module state in
mp_rank_00_model_states.pt is used. Names are those of the wrapped module (with LoRA the peft names,
`base_model.model.<canonical>...`); LoRA checkpoints hold the trainable parameters only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# Keys DeepSpeed writes into the model-states file itself; everything else there is the client state.
DS_STATE_KEYS = {
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "ds_config",
    "ds_version",
    "checkpoint_parallel_dimensions",
}


def model_states_file(tag_dir: Path) -> Path | None:
    return next((tag_dir / n for n in MODEL_STATES if (tag_dir / n).exists()), None)


def read_model_states(tag_dir: Path) -> dict[str, Any]:
    """The (rank 0) model-states dict: DeepSpeed's bookkeeping plus the client state, on CPU."""
    path = model_states_file(tag_dir)
    if path is None:
        raise FileNotFoundError(f"{tag_dir} has no {MODEL_STATES[0]}: not a DeepSpeed checkpoint tag")
    return torch.load(path, map_location="cpu", weights_only=False)


def client_state(states: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in states.items() if k not in DS_STATE_KEYS}


def zero_stage(states: dict[str, Any]) -> int:
    cfg = states.get("ds_config")
    zero = getattr(cfg, "zero_config", None)
    if zero is not None:
        return int(getattr(zero, "stage", 0))
    if isinstance(cfg, dict):
        return int(cfg.get("zero_optimization", {}).get("stage", 0))
    return 0


def fp32_state_dict(tag_dir: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(fp32 CPU state dict named as the wrapped module, the model-states dict) of one checkpoint tag."""
    tag_dir = Path(tag_dir)
    states = read_model_states(tag_dir)
    module = states.get("module") or {}
    # Below ZeRO-3 the module state holds real (possibly lower-precision) tensors: a base to override.
    state = {k: v.float() for k, v in module.items() if isinstance(v, Tensor) and v.numel() > 0}
    if any(tag_dir.glob("*optim_states.pt")):
        from ript_ds.engine.deepspeed import zero_fp32_state_dict  # the one module importing deepspeed

        fp32 = zero_fp32_state_dict(tag_dir)
        state.update({k: v.detach().to(torch.float32) for k, v in fp32.items()})
    elif zero_stage(states) == 3:
        raise FileNotFoundError(f"{tag_dir}: ZeRO-3 checkpoint without its *optim_states.pt partitions")
    return state, states
