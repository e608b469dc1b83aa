"""openpi JAX PI0 / PI0.5 parameters (a flat dict of numpy arrays keyed by the '/'-joined Flax path) ->
canonical.

Pure numpy/torch: tools/convert_openpi_jax.py adds the orbax reading. Sizes come from the array shapes
(SigLIP's head count from its attention kernel, which is (depth, width, heads, head_dim)); only the chunk
size (action horizon) is not stored in the weights and is an argument.

The Flax -> torch rules (each one silently wrong when skipped; see the fixture README's "Traps"):
- Dense kernels are (in, out): torch Linear weights are their transpose;
- scanned layers are stacked along axis 0 (`.../layers/...`, `.../encoderblock/...`);
- `q_einsum` (N, D, H) -> q_proj = transpose(0, 2, 1).reshape(N*H, D); `kv_einsum` (2, K, D, H) likewise
  for k (index 0) and v (index 1); `attn_vec_einsum` (N, H, D) -> o_proj = reshape(N*H, D).T;
- `gating_einsum` (2, D, F): index 0 is the GELU-gated half (gate_proj), index 1 up_proj;
- Gemma RMSNorm scales are used as (1 + scale) by both sides: copied unchanged;
- the SigLIP patch kernel is HWIO -> Conv2d OIHW;
- a `_1` suffix marks the action expert (`q_einsum_1`, `mlp_1`, `final_norm_1`, ...);
- PI0.5 (pi05=True; model/pi05.py) is recognised by its leaves, not by a path name: the expert's norms are
  adaptive, `pre_attention_norm_1/Dense_0`, `pre_ffw_norm_1/Dense_0` (stacked) and `final_norm_1/Dense_0`
  with kernels (in, 3 * width) -> `.dense` Linear weights (transposed) and no `scale`; `time_mlp_in/out`
  instead of `state_proj` and `action_time_mlp_in/out`.
Keys ending in `/value` (openpi's training layout, nnx.State) are accepted as the same leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from ript_ds.model.arch import GemmaArch, PI0Arch, VisionArch

IMG = "PaliGemma/img/"
LLM = "PaliGemma/llm/"
ENC = IMG + "Transformer/encoderblock/"
ATT = ENC + "MultiHeadDotProductAttention_0/"
CAN_VT = "model.vlm.vision_tower."
_PROJ = {
    "state_proj": "embed_action_time.state_proj",
    "action_in_proj": "embed_action_time.action_in_proj",
    "action_time_mlp_in": "embed_action_time.action_time_mlp_in",
    "action_time_mlp_out": "embed_action_time.action_time_mlp_out",
    "action_out_proj": "action_out_proj",
}
_PROJ_PI05 = {
    "action_in_proj": "embed_action_time.action_in_proj",
    "time_mlp_in": "embed_action_time.time_mlp_in",
    "time_mlp_out": "embed_action_time.time_mlp_out",
    "action_out_proj": "action_out_proj",
}
PI05_LEAF = LLM + "final_norm_1/Dense_0/kernel"  # the expert's adaptive final norm: only in pi0.5


class OpenpiJaxError(ValueError):
    """Parameters that are not an openpi PI0 / PI0.5 checkpoint; the message names the keys."""


def model_type_of(params: Mapping[str, np.ndarray]) -> str:
    """The model type of flat (`normalize_keys`-ed) openpi parameters: pi05 for pi05=True, else pi0."""
    return "pi05" if PI05_LEAF in params else "pi0"


def normalize_keys(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the training layout's trailing `/value` and a leading `params/` level."""
    out = {}
    for key, value in params.items():
        k = key.removesuffix("/value")
        k = k.removeprefix("params/")
        if k in out:
            raise OpenpiJaxError(f"two leaves map to {k!r} (one with /value and one without?)")
        out[k] = np.asarray(value)
    return out


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float32)))


