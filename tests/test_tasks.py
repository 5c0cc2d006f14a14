"""Image-conditioned tasks: masks, conditions, condition dropout, training-free samplers, and the scripts end to end."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image
from safetensors.torch import load_file

from config import load_config
from data.tasks import Inpaint, Measurement, Semantic, SuperRes, read_mask_folder, sample_masks
from errors import UserError
from flows import build_objective
from flows.inverse import restore
from flows.latent import PixelSpace
from flows.paths import LinearPath
from models import build_model

TINY_DIT = ["model.name=DiT-S/4", "model.width=16", "model.depth=1", "model.heads=2", "train.batch_size=4",
            "train.trackers=[]", "train.preview_images=6", "train.preview_steps=2"]
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def gray_folder(root, n=12, size=8, seed=0):
    """n gray images of size×size: a bright square on a dark ground, somewhere different in each."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        array = np.full((size, size), 20, dtype=np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        array[top: top + size // 2, left: left + size // 2] = 230
        Image.fromarray(array).save(root / f"{i:03d}.png")
    return root


def shapes_folder(root, n=8, size=16, classes=3):
    """Images of shapes and their label maps (class 0 ground, 1 a square, 2 a disc), CelebAMask-HQ style."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "maps").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        labels = np.zeros((size, size), dtype=np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        labels[top: top + size // 3, left: left + size // 3] = 1
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] = min(2, classes - 1)
        colours = np.array([[10, 10, 60], [220, 40, 40], [40, 220, 40]], dtype=np.uint8)
        Image.fromarray(colours[labels]).save(root / "images" / f"{i}.jpg")
        Image.fromarray(labels, mode="L").save(root / "maps" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return gray_folder(tmp_path_factory.mktemp("gray") / "data")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Tiny runs on 8×8 gray images: unconditional, inpainting (with condition dropout), super-resolution ×4."""
    root = tmp_path_factory.mktemp("runs")
    common = ["data.name=imagefolder", f"data.path={data}", *TINY_DIT, "train.steps=3"]
    out = {}
    for name, extra in (("uncond", []), ("inpaint", ["data.task=inpaint", "flow.cond_dropout=0.5"]),
                        ("superres", ["data.task=superres", "data.factor=4"])):
        done = run_script("train.py", "-e", str(root / name), *common, *extra)
        assert done.returncode == 0, done.stderr
        out[name] = root / name / "checkpoints" / "step_0000003"
    return out


def sample(weights, save_dir, *args, launcher=None):
    return run_script("sample.py", "--weights", str(weights), "--save-dir", str(save_dir), *args, launcher=launcher)


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("0*.png"))}


def one_clear_line(done, words):
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------
# Masks and conditions.


def test_masks_are_binary_seeded_per_case_and_the_center_box_is_the_middle_half():
    for kind in ("mixed", "strokes", "boxes", "center"):
        a = sample_masks(kind, 28, 28, seed=3, indices=[0, 1, 2, 3, 4, 5])
        assert a.shape == (6, 1, 28, 28) and set(a.unique().tolist()) <= {0.0, 1.0}
        assert (a.flatten(1).sum(1) > 0).all()  # every case has something to fill
        # Case k's mask depends on (seed, k) alone: the same in any batch, at any position.
        assert torch.equal(sample_masks(kind, 28, 28, seed=3, indices=[4, 1])[0], a[4])
    center = sample_masks("center", 28, 28, 0, [0])[0, 0]
    assert center.sum() == 14 * 14 and center[7:21, 7:21].all()
    mixed = sample_masks("mixed", 28, 28, 0, list(range(40)))
    assert len({m.numpy().tobytes() for m in mixed}) == 40  # a different mask per case
    assert 0.05 < mixed.mean() < 0.6  # holes, not whole images


