"""Input sets from files, for ``qlfx compare --inputs`` and ``qlfx bench --inputs``.

- ``FILE.npy``: one array, the model's only input.
- ``FILE.npz``: one array per model input, named like the input (the forward's argument name, which is
  also the ONNX / TVM input name) or, for ``np.savez(path, a, b)``, ``arr_0``, ``arr_1``... in order.
- a folder of images (``.jpg .jpeg .png .bmp .ppm .webp``, sorted by name), for a model with one
  ``[N, 3, H, W]`` (or ``[N, 1, H, W]``) input. Each image is preprocessed as torchvision's ImageNet
  recipe does: converted to RGB (grayscale for C=1), the shorter side resized to ``max(H, W) * 256 / 224``
  (bilinear), center-cropped to ``H x W``, scaled to [0, 1] (``/255``), then normalised with the ImageNet
  mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) (for C=1: their averages).

An array's first axis holds samples: an array of ``K * N`` samples, ``N`` the batch of the example
input, gives ``K`` input sets of ``N`` (the other axes must equal the example input's). A float array is
cast to the input's float dtype; an integer input needs an integer array. Anything else is a
:class:`~qlfx.errors.UsageError` that says what the file must hold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = ("RGB, shorter side resized to max(H,W)*256/224, center crop HxW, /255, "
                 "ImageNet mean (0.485,0.456,0.406) / std (0.229,0.224,0.225)")


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def read_arrays(path: str | Path, names: Sequence[str]) -> list[np.ndarray]:
    """The arrays of ``path`` (.npy, .npz or an image folder is handled by :func:`load_input_sets`), one
    per input, in the order of ``names``."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"inputs file '{p}' does not exist (give a .npy, a .npz or a folder of images)")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            return [np.load(p, allow_pickle=False)]
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as archive:
                stored = {k: archive[k] for k in archive.files}
        else:
            raise UsageError(f"inputs file '{p}': give a .npy (one input), a .npz (one array per input) or a "
                             f"folder of images")
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt or pickled file: say which, not numpy's traceback
        raise UsageError(f"cannot read '{p}' as a numpy {suffix} file: {err}") from err
    if not stored:
        raise UsageError(f"'{p}' holds no arrays; save one per model input ({', '.join(names)})")
    if set(names) <= set(stored) and len(stored) == len(names):
        return [stored[n] for n in names]
    positional = [f"arr_{i}" for i in range(len(stored))]
    if sorted(stored) == sorted(positional) and len(stored) == len(names):
        return [stored[k] for k in positional]
    if len(stored) == 1 and len(names) == 1:
        return list(stored.values())
    raise UsageError(f"'{p}' holds arrays {sorted(stored)}, but the model takes {len(names)} input(s) "
                     f"({', '.join(names)}): save one array per input, named like the input "
                     f"(np.savez(path, {names[0]}=...)) or in order (np.savez(path, a, b))")


def count_arrays(path: str | Path) -> int:
    """How many arrays a .npy / .npz holds (a folder of images: UsageError, it needs the input shape)."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"a folder of images ('{p}') is cropped to the model's input size: give --input-shape N,C,H,W")
    if p.suffix.lower() == ".npz" and p.is_file():
        try:
            with np.load(p, allow_pickle=False) as archive:
                return max(1, len(archive.files))
        except Exception as err:  # noqa: BLE001
            raise UsageError(f"cannot read '{p}' as a numpy .npz file: {err}") from err
    return 1


def read_images(folder: str | Path, example: torch.Tensor) -> np.ndarray:
    """The images of ``folder`` preprocessed for ``example``'s ``[N, C, H, W]`` (see module docstring)."""
    from PIL import Image

    folder = Path(folder)
    if example.dim() != 4 or example.shape[1] not in (1, 3):
        raise UsageError(f"a folder of images feeds a model with one [N, 3, H, W] (or [N, 1, H, W]) input; this "
                         f"model's input is {_describe(example)}. Give a .npy / .npz instead")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"folder '{folder}' has no images ({', '.join(IMAGE_SUFFIXES)})")
    channels, height, width = int(example.shape[1]), int(example.shape[2]), int(example.shape[3])
    mean = np.array(IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,), np.float32)[:, None, None]
    std = np.array(IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,), np.float32)[:, None, None]
    arrays = []
    for f in files:
        try:
            with Image.open(f) as image:
                image = image.convert("RGB" if channels == 3 else "L")
                short = max(height, width) * 256 / 224
                scale = short / min(image.size)
                image = image.resize((max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale))),
                                     Image.BILINEAR)
                left, top = (image.size[0] - width) // 2, (image.size[1] - height) // 2
                image = image.crop((left, top, left + width, top + height))
                pixels = np.asarray(image, dtype=np.float32) / 255.0
        except Exception as err:  # noqa: BLE001 - name the file that is not an image
            raise UsageError(f"cannot read image '{f}': {err}") from err
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        arrays.append((pixels - mean) / std)
    return np.stack(arrays).astype(np.float32)


def load_input_sets(path: str | Path, examples: Sequence[torch.Tensor], names: Sequence[str],
                    fit_examples: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """Input sets for a model whose example inputs are ``examples`` (named ``names``), from ``path``.

    ``fit_examples``: the example shapes were not given (a model file without --input-shape), so the
    file's arrays are one input set as they are."""
    p = Path(path)
    if p.is_dir():
        if len(examples) != 1:
            raise UsageError(f"a folder of images feeds a model with one input; this one takes {len(examples)}")
        arrays = [read_images(p, examples[0])]
    else:
        arrays = read_arrays(p, names)
    sets: list[list[torch.Tensor]] = []
    for name, example, array in zip(names, examples, arrays):
        want = f"[K*{example.shape[0]}, {', '.join(map(str, example.shape[1:]))}]" if example.dim() else "[]"
        if example.is_floating_point() != np.issubdtype(array.dtype, np.floating) or array.dtype.kind not in "fiub":
            raise UsageError(f"inputs '{p}': array for input '{name}' has dtype {array.dtype}; the model's input is "
                             f"{_describe(example)}: save it as {'a float' if example.is_floating_point() else 'an integer'} "
                             f"array")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(example.dtype)
        if fit_examples:
            chunks = [tensor]
        elif tensor.dim() != example.dim() or tuple(tensor.shape[1:]) != tuple(example.shape[1:]) or \
                example.dim() == 0 or tensor.shape[0] % max(1, example.shape[0]) or tensor.shape[0] == 0:
            raise UsageError(f"inputs '{p}': array for input '{name}' has shape {list(array.shape)}; the model's "
                             f"input is {_describe(example)}, so the array must be {want} (K input sets of "
                             f"{example.shape[0]}). Give --input-shape to match the file, or reshape the array")
        else:
            chunks = list(torch.split(tensor, int(example.shape[0])))
        sets.append(chunks)
    counts = {len(c) for c in sets}
    if len(counts) != 1:
        raise UsageError(f"inputs '{p}': the arrays hold different numbers of input sets "
                         f"({', '.join(f'{n}: {len(c)}' for n, c in zip(names, sets))}); give each the same")
    return [tuple(c[i] for c in sets) for i in range(counts.pop())]
