"""Check a PI0 or PI0.5 checkpoint against reference outputs (loss per element and sampled actions).

    python tools/parity_check.py --fixture ../shared/fixtures/pi0_lerobot_tiny_a
    python tools/parity_check.py --fixture ../shared/fixtures/pi05_lerobot_tiny_a

The fixture directory holds arch.json (the sizes; `policy_type` "pi05", or an expert with `use_adarms`,
makes it a PI0.5), weights.safetensors (any layout our loader reads) and
io.safetensors (image_<i>, image_mask_<i>, lang_tokens, lang_masks, state, actions, noise, time and the
reference's loss_per_element and sampled_actions). Prints one JSON line and exits 1 when a tolerance is
exceeded, 2 when the fixture itself is unusable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ript_ds.model.arch import arch_from_reference_json
from ript_ds.model.pi0 import PI0Batch, PI0Policy
from ript_ds.model.pi05 import make_policy
from ript_ds.model.weights import CheckpointError, load_weights_file

IO_KEYS = (
    "lang_tokens",
    "lang_masks",
    "state",
    "actions",
    "noise",
    "time",
    "loss_per_element",
    "sampled_actions",
)


class FixtureError(ValueError):
    pass


def read_io(path: Path) -> tuple[PI0Batch, dict[str, torch.Tensor]]:
    if not path.exists():
        raise FixtureError(
            f"{path} not found; a fixture needs io.safetensors with inputs and reference outputs"
        )
    io = load_file(str(path))
    absent = [k for k in IO_KEYS if k not in io]
    n_cam = sum(1 for k in io if k.startswith("image_") and not k.startswith("image_mask_"))
    if absent or n_cam == 0:
        raise FixtureError(f"{path} lacks tensors {absent + ([] if n_cam else ['image_0'])}")
    cams = range(n_cam)
    masks = [io.get(f"image_mask_{i}", torch.ones(io["state"].shape[0], dtype=torch.bool)) for i in cams]
    batch = PI0Batch(
        images=torch.stack([io[f"image_{i}"].float() for i in cams], dim=1),
        image_masks=torch.stack(masks, dim=1).bool(),
        tokens=io["lang_tokens"].long(),
        token_masks=io["lang_masks"].bool(),
        state=io["state"].float(),
        actions=io["actions"].float(),
    )
    return batch, io


def compare(policy: PI0Policy, batch: PI0Batch, io: dict[str, torch.Tensor]) -> tuple[float, float]:
    ref_loss, ref_actions = io["loss_per_element"], io["sampled_actions"]
    with torch.no_grad():
        policy.train()  # the reference loss is the training forward (the model has no dropout)
        loss = policy.loss(batch, io["noise"].float(), io["time"].float())
        policy.eval()
        actions = policy.sample_actions(batch, io["noise"].float(), num_steps=policy.arch.num_inference_steps)
    if loss.shape != ref_loss.shape or actions.shape != ref_actions.shape:
        raise FixtureError(
            f"output shapes loss {tuple(loss.shape)} / actions {tuple(actions.shape)} differ from the "
            f"reference {tuple(ref_loss.shape)} / {tuple(ref_actions.shape)}; check chunk_size and action dims"
        )
    return (loss - ref_loss).abs().max().item(), (actions - ref_actions).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fixture", type=Path, required=True, help="directory with arch.json, weights, io")
    parser.add_argument("--weights", type=Path, help="weights file (default: FIXTURE/weights.safetensors)")
    parser.add_argument("--atol-actions", type=float, default=1e-5)
    parser.add_argument("--atol-loss", type=float, default=1e-4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        arch_file = args.fixture / "arch.json"
        if not arch_file.exists():
            raise FixtureError(f"{arch_file} not found; the fixture must describe its architecture")
        policy = make_policy(arch_from_reference_json(json.loads(arch_file.read_text())))
        load_weights_file(policy, args.weights or args.fixture / "weights.safetensors")
        batch, io = read_io(args.fixture / "io.safetensors")
        loss_diff, action_diff = compare(policy, batch, io)
    except (FixtureError, CheckpointError, ValueError, KeyError) as err:
        print(f"parity_check: {err}", file=sys.stderr)
        return 2
    ok = loss_diff <= args.atol_loss and action_diff <= args.atol_actions
    report = {"model_type": policy.arch.model_type, "loss_max_abs_diff": loss_diff}
    print(json.dumps(report | {"actions_max_abs_diff": action_diff, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
