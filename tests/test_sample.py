"""sample.py end to end: deterministic per-sample noise, resume, outputs, and bad input."""

import json
import os
import sys

import numpy as np
import pytest
from conftest import run_script
from PIL import Image
from test_images import make_folder


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy")
    out = run_script("train.py", "-e", str(run), "model.width=32", "model.depth=2", "model.time_dim=16",
                     "train.batch_size=32", "data.size=512", "train.steps=30", "train.trackers=[]",
                     "train.preview_every=0", "train.preview_n=16", "train.preview_steps=2")
    assert out.returncode == 0, out.stderr
    return run / "checkpoints" / "step_0000030"


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_folder(root / "data", {"a": [(8, 8)] * 4, "b": [(8, 8)] * 4})
    out = run_script("train.py", "-e", str(root / "run"), "data.name=imagefolder", f"data.path={root / 'data'}",
                     "data.class_folders=true", "model.class_cond=true", "flow.label_dropout=0.2",
                     "model.name=DiT-S/4", "model.width=16", "model.depth=1", "model.heads=2", "train.batch_size=4",
                     "train.steps=2", "train.trackers=[]", "train.preview_images=4", "train.preview_steps=1")
    assert out.returncode == 0, out.stderr
    return root / "run" / "checkpoints" / "step_0000002"


def sample(weights, save_dir, *args, launcher=None):
    return run_script("sample.py", "--weights", str(weights), "--save-dir", str(save_dir), *args, launcher=launcher)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("0*"))}


def test_samples_do_not_depend_on_batch_size_or_processes(toy_run, tmp_path):
    a = sample(toy_run, tmp_path / "a", "--n-samples", "11", "--bspp", "3", "--steps", "5", "--solver", "heun")
    b = sample(toy_run, tmp_path / "b", "--n-samples", "11", "--bspp", "7", "--steps", "5", "--solver", "heun")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert len(files(tmp_path / "a")) == 11 and files(tmp_path / "a") == files(tmp_path / "b")  # bitwise
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    c = sample(toy_run, tmp_path / "c", "--n-samples", "11", "--bspp", "2", "--steps", "5", "--solver", "heun",
               launcher=launcher)
    assert c.returncode == 0, c.stderr
    assert files(tmp_path / "c") == files(tmp_path / "a")
    info = json.loads((tmp_path / "c" / "info.json").read_text())
    assert info["processes"] == 2 and info["nfe"] == 10 and info["steps"] == 5
    points = np.load(tmp_path / "a" / "samples.npy")
    assert np.array_equal(points, np.stack([np.load(tmp_path / "a" / f"{k:06d}.npy") for k in range(11)]))
    assert Image.open(tmp_path / "a" / "scatter.png").size == (500, 500)


def test_adaptive_samples_do_not_depend_on_batch_size(toy_run, tmp_path):
    """dopri5 controls its steps per sample: sample k takes the same steps, to the same bits, in any batch."""
    args = ["--n-samples", "11", "--solver", "dopri5", "--atol", "1e-4", "--rtol", "1e-4"]
    a = sample(toy_run, tmp_path / "a", *args, "--bspp", "3")
    b = sample(toy_run, tmp_path / "b", *args, "--bspp", "11")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert len(files(tmp_path / "a")) == 11 and files(tmp_path / "a") == files(tmp_path / "b")
    nfe = [json.loads((tmp_path / d / "info.json").read_text())["nfe"] for d in ("a", "b")]
    assert nfe[0] == nfe[1] and nfe[0] >= 8  # the mean over the samples of each one's evaluations


def test_an_interrupted_run_continues_without_duplicates_or_gaps(toy_run, tmp_path):
    first = sample(toy_run, tmp_path, "--n-samples", "8", "--steps", "4")
    assert first.returncode == 0, first.stderr
    before = files(tmp_path)
    for k in (2, 5, 7):  # as if the run had stopped before writing these
        (tmp_path / f"00000{k}.npy").unlink()
    (tmp_path / ".tmp_000005.npy").write_bytes(b"half a file")  # a write cut short
    kept = {p: os.stat(tmp_path / p).st_mtime_ns for p in ("000000.npy", "000006.npy")}
    again = sample(toy_run, tmp_path, "--n-samples", "8", "--steps", "4")
    assert again.returncode == 0, again.stderr
    assert "8 samples (5 already in" in again.stdout
    assert files(tmp_path) == before
    assert {p: os.stat(tmp_path / p).st_mtime_ns for p in kept} == kept  # the finished ones were not redone


def test_adaptive_solver_and_schedules(toy_run, tmp_path):
    out = sample(toy_run, tmp_path / "d", "--n-samples", "4", "--solver", "dopri5", "--atol", "1e-4", "--rtol", "1e-4")
    assert out.returncode == 0, out.stderr
    info = json.loads((tmp_path / "d" / "info.json").read_text())
    assert info["steps"] is None and info["nfe"] >= 6 and info["atol"] == 1e-4
    out = sample(toy_run, tmp_path / "e", "--n-samples", "4", "--steps", "6", "--schedule", "logit_normal:std=0.5")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "e" / "info.json").read_text())["schedule"] == "logit_normal:std=0.5"


