"""Analytic memory model of PI0 training: parameter inventory and activation bytes per training row.

memory/zero.py adds the ZeRO accounting, tools/estimate_memory.py prints the result; both are checked
against measurements in tests/test_estimate_memory.py and tools/bench/memory_check.py.

Parameters are counted exactly from the model definition (built on the meta device, so nothing is
allocated). Activations are what autograd keeps for backward, derived op by op from PI0Policy's forward
under bf16 autocast with fp32 parameters (our `model.dtype=bfloat16`; under LoRA the frozen Gemma weights
are stored in bf16), per joint transformer layer:

- RMSNorm (computed in fp32): input x and the rsqrt when x requires grad, the normed output when the norm
  weight trains (4 bytes per element).
- nn.Linear under autocast: a bf16 copy of its input when the weight trains, a bf16 copy of the weight when
  the input requires grad (each projection casts its input separately, so q/k/v keep three copies); none
  for a frozen weight the engine stores in bf16 (LoRA: engine/lora.store_frozen_bf16), saved as it is.
  A LoRA adapter adds a bf16 copy of the input and of the rank-r hidden state, and its B weight.
- eager attention over [prefix | suffix]: bf16 q, the key and value expanded to all heads, the fp32
  softmax output and its bf16 copy (b x heads x T_q x T).
- gated MLP: gate (input of GELU), GELU output and up projection (bf16), the product (down's input).
- SigLIP layers (scaled-dot-product attention): LayerNorm inputs, q/k/v/output, log-sum-exp, fc1 input,
  fc1 output and GELU output.

With activation checkpointing each checkpointed layer keeps only its inputs (fp32 residual streams, plus
the shared mask and RoPE tables), and backward recomputes one layer at a time. Nothing is saved where no
gradient flows: under LoRA the frozen vision tower, projector and token embeddings keep nothing.

The peak adds to the saved bytes one layer's temporaries (`_grad_working_set`) and the larger of
(a) autocast's cache of bf16 copies of the trainable weights, alive until the forward returns (with
checkpointing these copies are not saved, yet cached for the whole forward: for the full-size PI0 this,
not the recomputation, sets the peak) and (b) in backward, one checkpointed layer's recomputed activations.
Measured on CPU (tools/bench/memory_check.py) the saved bytes match to ~1% and the peak to ~10%.

PI0.5 (arch.model_type "pi05"): its parameters are counted exactly (model/pi05.make_policy) and its suffix
has no state token; its adaptive norms and time MLP are accounted like PI0's RMSNorms and action-time MLP
(an approximation: the per-token modulation they add is small next to attention and the MLPs; not measured).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ript_ds.model.arch import GemmaArch, PI0Arch
from ript_ds.model.pi0 import keeps_fp32, unused_parameter_names
from ript_ds.model.pi05 import make_policy

BF16, FP32, INT64 = 2, 4, 8
_LORA_TARGET = re.compile(r"model\.(vlm\.language_model|dit)\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


# ---------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamInfo:
    name: str
    numel: int
    trainable: bool
    low_precision: bool  # weight of an nn.Linear / Conv: autocast runs it in bf16, (its gradient all-reduce stays fp32: build_ds_config)
    used: bool  # read by the training forward (the last VLM layer's q/o/MLP and final norm are not)
    storage: int = FP32  # bytes per element as the engine stores it (BF16: a frozen weight, below)


def parameter_inventory(
    arch: PI0Arch,
    lora_targets: Iterable[str] = (),
    lora_rank: int = 0,
    train_cond_embed: bool = True,
    frozen_bf16: bool = True,
) -> list[ParamInfo]:
    """Every parameter of make_policy(arch) (PI0 or PI0.5) as the engine trains it: full fine-tuning (all used parameters
    train) or, with `lora_targets` (module names, engine/lora.lora_target_names), frozen base weights
    plus rank-`lora_rank` adapters A [r, in] and B [out, r] and, optionally, the condition embedding.
    frozen_bf16 (LoRA only; engine.lora.frozen_dtype=auto under model.dtype=bfloat16): the frozen weights
    of the modules autocast runs in bf16 are stored in bf16 (engine/lora.store_frozen_bf16), the rest fp32."""
    with torch.device("meta"):
        policy = make_policy(arch)
    unused = set(unused_parameter_names(arch))
    # Autocast runs Linear/Conv in bf16, except the parts model.pi0 keeps in fp32 (its _fp32 regions).
    low = {
        f"{m}.{n}" if m else n
        for m, mod in policy.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and not keeps_fp32(m)
        for n, _ in mod.named_parameters(recurse=False)
    }
    targets = set(lora_targets)
    modules = dict(policy.named_modules())
    out = []
    for name, p in policy.named_parameters():  # in the order DeepSpeed flattens them
        trainable = name not in unused and (not targets or (name == "cond_embed.weight" and train_cond_embed))
        bf16 = bool(targets) and frozen_bf16 and not trainable and not keeps_fp32(name.rpartition(".")[0])
        storage = BF16 if bf16 else FP32
        out.append(ParamInfo(name, p.numel(), trainable, name in low, name not in unused, storage))
        module = name.removesuffix(".weight")
        if module in targets:  # peft registers the adapters right after the base layer
            layer = modules[module]
            out.append(ParamInfo(f"{module}.lora_A.weight", lora_rank * layer.in_features, True, True, True))
            out.append(ParamInfo(f"{module}.lora_B.weight", layer.out_features * lora_rank, True, True, True))
    return out


def lora_ranks(lora_targets: Iterable[str], rank: int) -> dict[tuple[str, int, str], int]:
    """{(stack 'vlm'|'expert', layer, projection): rank} from full module names."""
    out = {}
    for name in lora_targets:
        m = _LORA_TARGET.fullmatch(name)
        if m is None:
            raise ValueError(f"lora target {name!r} is not a Gemma projection")
        out[("vlm" if m.group(1).startswith("vlm") else "expert", int(m.group(2)), m.group(3))] = rank
    return out


# ---------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class TokenLayout:
    """Token layout of one training row (PI0 on LIBERO: 3 camera slots x 256 + 48 prompt | 1 + 50)."""

    cameras: int = 3
    text_tokens: int = 48

    def prefix(self, arch: PI0Arch) -> int:
        return self.cameras * arch.vision.tokens_per_image + self.text_tokens

    def suffix(self, arch: PI0Arch) -> int:
        return suffix_tokens(arch)


def suffix_tokens(arch: PI0Arch) -> int:
    """PI0: the state token + H actions; PI0.5: the H actions alone."""
    return arch.chunk_size + (0 if arch.model_type == "pi05" else 1)


@dataclass
class Saved:
    """Bytes autograd keeps: token-proportional activations, and bf16 copies of trainable / frozen weights."""

    act: int = 0
    w_train: int = 0
    w_frozen: int = 0

    def add(self, other: Saved) -> Saved:
        self.act += other.act
        self.w_train += other.w_train
        self.w_frozen += other.w_frozen
        return self

    @property
    def total(self) -> int:
        return self.act + self.w_train + self.w_frozen


def _linear(n: int, d_in: int, d_out: int, x_rg: bool, w_train: bool, rank: int = 0, fp32: bool = False):
    """One nn.Linear on n tokens under bf16 autocast -> (Saved, output requires grad). A bf16 input (MLP
    product, SiLU output) is saved as it is instead of as a copy: the same bytes. fp32: a layer PI0 keeps
    in float32 under autocast (model.pi0 _fp32): its fp32 input is saved, no weight copy is made."""
    s = Saved()
    if fp32:
        s.act += FP32 * n * d_in if w_train else 0
        return s, x_rg or w_train
    if w_train:
        s.act += BF16 * n * d_in  # bf16 input copy, for the weight gradient
    if x_rg:
        weights = BF16 * d_in * d_out  # bf16 weight copy, for the input gradient
        s.w_train += weights if w_train else 0
        s.w_frozen += 0 if w_train else weights
    if rank:  # peft: lora_B(lora_A(x)) * scaling
        s.act += BF16 * n * (d_in + rank)
        s.w_train += BF16 * (d_out * rank + (rank * d_in if x_rg else 0))
    return s, x_rg or w_train or bool(rank)


def _rms_norm(n: int, d: int, x_rg: bool, w_train: bool) -> Saved:
    return Saved(act=n * ((FP32 * d + FP32 if x_rg else 0) + (FP32 * d if w_train else 0)))


@dataclass(frozen=True)
class _Stack:
    """One Gemma stack's share of a joint layer: its tokens, sizes, training mode and adapters."""

    g: GemmaArch
    n: int  # tokens of this stack (batch x sequence)
    full: bool  # full fine-tuning (every used weight trains)
    ranks: dict[str, int]  # projection -> LoRA rank for this layer