def test_user_masks_must_be_binary_and_of_the_images_size(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:5, 2:5] = 255
    Image.fromarray(mask).save(good / "0.png")
    assert read_mask_folder(good, (8, 8)).sum() == 9
    with pytest.raises(UserError, match="is 8×8 but the images are 16×16"):
        read_mask_folder(good, (16, 16))
    gray = tmp_path / "gray"
    gray.mkdir()
    mask[0, 0] = 128
    Image.fromarray(mask).save(gray / "0.png")
    with pytest.raises(UserError, match="not binary"):
        read_mask_folder(gray, (8, 8))


def test_each_task_measures_and_enforces_its_measurement():
    g = torch.Generator().manual_seed(0)
    x1 = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    other = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    inpaint = Inpaint("center")
    m = inpaint.measure(x1, sample_masks("center", 8, 8, 0, [0, 1, 2]))
    out = inpaint.enforce(other, m)
    assert torch.equal(out * (1 - m.mask), x1 * (1 - m.mask)) and torch.equal(out * m.mask, other * m.mask)
    assert inpaint.consistency(out, m).max() == 0 and inpaint.consistency(other, m).max() > 0
    superres = SuperRes(4)
    m = superres.measure(x1)
    assert m.y.shape == (3, 1, 2, 2)
    assert superres.consistency(superres.enforce(other, m), m).max() < 1e-3  # uint8 levels
    assert superres.baseline(m).shape == x1.shape


def test_condition_dropout_puts_the_null_condition_in_and_its_rows_train_the_model(tmp_path):
    """The unconditional branch of guidance is trained: dropped rows see 'nothing known' and carry gradient."""
    cfg = load_config(None, ["model.name=unet-mnist", "model.width=8", "data.task=inpaint", "flow.cond_dropout=0.5"])
    task = Inpaint("mixed")
    objective = build_objective(cfg, lambda n, g, d: torch.randn(n, 1, 8, 8, generator=g, device=d), task=task)
    x1 = torch.rand(256, 1, 8, 8) * 2 - 1
    m = task.measure(x1, sample_masks("mixed", 8, 8, 0, list(range(256))))
    cond = task.condition(m, PixelSpace((1, 8, 8)))
    draw = objective.draw(x1, None, torch.Generator().manual_seed(0), image_cond=cond)
    seen = draw.cond["image_cond"]
    dropped = (seen[:, -1] == 1).flatten(1).all(1) & (seen[:, :-1] == 0).flatten(1).all(1)
    kept = (seen == cond).flatten(1).all(1)
    assert (dropped | kept).all() and 0.35 < dropped.float().mean() < 0.65

    model = build_model(cfg, (1, 8, 8), cond_channels=task.cond_channels(1))
    model.out[-1].weight.data.normal_()  # a zero output layer would pass no gradient back
    seen_by_model = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen_by_model.append(kwargs["image_cond"]),
                                    with_kwargs=True)
    null_only = objective.draw(x1[:8], None, torch.Generator().manual_seed(0), image_cond=task.null(cond[:8]))
    objective.loss(model, x1[:8], null_only).loss.mean().backward()
    assert torch.equal(seen_by_model[0], task.null(cond[:8]))
    assert model.stem.weight.grad[:, 1:].abs().sum() > 0  # the condition's input channels learn from null rows too


def test_a_conditional_models_output_changes_with_its_condition_and_a_semantic_projection_learns():
    for name in ("unet-mnist", "DiT-S/4"):
        extra = ["model.width=16", "model.depth=1", "model.heads=2"] if name.startswith("DiT") else ["model.width=8"]
        cfg = load_config(None, [f"model.name={name}", *extra])
        model = build_model(cfg, (1, 8, 8), cond_channels=2)
        for p in model.parameters():  # away from the zero-output initialization
            p.data.add_(0.05 * torch.randn_like(p))
        x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
        a = model(x, t, image_cond=torch.zeros(2, 2, 8, 8))
        b = model(x, t, image_cond=torch.ones(2, 2, 8, 8))
        assert a.shape == x.shape and not torch.allclose(a, b)
    semantic = Semantic(3)
    model = build_model(load_config(None, ["model.name=unet-mnist", "model.width=8"]), (3, 8, 8),
                        cond_channels=semantic.cond_channels(3), cond_classes=3)
    model.out[-1].weight.data.normal_()
    labels = torch.randint(3, (2, 8, 8))
    cond = semantic.condition(Measurement(labels), PixelSpace((3, 8, 8)))
    assert cond.shape == (2, 3, 8, 8) and torch.equal(cond.argmax(1), labels)
    model(torch.randn(2, 3, 8, 8), torch.rand(2), image_cond=cond).square().sum().backward()
    assert model.image_cond.project.weight.grad.abs().sum() > 0  # LFM's projection never gets one; ours does


