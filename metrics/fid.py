"""FID and KID of uint8 images through clean-fid's Inception-v3, and the reference statistics they compare to.

FID (Heusel et al. 2017): ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) between Gaussians fitted to the 2048-d
pool features. KID (Bińkowski et al. 2018): the unbiased MMD² under the cubic polynomial kernel
k(a, b) = (aᵀb / d + 1)³, averaged over random subsets (mean ± std reported). Precision and recall
(Kynkäänniemi et al. 2019): the fraction of samples inside the reference's k-nearest-neighbour balls (fidelity),
and of reference images inside the samples' (diversity), k = 3, against as many reference images as samples.

Features follow clean-fid (Parmar et al. 2022) exactly: mode "clean" resizes each channel to 299×299
with PIL's bicubic filter in float before the network; "legacy_tensorflow" lets the network resize as
the original TensorFlow code did. Images are held in memory (uint8 tensors (N, C, H, W), gray
replicated to RGB), which gives the same numbers as writing PNG files and calling clean-fid on the
folder. The network is the file clean-fid downloads to INCEPTION_FILE; offline, put it there first
(../shared/tools/inception-offline does so on this project's machines).

"pixels" is a fast stand-in extractor (8×8 area-averaged pixels) for tests and smoke runs: it goes
through the same statistics code, but its numbers are not FID.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.images import read_image_folder, read_npz_images
from errors import UserError, atomic_write
from models.encoders import INCEPTION_FILE  # where clean-fid loads (and downloads) the network

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
MODES = ("clean", "legacy_tensorflow")
# Reference sets clean-fid publishes precomputed statistics for (downloaded on first use).
CLEANFID_NAMES = ("cifar10", "ffhq", "lsun_church", "lsun_horse", "lsun_cat", "afhq_cat", "afhq_dog", "afhq_wild",
                  "metfaces", "horse2zebra", "cat2dog")


def default_stats_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fm-toolkit" / "fid-stats"


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W) -> (N, 3, H, W), gray replicated as when a gray PNG is read as RGB."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"features need uint8 images (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1)


class _Resized(torch.utils.data.Dataset):
    """Images as clean-fid's dataset hands them to the network: float HWC resized by the mode's resizer."""

    def __init__(self, images: torch.Tensor, mode: str):
        from cleanfid.resize import build_resizer

        self.images, self.resize = _rgb(images), build_resizer(mode)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = np.asarray(self.resize(self.images[i].permute(1, 2, 0).numpy()), dtype=np.float32)
        return torch.from_numpy(image).permute(2, 0, 1)


class InceptionFeatures:
    """clean-fid's Inception-v3 pool features (N, 2048) of uint8 images."""

    dim = 2048

    def __init__(self, mode: str = "clean", device: torch.device | str = "cpu", batch_size: int = 200,
                 num_workers: int = 0):
        if mode not in MODES:
            raise UserError(f"unknown clean-fid mode '{mode}'; choose {' or '.join(MODES)}")
        self.mode, self.device = mode, torch.device(device)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.key, self.description = f"inception-{mode}", f"Inception-v3 (clean-fid, mode {mode})"
        self.network = _inception(mode, self.device)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        loader = torch.utils.data.DataLoader(_Resized(images.cpu(), self.mode), batch_size=self.batch_size,
                                             num_workers=self.num_workers)
        with torch.no_grad():
            return np.concatenate([self.network(batch.to(self.device)).double().cpu().numpy() for batch in loader])


@functools.cache
def _inception(mode: str, device: torch.device):
    from cleanfid import fid

    if not INCEPTION_FILE.is_file():
        try:
            _download_inception()
        except Exception as e:  # no network, proxy, certificate, ...: all end the same way for the user
            raise UserError(
                f"clean-fid's Inception network is not at {INCEPTION_FILE} and could not be downloaded "
                f"({type(e).__name__}); on a machine without network copy inception-2015-12-05.pt there "
                f"(from {INCEPTION_URL}; on this project's machines run ../shared/tools/inception-offline PYTHON)"
            ) from None
    import warnings

    with warnings.catch_warnings():  # torch.jit.load's deprecation notice, on every evaluation's stderr
        warnings.simplefilter("ignore", FutureWarning)
        return fid.build_feature_extractor(mode, device=device, use_dataparallel=False)


