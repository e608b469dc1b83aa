"""The PI0 policy network on transformers' `transformers.models.pi0` modules.

We reuse transformers' PI0 parameters and sub-modules (SigLIP, projector, the two Gemma stacks, the
action/time projections) so checkpoints in its layout load unchanged, but run our own forward:

- training: one joint pass over [prefix | suffix] per layer (the reference's layout), each layer an
  ordinary function, so per-layer activation checkpointing works (transformers' own checkpointing feeds
  the prefix to the expert as a mutable KV cache and breaks when layers are recomputed); several suffix
  branches per window (cfg's two conditions, fpo's draws: `repeats`) share one prefix pass (packing.py);
- sampling: the image+text prefix runs once and its per-layer (K, V) are reused by every denoising step;
- the numerics the reference (lerobot) fixes: float64 sinusoidal time embedding, eager attention with
  float32 softmax, masked cameras / padded text taking no position and no attention;
- an optimality condition c in {none=0, positive=1}: a zero-initialised embedding added to every
  action-expert input token, for classifier-free-guidance style training and guided sampling.

The action expert's 257152 x width token embedding is never allocated (its vocabulary is set to 1 before
construction and the module removed): the expert only ever receives embeddings.

Shapes: B batch, N cameras, P prefix tokens, H chunk size, A = max_action_dim, S = max_state_dim.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PI0ForConditionalGeneration
from transformers.models.gemma import modeling_gemma

from ript_ds.model.arch import PI0Arch
from ript_ds.model.packing import branch_mask, pack, unpack

# The reference's additive mask value (openpi / lerobot); not -inf, so fully masked rows stay finite.
ATTENTION_MASK_VALUE = -2.3819763e38

# Kept in float32 when the rest runs in bfloat16, as the reference does.
FP32_MODULE_MARKERS = (
    "vision_tower",
    "multi_modal_projector",
    "layernorm",
    ".norm.",
    "embed_action_time",
    "action_out_proj",
    "cond_embed",
)

COND_NONE = 0
COND_POSITIVE = 1


def precision(device: torch.device | str, dtype: str | torch.dtype) -> contextlib.AbstractContextManager:
    """The one precision policy of rollouts, updates and evaluation: float32, or bfloat16 autocast for the
    Gemma stacks while the parts the reference keeps in float32 stay there (PI0Policy._fp32 regions).
    DeepSpeed's torch_autocast wraps the training forward in the same autocast."""
    bf16 = dtype in ("bfloat16", torch.bfloat16)
    if not bf16 and dtype not in ("float32", torch.float32):
        raise ValueError(f"precision: unsupported dtype {dtype}; use float32 or bfloat16")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def keeps_fp32(module_name: str) -> bool:
    """Whether the module of this name (as named_modules gives it) stays float32 when the Gemma stacks run
    in bfloat16: the one rule of set_precision and of engine/lora's bfloat16 storage of frozen weights."""
    return any(m in f".{module_name}." for m in FP32_MODULE_MARKERS)


def _fp32(like: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off: the vision tower, projector, action/state/time projections and the output head run
    in float32 under a bf16 autocast, as the reference keeps them (FP32_MODULE_MARKERS)."""
    return torch.autocast(like.device.type, enabled=False)


@dataclass
class PI0Batch:
    """Model-level inputs, already normalized and tokenized (see model/processing.py)."""

    images: Tensor  # [B, N, 3, H_img, W_img] float in [-1, 1]
    image_masks: Tensor  # [B, N] bool, False = camera absent for that sample
    tokens: Tensor  # [B, L] int64, right-padded
    token_masks: Tensor  # [B, L] bool
    state: Tensor  # [B, S] float32, normalized and zero-padded
    actions: Tensor | None = None  # [B, H, A] normalized and zero-padded (training only)

    def to(self, device: torch.device | str) -> PI0Batch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return PI0Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]


def sinusoidal_time_embedding(time: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """[B] -> [B, dim]; computed in float64 then cast back, as the reference does (float32 costs ~3e-4)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = time[:, None] * (1.0 / period * 2 * math.pi)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).to(time.dtype)


