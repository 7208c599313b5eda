"""Train small QLNets on scikit-learn's 8x8 digits, upsampled to 32x32 (no download needed).

Both layouts are trained: the authors' PDEBlock net (``qlnet``) and the paper's Eq.(3) net
(``qlnet_eq3``), one block per stage, small widths, one input channel, 10 classes. A checkpoint per
layout is written to ``--out`` (default ``examples/out/``):

    digits_qlnet.pt, digits_eq3.pt   {"state_dict", "config", "test_accuracy", "train_seconds", "split"}

``config`` rebuilds the model with :func:`build_model`. The data split is fixed (stratified, seed 0),
so ``examples/compress_digits.py`` evaluates on the same test images. Runs in a few minutes on
2 CPU cores (``torch.set_num_threads(2)``).

    python examples/train_digits.py [--out examples/out] [--epochs 30] [--threads 2] [--arch both|qlnet|eq3]
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SPLIT_SEED = 0
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.2  # of the training split: held out of training, for choosing compression budgets
IMAGE_SIZE = 32

CONFIGS = {
    "qlnet": dict(arch="qlnet", layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), num_classes=10, in_chans=1),
    "eq3": dict(arch="eq3", layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), num_classes=10, in_chans=1,
                expansion=4, weight_sharing=True, activation="softball"),
}


def _require_sklearn():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # optional extra
        raise SystemExit(
            "this example needs scikit-learn for the digits data set (it ships with the package, no "
            "download): pip install scikit-learn"
        ) from err
    return load_digits, train_test_split


def load_digits_tensors() -> dict[str, torch.Tensor]:
    """The digits split as float tensors: x_train (N,1,32,32), y_train, x_val, y_val, x_test, y_test.

    Test: 20% of the 1,797 images (stratified, seed 0). Validation: 20% of the rest, never trained on
    (what ``compress_digits.py`` chooses budgets on). Train: the remaining 1,149 images.
    Pixels (0..16) are scaled to [0, 1], upsampled bilinearly from 8x8 to 32x32 and standardised with
    the training images' mean and std.
    """
    load_digits, train_test_split = _require_sklearn()
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    index = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(index, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                           stratify=labels.numpy())
    train_idx, val_idx = train_test_split(train_idx, test_size=VALIDATION_FRACTION, random_state=SPLIT_SEED,
                                          stratify=labels.numpy()[train_idx])
    big = F.interpolate(images[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    mean, std = big[train_idx].mean(), big[train_idx].std()
    big = (big - mean) / std
    return {"x_train": big[train_idx], "y_train": labels[train_idx], "x_val": big[val_idx], "y_val": labels[val_idx],
            "x_test": big[test_idx], "y_test": labels[test_idx]}


def build_model(config: dict) -> nn.Module:
    """The model a checkpoint's ``config`` describes (fresh weights)."""
    from qlfx.models import qlnet, qlnet_eq3

    common = dict(layers=tuple(config["layers"]), widths=tuple(config["widths"]),
                  num_classes=config["num_classes"], in_chans=config["in_chans"])
    if config["arch"] == "qlnet":
        return qlnet(**common)
    if config["arch"] == "eq3":
        return qlnet_eq3(expansion=config["expansion"], weight_sharing=config["weight_sharing"],
                         activation=config["activation"], **common)
    raise ValueError(f"unknown arch {config['arch']!r}; expected 'qlnet' or 'eq3'")


def load_checkpoint(path) -> tuple[nn.Module, dict]:
    """(model in eval mode, checkpoint dict) from a file written by this script."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy in percent."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    if was_training:
        model.train()
    return 100.0 * correct / len(y)


def _augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (pad with the background value, random crop)."""
    n, _, h, w = x.shape
    background = float(x.min())
    padded = F.pad(x, (shift, shift, shift, shift), value=background)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None])  # (n, w)
    batch_index = torch.arange(n)[:, None, None]
    return padded[:, 0][batch_index, rows[:, :, None], cols[:, None, :]][:, None]


def train(config: dict, data: dict, epochs: int = 8, batch_size: int = 128, lr: float = 4e-3,
          weight_decay: float = 5e-4, seed: int = 0, log=print) -> tuple[nn.Module, float]:
    """Train with AdamW + cosine schedule + label smoothing; returns (model, seconds)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # channels_last: oneDNN's convs are ~2x faster in NHWC for these tiny layers (measured on 2 cores)
    model = build_model(config).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    x, y = data["x_train"], data["y_train"]
    steps_per_epoch = math.ceil(len(y) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.15)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # batchnorm needs more than one sample
                continue
            images = _augment(x[idx], generator).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(images), y[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 2 == 0 or epoch == epochs - 1:
            log(f"  [{config['arch']}] epoch {epoch + 1:3d}/{epochs}  loss {total / len(y):.4f}  "
                f"test acc {accuracy(model, data['x_test'], data['y_test']):.2f}%  "
                f"({time.perf_counter() - start:.0f} s)")
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"),
                        help="folder for the checkpoints (default: examples/out)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--arch", choices=("both", "qlnet", "eq3"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_tensors()
    print(f"digits: {len(data['y_train'])} train / {len(data['y_val'])} validation (not trained on) / "
          f"{len(data['y_test'])} test images, 1x{IMAGE_SIZE}x{IMAGE_SIZE}")
    archs = ("qlnet", "eq3") if args.arch == "both" else (args.arch,)
    for arch in archs:
        config = CONFIGS[arch]
        model, seconds = train(config, data, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
        acc = accuracy(model, data["x_test"], data["y_test"])
        params = sum(p.numel() for p in model.parameters())
        path = out / f"digits_{arch}.pt"
        torch.save({"state_dict": model.state_dict(), "config": config, "test_accuracy": acc,
                    "train_seconds": seconds, "split": {"seed": SPLIT_SEED, "test_fraction": TEST_FRACTION,
                                                             "validation_fraction": VALIDATION_FRACTION}},
                   path)
        print(f"{arch}: {params:,} params, trained in {seconds:.1f} s, test accuracy {acc:.2f}% -> {path}")


if __name__ == "__main__":
    main()
