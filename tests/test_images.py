"""Image data: MNIST and CIFAR-10 files, image folders, field arrays; training image models end to end."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from PIL import Image

from config import load_config
from data import build_dataset
from data.images import (
    FieldDataset,
    ImageFolderDataset,
    load_cifar10,
    load_mnist,
    random_hflip,
    save_grid,
    to_model_range,
    to_uint8,
)
from errors import UserError
from models import build_model
from models.checkpoint import load_weights

SHARED_MNIST = next((p for p in (ROOT.parent / "shared" / "data" / "mnist", Path("/work/shared/data/mnist"))
                     if (p / "t10k-images-idx3-ubyte.gz").is_file()), None)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.skipif(SHARED_MNIST is None, reason="../shared/data/mnist is not on this machine")
def test_mnist_test_split_from_the_shared_idx_files():
    ds = load_mnist(SHARED_MNIST, "test", download=False)
    x, y = ds[torch.arange(len(ds))]
    assert len(ds) == 10_000 and ds.shape == (1, 28, 28) and ds.num_classes == 10
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1  # the model's value range, background exactly -1
    assert torch.equal(torch.bincount(y), torch.tensor([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]))


def test_mnist_reads_torchvision_layout_and_fails_clearly(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(raw / "train-images-idx3-ubyte", images, gz=False)
    write_idx(raw / "train-labels-idx1-ubyte", np.array([7, 0, 9]), gz=False)
    ds = load_mnist(tmp_path, "train", download=False)
    x, y = ds[torch.tensor([2, 0])]
    assert torch.equal(y, torch.tensor([9, 7]))
    assert torch.equal(to_uint8(x)[1, 0], torch.from_numpy(images[0].astype(np.uint8)))  # exact round trip
    with pytest.raises(UserError, match=f"MNIST test files .* are not in {tmp_path}"):
        load_mnist(tmp_path, "test", download=False)
    (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:100])
    with pytest.raises(UserError, match="is truncated"):
        load_mnist(tmp_path, "train", download=False)


def test_cifar10_from_the_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": pixels, b"labels": [3, 1, 4, 1]}, f)
    ds = load_cifar10(tmp_path, "test", download=False)
    x, y = ds[torch.arange(4)]
    assert ds.shape == (3, 32, 32) and ds.num_classes == 10 and torch.equal(y, torch.tensor([3, 1, 4, 1]))
    assert torch.equal(to_uint8(x).reshape(4, -1), torch.from_numpy(pixels))  # channel-major rows, as in the files
    with pytest.raises(UserError, match="CIFAR-10 train files"):
        load_cifar10(tmp_path, "train", download=False)


def make_folder(root: Path, sizes: dict[str, list[tuple[int, int]]], mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(shapes):
            array = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
            Image.fromarray(array).save(root / cls / f"{i}.png")


def test_image_folder_sizes_labels_and_crops(tmp_path):
    make_folder(tmp_path, {"cat": [(40, 30), (30, 60)], "dog": [(20, 20)], "owl": [(64, 48)]})
    ds = ImageFolderDataset(tmp_path, resolution=16, class_folders=True)
    x, y = ds[torch.arange(len(ds))]
    assert len(ds) == 4 and ds.shape == (3, 16, 16) and ds.num_classes == 3 and x.shape == (4, 3, 16, 16)
    assert torch.equal(y, torch.tensor([0, 0, 1, 2]))  # sorted subfolders: cat, dog, owl
    assert -1 <= x.min() and x.max() <= 1
    unlabelled = ImageFolderDataset(tmp_path / "cat", resolution=8)
    assert unlabelled.num_classes == 0 and unlabelled[torch.tensor([0])][1] is None
    # The central square is kept: a 40×30 image scaled to 16 px high is 21 wide, cropped 2 px left.
    image = Image.open(tmp_path / "cat" / "0.png").resize((21, 16), Image.Resampling.BICUBIC, reducing_gap=3.0)
    expected = torch.from_numpy(np.asarray(image)[:, 2:18].copy()).permute(2, 0, 1)
    assert torch.equal(to_uint8(ds[torch.tensor([0])][0])[0], expected)


def test_gray_folder_keeps_one_channel_and_flips_mirror(tmp_path):
    make_folder(tmp_path, {"a": [(12, 12), (12, 12)]}, mode="L")
    ds = ImageFolderDataset(tmp_path)
    x, _ = ds[torch.tensor([0, 1])]
    assert ds.shape == (1, 12, 12) and x.shape == (2, 1, 12, 12)
    flipped = random_hflip(x, torch.tensor([True, False]))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])


def test_image_folder_bad_inputs_name_the_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path / 'empty'} holds no images"):
        ImageFolderDataset(tmp_path / "empty")
    make_folder(tmp_path / "mixed", {"a": [(8, 8), (10, 10)]})
    ds = ImageFolderDataset(tmp_path / "mixed")
    with pytest.raises(UserError, match="1.png is 10×10 but the first image is 8×8; set data.resolution"):
        ds[torch.tensor([1])]
    with pytest.raises(UserError, match="not in a class subfolder"):
        Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "loose.png")
        ImageFolderDataset(tmp_path / "mixed", class_folders=True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.jpg could not be read"):
        ImageFolderDataset(tmp_path / "bad")


def test_fields_are_normalized_per_channel(tmp_path):
    rng = np.random.default_rng(0)
    fields = np.stack([rng.normal(5.0, 3.0, (20, 8, 8)), rng.normal(-200.0, 0.01, (20, 8, 8))], axis=1)
    np.save(tmp_path / "darcy.npy", fields.astype(np.float32))
    ds = FieldDataset(tmp_path / "darcy.npy")
    x, y = ds[torch.arange(20)]
    assert ds.shape == (2, 8, 8) and y is None
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(2), atol=1e-4)
    assert torch.allclose(x * ds.std[:, None, None] + ds.mean[:, None, None], torch.from_numpy(fields).float(),
                          atol=1e-3)
    np.save(tmp_path / "plain.npy", fields[:, 0].astype(np.float32))  # N×H×W: one channel
    assert FieldDataset(tmp_path / "plain.npy").shape == (1, 8, 8)
    np.save(tmp_path / "flat.npy", np.zeros((20, 8), np.float32))
    with pytest.raises(UserError, match="N×C×H×W"):
        FieldDataset(tmp_path / "flat.npy")


def test_registry_builds_image_datasets_from_config(tmp_path):
    make_folder(tmp_path, {"x": [(9, 9)]})
    ds = build_dataset(load_config(None, ["data.name=imagefolder", f"data.path={tmp_path}", "data.resolution=8"]))
    assert ds.shape == (3, 8, 8)


def test_grid_is_one_png_with_rows_and_columns(tmp_path):
    images = to_uint8(to_model_range(torch.arange(6 * 3 * 4 * 5).reshape(6, 3, 4, 5) % 256))
    save_grid(images, tmp_path / "grid.png", rows=2, pad=1)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
    assert np.array_equal(grid[1:5, 7:12], images[1].permute(1, 2, 0).numpy())  # row 0, column 1
    save_grid(images, tmp_path / "labelled.png", rows=2, pad=1, row_labels=["7", "12"])
    labelled = np.asarray(Image.open(tmp_path / "labelled.png"))
    assert labelled.shape == (11, 16 + 19, 3) and labelled[:, :16].min() < 128  # a margin with the labels
    assert np.array_equal(labelled[1:5, 16 + 7:16 + 12], images[1].permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------------------------
# Training image models end to end.

IMAGE_TINY = ["train.batch_size=8", "train.log_every=2", "train.checkpoint_every=2", "train.preview_every=2",
              "train.preview_images=12", "train.preview_steps=2", "train.trackers=[]"]


def mnist_subset(tmp_path: Path, n: int = 64) -> Path:
    """A small MNIST-format folder (from the shared test digits when they are here, else random strokes)."""
    if SHARED_MNIST is not None:
        ds = load_mnist(SHARED_MNIST, "test", download=False)
        images, labels = ds.images[:n, 0].numpy(), ds.labels[:n].numpy()
    else:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_mnist_unet_trains_previews_checkpoints_and_resumes(tmp_path):
    data = mnist_subset(tmp_path / "mnist")
    args = ["train.py", "-c", "configs/mnist_icfm_unet.yaml", "-e", str(tmp_path / "run"), f"data.path={data}",
            "data.split=test", "data.download=false", "data.hflip=true", *IMAGE_TINY]
    first = run_script(*args, "train.steps=2")
    assert first.returncode == 0, first.stderr
    grid = Image.open(tmp_path / "run" / "samples" / "step_0000002.png")
    assert grid.mode == "L" and grid.size == (4 * 30 + 2, 3 * 30 + 2)  # 12 images: 3 rows of 4, 2 px padding
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002"  # loads into the model its config builds
    load_weights(build_model(load_config(checkpoint / "config.yaml"), (1, 28, 28)), checkpoint / "ema.safetensors")
    second = run_script(*args, "train.steps=4")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout + second.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_0000004").is_dir()


def test_tiny_conditional_dit_trains_with_a_row_per_class(tmp_path):
    data = mnist_subset(tmp_path / "mnist")
    args = ["train.py", "-c", "configs/mnist_cond_dit.yaml", "-e", str(tmp_path / "run"), f"data.path={data}",
            "data.split=test", "data.download=false", "model.name=DiT-S/4", "model.width=32", "model.depth=1",
            "model.heads=2", "train.steps=2", *IMAGE_TINY, "train.preview_images=20"]
    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    grid = Image.open(tmp_path / "run" / "samples" / "step_0000002.png")
    assert grid.size == (10 + 2 * 30 + 2, 10 * 30 + 2)  # one row per class, 20 images: 10 rows of 2, labelled
    assert np.asarray(grid)[:, :10].min() < 128  # the class numbers, written in the margin
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "label_dropout: 0.1" in config and "name: DiT-S/4" in config


def test_image_training_bad_inputs(tmp_path):
    result = run_script("train.py", "data.name=imagefolder", f"data.path={tmp_path / 'none'}", "model.name=unet-mnist",
                        "-e", str(tmp_path / "run"))
    assert result.returncode == 2 and f"image folder '{tmp_path / 'none'}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script("train.py", "data.hflip=true", "-e", str(tmp_path / "run"), "train.trackers=[]")
    assert result.returncode == 2 and "data.hflip applies to images" in result.stderr
    make_folder(tmp_path / "folder", {"a": [(8, 8)]})
    (tmp_path / "folder" / "a" / "z.png").write_bytes(b"\x89PNG but cut short")  # found when a worker loads it
    result = run_script("train.py", "data.name=imagefolder", f"data.path={tmp_path / 'folder'}", "data.num_workers=1",
                        "model.name=unet-mnist", "train.batch_size=2", "-e", str(tmp_path / "run2"),
                        "train.trackers=[]")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr  # the worker's traceback is reduced to the user's sentence
    assert f"error: image {tmp_path / 'folder' / 'a' / 'z.png'} could not be read (UnidentifiedImageError); " \
           "remove or replace it\n" in result.stderr
    data = mnist_subset(tmp_path / "mnist", n=16)
    result = run_script("train.py", "-c", "configs/mnist_icfm_unet.yaml", f"data.path={data}", "data.split=test",
                        "model.name=DiT-S/8", "-e", str(tmp_path / "run"), "train.trackers=[]")
    assert result.returncode == 2 and "divisible by 8" in result.stderr