def _qkv(st: _Stack, x_rg: bool, with_q: bool) -> tuple[Saved, bool]:
    g, s = st.g, _rms_norm(st.n, st.g.width, x_rg, st.full)
    xn_rg = x_rg or st.full
    rg = False
    for proj, d_out in (("q_proj", g.num_heads * g.head_dim), ("k_proj", g.num_kv_heads * g.head_dim)):
        if proj == "q_proj" and not with_q:
            continue
        part, out_rg = _linear(st.n, g.width, d_out, xn_rg, st.full, st.ranks.get(proj, 0))
        s.add(part)
        rg |= out_rg
    part, out_rg = _linear(
        st.n, g.width, g.num_kv_heads * g.head_dim, xn_rg, st.full, st.ranks.get("v_proj", 0)
    )
    return s.add(part), rg or out_rg


def _finish(st: _Stack) -> Saved:
    """o_proj + residual, RMSNorm, gated MLP + residual (the stream requires grad here)."""
    g, n = st.g, st.n
    s, _ = _linear(n, g.num_heads * g.head_dim, g.width, True, st.full, st.ranks.get("o_proj", 0))
    s.add(_rms_norm(n, g.width, True, st.full))
    for proj in ("gate_proj", "up_proj"):
        s.add(_linear(n, g.width, g.mlp_dim, True, st.full, st.ranks.get(proj, 0))[0])
    s.act += 3 * BF16 * n * g.mlp_dim  # GELU input, GELU output, up output (both factors of the product)
    return s.add(_linear(n, g.mlp_dim, g.width, True, st.full, st.ranks.get("down_proj", 0))[0])