def test_conditional_images_with_guidance_write_pngs_npz_and_grid(image_run, tmp_path):
    out = sample(image_run, tmp_path, "--n-samples", "5", "--steps", "3", "--cfg-scale", "2", "--class-labels",
                 "1", "0", "--npz", "--grid", "4", "--bspp", "2")
    assert out.returncode == 0, out.stderr
    pngs = sorted(tmp_path.glob("0*.png"))
    assert len(pngs) == 5 and np.asarray(Image.open(pngs[0])).shape == (8, 8, 3)
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[3], np.asarray(Image.open(pngs[3])))
    grid = np.asarray(Image.open(tmp_path / "grid.png"))  # 4 images in 2 rows of 2, 2 px padding
    assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3)
    assert np.array_equal(grid[12:20, 12:20], np.asarray(Image.open(pngs[3])))  # the 4th sample, bottom right
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["cfg_scale"] == 2 and info["nfe"] == 3 and info["forward_passes"] == 6
    assert info["class_labels"] == ["1", "0"] and "NFE 3, 6 forward passes" in out.stdout
    again = sample(image_run, tmp_path / "bspp5", "--n-samples", "5", "--steps", "3", "--cfg-scale", "2",
                   "--class-labels", "1", "0", "--bspp", "5")
    assert again.returncode == 0, again.stderr
    assert files(tmp_path / "bspp5") == files(tmp_path)  # the same PNG bytes for another batch size


def test_guidance_is_refused_for_a_model_trained_without_label_dropout(tmp_path):
    make_folder(tmp_path / "data", {"a": [(8, 8)] * 4, "b": [(8, 8)] * 4})
    out = run_script("train.py", "-e", str(tmp_path / "run"), "data.name=imagefolder", f"data.path={tmp_path / 'data'}",
                     "data.class_folders=true", "model.class_cond=true", "model.name=DiT-S/4", "model.width=16",
                     "model.depth=1", "model.heads=2", "train.batch_size=4", "train.steps=1", "train.trackers=[]",
                     "train.preview_images=4", "train.preview_steps=1")
    assert out.returncode == 0, out.stderr
    weights = tmp_path / "run" / "checkpoints" / "step_0000001"
    out = sample(weights, tmp_path / "s", "--n-samples", "2", "--steps", "1", "--cfg-scale", "1.5")
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: --cfg-scale 1.5 needs the unconditional velocity, which this model never learned (trained with "
        "flow.label_dropout=0, its null class is untrained); leave --cfg-scale 1 or train with flow.label_dropout=0.1")
    assert sample(weights, tmp_path / "s", "--n-samples", "2", "--steps", "1").returncode == 0  # no guidance: fine
    out = run_script("evaluate.py", "-e", str(tmp_path / "run"), "--cfg-scale", "1", "1.5", "--n-samples", "2",
                     "--samplers", "euler:1", "--features", "pixels", "--stats-dir", str(tmp_path / "stats"))
    assert out.returncode == 2 and out.stderr.startswith("error: --cfg-scale 1.5 needs the unconditional velocity")


def test_weights_without_metadata_read_the_data_from_disk_and_never_download_it(toy_run, tmp_path):
    """A bare .safetensors (no data metadata) with a config whose MNIST is not on disk: one line, no download."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(toy_run / "ema.safetensors")), str(tmp_path / "bare.safetensors"))
    config = (toy_run / "config.yaml").read_text().replace("name: moons", "name: mnist", 1)
    config = config.replace("path: ''", f"path: {tmp_path / 'mnist'}", 1)
    (tmp_path / "config.yaml").write_text(config)
    out = sample(tmp_path / "bare.safetensors", tmp_path / "s", "--n-samples", "2", "-c", str(tmp_path / "config.yaml"))
    assert out.returncode == 2 and out.stderr.startswith(
        f"error: {tmp_path / 'bare.safetensors'} records no data shape (weights made outside train.py?) and the "
        "config's data, which would tell it, cannot be read: MNIST train files"), out.stderr
    assert not (tmp_path / "mnist").exists()  # nothing was downloaded there


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "/nonexistent/step_1"], "error: weights /nonexistent/step_1 do not exist; give --weights a"),
    (["--solver", "eulr"], "error: unknown solver 'eulr'; did you mean 'euler'?"),
    (["--schedule", "cosin"], "error: unknown schedule 'cosin'; did you mean 'cosine'?"),
    (["--steps", "0"], "error: solver euler needs a positive number of steps, got 0"),
    (["--solver", "dopri5", "--atol", "-1"], "error: adaptive solvers need atol ≥ 0 and rtol ≥ 0, not both 0"),
    (["--solver", "dopri5", "--steps", "10"], "error: solver dopri5 chooses its own steps"),
    (["--cfg-scale", "2"], "error: --cfg-scale 2.0 asks for classifier-free guidance but the model is unconditional"),
    (["--class-labels", "1"], "error: --class-labels given but the model is unconditional"),
    (["model.width=64"], "error: weights file"),
    (["--save-dir", "/proc/no_such_dir"], "error: save dir /proc/no_such_dir is not writable"),
])
def test_bad_input_is_one_clear_line(toy_run, tmp_path, args, message):
    weights = ["--weights", str(toy_run)] if "--weights" not in args else []
    save = ["--save-dir", str(tmp_path / "out")] if "--save-dir" not in args else []
    out = run_script("sample.py", *weights, *save, "--n-samples", "2", *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().startswith(message) and len(out.stderr.strip().splitlines()) == 1, out.stderr
    if "model.width=64" in args:
        assert "does not fit the model built from the config" in out.stderr
