"""PyTorch's side of scripts/bench_loader.sh: images/s of torchvision's ImageFolder through a
DataLoader (num_workers = --threads, persistent workers) with timm's 224-px transforms, on the
same files as liederiv's `bench --loader`:
  eval:  Resize(256, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize(ImageNet)
  train: RandomResizedCrop(224, bicubic) -> RandomHorizontalFlip -> ToTensor -> Normalize
Prints `impl=torch model=loader_eval|loader_train images=N batch=B images_per_s=X threads=T`
(the best of --reps passes after --warmup)."""

import argparse
import pathlib
import time

import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--folder", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    forms = {
        "loader_eval": T.Compose([T.Resize(256, interpolation=BICUBIC), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)]),
        "loader_train": T.Compose(
            [T.RandomResizedCrop(224, interpolation=BICUBIC), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
        ),
    }
    for form, tf in forms.items():
        ds = ImageFolder(str(pathlib.Path(a.folder) / "train"), tf)
        dl = DataLoader(ds, batch_size=a.batch, num_workers=a.threads, persistent_workers=True)

        def one_pass():
            t = time.perf_counter()
            for x, _ in dl:
                pass
            return len(ds) / (time.perf_counter() - t)

        for _ in range(a.warmup):
            one_pass()
        best = max(one_pass() for _ in range(max(a.reps, 1)))
        print(f"impl=torch model={form} images={len(ds)} batch={a.batch} images_per_s={best:.1f} threads={a.threads}")


if __name__ == "__main__":
    main()