def _attention(b: int, g: GemmaArch, t_q: int, t: int) -> Saved:
    heads = b * g.num_heads
    return Saved(act=BF16 * heads * g.head_dim * (t_q + 2 * t) + (FP32 + BF16) * heads * t_q * t)


def _joint_layer(arch: PI0Arch, b: int, seq: TokenLayout, i: int, full: bool, ranks: dict, rg: tuple):
    """-> (Saved, whether the layer's outputs require grad). rg: (prefix, suffix) inputs require grad."""
    p, s_len = seq.prefix(arch), seq.suffix(arch)
    last = i == arch.vlm.depth - 1
    vlm = _Stack(arch.vlm, b * p, full, {k[2]: r for k, r in ranks.items() if k[:2] == ("vlm", i)})
    exp = _Stack(arch.expert, b * s_len, full, {k[2]: r for k, r in ranks.items() if k[:2] == ("expert", i)})
    saved, pre_rg = _qkv(vlm, rg[0], with_q=not last)
    part, suf_rg = _qkv(exp, rg[1], with_q=True)
    saved.add(part)
    if not (pre_rg or suf_rg):
        return saved, False
    # Past the attention both streams require grad: prefix queries meet suffix keys in one matmul.
    saved.add(_attention(b, arch.vlm, s_len if last else p + s_len, p + s_len))
    saved.add(_finish(exp))
    return (saved if last else saved.add(_finish(vlm))), True


def _siglip_layer(arch: PI0Arch, n: int) -> Saved:
    """One SigLIP encoder layer on n tokens (full fine-tuning), in fp32 (model.pi0 keeps SigLIP fp32)."""
    v = arch.vision
    per_token = (
        2 * (FP32 * v.width + 8)  # two LayerNorms: fp32 input, mean and rstd
        + 2 * FP32 * v.width  # their outputs: the input of q/k/v (shared) and of fc1
        + 4 * FP32 * v.width
        + FP32 * v.num_heads  # SDPA: q, k, v, output (= out_proj input), log-sum-exp
        + 2 * FP32 * v.mlp_dim  # fc1 output (GELU input) and GELU output (fc2 input)
    )
    return Saved(act=n * per_token)