def test_training_free_inpainting_keeps_exactly_the_known_pixels():
    cfg = load_config(None, ["model.name=unet-mnist", "model.width=8"])
    model = build_model(cfg, (1, 8, 8)).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    task = Inpaint("mixed")
    x1 = torch.rand(4, 1, 8, 8) * 2 - 1
    m = task.measure(x1, sample_masks("mixed", 8, 8, 0, [0, 1, 2, 3]))
    space = PixelSpace((1, 8, 8))
    raw, nfe = restore(model, task, m, space, LinearPath(), "replace", 0, [0, 1, 2, 3], steps=5)
    assert nfe == 5 and torch.allclose(raw * (1 - m.mask), x1 * (1 - m.mask), atol=1e-6)  # α_1·y on the path
    for method in ("replace", "pnp"):
        out = task.enforce(restore(model, task, m, space, LinearPath(), method, 0, [0, 1, 2, 3], steps=5)[0], m)
        assert torch.equal(out * (1 - m.mask), x1 * (1 - m.mask))


ALL_PATHS = {"linear": ["flow.sigma_min=0.05"], "cosine": [], "vp": [], "polynomial": [], "icfm": ["flow.sigma=0.2"],
             "sb": ["flow.sigma=0.3", "flow.coupling=entropic"]}


def inpainting_case(n: int = 4):
    task = Inpaint("mixed")
    x1 = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return task, task.measure(x1, sample_masks("mixed", 8, 8, 0, list(range(n)))), x1


@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_replacement_pastes_the_known_pixels_where_the_models_path_puts_them(name):
    """After every step to t, the known pixels are the model's own path.sample(x0, y, t) (with the bridge noise of
    stream 3 on a bridge path): what the network sees there is where it was trained to see the data."""
    from flows import PATHS
    from flows.solvers import noise, per_sample_normal, sample_generators

    path = PATHS[name](load_config(None, [f"flow.path={name}", *ALL_PATHS[name]]))
    task, m, x1 = inpainting_case()
    seen = []

    def model(x, t, y=None):
        seen.append((x.clone(), t.clone()))
        return 0.3 * x + 0.1

    indices = [0, 1, 2, 3]
    restore(model, task, m, PixelSpace((1, 8, 8)), path, "replace", 7, indices, steps=4, solver="midpoint")
    x0 = noise(7, indices, (1, 8, 8))
    eps = per_sample_normal(sample_generators(7, indices, 3), (1, 8, 8)) if path.bridge else None
    known = 1 - m.mask
    checked = 0
    for x, t in seen[2::2]:  # midpoint: the first evaluation of each later step sees the replaced state
        on_path = path.sample(x0, x1, t, eps).x_t
        assert torch.allclose(x * known, on_path * known, atol=1e-6), float(t[0])
        checked += 1
    assert checked == 3


