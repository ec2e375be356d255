#!/usr/bin/env python3
"""PyTorch reference timings for scripts/bench.sh: the same models as liederiv, same batch, same threads.

Models (liederiv's own layouts, see src/models/{vit,cnn,gcnn}.rs):
  vit_tiny   ViT p7 / dim 64 / depth 4 / heads 2, cls pooling, learned pos embed, LN eps 1e-6, GELU-erf
  vit_small  ViT p4 / dim 192 / depth 6 / heads 3 (same layout)
  cnn        ResNet-style: 3x3 stem, stages [32, 64, 128] x 2 basic blocks, BN, global mean pool
  vit_base   ViT-B/16 (p16 / dim 768 / depth 12 / heads 12) on (B, 3, 224, 224), the GPU-scale model
  gcnn       C8 G-CNN: lifting + group convs (k=5, fields [16, 24, 32, 32]), filter bank rebuilt per call by
             rotating the base filter (rot90 + bilinear remainder inside a disk mask), field batch norm,
             2x2 mean pool while the grid is even, group max pool, global mean pool

Measurements on a (B, 1, 28, 28) batch, 10 classes, torch.set_num_threads(threads):
  train_ms    forward (train mode) + cross-entropy + backward + AdamW step
  forward_ms  eval-mode forward under torch.no_grad()
  lee_ms      torch.func.jvp of softmax(model(x)) along one input tangent (eval mode), the LEE core
  peak_mb     the process's peak resident set (ru_maxrss), interpreter and torch included
Each is the median of --reps timed repetitions after --warmup untimed ones. Attention uses PyTorch's
scaled_dot_product_attention for train/forward (timm's default path) and the explicit
softmax(q k^T) v for the jvp (forward-mode AD is not implemented for the fused CPU kernel).

Output: one line per model, `impl=torch model=NAME train_ms=X forward_ms=X lee_ms=X peak_mb=X`.
"""
import argparse
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fused = True

    def forward(self, x):
        b, n, d = x.shape
        # (B, N, 3D) -> (3, B, H, N, hd)
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            a = (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)
            o = a.softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Vit(nn.Module):
    """timm's VisionTransformer layout (pre-norm blocks, cls token, learned pos embed, `norm`, `head`)."""

    def __init__(self, patch, dim, depth, heads, image=28, chans=1, classes=10):
        super().__init__()
        n = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(chans, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        self.grad_checkpointing = False

    def set_fused_attention(self, on):
        for b in self.blocks:
            b.attn.fused = on

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for b in self.blocks:
            # timm's checkpoint_seq: each block keeps its input and reruns in the backward
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False)
            else:
                x = b(x)
        return self.head(self.norm(x)[:, 0])


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class Cnn(nn.Module):
    def __init__(self, widths=(32, 64, 128), blocks=2, chans=1, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for s, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if s > 0 and b == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def rotate_filters(w, angle):
    """Bilinear rotation of the last two (k, k) axes by `angle` radians about the centre."""
    k = w.shape[-1]
    flat = w.reshape(-1, 1, k, k)
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[c, s, 0.0], [-s, c, 0.0]], dtype=w.dtype, device=w.device).expand(flat.shape[0], 2, 3)
    grid = F.affine_grid(theta, flat.shape, align_corners=True)
    return F.grid_sample(flat, grid, align_corners=True).reshape(w.shape)