def _download_inception() -> None:
    import socket
    import urllib.request

    tmp = INCEPTION_FILE.with_name(f".{INCEPTION_FILE.name}.{os.getpid()}")
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        urllib.request.urlretrieve(INCEPTION_URL, tmp)
        os.replace(tmp, INCEPTION_FILE)
    finally:
        socket.setdefaulttimeout(old)
        tmp.unlink(missing_ok=True)


class PixelFeatures:
    """8×8 area-averaged RGB pixels in [0, 1] (192-d): a fast stand-in for tests and smoke runs, not FID."""

    key, description, dim = "pixels", "8x8 pixels (a stand-in, not FID)", 192

    def __init__(self, mode: str = "clean", device: torch.device | str = "cpu", **_):
        self.device = torch.device(device)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = _rgb(images).to(self.device).double() / 255
        return F.adaptive_avg_pool2d(x, 8).flatten(1).cpu().numpy()


FEATURES = {"inception": InceptionFeatures, "pixels": PixelFeatures}


def build_features(name: str, mode: str = "clean", device: torch.device | str = "cpu", **kwargs):
    if name not in FEATURES:
        raise UserError(f"unknown feature extractor '{name}'; choose one of {', '.join(FEATURES)}")
    return FEATURES[name](mode=mode, device=device, **kwargs)


# Statistics and distances.


@dataclass
class Reference:
    """What generated images are compared with: feature mean and covariance, the features themselves
    when known (KID needs them), how many images, their resolution (H, W) and the feature extractor
    (its key, e.g. 'inception-clean', which names clean-fid's mode) when known, and a name."""

    name: str
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None
    resolution: tuple[int, int] | None = None
    extractor: str | None = None

    @classmethod
    def of(cls, features: np.ndarray, name: str, resolution: tuple[int, int] | None = None,
           extractor: str | None = None) -> Reference:
        return cls(name, features.mean(0), np.cov(features, rowvar=False), len(features), features, resolution,
                   extractor)

    def save(self, path: str | Path) -> None:
        """Written whole (a temporary name, then rename), with what made it: resolution and feature extractor."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self.features is None else {"features": self.features.astype(np.float32)}
        atomic_write(path, lambda tmp: np.savez(tmp, mu=self.mu, sigma=self.sigma, n=self.n, name=self.name,
                                                resolution=np.array(self.resolution or (0, 0)),
                                                extractor=self.extractor or "", **extra))

    @classmethod
    def load(cls, path: Path) -> Reference:
        """Statistics from an .npz with mu and sigma (ours, or clean-fid's and others' without the rest)."""
        try:
            with np.load(path) as z:
                resolution = tuple(int(v) for v in z["resolution"]) if "resolution" in z else (0, 0)
                features = next((z[k].astype(np.float64) for k in ("features", "feats") if k in z), None)
                n = int(z["n"]) if "n" in z else (len(features) if features is not None else 0)
                extractor = str(z["extractor"]) if "extractor" in z else ""
                return cls(str(z["name"]) if "name" in z else str(path), z["mu"].astype(np.float64),
                           z["sigma"].astype(np.float64), n, features, resolution if any(resolution) else None,
                           extractor or None)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"reference {path} is not a readable .npz of statistics ({type(e).__name__}); give "
                            "an .npz with mu and sigma, or make the statistics again") from None


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2 Tr((Σ₁Σ₂)^½) (Heusel et al. 2017, eq. 6); like clean-fid, a tiny
    ridge is added when the product's square root is not finite (singular covariances of few samples), and
    a square root whose diagonal has an imaginary part above 1e-3 is refused rather than dropped."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():  # few samples give singular covariances; the ridge below handles failures
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        ridge = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    if np.iscomplexobj(covmean):
        imaginary = float(np.abs(np.diagonal(covmean).imag).max())
        if imaginary > 1e-3:
            raise UserError(f"the square root of Σ₁Σ₂ in the Fréchet distance has an imaginary part of {imaginary:.3g} "
                            "(clean-fid refuses above 1e-3): a covariance is not positive semi-definite or far "
                            "too singular; check the reference statistics or use more samples")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD² with the kernel (aᵀb / d + 1)³ over `subsets` random subsets of equal size
    (Bińkowski et al. 2018, as in clean-fid and torch-fidelity): mean and standard deviation."""
    rng = np.random.default_rng(seed)
    d, m = features1.shape[1], min(len(features1), len(features2), subset_size)
    values = []
    for _ in range(subsets):
        a = features1[rng.choice(len(features1), m, replace=False)]
        b = features2[rng.choice(len(features2), m, replace=False)]
        k_aa, k_bb, k_ab = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        values.append(within - 2 * k_ab.mean())
    return float(np.mean(values)), float(np.std(values))


