"""Image data: MNIST, CIFAR-10, folders of images, and arrays of scientific fields.

Every dataset returns batches (x1, y): x1 float (N, C, H, W), images in [-1, 1] and fields normalized
to zero mean and unit variance per channel; y (N,) integer labels or None. Each tells its `shape`
(C, H, W) and `num_classes`, from which the model is sized.

MNIST and CIFAR-10 are read from their original files (so the MNIST test split alone, as in
../shared/data/mnist, is a dataset) and downloaded with torchvision when they are not there.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data.toy import load_tensor_file
from errors import UserError, atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding to the nearest level (values outside are clipped)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def random_hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images (N, C, H, W) where flip (N,) is True."""
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def save_grid(images: torch.Tensor, path: str | Path, rows: int, pad: int = 2,
              row_labels: list[str] | None = None) -> None:
    """Write uint8 images (N, C, H, W), C = 1 or 3, as one PNG: `rows` rows, filled row by row,
    with `row_labels` (e.g. the class of each row) written in a margin on the left."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    margin = 0 if not row_labels else 6 * max(len(label) for label in row_labels) + 4
    grid = torch.full((c, rows * (h + pad) + pad, margin + cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, image in enumerate(images.cpu()):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), margin + pad + k * (w + pad)
        grid[:, top: top + h, left: left + w] = image
    array = grid.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if c == 1 else array)
    if row_labels:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(picture)
        for r, label in enumerate(row_labels):
            draw.text((2, pad + r * (h + pad) + h // 2 - 5), label, fill=0 if c == 1 else (0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, picture.save)


class ImageTensorDataset:
    """Images held in memory as uint8 (N, C, H, W), returned in [-1, 1], with optional labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, num_classes: int | None = None):
        self.images, self.labels = images, labels
        self.shape = tuple(images.shape[1:])
        self.num_classes = 0 if labels is None else num_classes or int(labels.max()) + 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return to_model_range(self.images[idx]), None if self.labels is None else self.labels[idx]


# ---------------------------------------------------------------------------------------------
# MNIST and CIFAR-10 from their original files.


def read_idx(path: Path) -> np.ndarray:
    """An array from an idx file (LeCun's MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:  # 0x08: unsigned bytes
        raise UserError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: {body.size} bytes for shape {tuple(dims)}")
    return body.reshape(dims)


def _find(root: Path, names: list[str]) -> Path | None:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):  # ours, torchvision's layout
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist(root: str | Path, split: str = "train", download: bool = True) -> ImageTensorDataset:
    """MNIST's 28×28 gray digits (60,000 train or 10,000 test) and their labels."""
    root = Path(root or "data/mnist")
    prefix = "train" if split == "train" else "t10k"
    names = {kind: [f"{prefix}-{kind}-idx{d}-ubyte{gz}" for gz in (".gz", "")]
             for kind, d in (("images", 3), ("labels", 1))}
    if _find(root, names["images"]) is None and download:
        _download("MNIST", root, split)
    images, labels = _find(root, names["images"]), _find(root, names["labels"])
    if images is None or labels is None:
        raise UserError(f"MNIST {split} files ({names['images'][0]}, {names['labels'][0]}) are not in {root}; "
                        "set data.path to the folder that holds them, or data.download=true on a machine with network")
    x, y = torch.from_numpy(read_idx(images).copy()), torch.from_numpy(read_idx(labels).astype(np.int64))
    if len(x) != len(y):
        raise UserError(f"MNIST files in {root} disagree: {len(x)} images but {len(y)} labels")
    return ImageTensorDataset(x[:, None], y, num_classes=10)


def load_cifar10(root: str | Path, split: str = "train", download: bool = True) -> ImageTensorDataset:
    """CIFAR-10's 32×32 colour images (50,000 train or 10,000 test) and their 10 labels."""
    root = Path(root or "data/cifar10")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]

    def folder() -> Path | None:
        return next((f for f in (root / "cifar-10-batches-py", root) if all((f / n).is_file() for n in names)), None)

    if folder() is None and download:
        _download("CIFAR10", root, split)
    found = folder()
    if found is None:
        raise UserError(f"CIFAR-10 {split} files ({', '.join(names)}) are not in {root} or "
                        f"{root / 'cifar-10-batches-py'}; set data.path to that folder, or data.download=true "
                        "on a machine with network")
    xs, ys = [], []
    for name in names:
        with open(found / name, "rb") as f:  # the official python-version batches: pickled dicts of arrays
            batch = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return ImageTensorDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                              num_classes=10)


def _download(name: str, root: Path, split: str) -> None:
    import torchvision

    try:
        getattr(torchvision.datasets, name)(str(root), train=split == "train", download=True)
    except Exception as e:  # no network, a full disk, a proxy: say which and what to do
        raise UserError(f"{name} is not in {root} and downloading it failed ({str(e).splitlines()[0]}); "
                        "copy the files there, or set data.path to where they are") from None