def _vision(arch: PI0Arch, rows: int, seq: TokenLayout, ckpt: bool) -> Saved:
    """Full fine-tuning only: conv patch embedding, SigLIP layers, post-LayerNorm, projector."""
    v = arch.vision
    n = rows * seq.cameras * v.tokens_per_image
    # fp32 conv: it saves the batch's own pixel tensor (no new allocation), and the position ids.
    conv = Saved(act=INT64 * v.tokens_per_image)
    if ckpt:
        layers = Saved(act=v.depth * FP32 * n * v.width)  # each layer's fp32 input
    else:
        layers = _siglip_layer(arch, n)
        layers = Saved(act=v.depth * layers.act, w_train=v.depth * layers.w_train)
    post = Saved(act=n * (FP32 * v.width + 8))  # LayerNorm input, mean, rstd
    proj, _ = _linear(n, v.width, arch.vlm.width, True, True, fp32=True)
    return conv.add(layers).add(post).add(proj)


def _suffix_embedding(arch: PI0Arch, rows: int, full: bool) -> Saved:
    """State and action projections, the action-time MLP (SiLU), the condition index."""
    h, d = arch.chunk_size, arch.expert.width
    s = Saved(act=INT64 * rows)  # condition indices
    if not full:
        return s
    # model.pi0 keeps these fp32; state_proj saves the batch's own state tensor (no new allocation)
    s.add(_linear(rows * h, arch.max_action_dim, d, False, True, fp32=True)[0])
    s.add(_linear(rows * h, 2 * d, d, True, True, fp32=True)[0])
    s.act += FP32 * rows * h * d  # SiLU input
    return s.add(_linear(rows * h, d, d, True, True, fp32=True)[0])


def _head(arch: PI0Arch, rows: int, full: bool) -> Saved:
    """Expert final norm on the suffix, action_out_proj on the chunk, the MSE loss."""
    s_len, h, d = suffix_tokens(arch), arch.chunk_size, arch.expert.width
    s = _rms_norm(rows * s_len, d, True, full)
    s.add(_linear(rows * h, d, arch.max_action_dim, True, full, fp32=True)[0])
    s.act += 2 * FP32 * rows * h * arch.max_action_dim  # MSE target and prediction
    return s


@dataclass(frozen=True)
class Activations:
    """Per-rank activation memory of one micro-batch forward + backward (bytes)."""

    saved: int  # kept by autograd at the end of the forward (checkpointed layers: their inputs only)
    weight_copies: int  # bf16 weight copies among `saved` (included in `saved`)
    cache: int  # autocast's cached bf16 copies of trainable weights not in `saved` (until the forward ends)
    recompute: int  # checkpointing: one layer's activations rebuilt in backward (the largest layer)
    grad: int  # gradient temporaries of one layer's backward (also the forward's in-layer transient)

    @property
    def peak(self) -> int:
        """Forward end: saved + cache + one layer's transient; backward: saved + recompute + its gradients."""
        return self.saved + self.grad + max(self.cache, self.recompute)