def precision_recall(features: np.ndarray, reference: np.ndarray, k: int = 3, seed: int = 0) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, §3): a set's manifold is the union of balls around
    its points, each of radius the distance to the point's k-th nearest neighbour in its own set. Precision is the
    fraction of the samples inside the reference's manifold, recall the fraction of the reference inside the
    samples'. The reference is subsampled (seeded) to as many points as there are samples, as the paper compares
    equal numbers; distances are Euclidean in the features, in float64."""
    if len(features) <= k or len(reference) <= k:
        raise UserError(f"precision and recall with k = {k} need more than {k} samples and reference images; give "
                        "more samples (--n-samples)")
    rng = np.random.default_rng(seed)
    if len(reference) > len(features):
        reference = reference[np.sort(rng.choice(len(reference), len(features), replace=False))]
    a, b = torch.from_numpy(np.asarray(features, np.float64)), torch.from_numpy(np.asarray(reference, np.float64))

    def radii(x: torch.Tensor) -> torch.Tensor:  # the k-th neighbour other than the point itself (column 0)
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    between = torch.cdist(a, b)  # (samples, reference)
    precision = (between <= radii(b)[None, :]).any(1).double().mean()
    recall = (between <= radii(a)[:, None]).any(0).double().mean()
    return float(precision), float(recall)


# Reference images: where they come from, read as uint8 (N, C, H, W).


def _fingerprint(path: Path) -> str:
    """Changes when the files under `path` change (names, sizes, modification times)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256(str(path.resolve()).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(path) if path.is_dir() else p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def check_reference(reference: Reference, resolution: tuple[int, int], extractor) -> None:
    """The reference was made like the samples' statistics (same resolution, same feature extractor and clean-fid
    mode) wherever it records how it was made; else one sentence naming what differs."""
    if reference.resolution is not None and tuple(reference.resolution) != tuple(resolution):
        (h, w), (rh, rw) = resolution, reference.resolution
        raise UserError(f"reference {reference.name} is at {rh}x{rw} px but the samples are {h}x{w}; "
                        f"give a reference at {h}x{w}")
    if reference.extractor is not None and reference.extractor != extractor.key:
        raise UserError(f"reference {reference.name} holds {reference.extractor} features but the samples are "
                        f"scored with {extractor.key}; give the --mode / --features it was made with, or a "
                        f"reference made with {extractor.key}")


def cleanfid_reference(name: str, resolution: tuple[int, int], mode: str, need_features: bool) -> Reference:
    """clean-fid's precomputed statistics `NAME[:SPLIT]` (split 'train' by default) at the samples' size."""
    from cleanfid.features import get_reference_statistics

    dataset, _, split = name.partition(":")
    split = split or "train"
    res = resolution[0]
    try:
        mu, sigma = get_reference_statistics(dataset, res, mode=mode, split=split)
        features = get_reference_statistics(dataset, res, mode=mode, split=split, metric="KID") if need_features \
            else None
    except Exception as e:
        raise UserError(f"clean-fid has no statistics for {dataset} split {split} at {res} px in mode {mode}, or "
                        f"they could not be downloaded ({type(e).__name__}); check the name and resolution, or "
                        "give a folder, an .npz or leave --ref out to use the run's dataset") from None
    return Reference(f"clean-fid {dataset} {split} {res}px", mu, sigma, 0 if features is None else len(features),
                     features, None, f"inception-{mode}")


def file_reference(spec: str, extractor, resolution: tuple[int, int], stats_dir: Path) -> Reference:
    """A folder of images or an .npz (statistics, or images) given as --ref; image features are cached."""
    path = Path(spec)
    name = str(path.resolve())  # one name however the path is spelled: reports find their rows by it
    if not path.exists():
        raise UserError(f"reference {spec} does not exist; give a folder of images, an .npz, a clean-fid dataset "
                        f"name ({', '.join(CLEANFID_NAMES)}[:split]) or leave --ref out to use the run's dataset")
    if path.is_file():
        if path.suffix != ".npz":
            raise UserError(f"reference {spec} is a {path.suffix or 'suffix-less'} file; give a folder of images, an "
                            ".npz with mu and sigma (or arr_0 images), a clean-fid dataset name or leave --ref out")
        try:
            with np.load(path) as z:
                has_stats = "mu" in z and "sigma" in z
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f"reference {spec} is not a readable .npz ({type(e).__name__}); give an .npz with mu "
                            "and sigma, or arr_0 images") from None
        if has_stats:
            return replace(Reference.load(path), name=name)
    cache = stats_dir / f"{path.name}_{extractor.key}_{_fingerprint(path)}.npz"
    if cache.is_file():  # the cache is shared by every spelling (the fingerprint resolves the path); so is the name
        return replace(Reference.load(cache), name=name)
    images = read_image_folder(path) if path.is_dir() else read_npz_images(path)
    size = tuple(images.shape[-2:])
    if size != tuple(resolution):
        raise UserError(f"reference {spec} holds {size[0]}x{size[1]} images but the samples are "
                        f"{resolution[0]}x{resolution[1]}; give a reference at the samples' resolution")
    reference = Reference.of(extractor(images), name, size, extractor.key)
    reference.save(cache)
    return reference