def arch_from_params(params: Mapping[str, np.ndarray], chunk_size: int = 50, **overrides) -> PI0Arch:
    """PI0Arch (pi0 or pi05) from openpi array shapes (flat keys, already `normalize_keys`-ed)."""
    p = params
    _require(p, [LLM + "layers/attn/q_einsum/w", IMG + "embedding/kernel", "action_in_proj/kernel"])
    model_type = model_type_of(p)
    # pi0.5 has no state projection; its max_state_dim is only the processor's padding (the default)
    state_dims = {} if model_type == "pi05" else {"max_state_dim": p["state_proj/kernel"].shape[0]}

    def gemma(sfx: str) -> GemmaArch:
        depth, heads, width, head_dim = p[f"{LLM}layers/attn/q_einsum{sfx}/w"].shape
        kv = p[f"{LLM}layers/attn/kv_einsum{sfx}/w"].shape[2]
        mlp = p[f"{LLM}layers/mlp{sfx}/gating_einsum"].shape[-1]
        return GemmaArch(
            width=width, depth=depth, mlp_dim=mlp, num_heads=heads, num_kv_heads=kv, head_dim=head_dim
        )

    kh, kw, _, vwidth = p[IMG + "embedding/kernel"].shape
    if kh != kw:
        raise OpenpiJaxError(f"non-square SigLIP patches {kh}x{kw} are not supported")
    tokens = p[IMG + "pos_embedding"].shape[-2]
    side = round(tokens**0.5)
    if side * side != tokens:
        raise OpenpiJaxError(f"SigLIP has {tokens} position embeddings, not a square grid")
    vdepth, _, vheads, _ = p[ATT + "query/kernel"].shape
    vision = VisionArch(
        width=vwidth,
        depth=vdepth,
        mlp_dim=p[ENC + "MlpBlock_0/Dense_0/kernel"].shape[-1],
        num_heads=vheads,
        patch_size=kh,
        image_size=side * kh,
    )
    return PI0Arch(
        vlm=gemma(""),
        expert=gemma("_1"),
        vision=vision,
        vocab_size=p[LLM + "embedder/input_embedding"].shape[0],
        chunk_size=chunk_size,
        max_action_dim=p["action_in_proj/kernel"].shape[0],
        model_type=model_type,
        **state_dims,
        **overrides,
    )


def _require(p: Mapping[str, np.ndarray], keys: list[str]) -> None:
    missing = [k for k in keys if k not in p]
    if missing:
        shown = ", ".join(missing[:8])
        raise OpenpiJaxError(
            f"not an openpi PI0 parameter tree: missing {shown}{' ...' if len(missing) > 8 else ''} "
            f"({len(missing)} in all); first keys present: {', '.join(sorted(p)[:5])}"
        )