def activation_memory(
    arch: PI0Arch,
    rows: int,
    seq: TokenLayout = TokenLayout(),
    checkpointing: bool = True,
    lora_targets: Iterable[str] = (),
    lora_rank: int = 0,
    train_cond_embed: bool = True,
    trainable_low_precision: int = 0,
    frozen_bf16: bool = True,
) -> Activations:
    """Activation bytes for `rows` training rows (windows x rows per window) on one rank.
    trainable_low_precision: elements of trainable Linear/Conv weights (autocast caches a bf16 copy of
    each for the whole forward). frozen_bf16: as parameter_inventory's (LoRA only)."""
    full = not lora_targets
    ranks = lora_ranks(lora_targets, lora_rank) if not full else {}
    p, s_len = seq.prefix(arch), seq.suffix(arch)
    t, hd = p + s_len, arch.vlm.head_dim
    saved = _vision(arch, rows, seq, checkpointing) if full else Saved()
    if full:
        saved.act += INT64 * rows * seq.text_tokens + FP32  # token ids, embedding scale
    saved.add(_suffix_embedding(arch, rows, full)).add(_head(arch, rows, full))
    saved.act += 2 * FP32 * rows * t * hd  # RoPE cos / sin
    rg = (full, full or train_cond_embed)
    layers = []
    for i in range(arch.vlm.depth):
        layer, attended = _joint_layer(arch, rows, seq, i, full, ranks, rg)
        layers.append(layer)
        rg = (True, True) if attended else rg
    if not full and frozen_bf16:  # a bf16-stored frozen weight is saved as it is: no copy to keep
        layers = [Saved(layer.act, layer.w_train, 0) for layer in layers]
    if checkpointing:
        saved.act += arch.vlm.depth * FP32 * rows * (p * arch.vlm.width + s_len * arch.expert.width)
        saved.act += FP32 * rows * t * t  # the additive attention mask, an input of every layer
        recompute = max(layer.total for layer in layers)
        if full:  # SigLIP layers are checkpointed too
            recompute = max(
                recompute, _siglip_layer(arch, rows * seq.cameras * arch.vision.tokens_per_image).total
            )
    else:
        for layer in layers:
            saved.add(layer)
        recompute = 0
    cache = max(0, BF16 * trainable_low_precision - saved.w_train)
    grad = _grad_working_set(arch, rows, seq, ranks)
    return Activations(saved.total, saved.w_train + saved.w_frozen, cache, recompute, grad)


def _grad_working_set(arch: PI0Arch, rows: int, seq: TokenLayout, ranks: dict | None = None) -> int:
    """Temporaries of one joint layer beyond what it saves: in backward the gradients of the MLP's gate and
    up outputs (bf16, tokens x mlp_dim, alive together), or of the attention scores (fp32 softmax
    gradient and its bf16 copy), whichever is larger; the forward's in-layer transient is about the same.
    A down_proj adapter adds the fp32 gradient of its input: peft casts the bf16 MLP product to the
    adapter's fp32 before lora_A (found once the frozen weights' bf16 copies no longer hid it).
    Calibrated against CPU allocation traces (tools/bench/memory_check.py): within ~10% of the peak."""
    p, s_len = seq.prefix(arch), seq.suffix(arch)
    g = arch.vlm
    attention = (FP32 + BF16) * rows * g.num_heads * (p + s_len) ** 2
    mlp = 2 * BF16 * rows * (p * g.mlp_dim + s_len * arch.expert.mlp_dim)
    down = {stack for stack, _, proj in ranks or {} if proj == "down_proj"}
    mlp += FP32 * rows * (p * g.mlp_dim * ("vlm" in down) + s_len * arch.expert.mlp_dim * ("expert" in down))
    return max(attention, mlp)


def rollout_memory(arch: PI0Arch, envs: int, seq: TokenLayout = TokenLayout(), guidance: bool = True) -> int:
    """Working set of one batched sample_actions call for `envs` observations (no autograd): the prefix KV
    cache (K after RoPE in fp32, V in bf16; with guidance repeated for the two branches while the
    original is still alive) plus the widest transient of the prefix pass (one SigLIP or Gemma layer).
    The autocast weight cache and ZeRO-3's gathered parameters are added by memory/zero.py."""
    p, g, v = seq.prefix(arch), arch.vlm, arch.vision
    copies = 3 if guidance else 1
    kv = copies * g.depth * envs * p * g.num_kv_heads * g.head_dim * (FP32 + BF16)
    n_img = envs * seq.cameras * v.tokens_per_image
    vision = n_img * (2 * BF16 * v.mlp_dim + 3 * FP32 * v.width)
    attention = envs * g.num_heads * p * p * 2 * (FP32 + BF16)  # scores, masked fp32, softmax, bf16 copy
    mlp = envs * p * (4 * BF16 * g.mlp_dim + 3 * FP32 * g.width)
    return kv + max(vision, attention, mlp)
