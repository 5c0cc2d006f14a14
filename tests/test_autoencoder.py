"""The KL autoencoder for latent flow matching: shapes, KL, training on the MNIST test digits, clear errors."""

import json

import pytest
import torch
from conftest import run_script
from PIL import Image
from test_images import SHARED_MNIST, make_folder

from config import load_config
from data import build_dataset
from errors import UserError
from models import AUTOENCODERS, build_autoencoder
from models.autoencoder import Posterior
from models.checkpoint import load_weights, read_metadata


@pytest.mark.parametrize("name", list(AUTOENCODERS))
def test_every_autoencoder_round_trips_shapes(name):
    cfg = load_config(None, [f"model.name={name}", "model.width=8", "flow.objective=autoencoder"])
    model = build_autoencoder(cfg, (3, 16, 16))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = model.encode(x)
    f = model.factor
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 16 // f, 16 // f)
    assert model.latent_shape((3, 16, 16)) == (4, 16 // f, 16 // f)
    reconstruction, _ = model(x, torch.randn(2, 4, 16 // f, 16 // f))
    assert model.decode(posterior.mean).shape == reconstruction.shape == x.shape
    reconstruction.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_kl_matches_the_closed_form():
    mean, logvar = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(Posterior(mean, logvar).kl(), expected)
    assert Posterior(torch.zeros(1, 4), torch.zeros(1, 4)).kl().item() == 0


def test_sizes_the_autoencoder_cannot_take_fail_clearly():
    cfg = load_config(None, ["model.name=ae-mnist", "flow.objective=autoencoder"])
    with pytest.raises(UserError, match="downsamples by 4 but the images are 30x30"):
        build_autoencoder(cfg, (1, 30, 30))
    with pytest.raises(UserError, match="takes images"):
        build_autoencoder(cfg, (2,))


@pytest.mark.skipif(SHARED_MNIST is None, reason="../shared/data/mnist is not on this machine")
def test_a_few_hundred_cpu_steps_on_mnist_reconstruct_digits(tmp_path):
    run = tmp_path / "ae"
    out = run_script("train.py", "-c", "configs/mnist_autoencoder.yaml", "-e", str(run), f"data.path={SHARED_MNIST}",
                     "data.split=test", "model.width=8", "train.steps=200", "train.batch_size=32", "train.lr=3e-3",
                     "train.lr_schedule=constant", "train.warmup_steps=10", "train.ema_decay=0.99",
                     "train.preview_every=0", "train.preview_images=8", "train.checkpoint_every=200",
                     "train.trackers=[]")
    assert out.returncode == 0, out.stderr
    checkpoint = run / "checkpoints" / "step_0000200"
    cfg = load_config(checkpoint / "config.yaml")
    dataset = build_dataset(cfg)
    model = build_autoencoder(cfg, dataset.shape)
    load_weights(model, checkpoint / "ema.safetensors")
    x, _ = dataset[torch.arange(512)]
    with torch.no_grad():
        reconstruction, _ = model.eval()(x)
    # The bound: mean squared error per pixel (values in [-1, 1]) under 0.05, a fifth of the 0.25 that
    # predicting the mean digit gets; 200 steps reach about 0.023.
    assert (reconstruction - x).square().mean().item() < 0.05
    meta = read_metadata(checkpoint / "ema.safetensors")
    assert json.loads(meta["latent_shape"]) == [4, 7, 7]
    # The stored shift and scale normalize the latents: on other digits than the 1,024 they were measured on,
    # (z − shift)·scale has mean ≈ 0 and standard deviation ≈ 1.
    with torch.no_grad():
        z = model.encode(dataset[torch.arange(5000, 6000)][0]).mean
    normalized = (z - float(meta["latent_shift"])) * float(meta["latent_scale"])
    assert abs(normalized.mean().item()) < 0.1 and abs(normalized.std().item() - 1) < 0.1
    preview = Image.open(run / "samples" / "step_0000200.png")  # 8 originals above their reconstructions
    assert preview.size == (40 + 3 * 30 + 2, 6 * 30 + 2)  # label margin, 3 columns; 3 pairs of rows
    out = run_script("sample.py", "--weights", str(checkpoint), "--n-samples", "2", "--save-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "is an autoencoder (flow.objective=autoencoder), not a flow" in out.stderr


def test_latent_flow_matching_trains_samples_and_evaluates_decoded_images(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where the latent cache goes
    make_folder(tmp_path / "data", {"": [(8, 8)] * 8})
    data = ["data.name=imagefolder", f"data.path={tmp_path / 'data'}", "train.trackers=[]", "train.batch_size=4"]
    out = run_script("train.py", "-e", str(tmp_path / "ae"), *data, "flow.objective=autoencoder",
                     "model.name=ae-mnist", "model.width=8", "train.steps=4", "train.preview_images=4")
    assert out.returncode == 0, out.stderr
    ae = tmp_path / "ae" / "checkpoints" / "step_0000004"
    out = run_script("train.py", "-e", str(tmp_path / "flow"), *data, f"latent.autoencoder={ae}",
                     "model.name=unet-mnist", "model.width=8", "train.steps=2", "train.checkpoint_every=1",
                     "train.preview_images=4", "train.preview_steps=2")
    assert out.returncode == 0, out.stderr
    flow = tmp_path / "flow" / "checkpoints" / "step_0000002"
    assert "latent cache: 8 latents encoded" in (tmp_path / "flow" / "log.txt").read_text()
    out = run_script("train.py", "-e", str(tmp_path / "flipped"), *data, f"latent.autoencoder={ae}", "data.hflip=true",
                     "model.name=unet-mnist", "model.width=8", "train.steps=1", "train.preview_images=4",
                     "train.preview_steps=1")
    assert out.returncode == 0, out.stderr
    assert "latent cache: 16 latents encoded (images and their mirrors)" in (tmp_path / "flipped/log.txt").read_text()
    assert json.loads(read_metadata(flow / "ema.safetensors")["latent_shape"]) == [4, 2, 2]
    out = run_script("sample.py", "--weights", str(flow), "--n-samples", "3", "--steps", "2",
                     "--save-dir", str(tmp_path / "samples"))
    assert out.returncode == 0, out.stderr
    images = sorted((tmp_path / "samples").glob("*.png"))
    assert len(images) == 3 and Image.open(images[0]).size == (8, 8)  # decoded to the data's shape
    out = run_script("evaluate.py", "-e", str(tmp_path / "flow"), "--samplers", "euler:2", "--n-samples", "6",
                     "--features", "pixels", "--stats-dir", str(tmp_path / "stats"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "flow" / "eval" / "report.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["fid"] >= 0 for r in rows)


class CountingSpace:
    """A LatentSpace whose encoder counts its calls (and can die after a number of them)."""

    def __init__(self, space, die_after=None):
        self.space, self.calls, self.die_after = space, 0, die_after
        self.name, self.shift, self.scale = space.name, space.shift, space.scale
        outer = self

        class Encoder:
            def encode(self, x):
                outer.calls += 1
                if outer.die_after is not None and outer.calls > outer.die_after:
                    raise KeyboardInterrupt
                return space.autoencoder.encode(x)

        self.autoencoder = Encoder()


def test_latent_cache_is_written_once_reused_and_rebuilt_for_another_autoencoder(tmp_path, monkeypatch):
    from data import latents
    from flows.latent import build_space

    monkeypatch.setattr(latents, "SHARD", 4)  # 10 images: shards of 4, 4 and 2
    make_folder(tmp_path / "data", {"": [(8, 8)] * 10})
    data = ["data.name=imagefolder", f"data.path={tmp_path / 'data'}", "train.trackers=[]", "train.batch_size=4"]
    out = run_script("train.py", "-e", str(tmp_path / "ae"), *data, "flow.objective=autoencoder",
                     "model.name=ae-mnist", "model.width=8", "train.steps=2", "train.checkpoint_every=1",
                     "train.keep_last=2", "train.preview_images=4")
    assert out.returncode == 0, out.stderr
    cfg = load_config(None, data[:2] + [f"latent.autoencoder={tmp_path / 'ae/checkpoints/step_0000001'}"])
    dataset = build_dataset(cfg)
    space = CountingSpace(build_space(cfg, dataset.shape))
    cached, encoded = latents.encode_dataset(cfg, dataset, space, cache_dir=tmp_path / "cache", batch_size=4)
    assert encoded and space.calls == 3 and len(cached) == 10 and cached.shape == (4, 2, 2)
    expected = (space.space.autoencoder.encode(dataset[torch.arange(10)][0]).mean - space.shift) * space.scale
    assert torch.allclose(cached[torch.arange(10)][0], expected, atol=1e-6)
    again = CountingSpace(build_space(cfg, dataset.shape))
    _, encoded = latents.encode_dataset(cfg, dataset, again, cache_dir=tmp_path / "cache", batch_size=4)
    assert not encoded and again.calls == 0  # reused: not one encoder call
    # Another autoencoder (the next checkpoint): a new cache, killed after its first shard.
    cfg.latent.autoencoder = str(tmp_path / "ae/checkpoints/step_0000002")
    dying = CountingSpace(build_space(cfg, dataset.shape), die_after=1)
    with pytest.raises(KeyboardInterrupt):
        latents.encode_dataset(cfg, dataset, dying, cache_dir=tmp_path / "cache", batch_size=4)
    folders = sorted((tmp_path / "cache").iterdir())
    new = next(f for f in folders if not (f / "manifest.json").exists())
    assert [p.name for p in new.iterdir()] == ["shard_00000.safetensors"]  # complete shards only, no manifest
    finishing = CountingSpace(build_space(cfg, dataset.shape))
    rebuilt, encoded = latents.encode_dataset(cfg, dataset, finishing, cache_dir=tmp_path / "cache", batch_size=4)
    assert encoded and finishing.calls == 2 and len(folders) == 2  # the two missing shards, in a second folder
    fresh = (finishing.space.autoencoder.encode(dataset[torch.arange(10)][0]).mean - finishing.shift) * finishing.scale
    assert torch.allclose(rebuilt[torch.arange(10)][0], fresh, atol=1e-6)


def test_diffusers_autoencoder_loads_from_a_folder_and_trains_a_latent_flow(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from flows.latent import build_space

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=4, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    make_folder(tmp_path / "data", {"": [(8, 8)] * 4})
    cfg_data = ["data.name=imagefolder", f"data.path={tmp_path / 'data'}", f"latent.autoencoder={tmp_path / 'vae'}"]
    cfg = load_config(None, cfg_data)
    space = build_space(cfg, (3, 8, 8))
    assert space.shape == (4, 4, 4) and space.scale == pytest.approx(0.18215) and space.shift == 0
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    z = space.encode(x)
    expected = vae.encode(x).latent_dist.mean * 0.18215
    assert torch.allclose(z, expected, atol=1e-6) and space.decode(z).shape == x.shape
    out = run_script("train.py", "-e", str(tmp_path / "flow"), *cfg_data, "model.name=DiT-S/2", "model.width=16",
                     "model.depth=1", "model.heads=2", "train.batch_size=2", "train.steps=1", "train.trackers=[]",
                     "train.preview_images=2", "train.preview_steps=1")
    assert out.returncode == 0, out.stderr
    cfg.latent.autoencoder = str(tmp_path / "missing" / "vae")
    with pytest.raises(UserError, match="is not an autoencoder checkpoint"):
        build_space(cfg, (3, 8, 8))


def test_a_hub_id_reaches_diffusers_and_is_not_taken_for_a_local_path(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never download here: the point is which loader is asked
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    make_folder(tmp_path / "data", {"": [(8, 8)] * 4})
    out = run_script("train.py", "-e", str(tmp_path / "run"), "data.name=imagefolder", f"data.path={tmp_path / 'data'}",
                     "latent.autoencoder=owner/no-such-vae", "train.steps=1", "train.trackers=[]")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: diffusers could not load an AutoencoderKL from owner/no-such-vae"), out.stderr
