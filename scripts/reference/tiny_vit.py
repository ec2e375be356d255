"""Our ViT in PyTorch, with timm's parameter names (so one safetensors file loads into both this,
timm's VisionTransformer and liederiv's `Vit`), plus our Lie-derivative conventions in torch.

Architecture (timm VisionTransformer, pre-norm): patch_embed.proj (conv p×p, stride p) -> cat
cls_token -> + pos_embed (cls slot included) -> blocks[i] (x + attn(norm1 x); x + mlp(norm2 x),
fused qkv, exact-erf GELU) -> norm -> cls token -> head   (pool="cls"), or mean of patch tokens
-> fc_norm -> head (pool="mean"). LayerNorm eps 1e-6.

The stencil matches src/transforms/stencil.rs: central difference with reflection that does not
repeat the border pixel (torch's "reflect" padding), scaled by (W-1)/2, times the generator's
vector field on align_corners=True coordinates u in [-1, 1].
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        # (B, N, 3D) -> (3, B, heads, N, hd)
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * hd ** -0.5
        att = att.softmax(dim=-1)
        # (B, heads, N, hd) -> (B, N, D)
        o = (att @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(o)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x):
        # (B, D, h, w) -> (B, h*w, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Vit(nn.Module):
    def __init__(self, image_size=28, in_chans=1, num_classes=10, patch=7, dim=64, depth=4, heads=2,
                 mlp_ratio=4.0, pool="cls", eps=1e-6):
        super().__init__()
        n = (image_size // patch) ** 2
        self.pool = pool
        self.patch_embed = PatchEmbed(in_chans, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, eps) for _ in range(depth)])
        if pool == "cls":
            self.norm = nn.LayerNorm(dim, eps=eps)
        else:
            self.fc_norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        if self.pool == "cls":
            f = self.norm(t)[:, 0]
        else:
            f = self.fc_norm(t[:, 1:].mean(dim=1))
        return self.head(f)


# Generators B = dA/dt at t = 0 (DESIGN.md), 2x3 on [u_x, u_y, 1]; saturate is x -> x.
GENERATORS = {
    "translate_x": [[0, 0, 1], [0, 0, 0]],
    "translate_y": [[0, 0, 0], [0, 0, 1]],
    "rotate": [[0, 1, 0], [-1, 0, 0]],
    "shear_x": [[0, 1, 0], [0, 0, 0]],
    "shear_y": [[0, 0, 0], [1, 0, 0]],
    "stretch_x": [[1, 0, 0], [0, 0, 0]],
    "stretch_y": [[0, 0, 0], [0, 1, 0]],
    "scale": [[-1, 0, 0], [0, -1, 0]],
    "hyperbolic": [[0, 1, 0], [1, 0, 0]],
}


def central_derivative(x, dim):
    """(x[j+1] - x[j-1]) / 2 along `dim` (-1: columns, -2: rows), reflection without repeating the border."""
    n = x.shape[dim]
    nxt = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 2, 1)], dim)
    prv = torch.cat([x.narrow(dim, 1, 1), x.narrow(dim, 0, n - 1)], dim)
    return (nxt - prv) / 2


def image_lie_derivative(x, transform):
    """L_X x for x: (B, C, H, W), central stencil."""
    if transform == "saturate":
        return x.clone()
    b = GENERATORS[transform]
    h, w = x.shape[-2:]
    uy, ux = torch.meshgrid(torch.linspace(-1, 1, h, dtype=x.dtype), torch.linspace(-1, 1, w, dtype=x.dtype),
                            indexing="ij")
    fx = (w - 1) / 2 * (b[0][0] * ux + b[0][1] * uy + b[0][2])
    fy = (h - 1) / 2 * (b[1][0] * ux + b[1][1] * uy + b[1][2])
    return central_derivative(x, -1) * fx + central_derivative(x, -2) * fy