def dataset_reference(cfg, dataset, extractor, stats_dir: Path, progress: bool = True) -> Reference:
    """Features of every image of the run's dataset (no flips), computed once and cached under stats_dir
    by dataset, split, resolution, feature extractor (and clean-fid mode) and the data's location."""
    from cluster import progress as bar
    from data.images import to_uint8

    d = cfg.data
    h, w = dataset.shape[-2:]
    location = hashlib.sha256(f"{Path(d.path).resolve() if d.path else ''}:{d.resolution}:{len(dataset)}".encode())
    cache = stats_dir / f"{d.name}_{d.split}_{h}x{w}_{extractor.key}_{location.hexdigest()[:12]}.npz"
    if cache.is_file():
        return Reference.load(cache)
    chunks, n = [], len(dataset)
    counter = bar(n, desc=f"reference {d.name} {d.split}", disable=not progress, unit="image")
    for first in range(0, n, 500):
        x, _ = dataset[torch.arange(first, min(first + 500, n))]
        chunks.append(extractor(to_uint8(x)))
        counter.update(len(x))
    counter.close()
    reference = Reference.of(np.concatenate(chunks), f"{d.name} {d.split} ({n} images)", (h, w), extractor.key)
    reference.save(cache)
    return reference


def load_reference(spec: str | None, extractor, resolution: tuple[int, int], stats_dir: Path, cfg=None, dataset=None,
                   need_features: bool = False) -> Reference:
    """The reference that `spec` names: None for the run's dataset (cfg, dataset), a clean-fid dataset name
    NAME[:SPLIT], a folder of images or an .npz; checked against the samples' resolution."""
    if spec is None:
        reference = dataset_reference(cfg, dataset, extractor, stats_dir)
    elif not Path(spec).exists() and spec.partition(":")[0] in CLEANFID_NAMES:
        if not extractor.key.startswith("inception-"):
            raise UserError(f"clean-fid's statistics are Inception features; with {extractor.key} features give a "
                            "folder, an .npz or the run's dataset as the reference")
        reference = cleanfid_reference(spec, resolution, extractor.mode, need_features)
    else:
        reference = file_reference(spec, extractor, resolution, stats_dir)
    check_reference(reference, resolution, extractor)
    if need_features and reference.features is None:
        raise UserError(f"KID, precision and recall need the reference's features, but {reference.name} holds only "
                        "statistics; give a folder, an .npz of images, or leave --ref out for the run's dataset")
    return reference


def image_metrics(features: np.ndarray, reference: Reference, kid: bool, seed: int, pr: bool = False) -> dict:
    """FID of the features (N, D) against the reference; with `kid` the KID (mean and std over subsets), with `pr`
    precision and recall."""
    out = {"fid": frechet_distance(features.mean(0), np.cov(features, rowvar=False), reference.mu, reference.sigma)}
    if kid:
        out["kid"], out["kid_std"] = kernel_inception_distance(features, reference.features, seed=seed)
    if pr:
        out["precision"], out["recall"] = precision_recall(features, reference.features, seed=seed)
    return out