def attention_2d_mask(pad: Tensor, blocks: Tensor) -> Tensor:
    """Token i attends token j iff both are real and block(j) <= block(i).  [B, T] -> [B, T, T] bool."""
    cum = torch.cumsum(blocks, dim=1)
    return (cum[:, None, :] <= cum[:, :, None]) & (pad[:, None, :] & pad[:, :, None])


def additive_mask(mask_2d: Tensor) -> Tensor:
    """[B, Tq, Tk] bool -> [B, 1, Tq, Tk] float32 additive mask."""
    return torch.where(mask_2d[:, None], 0.0, ATTENTION_MASK_VALUE)


def _residual(h: Tensor, out: Tensor, gate: Tensor | None) -> Tensor:
    """h + out, or PI0.5's gated h + out * gate (the gate of the norm that fed the sub-block)."""
    return h + out if gate is None else h + out * gate


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on [B, heads, T, head_dim] with cos/sin [B, T, head_dim] (transformers' Gemma formula)."""
    return x * cos[:, None] + modeling_gemma.rotate_half(x) * sin[:, None]


class PI0Policy(nn.Module):
    """PI0 with a condition embedding; parameter names follow transformers' PI0ForConditionalGeneration."""

    MODEL_TYPE = "pi0"  # the arch.model_type this class builds (PI05Policy: "pi05"; model/pi05.make_policy)

    def __init__(self, arch: PI0Arch):
        if arch.model_type != self.MODEL_TYPE:
            raise ValueError(
                f"{type(self).__name__} builds model_type {self.MODEL_TYPE!r}, the arch is "
                f"{arch.model_type!r}; build networks with model/pi05.make_policy(arch)"
            )
        super().__init__()
        self.arch = arch
        hf_config = arch.to_hf_config()
        hf_config.dit_config.vocab_size = 1  # the expert never embeds tokens; see module docstring
        hf = PI0ForConditionalGeneration(hf_config)
        hf.model.dit.embed_tokens = None
        self.model = hf.model  # .vlm (PaliGemmaModel) and .dit (GemmaModel)
        self.embed_action_time = hf.embed_action_time
        self.action_out_proj = hf.action_out_proj
        self.cond_embed = nn.Embedding(2, arch.expert.width)
        nn.init.zeros_(self.cond_embed.weight)  # a pretrained PI0 is unchanged at step 0
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ set-up
    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each joint transformer layer (and SigLIP layer) in backward instead of storing it."""
        self.gradient_checkpointing = enabled
        vision = self.model.vlm.vision_tower
        if enabled:
            vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            vision.gradient_checkpointing_disable()

    def set_precision(self, dtype: torch.dtype) -> PI0Policy:
        """float32 everywhere, or bfloat16 for the Gemma stacks with norms, vision and projections in float32."""
        self.to(torch.float32)
        if dtype == torch.bfloat16:
            for name, module in self.named_modules():
                own = list(module.parameters(recurse=False))
                if own and not keeps_fp32(name):
                    module.to(torch.bfloat16)
        elif dtype != torch.float32:
            raise ValueError(f"set_precision: unsupported dtype {dtype}; use torch.float32 or torch.bfloat16")
        return self

    def zero_init_names(self) -> tuple[str, ...]:
        """Parameters __init__ sets to zero; under ZeRO-3 zero.Init swallows that and the engine re-zeroes
        them when no checkpoint supplies them."""
        return ("cond_embed.weight",)

    # Residual-stream dtype when it is not the Gemma weights' own: engine/lora.py stores frozen weights in
    # bfloat16 only to save memory, under an autocast that computes them in bfloat16 anyway, and sets
    # float32 here so the stream (and so every output) stays that of float32 weights.
    stream_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.stream_dtype or self.model.dit.layers[0].self_attn.q_proj.weight.dtype

    # ------------------------------------------------------------------ embeddings
    def embed_prefix(self, batch: PI0Batch) -> tuple[Tensor, Tensor]:
        """Image tokens of every camera, then the scaled text embeddings.  -> [B, P, D_vlm], pad [B, P]."""
        b, n = batch.images.shape[:2]
        vlm = self.model.vlm
        vision_dtype = vlm.multi_modal_projector.linear.weight.dtype
        pixels = batch.images.flatten(0, 1).to(vision_dtype)  # [B*N, 3, H, W]
        with _fp32(pixels):
            feats = vlm.get_image_features(pixels).pooler_output  # [B*N, T, D]
        t = feats.shape[1]
        feats = feats.reshape(b, n * t, -1)
        text = vlm.language_model.embed_tokens(batch.tokens)  # Gemma scales by sqrt(width) inside
        img_pad = batch.image_masks[:, :, None].expand(b, n, t).reshape(b, n * t)
        embs = torch.cat([feats.to(self.compute_dtype), text.to(self.compute_dtype)], dim=1)
        return embs, torch.cat([img_pad, batch.token_masks.bool()], dim=1)

    def embed_suffix(self, state: Tensor, x_t: Tensor, time: Tensor, cond: Tensor | None) -> Tensor:
        """State token + H noisy-action tokens fused with the time embedding.  -> [B, 1 + H, D_expert]."""
        eat = self.embed_action_time
        with _fp32(x_t):
            state_emb = eat.state_proj(state.to(eat.state_proj.weight.dtype))
            action_emb = eat.action_in_proj(x_t.to(eat.action_in_proj.weight.dtype))
            time_emb = sinusoidal_time_embedding(
                time, action_emb.shape[-1], self.arch.min_period, self.arch.max_period
            )
            fused = torch.cat([action_emb, time_emb[:, None, :].expand_as(action_emb)], dim=2)
            fused = eat.action_time_mlp_out(F.silu(eat.action_time_mlp_in(fused)))
            embs = torch.cat([state_emb[:, None, :], fused], dim=1)
            if cond is not None:
                embs = embs + self.cond_embed(cond)[:, None, :]
        return embs.to(self.compute_dtype)

    def _suffix_blocks(self, b: int, device: torch.device) -> Tensor:
        # The state token opens block 1 and the actions block 2: the prefix never sees the suffix and
        # the state token never sees the (noisy) actions.
        h = self.arch.chunk_size
        blocks = torch.zeros(b, 1 + h, dtype=torch.long, device=device)
        blocks[:, 0] = 1
        blocks[:, 1] = 1
        return blocks

    def _rope(self, like: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.vlm.language_model.rotary_emb(like, positions)

    # ------------------------------------------------------------------ time condition
    def time_condition(self, time: Tensor) -> Tensor | None:
        """The vector the expert's norms are conditioned on ([B, D_expert]); PI0 has none (time enters its
        action tokens), PI0.5 overrides it (model/pi05.py)."""
        return None

    # ------------------------------------------------------------------ layers
    @staticmethod
    def _norm(norm: nn.Module, h: Tensor, ada: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(normed h, residual gate): a plain Gemma RMSNorm (no gate), or PI0.5's adaptive norm of `ada`."""
        return (norm(h), None) if ada is None else norm(h, ada)

    def _qkv(
        self, layer: nn.Module, h: Tensor, with_q: bool = True, ada: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
        """(q, k, v) [B, heads, T, head_dim] of the pre-attention norm, and that norm's gate (or None)."""
        attn = layer.self_attn
        x, gate = self._norm(layer.input_layernorm, h, ada)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k, v = (p(x).view(shape).transpose(1, 2) for p in (attn.k_proj, attn.v_proj))
        return (attn.q_proj(x).view(shape).transpose(1, 2) if with_q else None), k, v, gate

    def _finish(
        self, layer: nn.Module, h: Tensor, att: Tensor, gate: Tensor | None = None, ada: Tensor | None = None
    ) -> Tensor:
        """o_proj + residual, then the gated MLP + residual (each residual scaled by its norm's gate)."""
        h = _residual(h, layer.self_attn.o_proj(att.to(layer.self_attn.o_proj.weight.dtype)), gate)
        x, gate = self._norm(layer.post_attention_layernorm, h, ada)
        return _residual(h, layer.mlp(x), gate)

    def _attend(self, layer: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        out, _ = modeling_gemma.eager_attention_forward(
            layer.self_attn, q, k, v, mask, layer.self_attn.scaling
        )
        return out.reshape(out.shape[0], out.shape[1], -1)  # [B, T, heads * head_dim]

    def _joint_layer(
        self,
        i: int,
        pre: Tensor,
        suf: Tensor,
        mask: Tensor,
        cos: Tensor,
        sin: Tensor,
        ada: Tensor | None = None,
        r: int = 1,
    ):
        """pre [B, P, D_vlm], suf [R*B, S, D_expert]; only the attention sees the packed branches."""
        vlm_layer, exp_layer = self.model.vlm.language_model.layers[i], self.model.dit.layers[i]
        p = pre.shape[1]
        last = i == self.arch.vlm.depth - 1
        qp, kp, vp, _ = self._qkv(vlm_layer, pre, with_q=not last)
        qs, ks, vs, gate = self._qkv(exp_layer, suf, ada=ada)
        qs, ks, vs = (pack(x, r) for x in (qs, ks, vs))  # [B, heads, R*S, head_dim]
        k, v = rotate(torch.cat([kp, ks], dim=2), cos, sin), torch.cat([vp, vs], dim=2)
        if last:
            # Nothing reads the last VLM layer's prefix output: attend with the suffix queries only, so
            # its q_proj, o_proj and MLP do no work (and get no gradient).
            att = self._attend(exp_layer, rotate(qs, cos[:, p:], sin[:, p:]), k, v, mask[:, :, p:])
            return pre, self._finish(exp_layer, suf, unpack(att, r), gate, ada)
        q = rotate(torch.cat([qp, qs], dim=2), cos, sin)
        att = self._attend(vlm_layer, q, k, v, mask)
        pre_out = self._finish(vlm_layer, pre, att[:, :p])
        return pre_out, self._finish(exp_layer, suf, unpack(att[:, p:], r), gate, ada)

    def _joint_forward(
        self,
        prefix: Tensor,
        prefix_pad: Tensor,
        suffix: Tensor,
        ada: Tensor | None = None,
        repeats: int = 1,
    ) -> Tensor:
        """All layers over [prefix | suffix]; returns the expert's normed output [R*B, S, D_expert] (S = 1 + H
        for PI0, H for PI0.5). ada: the time condition of the expert's norms (PI0.5), else None.

        repeats R: suffix [R*B, S] holds R branches per window (row j*B+b: window b's branch j) sharing its
        prefix [B, P]: the prefix runs once and the branches are packed after it, kept apart by branch_mask,
        so each sees what it would alone. That wastes R(R-1)S^2 masked scores (a few % of P(P+RS))."""
        b, r, device = prefix.shape[0], repeats, prefix.device
        p, s = prefix.shape[1], suffix.shape[1]
        pad = torch.cat([prefix_pad, torch.ones(b, s, dtype=torch.bool, device=device)], dim=1)
        blocks = torch.cat(
            [torch.zeros_like(prefix_pad, dtype=torch.long), self._suffix_blocks(b, device)], 1
        )
        mask = additive_mask(branch_mask(attention_2d_mask(pad, blocks), p, r))
        positions = torch.cumsum(pad, dim=1) - 1  # every branch at the positions it would have alone
        cos, sin = self._rope(prefix, torch.cat([positions[:, :p], positions[:, p:].repeat(1, r)], dim=1))
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(self.arch.vlm.depth):
            if use_ckpt:
                prefix, suffix = checkpoint(
                    self._joint_layer, i, prefix, suffix, mask, cos, sin, ada, r, use_reentrant=False
                )
            else:
                prefix, suffix = self._joint_layer(i, prefix, suffix, mask, cos, sin, ada, r)
        return self._norm(self.model.dit.norm, suffix, ada)[0]  # the final norm's gate is unused

    def _velocity_out(self, suffix_out: Tensor) -> Tensor:
        with _fp32(suffix_out):
            return self.action_out_proj(suffix_out[:, -self.arch.chunk_size :].to(torch.float32))

    # ------------------------------------------------------------------ training
    def velocity(
        self, batch: PI0Batch, x_t: Tensor, time: Tensor, cond: Tensor | None = None, repeats: int = 1
    ) -> Tensor:
        """Predicted flow velocity v(x_t, t | observation, c) with the prefix recomputed.  -> [R*B, H, A]."""
        prefix, prefix_pad = self.embed_prefix(batch)
        suffix = self.embed_suffix(batch.state.repeat(repeats, 1), x_t, time, cond)
        out = self._joint_forward(prefix, prefix_pad, suffix, self.time_condition(time), repeats)
        return self._velocity_out(out)

    def loss(
        self, batch: PI0Batch, noise: Tensor, time: Tensor, cond: Tensor | None = None, repeats: int = 1
    ) -> Tensor:
        """Per-element flow-matching loss [R*B, H, A] with the given noise [R*B, H, A] and time [R*B].
        repeats R: R branches (conditions, draws) per window, branch-major (row j*B+b: window b's branch
        j); equal to the loss of the batch stacked R times, with the prefix run once per window."""
        if batch.actions is None:
            raise ValueError("PI0Policy.loss: batch.actions is None; training batches need target actions")
        if noise.shape[0] != repeats * batch.batch_size:
            raise ValueError(
                f"PI0Policy.loss: {len(noise)} noise rows, not repeats x batch = {repeats} x {batch.batch_size}"
            )
        actions = batch.actions.repeat(repeats, 1, 1)  # [R*B, H, A]
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        v_t = self.velocity(batch, x_t, time, cond, repeats)
        return F.mse_loss(noise - actions, v_t, reduction="none")

    def forward(
        self, batch: PI0Batch, noise: Tensor, time: Tensor, cond: Tensor | None = None, repeats: int = 1
    ) -> Tensor:
        """= loss(); engines (DeepSpeed) call the module itself, so their forward hooks see the pass."""
        return self.loss(batch, noise, time, cond, repeats)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def prefix_cache(self, batch: PI0Batch) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """Run the VLM over the prefix once; returns per-layer rotated (K, V) and the prefix pad mask."""
        prefix, pad = self.embed_prefix(batch)
        mask = additive_mask(attention_2d_mask(pad, torch.zeros_like(pad, dtype=torch.long)))
        cos, sin = self._rope(prefix, torch.cumsum(pad, dim=1) - 1)
        cache, h = [], prefix
        layers = self.model.vlm.language_model.layers
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1  # the last layer only contributes its K, V
            q, k, v, _ = self._qkv(layer, h, with_q=not last)
            k = rotate(k, cos, sin)
            cache.append((k, v))
            if not last:
                h = self._finish(layer, h, self._attend(layer, rotate(q, cos, sin), k, v, mask))
        return cache, pad

    def _denoise_cached(
        self,
        cache: list[tuple[Tensor, Tensor]],
        prefix_pad: Tensor,
        suffix: Tensor,
        ada: Tensor | None = None,
    ) -> Tensor:
        b, s, device = suffix.shape[0], suffix.shape[1], suffix.device
        suffix_2d = attention_2d_mask(
            torch.ones(b, s, dtype=torch.bool, device=device), self._suffix_blocks(b, device)
        )
        mask = additive_mask(torch.cat([prefix_pad[:, None, :].expand(b, s, -1), suffix_2d], dim=2))
        positions = prefix_pad.sum(dim=1, keepdim=True) + torch.arange(s, device=device)[None]
        cos, sin = self._rope(suffix, positions)
        h = suffix
        for layer, (k_pre, v_pre) in zip(self.model.dit.layers, cache, strict=True):
            q, k, v, gate = self._qkv(layer, h, ada=ada)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            k, v = torch.cat([k_pre, k], dim=2), torch.cat([v_pre, v], dim=2)
            h = self._finish(layer, h, self._attend(layer, q, k, v, mask), gate, ada)
        return self._velocity_out(self._norm(self.model.dit.norm, h, ada)[0])

    @torch.no_grad()
    def sample_actions(
        self,
        batch: PI0Batch,
        noise: Tensor,
        num_steps: int | None = None,
        guidance: float | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Euler-integrate the flow from t=1 (noise [B, H, A]) to t=0.  -> actions [B, H, A].

        guidance None: the plain model (no condition). Otherwise v = v_none + w (v_pos - v_none), both
        branches in one batched forward of 2B over one shared prefix cache (w=1: conditional only).
        use_cache=False recomputes the prefix at every step (for equivalence tests and benchmarks).
        """
        num_steps = num_steps or self.arch.num_inference_steps
        b = noise.shape[0]
        state = batch.state
        conds = None
        if guidance is not None and (
            guidance == 1.0 or torch.equal(self.cond_embed.weight[0], self.cond_embed.weight[1])
        ):
            # One branch of B rows with the positive condition, not 2B: w = 1 is v_pos alone (v_none +
            # 1 (v_pos - v_none)), the default of rollouts, eval and the server; and with equal rows (the
            # zero-initialised embedding of a fresh PI0) v_none = v_pos for any w. It must still add the
            # embedding: equal rows need not be zero.
            guidance = None
            conds = torch.full((b,), COND_POSITIVE, dtype=torch.long, device=noise.device)
        if use_cache:
            cache, prefix_pad = self.prefix_cache(batch)
        if guidance is not None:
            conds = torch.cat([torch.full((b,), c, dtype=torch.long, device=noise.device) for c in (0, 1)])
            state = state.repeat(2, 1)
            if use_cache:
                cache = [(k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1)) for k, v in cache]
                prefix_pad = prefix_pad.repeat(2, 1)
        dt = -1.0 / num_steps
        x_t = noise
        for step in range(num_steps):
            # Same float time grid as the reference: 1 + step*dt, exact at 0.5 and 0.1.
            time = torch.full((x_t.shape[0],), 1.0 + step * dt, dtype=torch.float32, device=noise.device)
            x_in = x_t if guidance is None else x_t.repeat(2, 1, 1)
            t_in = time if guidance is None else time.repeat(2)
            suffix, ada = self.embed_suffix(state, x_in, t_in, conds), self.time_condition(t_in)
            if use_cache:
                v = self._denoise_cached(cache, prefix_pad, suffix, ada)
            else:
                v = self._uncached_velocity(batch, suffix, guidance is not None, ada)
            if guidance is not None:
                v_none, v_pos = v.chunk(2)
                v = v_none + guidance * (v_pos - v_none)
            x_t = x_t + dt * v
        return x_t

    def _uncached_velocity(
        self, batch: PI0Batch, suffix: Tensor, doubled: bool, ada: Tensor | None = None
    ) -> Tensor:
        prefix, prefix_pad = self.embed_prefix(batch)
        if doubled:
            prefix, prefix_pad = prefix.repeat(2, 1, 1), prefix_pad.repeat(2, 1)
        return self._velocity_out(self._joint_forward(prefix, prefix_pad, suffix, ada))


def unused_parameter_names(arch: PI0Arch) -> list[str]:
    """Parameters PI0 never reads: the last VLM layer's query/output/MLP (only its K and V feed the expert)
    and the VLM's final norm. The reference checkpoints carry them; optimizers and ZeRO should not."""
    last = f"model.vlm.language_model.layers.{arch.vlm.depth - 1}."
    names = [
        "self_attn.q_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
    ]
    return [f"{last}{n}.weight" for n in [*names, "mlp.down_proj"]] + ["model.vlm.language_model.norm.weight"]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