@pytest.mark.parametrize("name", ["linear", "cosine", "vp", "polynomial"])
def test_pnp_flow_interpolates_and_denoises_on_the_models_path(name):
    """PnP-Flow against a hand computation with the path's α_t, σ_t and E[x1 | z] = (σ_t·v − σ̇_t·z)/D_t (the
    paper's z + (1 − t)·v on rectified flow), the fidelity step and the noise of stream 3 as the sampler draws them."""
    from flows import PATHS
    from flows.paths import T_EPS
    from flows.solvers import noise, per_sample_normal, sample_generators

    path = PATHS[name](load_config(None, [f"flow.path={name}", *ALL_PATHS[name]]))
    task, m, _ = inpainting_case()

    def velocity(x, t, y=None):
        return 0.3 * x + 0.1 * t.view(-1, 1, 1, 1)

    indices, steps, alpha = [0, 1, 2, 3], 5, 0.5
    out, nfe = restore(velocity, task, m, PixelSpace((1, 8, 8)), path, "pnp", 7, indices, steps=steps,
                       pnp_alpha=alpha)
    x, generators = noise(7, indices, (1, 8, 8)), sample_generators(7, indices, 3)
    for n in range(steps):
        t = n / steps
        grad = (x * (1 - m.mask) - m.y) * (1 - m.mask)  # ∇½‖A x − y‖² of a mask
        z = x - (1 - t) ** alpha * grad
        eps = per_sample_normal(generators, (1, 8, 8))
        t = T_EPS if name == "polynomial" and n == 0 else t  # its D_0 is 0
        tt = torch.tensor(t)
        a, s, da, ds = path.alpha(tt), path.sigma(tt), path.d_alpha(tt), path.d_sigma(tt)
        z = a * z + s * eps
        x = (s * velocity(z, torch.full((4,), t)) - ds * z) / (s * da - a * ds)
    assert nfe == steps and torch.allclose(out, x, atol=1e-5)


def test_pnp_flow_is_refused_on_a_bridge_path():
    from flows import PATHS
    from flows.inverse import check_method

    task, m, _ = inpainting_case()
    with pytest.raises(UserError, match="--method pnp needs the denoised estimate"):
        check_method("pnp", task, False, "euler", "icfm")
    path = PATHS["sb"](load_config(None, ["flow.path=sb", *ALL_PATHS["sb"]]))
    with pytest.raises(UserError, match="PnP-Flow needs the denoised estimate"):
        restore(lambda x, t, y=None: x, task, m, PixelSpace((1, 8, 8)), path, "pnp", 0, [0, 1, 2, 3], steps=2)


# ---------------------------------------------------------------------------------------------
# Scripts end to end.


def test_conditional_samples_and_their_masks_do_not_depend_on_batch_size_or_processes(runs, data, tmp_path):
    args = ["--condition-images", str(data), "--n-samples", "7", "--steps", "3"]
    a = sample(runs["inpaint"], tmp_path / "a", *args, "--bspp", "2", "--grid", "4")
    b = sample(runs["inpaint"], tmp_path / "b", *args, "--bspp", "5")
    c = sample(runs["inpaint"], tmp_path / "c", *args, "--bspp", "3", launcher=LAUNCH_2)
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + b.stderr + c.stderr
    assert len(pngs(tmp_path / "a")) == 7 and pngs(tmp_path / "a") == pngs(tmp_path / "b") == pngs(tmp_path / "c")
    info = json.loads((tmp_path / "a" / "info.json").read_text())
    assert info["task"] == "inpaint" and info["method"] == "model" and info["measurement_error_uint8"] == 0
    assert Image.open(tmp_path / "a" / "grid.png").size[0] > 3 * 8  # condition | sample | original
    guided = sample(runs["inpaint"], tmp_path / "g", *args, "--cfg-scale", "2")
    assert guided.returncode == 0 and pngs(tmp_path / "g") != pngs(tmp_path / "a"), guided.stderr


def test_training_free_samplers_on_an_unconditional_run(runs, data, tmp_path):
    originals = sorted(data.glob("*.png"))
    for method in ("replace", "pnp"):
        out = sample(runs["uncond"], tmp_path / method, "--task", "inpaint", "--method", method, "--mask", "center",
                     "--condition-images", str(data), "--n-samples", "3", "--steps", "4")
        assert out.returncode == 0, out.stderr
        mask = sample_masks("center", 8, 8, 0, [0])[0, 0].bool().numpy()
        for k in range(3):
            made, original = (np.array(Image.open(p)) for p in (tmp_path / method / f"{k:06d}.png", originals[k]))
            assert np.array_equal(made[~mask], original[~mask])  # the known pixels, exactly
    sr = sample(runs["uncond"], tmp_path / "sr", "--task", "superres", "--condition-images", str(data),
                "--n-samples", "2", "--steps", "4")
    assert sr.returncode == 0 and "measurement error" in sr.stdout, sr.stderr
    assert json.loads((tmp_path / "sr" / "info.json").read_text())["method"] == "pnp"


