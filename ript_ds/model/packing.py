"""Several suffix branches of one window in one sequence over its shared prefix (PI0Policy._joint_forward).

A training window's branches (cfg's two conditions, fpo's M (noise, time) draws) differ only in the suffix;
the image+text prefix attends only itself, so it is the same in every branch. Packing the R branches after
the prefix, [prefix | branch 0 | ... | branch R-1], with a mask that keeps them apart, runs the prefix once
per window and lets every branch read its K/V in one attention call, with no copy of them per branch.
Rows are branch-major outside the attention: row j*B+b is window b's branch j.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack(x: Tensor, r: int) -> Tensor:
    """[R*B, heads, S, d] branch-major (row j*B+b: window b's branch j) -> [B, heads, R*S, d]: the R suffix
    branches of a window become one longer suffix of that window's sequence, so they read its single prefix
    K/V in one attention call (no copy of the prefix per branch)."""
    rb, heads, s, d = x.shape
    return x.view(r, rb // r, heads, s, d).permute(1, 2, 0, 3, 4).reshape(rb // r, heads, r * s, d)


def unpack(x: Tensor, r: int) -> Tensor:
    """[B, R*S, F] attention output of packed branches -> [R*B, S, F] branch-major (inverse of pack)."""
    b, rs, f = x.shape
    return x.view(b, r, rs // r, f).transpose(0, 1).reshape(r * b, rs // r, f)


def branch_mask(mask_2d: Tensor, p: int, r: int) -> Tensor:
    """[B, P+S, P+S] one-branch mask -> [B, P+R*S, P+R*S] with R suffix branches packed after the shared
    prefix: each branch sees the prefix (as before) and itself, never another branch; the prefix sees no
    suffix either way. R=1 returns the same mask."""
    b, s = mask_2d.shape[0], mask_2d.shape[1] - p
    eye = torch.eye(r, dtype=torch.bool, device=mask_2d.device)
    suffix = (eye[None, :, None, :, None] & mask_2d[:, None, p:, None, p:]).reshape(b, r * s, r * s)
    top = torch.cat([mask_2d[:, :p, :p], mask_2d.new_zeros(b, p, r * s)], dim=2)
    return torch.cat([top, torch.cat([mask_2d[:, p:, :p].repeat(1, r, 1), suffix], dim=2)], dim=1)
