# Reference numbers for tests/train.rs::adamw_matches_torch (torch.optim.AdamW + clip_grad_norm_).
# Two parameter groups (a 2x3 weight with weight decay and lr scale 1, a bias without decay and
# lr scale 0.5), 3 steps, each step's gradient the mean of 2 accumulated micro-batch gradients,
# clipped to global norm 1.0. Run: /work/venv-torch/bin/python scripts/adamw_fixture.py
import torch
torch.set_printoptions(precision=8)
w = torch.nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [0.1, 0.2, -0.3]], dtype=torch.float64))
b = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
lr = 0.1
opt = torch.optim.AdamW([{"params": [w], "lr": lr, "weight_decay": 0.05},
                         {"params": [b], "lr": lr * 0.5, "weight_decay": 0.0}],
                        betas=(0.9, 0.999), eps=1e-8)
for step in range(3):
    opt.zero_grad()
    for micro in range(2):
        # loss = sum(w^2 * c) + sum(b * d), gradients 2 c w and d
        c = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64) * (micro + 1)
        d = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) * (step + 1)
        loss = ((w * w * c).sum() + (b * d).sum()) / 2
        loss.backward()
    n = torch.nn.utils.clip_grad_norm_([w, b], 1.0)
    print("norm", step, n.item())
    opt.step()
print("w", w.detach().flatten().tolist())
print("b", b.detach().flatten().tolist())