class GroupConv(nn.Module):
    def __init__(self, cin, cout, n, k, lifting):
        super().__init__()
        shape = (cout, cin, k, k) if lifting else (cout, cin, n, k, k)
        fan_in = cin * k * k * (1 if lifting else n)
        self.weight = nn.Parameter(torch.randn(shape) * math.sqrt(2.0 / fan_in))
        self.n, self.k, self.lifting = n, k, lifting
        c = (k - 1) / 2
        ii, jj = torch.meshgrid(torch.arange(k) - c, torch.arange(k) - c, indexing="ij")
        self.register_buffer("mask", ((ii**2 + jj**2) <= (k / 2) ** 2).float())

    def bank(self):
        filters = []
        for r in range(self.n):
            w = self.weight if self.lifting else torch.roll(self.weight, r, 2)
            quarter, rest = divmod(r * 4, self.n)  # r·2π/N = quarter·π/2 + remainder
            w = torch.rot90(w, quarter, (-2, -1))
            if rest:
                w = rotate_filters(w * self.mask, rest * (math.pi / 2) / self.n)
            filters.append(w)
        bank = torch.stack(filters, 1)  # (Cout, N, Cin, [N,] k, k)
        return bank.reshape(bank.shape[0] * self.n, -1, self.k, self.k)

    def forward(self, x):
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        y = F.conv2d(x.reshape(b, -1, h, w), self.bank(), padding=self.k // 2)
        return y.reshape(b, -1, self.n, h, w)  # (B, Cout, N, H, W)


class Gcnn(nn.Module):
    def __init__(self, n=8, widths=(16, 24, 32, 32), k=5, chans=1, classes=10):
        super().__init__()
        self.convs, self.bns, cin = nn.ModuleList(), nn.ModuleList(), chans
        for i, w in enumerate(widths):
            self.convs.append(GroupConv(cin, w, n, k, i == 0))
            self.bns.append(nn.BatchNorm3d(w))  # one statistic per field, shared over its N channels
            cin = w
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        last = len(self.convs) - 1
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(conv(x)))
            if i < last and x.shape[-1] % 2 == 0:
                b, c, n, h, w = x.shape
                x = F.avg_pool2d(x.reshape(b, c * n, h, w), 2).reshape(b, c, n, h // 2, w // 2)
        return self.head(x.amax(2).mean((2, 3)))


def build(name):
    if name == "vit_tiny":
        return Vit(7, 64, 4, 2)
    if name == "vit_small":
        return Vit(4, 192, 6, 3)
    if name == "cnn":
        return Cnn()
    if name == "gcnn":
        return Gcnn()
    if name == "vit_base":
        return Vit(16, 768, 12, 12, image=224, chans=3)
    raise SystemExit(f"unknown model {name!r}: use vit_tiny, vit_small, cnn, gcnn or vit_base")


def timed(fn, warmup, reps, sync):
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_tiny,vit_small,cnn,gcnn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (times then wait for the GPU)")
    ap.add_argument("--train-only", action="store_true",
                    help="time only the training step (forward_ms and lee_ms print 0), so that the peak "
                         "memory is the step's own")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="train the ViTs with torch.utils.checkpoint per block (timm's set_grad_checkpointing)")
    ap.add_argument("--bf16", action="store_true",
                    help="train under torch.autocast(bfloat16) (f32 weights and AdamW state)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for name in args.models.split(","):
        chans, size = (3, 224) if name == "vit_base" else (1, 28)
        x = torch.randn(args.batch, chans, size, size, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)
        dx = torch.randn_like(x)
        model = build(name).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        is_vit = isinstance(model, Vit)
        if is_vit:
            model.grad_checkpointing = args.grad_checkpointing

        def train():
            model.train()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x)
            F.cross_entropy(logits.float(), y).backward()
            opt.step()

        def forward():
            model.eval()
            with torch.no_grad():
                model(x)

        def lee():
            model.eval()
            if is_vit:
                model.set_fused_attention(False)
            torch.func.jvp(lambda inp: model(inp).softmax(-1), (x,), (dx,))
            if is_vit:
                model.set_fused_attention(True)

        t_train = timed(train, args.warmup, args.reps, sync)
        t_fwd = 0.0 if args.train_only else timed(forward, args.warmup, args.reps, sync)
        t_lee = 0.0 if args.train_only else timed(lee, args.warmup, args.reps, sync)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(f"impl=torch model={name} train_ms={t_train:.2f} forward_ms={t_fwd:.2f} lee_ms={t_lee:.2f} peak_mb={peak:.1f} "
              f"grad_checkpointing={args.grad_checkpointing} precision={'bf16' if args.bf16 else 'f32'}",
              flush=True)


if __name__ == "__main__":
    main()