# ---------------------------------------------------------------------------------------------
# Folders of images, read lazily.


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to `resolution` (bicubic, antialiased), then crop the central square."""
    w, h = image.size
    scale = resolution / min(w, h)
    if scale != 1:
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.Resampling.BICUBIC, reducing_gap=3.0)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


class ImageFolderDataset:
    """Every image under a folder (any depth), as RGB (or gray when the first image is gray).

    With `class_folders`, the label of an image is the index of its top-level subfolder in sorted
    order. With a `resolution`, images are resized and center-cropped to that square; without one,
    all images must have the same size.
    """

    def __init__(self, root: str | Path, resolution: int = 0, class_folders: bool = False):
        self.root = Path(root)
        if not str(root) or not self.root.is_dir():
            raise UserError(f"image folder '{root}' does not exist; set data.path to a folder of images")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise UserError(f"image folder {self.root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.labels, self.classes = None, []
        if class_folders:
            self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.files if p.parent != self.root})
            loose = [p for p in self.files if p.parent == self.root]
            if loose or not self.classes:
                raise UserError(f"data.class_folders is set but {loose[0] if loose else self.root} is not in a "
                                "class subfolder; put every image in ROOT/CLASS/ or set data.class_folders=false")
            index = {name: i for i, name in enumerate(self.classes)}
            self.labels = torch.tensor([index[p.relative_to(self.root).parts[0]] for p in self.files])
        first = self._open(self.files[0])
        self.mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
        size = (resolution, resolution) if resolution else first.size
        self.resolution = resolution
        self.shape = (1 if self.mode == "L" else 3, size[1], size[0])
        self.num_classes = len(self.classes)

    def _open(self, path: Path) -> Image.Image:
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"image {path} could not be read ({e.__class__.__name__}); remove or replace it") from None
        return image

    def load(self, i: int) -> torch.Tensor:
        """Image i as uint8 (C, H, W)."""
        image = self._open(self.files[i]).convert(self.mode)
        if self.resolution:
            image = center_crop(image, self.resolution)
        elif (image.height, image.width) != self.shape[1:]:
            raise UserError(f"image {self.files[i]} is {image.width}×{image.height} but the first image is "
                            f"{self.shape[2]}×{self.shape[1]}; set data.resolution to resize them all")
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.reshape(image.height, image.width, -1).copy()).permute(2, 0, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = torch.stack([self.load(int(i)) for i in idx])
        return to_model_range(images), None if self.labels is None else self.labels[idx]


# ---------------------------------------------------------------------------------------------
# Arrays of fields (e.g. Darcy-flow permeability and pressure): any value range, normalized per channel.


class FieldDataset:
    """An N×C×H×W (or N×H×W) float array, normalized to zero mean and unit variance per channel.

    `mean` and `std` (C,) map generated fields back to physical units: x · std + mean.
    """

    def __init__(self, path: str | Path):
        x, self.labels, self.converted = load_tensor_file(path, layout="N×C×H×W")
        if x.dim() == 3:
            x = x[:, None]
        if not torch.isfinite(x).all():
            raise UserError(f"data file {path} holds NaN or infinite values")
        x = x.double()  # float64 statistics: fields far from zero with a small spread lose digits in float32
        mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-12)
        self.x = ((x - mean[:, None, None]) / std[:, None, None]).float()
        self.mean, self.std = mean.float(), std.float()
        self.shape = tuple(self.x.shape[1:])
        self.num_classes = 0 if self.labels is None else int(self.labels.max()) + 1

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        """Normalized fields (N, C, H, W) -> uint8 pictures for a grid, each field stretched to its own range."""
        low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        return ((x - low) / (high - low).clamp_min(1e-12) * 255).round().to(torch.uint8)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.x[idx], None if self.labels is None else self.labels[idx]


IMAGE_DATASETS = {
    "mnist": lambda cfg: load_mnist(cfg.data.path, cfg.data.split, cfg.data.download),
    "cifar10": lambda cfg: load_cifar10(cfg.data.path, cfg.data.split, cfg.data.download),
    "imagefolder": lambda cfg: ImageFolderDataset(cfg.data.path, cfg.data.resolution, cfg.data.class_folders),
    "fields": lambda cfg: FieldDataset(cfg.data.path),
}


def read_image_folder(folder: Path) -> torch.Tensor:
    """Every image under `folder` (sorted paths) as uint8 (N, C, H, W); gray stays one channel."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"reference folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images = []
    for path in paths:
        try:
            image = Image.open(path)
            image = image.convert("L" if image.mode in ("L", "I", "I;16", "1") else "RGB")
        except OSError as e:
            raise UserError(f"reference image {path} cannot be read ({e}); remove or replace it") from None
        array = np.asarray(image)
        images.append(torch.from_numpy((array[None] if array.ndim == 2 else array.transpose(2, 0, 1)).copy()))
    sizes = {tuple(x.shape) for x in images}
    if len(sizes) > 1:
        raise UserError(f"reference folder {folder} mixes image sizes {sorted(sizes)[:3]}; resize them to one size")
    return torch.stack(images)


def read_npz_images(path: Path) -> torch.Tensor:
    """arr_0 of an .npz (N, H, W, C) or (N, H, W) uint8, as sample.py --npz and the ADM evaluator write it."""
    with np.load(path) as z:
        if "arr_0" not in z:
            raise UserError(f"{path} holds neither statistics (mu, sigma) nor images (arr_0); give another --ref")
        array = z["arr_0"]
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
        raise UserError(f"{path}: arr_0 must be uint8 (N, H, W, C), got {array.dtype} {array.shape}")
    return torch.from_numpy(array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2).copy())
