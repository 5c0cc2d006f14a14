"""Image-conditioned tasks: inpainting, super-resolution and semantic-to-image (Dao et al. 2023, "Flow Matching in
Latent Space", §5; their code VinAIResearch/LFM).

A task turns an image x1 into its measurement, what a user gives (the image with holes and its mask, the image at a
lower resolution, a map of class indices), and a measurement into the spatial condition a model reads: channels
concatenated to x_t at every velocity call (LFM's choice), at the flow's resolution, in the flow's space:

    inpaint   [E(x1 ⊙ (1 − m)), m↓]  the known pixels (holes zero), encoded like x_t, and the mask at the flow's size
    superres  E(up(avg_f(x1)))       the f×f block means, upsampled bicubically to the image size, encoded like x_t
    semantic  onehot(labels↓)        K channels, projected by the model's learned 1×1 convolution

E is the identity in pixel space and the frozen autoencoder's encoder in latent space. Masks are 1 where pixels are
missing (to be generated) and 0 where known, as LaMa's and diffusers' white means "repaint". The null condition of
classifier-free guidance is "nothing known": every pixel missing, a zero low-resolution image, no class anywhere.

Masks are drawn per sample from a numpy generator of its own: in training from a seed the micro-step draws for the
global batch (so they do not depend on the number of processes), in sampling and evaluation from (seed, k), so that
case k has the same mask for any batch size and process count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import seeds
from data.images import IMAGE_SUFFIXES, ImageFolderDataset, read_image_folder, to_model_range
from errors import UserError

TASKS = ("inpaint", "superres", "semantic")
MASKS = ("mixed", "strokes", "boxes", "center")


# ---------------------------------------------------------------------------------------------
# Masks.


def _strokes(draw: ImageDraw.ImageDraw, h: int, w: int, rng: np.random.Generator) -> None:
    """Free-form strokes (LaMa's irregular masks, scaled to the image): 1-4 polylines of 1-5 segments, each
    segment 10-35 % of the side long, the line 5-15 % of the side wide, joints rounded."""
    side = min(h, w)
    for _ in range(rng.integers(1, 5)):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        width = max(1, round(rng.uniform(0.05, 0.15) * side))
        for _ in range(rng.integers(1, 6)):
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.10, 0.35) * side
            x2, y2 = np.clip(x + length * np.cos(angle), 0, w - 1), np.clip(y + length * np.sin(angle), 0, h - 1)
            draw.line([(x, y), (x2, y2)], fill=1, width=width)
            r = width / 2
            draw.ellipse([x2 - r, y2 - r, x2 + r, y2 + r], fill=1)
            x, y = x2, y2


def _boxes(draw: ImageDraw.ImageDraw, h: int, w: int, rng: np.random.Generator) -> None:
    """1-3 axis-aligned boxes (LaMa's box masks, scaled to the image), each side 10-50 % of the image's."""
    for _ in range(rng.integers(1, 4)):
        bh, bw = max(1, round(rng.uniform(0.1, 0.5) * h)), max(1, round(rng.uniform(0.1, 0.5) * w))
        top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        draw.rectangle([left, top, left + bw - 1, top + bh - 1], fill=1)


def draw_mask(kind: str, h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
    """One mask (1, h, w) float, 1 = missing: 'strokes', 'boxes', 'mixed' (strokes, boxes or both, a third each,
    as LaMa's mixed generator mixes them) or 'center' (the central box of half the sides: 14×14 on 28×28)."""
    if kind == "center":
        mask = torch.zeros(1, h, w)
        mask[:, h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 1
        return mask
    picture = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(picture)
    choice = {"strokes": 0, "boxes": 1}.get(kind, None)
    choice = rng.integers(0, 3) if choice is None else choice
    if choice in (0, 2):
        _strokes(draw, h, w, rng)
    if choice in (1, 2):
        _boxes(draw, h, w, rng)
    return torch.from_numpy(np.asarray(picture, dtype=np.float32).copy())[None]


def sample_masks(kind: str, h: int, w: int, seed: int, indices: list[int]) -> torch.Tensor:
    """The masks of cases `indices` (N, 1, h, w): case k's from a generator keyed by (seed, k) alone."""
    return torch.stack([draw_mask(kind, h, w, seeds.numpy_generator("mask", seed, k)) for k in indices])


def read_mask_folder(folder: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """User masks (R, 1, H, W) from the images of a folder in sorted order: gray or RGB, white (or 1) = missing,
    black (0) = known; any other value is refused (a mask must be binary)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise UserError(f"--masks {folder} is not a folder of mask images (PNG, white = missing)")
    masks = []
    for path in files:
        array = np.asarray(Image.open(path).convert("L"))
        if array.shape != tuple(size):
            raise UserError(f"mask {path} is {array.shape[1]}×{array.shape[0]} but the images are {size[1]}×{size[0]}; "
                            "give masks of the images' size")
        values = set(np.unique(array).tolist())
        if not values <= {0, 255} and not values <= {0, 1}:
            raise UserError(f"mask {path} is not binary (values {sorted(values)[:4]}...); give 0 for known and 255 "
                            "(or 1) for missing pixels")
        masks.append(torch.from_numpy((array > 0).astype(np.float32))[None])
    return torch.stack(masks)


# ---------------------------------------------------------------------------------------------
# Tasks.


@dataclass
class Measurement:
    """What the user gives for N cases: `y` the known image with holes zero (N, C, H, W) and `mask` (N, 1, H, W)
    (inpaint), the low-resolution image (N, C, H/f, W/f) (superres), or class indices (N, H, W) (semantic)."""

    y: torch.Tensor
    mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> Measurement:
        return Measurement(self.y.to(device), None if self.mask is None else self.mask.to(device))

    def __getitem__(self, rows) -> Measurement:
        return Measurement(self.y[rows], None if self.mask is None else self.mask[rows])


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "max":  # a latent position is missing when any pixel under it is
        return F.adaptive_max_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


class Inpaint:
    """Fill the pixels where the mask is 1; `mask` names the masks drawn in training (MASKS)."""

    name = "inpaint"
    cond_classes = 0
    weight = 1.0  # A·Aᵀ = A for a mask: the fidelity step needs no preconditioning

    def __init__(self, mask: str = "mixed"):
        self.mask = mask

    def cond_channels(self, channels: int) -> int:
        return channels + 1

    def measure(self, x1: torch.Tensor, mask: torch.Tensor) -> Measurement:
        return Measurement(x1 * (1 - mask), mask)

    def operator(self, x: torch.Tensor, m: Measurement) -> torch.Tensor:
        """A(x): the known pixels."""
        return x * (1 - m.mask)

    def condition(self, m: Measurement, space) -> torch.Tensor:
        known = space.encode(m.y)
        return torch.cat([known, _resize(m.mask, known.shape[-2:], "max").to(known.dtype)], 1)

    def null(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(cond[:, :-1]), torch.ones_like(cond[:, -1:])], 1)

    def enforce(self, x: torch.Tensor, m: Measurement) -> torch.Tensor:
        """The known pixels pasted back: every method returns them exactly."""
        return m.mask * x + (1 - m.mask) * m.y

    def consistency(self, x: torch.Tensor, m: Measurement) -> torch.Tensor:
        """Per case, the largest change of a known pixel, in uint8 levels."""
        return ((x - m.y) * (1 - m.mask)).abs().flatten(1).amax(1) * 127.5

    def baseline(self, m: Measurement) -> torch.Tensor:
        """The holes filled with the mean of each image's known pixels (per channel)."""
        known = (1 - m.mask).sum((2, 3), keepdim=True).clamp_min(1)
        return self.enforce((m.y.sum((2, 3), keepdim=True) / known).expand_as(m.y), m)

    def picture(self, m: Measurement) -> torch.Tensor:
        """The measurement as an image in [-1, 1]: the known pixels, the holes mid-gray."""
        return m.y * (1 - m.mask)

    def describe(self) -> str:
        return f"inpaint, {self.mask} masks"


class SuperRes:
    """Images from their f×f block means (area downsampling, a linear A with A·Aᵀ = I/f²)."""

    name = "superres"
    cond_classes = 0

    def __init__(self, factor: int = 4):
        self.factor = factor
        self.weight = float(factor)  # ‖f·(A x − y)‖²: its gradient A⁺(A x − y) makes step 1 a projection

    def cond_channels(self, channels: int) -> int:
        return channels

    def check(self, shape: tuple[int, ...]) -> None:
        if shape[-1] % self.factor or shape[-2] % self.factor:
            raise UserError(f"data.factor {self.factor} must divide the image sides {shape[-2]}×{shape[-1]}")

    def measure(self, x1: torch.Tensor, mask=None) -> Measurement:
        return Measurement(F.avg_pool2d(x1, self.factor))

    def operator(self, x: torch.Tensor, m: Measurement) -> torch.Tensor:
        return F.avg_pool2d(x, self.factor)

    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        """Bicubic upsampling to the image size (the baseline, and the condition before encoding)."""
        size = (low.shape[-2] * self.factor, low.shape[-1] * self.factor)
        return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)

    def condition(self, m: Measurement, space) -> torch.Tensor:
        return space.encode(self.upsample(m.y))

    def null(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(cond)

    def enforce(self, x: torch.Tensor, m: Measurement, iterations: int = 40) -> torch.Tensor:
        """The block means made those of the low-resolution image, within the pixel range: each f×f block is shifted
        by the constant c that makes the mean of clip(block + c, −1, 1) its low-resolution pixel, found by bisection
        (the clipped mean grows monotonically with c; c ∈ [−2, 2] reaches any mean in [−1, 1])."""
        x = x.clamp(-1, 1)
        low, high = torch.full_like(m.y, -2.0), torch.full_like(m.y, 2.0)
        for _ in range(iterations):
            c = (low + high) / 2
            mean = F.avg_pool2d((x + self._up(c)).clamp(-1, 1), self.factor)
            low, high = torch.where(mean < m.y, c, low), torch.where(mean < m.y, high, c)
        return (x + self._up((low + high) / 2)).clamp(-1, 1)

    def _up(self, low: torch.Tensor) -> torch.Tensor:
        return F.interpolate(low, scale_factor=self.factor, mode="nearest")

    def consistency(self, x: torch.Tensor, m: Measurement) -> torch.Tensor:
        """Per case, the largest difference of a block mean from the low-resolution pixel, in uint8 levels."""
        return (F.avg_pool2d(x, self.factor) - m.y).abs().flatten(1).amax(1) * 127.5

    def baseline(self, m: Measurement) -> torch.Tensor:
        return self.upsample(m.y)

    def picture(self, m: Measurement) -> torch.Tensor:
        return F.interpolate(m.y, scale_factor=self.factor, mode="nearest")

    def describe(self) -> str:
        return f"superres ×{self.factor}"


# 19 distinct colours (CelebAMask-HQ's class count) and more, for pictures of label maps.
_PALETTE = torch.tensor([[0, 0, 0], [204, 0, 0], [76, 153, 0], [204, 204, 0], [51, 51, 255], [204, 0, 204],
                         [0, 255, 255], [255, 204, 204], [102, 51, 0], [255, 0, 0], [102, 204, 0], [255, 255, 0],
                         [0, 0, 153], [0, 0, 204], [255, 51, 153], [0, 204, 204], [0, 51, 0], [255, 153, 51],
                         [0, 204, 0]], dtype=torch.float32)


class Semantic:
    """Images from maps of class indices (N, H, W), one-hot at the flow's resolution; the model projects the K
    channels with a learned 1×1 convolution (trained with the rest, unlike LFM's, which receives no gradient)."""

    name = "semantic"

    def __init__(self, classes: int):
        self.cond_classes = classes

    def cond_channels(self, channels: int) -> int:
        return channels  # the projection's output

    def condition(self, m: Measurement, space) -> torch.Tensor:
        size = space.shape[-2:]
        labels = _resize(m.y[:, None].float(), size, "nearest")[:, 0].long()
        return F.one_hot(labels, self.cond_classes).permute(0, 3, 1, 2).float()

    def null(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(cond)

    def enforce(self, x: torch.Tensor, m: Measurement) -> torch.Tensor:
        return x

    def picture(self, m: Measurement) -> torch.Tensor:
        colours = _PALETTE[m.y.cpu() % len(_PALETTE)]  # (N, H, W, 3)
        return (colours.permute(0, 3, 1, 2) / 127.5 - 1).to(m.y.device)

    def describe(self) -> str:
        return f"semantic, {self.cond_classes} classes"


def task_picture(task, m: Measurement, channels: int) -> torch.Tensor:
    """The measurement as a picture of `channels` channels in [-1, 1], for grids beside the samples."""
    picture = task.picture(m)
    if picture.shape[1] != channels:
        picture = picture.mean(1, keepdim=True) if channels == 1 else picture.expand(-1, channels, -1, -1)
    return picture


def build_task(name: str, mask: str = "mixed", factor: int = 4, classes: int = 0):
    """The task of a name in TASKS, or None for ''."""
    if not name:
        return None
    if name == "inpaint":
        return Inpaint(mask)
    if name == "superres":
        return SuperRes(factor)
    return Semantic(classes)


def task_of_config(cfg):
    """The task a run trains its model for (data.task), or None."""
    d = cfg.data
    return build_task(d.task, d.mask, d.factor, d.label_classes)


def model_inputs(task, channels: int) -> dict[str, int]:
    """build_model's arguments for a task's condition beside x of `channels` channels ({} without a task)."""
    if task is None:
        return {}
    return {"cond_channels": task.cond_channels(channels), "cond_classes": task.cond_classes}


def task_info(task) -> dict[str, str]:
    """What sampling needs to know of the model's condition, as weight-file metadata."""
    if task is None:
        return {}
    return {"task": json.dumps({"name": task.name, "mask": getattr(task, "mask", None),
                                "factor": getattr(task, "factor", None), "classes": task.cond_classes})}


def task_of_meta(meta: dict):
    """The task a checkpoint's model was trained for (from its weight file's metadata), or None."""
    if "task" not in meta:
        return None
    info = json.loads(meta["task"])
    return build_task(info["name"], info["mask"] or "mixed", info["factor"] or 4, info["classes"])


# ---------------------------------------------------------------------------------------------
# Training data: measurements drawn per micro-step; semantic maps read beside their images.


def training_measurement(task, x1: torch.Tensor, extras: dict, seed: int, step: int, shard) -> Measurement:
    """The measurement of micro-step `step`'s batch: inpaint masks drawn on the host, the one at position i of the
    global batch from (seed, step, i) (no device round trip, the same for any number of processes), the block means
    (superres), the batch's label maps (semantic)."""
    if task.name == "inpaint":
        positions = shard.local(torch.arange(x1.shape[0] * shard.world)).tolist()
        h, w = x1.shape[-2:]
        masks = torch.stack([draw_mask(task.mask, h, w, seeds.numpy_generator("train mask", seed, step, i))
                             for i in positions])
        return task.measure(x1, masks.to(x1.device, x1.dtype))
    if task.name == "superres":
        return task.measure(x1)
    return Measurement(extras["label_map"].to(x1.device))


def read_label_map(path: Path, classes: int, size: tuple[int, int], resolution: int) -> torch.Tensor:
    """A label map (H, W) long from a PNG of class indices (mode L or P), checked against the image's size and the
    class count, and cropped like its image."""
    if not path.is_file():
        raise UserError(f"label map {path} is missing; every image needs a PNG of class indices at the same relative "
                        "path under data.label_maps")
    picture = Image.open(path)
    if picture.mode not in ("L", "P", "I", "I;16"):
        picture = picture.convert("L")
    if picture.size != size:
        raise UserError(f"label map {path} is {picture.size[0]}×{picture.size[1]} but its image is "
                        f"{size[0]}×{size[1]}; give maps of their images' size")
    if resolution:
        picture = center_crop_nearest(picture, resolution)
    labels = torch.from_numpy(np.asarray(picture, dtype=np.int64).copy())
    if int(labels.max()) >= classes:
        raise UserError(f"label map {path} holds class {int(labels.max())} but data.label_classes is {classes}; "
                        f"set data.label_classes to at least {int(labels.max()) + 1}")
    return labels


def center_crop_nearest(picture: Image.Image, resolution: int) -> Image.Image:
    """data.images.center_crop for label maps: nearest-neighbour resizing keeps class indices whole."""
    w, h = picture.size
    scale = resolution / min(w, h)
    if scale != 1:
        picture = picture.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                                 Image.Resampling.NEAREST)
    w, h = picture.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return picture.crop((left, top, left + resolution, top + resolution))


class SemanticFolderDataset(ImageFolderDataset):
    """An image folder with a parallel folder of label maps (CelebAMask-HQ style): the map of ROOT/a/b.jpg is
    MAPS/a/b.png. Batches are (x1, y, {'label_map': (N, H, W) long})."""

    def __init__(self, root: str | Path, maps: str | Path, classes: int, resolution: int = 0,
                 class_folders: bool = False):
        super().__init__(root, resolution, class_folders)
        self.maps, self.classes_in_maps = Path(maps), classes
        if not str(maps) or not self.maps.is_dir():
            raise UserError(f"data.label_maps '{maps}' is not a folder; data.task=semantic needs the folder of label "
                            "maps (PNGs of class indices) parallel to data.path")
        missing = [p for p in self.files if not self.map_path(p).is_file()]
        if missing:
            raise UserError(f"label map {self.map_path(missing[0])} of image {missing[0]} is missing ({len(missing)} "
                            f"of {len(self.files)} images have none); every image needs one")

    def map_path(self, image: Path) -> Path:
        return (self.maps / image.relative_to(self.root)).with_suffix(".png")

    def label_map(self, i: int) -> torch.Tensor:
        size = self._open(self.files[i]).size
        return read_label_map(self.map_path(self.files[i]), self.classes_in_maps, size, self.resolution)

    def __getitem__(self, idx: torch.Tensor):
        x1, y = super().__getitem__(idx)
        return x1, y, {"label_map": torch.stack([self.label_map(int(i)) for i in idx])}


def read_label_folder(folder: str | Path, classes: int, size: tuple[int, int]) -> torch.Tensor:
    """Label maps (R, H, W) of a folder's PNGs in sorted order, for sampling a semantic model."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*.png")) if folder.is_dir() else []
    if not files:
        raise UserError(f"--condition-images {folder} holds no label maps (PNGs of class indices)")
    return torch.stack([read_label_map(p, classes, (size[1], size[0]), 0) for p in files])



# ---------------------------------------------------------------------------------------------
# The cases of a sampling or evaluation run.


class Cases:
    """N cases of a task: case k's measurement from original image k (in [-1, 1], (N, C, H, W)) and its mask (user
    masks cycled, k mod R, or drawn from (seed, k)), or given directly: low-resolution images (superres) or label
    maps (semantic), without originals."""

    def __init__(self, task, originals: torch.Tensor | None = None, given: torch.Tensor | None = None,
                 masks: torch.Tensor | None = None, mask_kind: str = "mixed", seed: int = 0):
        self.task, self.originals, self.given, self.masks = task, originals, given, masks
        self.mask_kind, self.seed = mask_kind, seed
        self.count = len(originals) if originals is not None else len(given)

    def measurement(self, indices: list[int]) -> Measurement:
        if self.given is not None:
            return Measurement(self.given[indices])
        x1 = self.originals[indices]
        if self.task.name == "inpaint":
            h, w = x1.shape[-2:]
            masks = self.masks[torch.tensor(indices) % len(self.masks)] if self.masks is not None else \
                sample_masks(self.mask_kind, h, w, self.seed, indices)
            return self.task.measure(x1, masks)
        return self.task.measure(x1)

    def original(self, indices: list[int]) -> torch.Tensor | None:
        return None if self.originals is None else self.originals[indices]


def cases_from_dataset(task, dataset, n: int, masks: str | None = None, mask_kind: str = "mixed",
                       seed: int = 0) -> Cases:
    """The cases of items 0..n-1 of a dataset (a run's own): originals, and label maps for semantic tasks."""
    if n > len(dataset):
        raise UserError(f"{n} cases asked but the run's dataset has {len(dataset)} items; ask for fewer, or give "
                        "--condition-images DIR")
    items = dataset[torch.arange(n)]
    given = items[2]["label_map"] if task.name == "semantic" else None
    user_masks = read_mask_folder(masks, tuple(items[0].shape[-2:])) if masks else None
    return Cases(task, originals=items[0], given=given, masks=user_masks, mask_kind=mask_kind, seed=seed)


def cases_from_folder(task, folder: str | Path, image_shape: tuple[int, ...], n: int, masks: str | None = None,
                      mask_kind: str = "mixed", seed: int = 0) -> Cases:
    """The cases of sample.py --condition-images DIR: images of the model's size (superres: also of the low
    resolution, taken as the measurement itself) or label maps (semantic), in sorted order, case k from file k."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--condition-images {folder} is not a folder")
    channels, h, w = image_shape
    if task.name == "semantic":
        given = read_label_folder(folder, task.cond_classes, (h, w))
        cases = Cases(task, given=given)
    else:
        images = read_image_folder(folder)
        size = tuple(images.shape[-2:])
        low = task.name == "superres" and size == (h // task.factor, w // task.factor)
        if images.shape[1] != channels or (size != (h, w) and not low):
            sizes = f"{w}×{h}" + (f" (or {w // task.factor}×{h // task.factor}, the low resolution)"
                                   if task.name == "superres" else "")
            raise UserError(f"--condition-images {folder} holds {size[1]}×{size[0]} images with {images.shape[1]} "
                            f"channel(s) but the model makes {sizes} images with {channels}; give images of that size")
        if masks is not None and task.name != "inpaint":
            raise UserError(f"--masks are for inpainting; this is {task.name}")
        user_masks = read_mask_folder(masks, (h, w)) if masks else None
        cases = Cases(task, given=to_model_range(images) if low else None,
                      originals=None if low else to_model_range(images), masks=user_masks, mask_kind=mask_kind,
                      seed=seed)
    if cases.count < n:
        raise UserError(f"--condition-images {folder} holds {cases.count} cases but --n-samples is {n}; each sample "
                        f"takes its own case (sample k from file k), so ask for at most {cases.count} samples or add "
                        "images")
    return cases


def check_task(cfg, task, dataset, pairs, features) -> None:
    """What an image-conditioned task (data.task) does not go with, one line each."""
    if len(dataset.shape) != 3:
        raise UserError(f"data.task={task.name} conditions on images but {cfg.data.name} has shape {dataset.shape}; "
                        "use an image dataset or remove data.task")
    if task.name == "superres":
        task.check(dataset.shape)
    if cfg.latent.autoencoder and cfg.latent.cache:
        raise UserError(f"data.task={task.name} in latent space encodes each batch's condition as it trains; set "
                        "latent.cache=false")
    for reason, present in (("flow.objective=meanflow", cfg.flow.objective != "cfm"),
                            ("reflow pairs (data.name=pairs)", pairs is not None),
                            ("Latent-CFM (latentcfm.encoder)", features is not None),
                            ("train.eval_every (use evaluate.py --task)", cfg.train.eval_every > 0)):
        if present:
            raise UserError(f"data.task={task.name} does not go with {reason} here; remove one of them")