def test_evaluate_scores_a_task_with_fid_psnr_ssim_and_the_baseline(runs, tmp_path):
    common = ["-e", str(runs["inpaint"].parents[1]), "--n-samples", "6", "--features", "pixels", "--bspp", "4",
              "--out", str(tmp_path / "eval"), "--stats-dir", str(tmp_path / "stats"), "--mask", "center"]
    done = run_script("evaluate.py", *common, "--samplers", "euler:2")
    assert done.returncode == 0, done.stderr
    baseline = run_script("evaluate.py", *common, "--method", "mean")
    assert baseline.returncode == 0, baseline.stderr
    rows = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"model", "mean"}
    for r in rows:
        assert r["task"] == "inpaint" and r["mask"] == "center" and r["measurement_error"] == 0
        assert r["psnr"] > 0 and -1 <= r["ssim"] <= 1 and r["fid"] >= 0
    assert "inpaint (center masks), 6 fixed cases" in (tmp_path / "eval" / "report.md").read_text()


def test_a_conditional_run_resumes_exactly_and_two_processes_match_one(data, tmp_path):
    common = ["data.name=imagefolder", f"data.path={data}", *TINY_DIT, "data.task=inpaint", "flow.cond_dropout=0.3",
              "train.checkpoint_every=2", "train.preview_every=0"]
    once = run_script("train.py", "-e", str(tmp_path / "once"), *common, "train.steps=4")
    first = run_script("train.py", "-e", str(tmp_path / "twice"), *common, "train.steps=2")
    again = run_script("train.py", "-e", str(tmp_path / "twice"), *common, "train.steps=4")
    two = run_script("train.py", "-e", str(tmp_path / "two"), *common, "train.steps=4", launcher=LAUNCH_2)
    for done in (once, first, again, two):
        assert done.returncode == 0, done.stderr
    weights = {name: load_file(str(tmp_path / name / "checkpoints" / "step_0000004" / "model.safetensors"))
               for name in ("once", "twice", "two")}
    assert all(torch.equal(weights["once"][k], weights["twice"][k]) for k in weights["once"])  # resume: bitwise
    assert all(torch.allclose(weights["once"][k], weights["two"][k], atol=1e-6) for k in weights["once"])


def test_semantic_to_image_trains_and_samples_from_label_maps(tmp_path):
    root = shapes_folder(tmp_path / "shapes")
    common = ["data.name=imagefolder", f"data.path={root / 'images'}", "data.task=semantic",
              f"data.label_maps={root / 'maps'}", "data.label_classes=3", "flow.cond_dropout=0.2", *TINY_DIT,
              "train.steps=2", "data.hflip=true"]
    done = run_script("train.py", "-e", str(tmp_path / "run"), *common)
    assert done.returncode == 0, done.stderr
    out = sample(tmp_path / "run" / "checkpoints" / "step_0000002", tmp_path / "out", "--condition-images",
                 str(root / "maps"), "--n-samples", "3", "--steps", "2", "--grid", "3")
    assert out.returncode == 0, out.stderr
    assert len(pngs(tmp_path / "out")) == 3 and Image.open(tmp_path / "out" / "000000.png").size == (16, 16)

    # A label above the class count, a missing map, a map of another size: one line each.
    Image.fromarray(np.full((16, 16), 5, dtype=np.uint8), mode="L").save(root / "maps" / "0.png")
    bad = run_script("train.py", "-e", str(tmp_path / "bad"), *common)
    one_clear_line(bad, "holds class 5 but data.label_classes is 3")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(root / "maps" / "0.png")
    one_clear_line(run_script("train.py", "-e", str(tmp_path / "bad2"), *common), "give maps of their images' size")
    (root / "maps" / "0.png").unlink()
    one_clear_line(run_script("train.py", "-e", str(tmp_path / "bad3"), *common), "is missing")


