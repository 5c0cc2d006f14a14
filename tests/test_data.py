import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from config import load_config
from data import SOURCES, ShardedBatchSampler, build_dataset, build_source
from data.toy import TOY
from errors import UserError


@pytest.mark.parametrize("name", list(TOY))
def test_toy_distributions_are_seeded_2d_and_roughly_unit_scale(name):
    a = TOY[name](5000, torch.Generator().manual_seed(0), torch.device("cpu"))
    b = TOY[name](5000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert a.shape == (5000, 2) and torch.equal(a, b)
    assert 0.3 < a.std(0).min() and a.std(0).max() < 3 and a.mean(0).abs().max() < 1


def test_toy_dataset_and_sources():
    cfg = load_config(None, ["data.name=checkerboard", "data.size=100", "data.source=8gaussians"])
    ds = build_dataset(cfg)
    assert len(ds) == 100 and ds.shape == (2,) and ds.num_classes == 0
    x0 = build_source(cfg, ds.shape)(7, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x0.shape == (7, 2)
    assert SOURCES["gaussian"]((3,))(4, torch.Generator(), torch.device("cpu")).shape == (4, 3)
    with pytest.raises(UserError, match="is a 2-D distribution"):
        build_source(cfg, (3,))


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_tensor_file_datasets(tmp_path, suffix):
    x = torch.randn(50, 3)
    path = tmp_path / f"d{suffix}"
    {".npy": lambda: np.save(path, x.numpy()), ".pt": lambda: torch.save(x, path),
     ".safetensors": lambda: save_file({"x": x, "y": torch.arange(50) % 4}, str(path))}[suffix]()
    ds = build_dataset(load_config(None, ["data.name=tensor_file", f"data.path={path}"]))
    assert ds.shape == (3,) and len(ds) == 50 and torch.equal(ds[torch.tensor([3, 1])][0], x[[3, 1]])
    assert ds.num_classes == (4 if suffix == ".safetensors" else 0)


def test_integer_arrays_are_converted_and_say_so(tmp_path):
    """np.save of integer coordinates: the points as float32, and the conversion told in the training log."""
    points = np.arange(40, dtype=np.int64).reshape(20, 2) - 20
    np.save(tmp_path / "d.npy", points)
    ds = build_dataset(load_config(None, ["data.name=tensor_file", f"data.path={tmp_path / 'd.npy'}"]))
    assert ds.x.dtype == torch.float32 and torch.equal(ds.x, torch.from_numpy(points).float())
    assert ds.converted == "int64 values converted to float32"


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (lambda p: p.mkdir(), "is a folder, not a data file"),
    (lambda p: p.write_bytes(b"not numpy"), "could not be read"),
    (lambda p: np.save(p, np.zeros((3, 2, 2), np.float32)), "must hold a non-empty N×D tensor of real numbers"),
    (lambda p: np.save(p, np.zeros((0, 2), np.float32)), "must hold a non-empty N×D tensor of real numbers"),
    (lambda p: np.save(p, np.zeros((3, 2), np.complex64)), "must hold a non-empty N×D tensor of real numbers, got "
                                                           "shape \\(3, 2\\) torch.complex64"),
    (lambda p: np.save(p, np.array([[1.0, np.nan]], np.float32)), "NaN or infinite"),
])
def test_bad_tensor_files_fail_clearly(tmp_path, content, message):
    path = tmp_path / "d.npy"
    if content:
        content(path)
    with pytest.raises(UserError, match=message):
        build_dataset(load_config(None, ["data.name=tensor_file", f"data.path={path}"]))


def test_sampler_shards_cover_the_global_batch_and_resume_exactly():
    whole = ShardedBatchSampler(10, global_batch=4, seed=1)
    shares = [ShardedBatchSampler(10, global_batch=4, rank=r, world=2, seed=1) for r in range(2)]
    for k in range(8):  # crosses several epochs
        assert torch.equal(torch.cat([s.batch(k) for s in shares]), whole.batch(k))
    # five epochs: every index appears exactly five times
    assert torch.bincount(torch.cat([whole.batch(k) for k in range(25)]), minlength=10).tolist() == [10] * 10
    resumed = iter(ShardedBatchSampler(10, global_batch=4, seed=1, start=5))
    assert torch.equal(next(resumed), whole.batch(5))