def to_canonical_openpi(params: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """Flat openpi params ('/'-joined paths, optional `/value`) -> canonical float32 torch tensors.

    Strict: every leaf must be consumed, and every leaf the model type (model_type_of) needs must be
    there; anything else (e.g. pi0-FAST's) is an error naming it.
    """
    p = normalize_keys(params)
    used: set[str] = set()

    def get(key: str) -> np.ndarray:
        if key not in p:
            _require(p, [key])
        used.add(key)
        return p[key]

    out: dict[str, Tensor] = {}
    pi05 = model_type_of(p) == "pi05"
    _siglip(get, out)
    _gemma_stacks(get, out, adaptive_expert=pi05)
    for src, dst in (_PROJ_PI05 if pi05 else _PROJ).items():
        out[f"{dst}.weight"] = _t(get(f"{src}/kernel").T)
        out[f"{dst}.bias"] = _t(get(f"{src}/bias"))
    left = sorted(set(p) - used)
    if left:
        raise OpenpiJaxError(
            f"openpi parameters that map to nothing (pi0-FAST checkpoints are not PI0 / PI0.5): "
            f"{', '.join(left[:10])}{' ...' if len(left) > 10 else ''} ({len(left)} in all)"
        )
    return out


def _siglip(get: Callable[[str], np.ndarray], out: dict[str, Tensor]) -> None:
    """The SigLIP tower and the multi-modal projector (flax layouts -> torch Linear / Conv2d)."""
    out[CAN_VT + "embeddings.patch_embedding.weight"] = _t(
        get(IMG + "embedding/kernel").transpose(3, 2, 0, 1)
    )
    out[CAN_VT + "embeddings.patch_embedding.bias"] = _t(get(IMG + "embedding/bias"))
    pos = get(IMG + "pos_embedding")
    out[CAN_VT + "embeddings.position_embedding.weight"] = _t(pos.reshape(-1, pos.shape[-1]))
    depth = get(ATT + "query/kernel").shape[0]
    for i in range(depth):
        lay = f"{CAN_VT}encoder.layers.{i}."
        for src, dst in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
            out[f"{lay}{dst}.weight"] = _t(get(f"{ENC}{src}/scale")[i])
            out[f"{lay}{dst}.bias"] = _t(get(f"{ENC}{src}/bias")[i])
        for src, dst in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            k = get(f"{ATT}{src}/kernel")[i]  # (D, heads, head_dim)
            out[f"{lay}self_attn.{dst}.weight"] = _t(k.reshape(k.shape[0], -1).T)
            out[f"{lay}self_attn.{dst}.bias"] = _t(get(f"{ATT}{src}/bias")[i].reshape(-1))
        k = get(ATT + "out/kernel")[i]  # (heads, head_dim, D)
        out[f"{lay}self_attn.out_proj.weight"] = _t(k.reshape(-1, k.shape[-1]).T)
        out[f"{lay}self_attn.out_proj.bias"] = _t(get(ATT + "out/bias")[i])
        for src, dst in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[f"{lay}mlp.{dst}.weight"] = _t(get(f"{ENC}MlpBlock_0/{src}/kernel")[i].T)
            out[f"{lay}mlp.{dst}.bias"] = _t(get(f"{ENC}MlpBlock_0/{src}/bias")[i])
    out[CAN_VT + "post_layernorm.weight"] = _t(get(IMG + "Transformer/encoder_norm/scale"))
    out[CAN_VT + "post_layernorm.bias"] = _t(get(IMG + "Transformer/encoder_norm/bias"))
    out["model.vlm.multi_modal_projector.linear.weight"] = _t(get(IMG + "head/kernel").T)
    out["model.vlm.multi_modal_projector.linear.bias"] = _t(get(IMG + "head/bias"))


def _gemma_stacks(get: Callable[[str], np.ndarray], out: dict[str, Tensor], adaptive_expert: bool) -> None:
    """The PaliGemma LLM (suffix "") and the action expert (suffix "_1"), stacked over layers in openpi;
    adaptive_expert: pi0.5's expert norms (_norms)."""
    out["model.vlm.language_model.embed_tokens.weight"] = _t(get(LLM + "embedder/input_embedding"))
    for sfx, root in (("", "model.vlm.language_model."), ("_1", "model.dit.")):
        q_all = get(f"{LLM}layers/attn/q_einsum{sfx}/w")  # (L, N, D, H)
        kv_all = get(f"{LLM}layers/attn/kv_einsum{sfx}/w")  # (L, 2, K, D, H)
        o_all = get(f"{LLM}layers/attn/attn_vec_einsum{sfx}/w")  # (L, N, H, D)
        gate_all = get(f"{LLM}layers/mlp{sfx}/gating_einsum")  # (L, 2, D, F)
        down_all = get(f"{LLM}layers/mlp{sfx}/linear")  # (L, F, D)
        _norms(get, out, sfx, root, adaptive=adaptive_expert and sfx == "_1")
        for i in range(q_all.shape[0]):
            lay = f"{root}layers.{i}."
            n, d, h = q_all[i].shape
            out[lay + "self_attn.q_proj.weight"] = _t(q_all[i].transpose(0, 2, 1).reshape(n * h, d))
            for j, name in enumerate(("k_proj", "v_proj")):
                kv = kv_all[i, j]  # (K, D, H)
                out[f"{lay}self_attn.{name}.weight"] = _t(
                    kv.transpose(0, 2, 1).reshape(kv.shape[0] * kv.shape[2], kv.shape[1])
                )
            o = o_all[i]
            out[lay + "self_attn.o_proj.weight"] = _t(o.reshape(o.shape[0] * o.shape[1], o.shape[2]).T)
            out[lay + "mlp.gate_proj.weight"] = _t(gate_all[i, 0].T)
            out[lay + "mlp.up_proj.weight"] = _t(gate_all[i, 1].T)
            out[lay + "mlp.down_proj.weight"] = _t(down_all[i].T)


_NORMS = (("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm"))


def _norms(get: Callable[[str], np.ndarray], out: dict[str, Tensor], sfx: str, root: str, adaptive: bool):
    """One stack's norms: Gemma scales (used as (1 + scale) on both sides: copied), or pi0.5's adaptive
    norms, whose Dense_0 kernel (in, 3 * width) is the `.dense` Linear's weight transposed."""
    if not adaptive:
        for src, dst in _NORMS:
            for i, scale in enumerate(get(f"{LLM}layers/{src}{sfx}/scale")):
                out[f"{root}layers.{i}.{dst}.weight"] = _t(scale)
        out[root + "norm.weight"] = _t(get(f"{LLM}final_norm{sfx}/scale"))
        return
    for src, dst in _NORMS:
        kernels, biases = (
            get(f"{LLM}layers/{src}{sfx}/Dense_0/kernel"),
            get(f"{LLM}layers/{src}{sfx}/Dense_0/bias"),
        )
        for i in range(kernels.shape[0]):
            out[f"{root}layers.{i}.{dst}.dense.weight"] = _t(kernels[i].T)
            out[f"{root}layers.{i}.{dst}.dense.bias"] = _t(biases[i])
    out[root + "norm.dense.weight"] = _t(get(f"{LLM}final_norm{sfx}/Dense_0/kernel").T)
    out[root + "norm.dense.bias"] = _t(get(f"{LLM}final_norm{sfx}/Dense_0/bias"))


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict (orbax's restored pytree) -> '/'-joined flat dict of numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, path + "/"))
        else:
            out[path] = np.asarray(value)
    return out