def test_the_celebamask_recipe_runs_a_few_steps_on_a_tiny_folder(tmp_path):
    root = shapes_folder(tmp_path / "shapes", classes=3)
    dry = run_script("train.py", "-c", "configs/imagefolder_sdvae_semantic_unet.yaml", "--dry-run")
    assert dry.returncode == 0 and "label_classes: 19" in dry.stdout, dry.stderr
    done = run_script("train.py", "-c", "configs/imagefolder_sdvae_semantic_unet.yaml", "-e", str(tmp_path / "run"),
                      f"data.path={root / 'images'}", f"data.label_maps={root / 'maps'}", "data.resolution=16",
                      "latent.autoencoder=", "model.name=unet-mnist", "model.width=8", "train.batch_size=4",
                      "train.steps=2", "train.trackers=[]", "train.preview_images=3", "train.preview_steps=1")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args, message", [
    (["--n-samples", "20"], "holds 12 cases but --n-samples is 20"),
    (["--n-samples", "2", "--task", "superres"], "this model was trained for inpaint"),
    (["--n-samples", "2", "--masks", "MASKS"], "not binary"),
    (["--n-samples", "2", "--condition-images", "BIG"], "give images of that size"),
])
def test_bad_task_input_is_one_clear_line(runs, data, tmp_path, args, message):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((8, 8), 100, dtype=np.uint8)).save(masks / "0.png")
    big = gray_folder(tmp_path / "big", n=3, size=16)
    args = [str(masks) if a == "MASKS" else str(big) if a == "BIG" else a for a in args]
    if "--condition-images" not in args:
        args += ["--condition-images", str(data)]
    one_clear_line(sample(runs["inpaint"], tmp_path / "out", *args, "--steps", "2"), message)


def test_latent_space_tasks_train_and_keep_the_known_pixels(tmp_path, monkeypatch):
    """LFM's setting in small: the condition encoded by a frozen autoencoder, the mask at the latent size; the
    training-free samplers take the measurement of the decoded image (PnP-Flow's gradient through the decoder)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = gray_folder(tmp_path / "data", n=8, size=16)  # 4×4 latents
    common = ["data.name=imagefolder", f"data.path={data}", "train.trackers=[]", "train.batch_size=4",
              "train.preview_images=3", "train.preview_steps=1"]
    ae = run_script("train.py", "-e", str(tmp_path / "ae"), *common, "flow.objective=autoencoder",
                    "model.name=ae-mnist", "model.width=8", "train.steps=2")
    assert ae.returncode == 0, ae.stderr
    latent = [f"latent.autoencoder={tmp_path / 'ae' / 'checkpoints' / 'step_0000002'}", *TINY_DIT, "model.patch=1",
              "train.steps=2"]
    cached = run_script("train.py", "-e", str(tmp_path / "refused"), *common, *latent, "data.task=inpaint")
    one_clear_line(cached, "set latent.cache=false")
    for name, extra in (("inpaint", ["data.task=inpaint", "latent.cache=false"]), ("uncond", [])):
        done = run_script("train.py", "-e", str(tmp_path / name), *common, *latent, *extra)
        assert done.returncode == 0, done.stderr
    mask = sample_masks("center", 16, 16, 0, [0])[0, 0].bool().numpy()
    original = np.array(Image.open(sorted(data.glob("*.png"))[1]))
    for run, extra in (("inpaint", []), ("uncond", ["--task", "inpaint", "--method", "replace"]),
                       ("uncond", ["--task", "inpaint", "--method", "pnp"])):
        out = sample(tmp_path / run / "checkpoints" / "step_0000002", tmp_path / "out" / "-".join([run, *extra[-1:]]),
                     *extra, "--condition-images", str(data), "--mask", "center", "--n-samples", "2", "--steps", "2")
        assert out.returncode == 0, out.stderr
        made = np.array(Image.open(tmp_path / "out" / "-".join([run, *extra[-1:]]) / "000001.png"))
        assert np.array_equal(made[~mask], original[~mask])
