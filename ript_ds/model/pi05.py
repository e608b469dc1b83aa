"""PI0.5: PI0 (model/pi0.py) with time entering the action expert through adaptive norms.

What differs from PI0 (openpi src/openpi/models/{pi0,gemma}.py with pi05=True; lerobot
policies/pi05/modeling_pi05.py and policies/pi_gemma.py), and nothing else:

- the time condition: cond = swish(time_mlp_out(swish(time_mlp_in(sincos(t))))) [B, D_expert], the
  sinusoid in float64 as for PI0;
- every norm of the expert (pre-attention, pre-MLP, final) is an `AdaptiveNorm`: RMS-normalised in
  float32 with no learned scale, then Dense(D -> 3D) of cond gives (scale, shift, gate) in that order,
  y = normed * (1 + scale) + shift, and the sub-block's residual adds out * gate (the final norm's gate
  is dropped); the VLM keeps its plain Gemma norms and residuals;
- the suffix is just action_in_proj(x_t): H tokens, one attention block (no state token, no state_proj;
  the state reaches pi0.5 only as text, when the checkpoint's convention puts it there);
- our condition embedding (cond_embed, guidance) is added to those action tokens, as PI0 adds it to its
  suffix tokens, so a pretrained PI0.5 is unchanged at step 0 too.

Canonical names: `embed_action_time.{action_in_proj,time_mlp_in,time_mlp_out}`,
`model.dit.layers.N.{input_layernorm,post_attention_layernorm}.dense`, `model.dit.norm.dense` (lerobot's
names below its `gemma_expert.model.`), so every layout maps by the PI0 prefix rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ript_ds.model.arch import PI0Arch
from ript_ds.model.pi0 import PI0Policy, _fp32, sinusoidal_time_embedding


class AdaptiveNorm(nn.Module):
    """PI0.5's adaptive RMS norm (openpi gemma.RMSNorm with a cond). Not named like "RMSNorm": transformers'
    `_init_weights` matches that name and would treat it as a Gemma norm (zero `.weight`)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(width, 3 * width)
        # the references' init: scale = shift = gate = 0 until trained
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, D], cond [B, D] -> (y [B, T, D], gate [B, 1, D]), both in x's dtype; computed in float32
        whatever the autocast (the references keep these norms in float32)."""
        with _fp32(x):
            xf = x.float()
            normed = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
            modulation = self.dense(cond.to(self.dense.weight.dtype))[:, None, :]  # [B, 1, 3D]
            scale, shift, gate = modulation.float().chunk(3, dim=-1)
            y = normed * (1 + scale) + shift
        return y.to(x.dtype), gate.to(x.dtype)


class PI05TimeEmbedding(nn.Module):
    """PI0.5's input projections, where PI0 has transformers' PI0ActionTimeEmbedding (same attribute)."""

    def __init__(self, arch: PI0Arch):
        super().__init__()
        width = arch.expert.width
        self.action_in_proj = nn.Linear(arch.max_action_dim, width)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)


class PI05Policy(PI0Policy):
    """PI0.5 with PI0Policy's interface (loss, sample_actions with the KV-cached prefix and guidance,
    per-layer checkpointing, precision); parameter names as PI0Policy's where the two share a module."""

    MODEL_TYPE = "pi05"

    def __init__(self, arch: PI0Arch):
        super().__init__(arch)
        width, eps = arch.expert.width, arch.rms_norm_eps
        self.embed_action_time = PI05TimeEmbedding(arch)  # drops PI0's state_proj / action_time_mlp_*
        dit = self.model.dit
        for layer in dit.layers:
            layer.input_layernorm = AdaptiveNorm(width, eps)
            layer.post_attention_layernorm = AdaptiveNorm(width, eps)
        dit.norm = AdaptiveNorm(width, eps)

    def zero_init_names(self) -> tuple[str, ...]:
        norms = [n for n, m in self.named_modules() if isinstance(m, AdaptiveNorm)]
        return (*super().zero_init_names(), *(f"{n}.dense.{p}" for n in norms for p in ("weight", "bias")))

    def time_condition(self, time: Tensor) -> Tensor:
        """[B] -> cond [B, D_expert] (float32) of every expert norm."""
        eat = self.embed_action_time
        with _fp32(time):
            emb = sinusoidal_time_embedding(
                time.float(), eat.time_mlp_in.in_features, self.arch.min_period, self.arch.max_period
            )
            return F.silu(eat.time_mlp_out(F.silu(eat.time_mlp_in(emb.to(eat.time_mlp_in.weight.dtype)))))

    def embed_suffix(self, state: Tensor, x_t: Tensor, time: Tensor, cond: Tensor | None) -> Tensor:
        """H action tokens action_in_proj(x_t) (+ the condition embedding).  -> [B, H, D_expert]. The state
        and time are not read here (time conditions the norms: time_condition)."""
        proj = self.embed_action_time.action_in_proj
        with _fp32(x_t):
            embs = proj(x_t.to(proj.weight.dtype))
            if cond is not None:
                embs = embs + self.cond_embed(cond)[:, None, :]
        return embs.to(self.compute_dtype)

    def _suffix_blocks(self, b: int, device: torch.device) -> Tensor:
        # One block of action tokens: they see the prefix and each other; the prefix never sees them.
        blocks = torch.zeros(b, self.arch.chunk_size, dtype=torch.long, device=device)
        blocks[:, 0] = 1
        return blocks


def make_policy(arch: PI0Arch) -> PI0Policy:
    """The network `arch` describes: PI0Policy for model_type "pi0", PI05Policy for "pi05"."""
    return PI05Policy(arch) if arch.model_type == "pi05" else PI0Policy(arch)
