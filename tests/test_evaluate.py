"""evaluate.py and the metrics behind it: FID/KID against direct computations, bits/dim, W2/MMD, the report."""

import csv
import itertools
import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_ranks, run_script
from PIL import Image
from scipy import linalg
from test_images import make_folder

import evaluate
from errors import UserError
from flows.likelihood import log_likelihood, standard_normal_log_p
from metrics import fid as fid_module
from metrics import frechet_distance, kernel_inception_distance, mmd, w2
from metrics.fid import PixelFeatures, Reference, precision_recall


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance by another route: Tr((Σ₁Σ₂)^½) as the sum of square roots of Σ₁Σ₂'s eigenvalues."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.clip(linalg.eigvals(s1 @ s2).real, 0, None)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum())


def stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


def test_fid_is_zero_against_itself_and_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    b = 0.8 * a[::-1] + 0.5 + rng.normal(size=a.shape) * 0.3
    assert abs(frechet_distance(*stats(a), *stats(a))) < 1e-8
    assert frechet_distance(*stats(a), *stats(b)) == pytest.approx(direct_fid(a, b), rel=1e-8)
    # The same through image features: a set of images against the reference made from itself.
    images = torch.randint(0, 256, (300, 1, 16, 16), dtype=torch.uint8)
    features = PixelFeatures()(images)
    reference = Reference.of(features, "itself")
    assert abs(frechet_distance(*stats(features), reference.mu, reference.sigma)) < 1e-6
    brighter = PixelFeatures()(images.clamp(max=200) + 40)
    assert frechet_distance(*stats(brighter), reference.mu, reference.sigma) == pytest.approx(
        direct_fid(brighter, features), rel=1e-6)


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 1
    # One subset of every point: the estimate is the plain unbiased MMD² (the order of points does not matter).
    k = lambda x, y: (x @ y / 5 + 1) ** 3  # noqa: E731
    m = len(a)
    within = sum(k(a[i], a[j]) + k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = kernel_inception_distance(a, b, subsets=1, subset_size=m)
    assert mean == pytest.approx(within - 2 * across, rel=1e-10) and std == 0
    same, _ = kernel_inception_distance(a, rng.normal(size=(30, 5)), subsets=50)
    assert abs(same) < 0.1 * mean


def test_precision_and_recall_count_points_inside_the_other_sets_knn_balls():
    # 1-D by hand, k = 1: reference 0, 1, 2, 10 (radii 1, 1, 1, 8); samples 0.5, 1.5, 30, 31 (radii 1 each).
    reference = np.array([[0.0], [1.0], [2.0], [10.0]])
    samples = np.array([[0.5], [1.5], [30.0], [31.0]])
    assert precision_recall(samples, reference, k=1) == (0.5, 0.75)  # 30, 31 outside; 10 outside
    # Mode collapse: samples that all sit on a few reference points are precise and not diverse.
    rng = np.random.default_rng(0)
    data = rng.normal(size=(400, 8))
    collapsed = np.repeat(data[:4], 100, axis=0) + 1e-3 * rng.normal(size=(400, 8))
    precision, recall = precision_recall(collapsed, data)
    assert precision == 1.0 and recall < 0.1
    same_law = precision_recall(rng.normal(size=(400, 8)), data)
    assert min(same_law) > 0.6
    # A larger reference is subsampled (seeded) to as many points as there are samples.
    big = rng.normal(size=(4000, 8))
    assert precision_recall(data, big, seed=3) == precision_recall(data, big, seed=3) != precision_recall(data, big)


def test_w2_and_mmd_equal_brute_force_on_tiny_sets():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, 2, generator=g, dtype=torch.float64)
    b = b + 0.5
    best = min(((a[list(p)] - b).square().sum(1).mean()) for p in itertools.permutations(range(6)))
    assert w2(a, b) == pytest.approx(best.sqrt().item(), rel=1e-12)
    h = 0.7
    k = lambda x, y: math.exp(-float((x - y).square().sum()) / (2 * h * h))  # noqa: E731
    within = sum(k(a[i], a[j]) + k(b[i], b[j]) for i in range(6) for j in range(6) if i != j) / 30
    across = sum(k(a[i], b[j]) for i in range(6) for j in range(6)) / 36
    assert mmd(a, b, bandwidths=(h,)) == pytest.approx(within - 2 * across, rel=1e-10)


def test_bits_per_dim_of_a_zero_velocity_flow_is_the_standard_normal_nll():
    x = torch.randn(7, 2, dtype=torch.float64)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    expected = -standard_normal_log_p(x) / (2 * math.log(2))
    for solver, steps in (("euler", 3), ("rk4", 2)):
        assert torch.equal(log_likelihood(zero, x, steps, solver).bpd, expected)
    assert torch.allclose(log_likelihood(zero, x, None, "dopri5").bpd, expected, rtol=1e-12, atol=0)


def test_dequantized_bits_per_dim_bound_the_exact_probability_of_the_pixels_tightly():
    """A zero velocity makes the model N(0, I) over the pixels' range [-1, 1], so the probability of 8-bit image u
    is exactly the Gaussian mass of its pixels' bins: width 2/255, centred on the training values u/127.5 − 1.
    Dequantized bits/dim bound −log₂ P(u) / D from above (Jensen) and, with bins this narrow, within ~1e-5 bits.
    Bins laid out as (u + U)·2/256 − 1 miss the training values (pixel 0, MNIST's background, sits on an edge)
    and measure another probability: here 0.0018 bits/dim off."""
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (64, 1, 8, 8), generator=g)
    u[:, :, :4] = 0  # half of each image is background
    x = u.float() / 127.5 - 1
    out = log_likelihood(lambda x, t: torch.zeros_like(x), x, 1, "euler", dequantize=True, generator=g)
    normal = torch.distributions.Normal(0.0, 1.0)
    centre = x.double()
    mass = normal.cdf(centre + 1 / 255) - normal.cdf(centre - 1 / 255)
    exact = -mass.log().flatten(1).sum(1) / (64 * math.log(2))
    gap = (out.bpd.double().mean() - exact.mean()).item()  # Monte Carlo standard error ≈ 5e-5 bits
    assert -2e-4 < gap < 3e-4, gap


def test_hutchinson_divergence_is_exact_for_a_scaled_identity_and_unbiased_for_any_linear_field():
    """dx/dt = A x carries N(0, I) to N(0, e^A e^Aᵀ): log p₁(x) = log N(e^{−A} x) − tr A. Hutchinson's εᵀAε with
    Rademacher ε equals tr A when A = kI, and averages to it otherwise; the exact divergence matches every sample."""
    d, k = 20, 0.7  # 20 dimensions: above the exact-divergence limit, so Hutchinson is the default
    x = torch.randn(2000, 1, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scaled = log_likelihood(lambda x, t: k * x, x[:8], None, "dopri5", atol=1e-9, rtol=1e-9,
                            generator=torch.Generator().manual_seed(2))
    exact = standard_normal_log_p(x[:8] * math.exp(-k)) - d * k
    assert torch.allclose(scaled.log_p, exact, atol=1e-6)
    a = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.2
    linear = lambda x, t: (x.flatten(1) @ a.T).view_as(x)  # noqa: E731
    exact = standard_normal_log_p(x.flatten(1) @ torch.linalg.matrix_exp(-a).T) - torch.trace(a)
    hutchinson = log_likelihood(linear, x, None, "dopri5", atol=1e-8, rtol=1e-8,
                                generator=torch.Generator().manual_seed(4)).log_p
    noise = hutchinson - exact  # εᵀAε − tr A per sample: zero mean, spread of the off-diagonal terms
    spread = math.sqrt(sum(((a[i, j] + a[j, i]) ** 2).item() for i in range(d) for j in range(i + 1, d)))
    assert noise.std().item() == pytest.approx(spread, rel=0.1) and abs(noise.mean().item()) < 4 * spread / 2000**0.5
    exact_divergence = log_likelihood(linear, x[:4], None, "dopri5", atol=1e-9, rtol=1e-9, hutchinson=False).log_p
    assert torch.allclose(exact_divergence, exact[:4], atol=1e-6)


def test_bits_per_dim_of_a_scaling_flow_matches_its_closed_form():
    # dx/dt = k x carries N(0, I) to N(0, e^{2k} I): log p₁(x) = log N(x e^{-k}) − D k.
    k, x = 0.7, torch.randn(5, 3, dtype=torch.float64)
    exact = standard_normal_log_p(x * math.exp(-k)) - 3 * k
    out = log_likelihood(lambda x, t: k * x, x, None, "dopri5", atol=1e-9, rtol=1e-9)
    assert torch.allclose(out.log_p, exact, atol=1e-7)


def test_a_square_root_with_a_large_imaginary_part_is_refused_not_dropped():
    """Σ₂ not positive semi-definite (a corrupted reference): (Σ₁Σ₂)^½ has an imaginary diagonal of 1, whose real
    part alone would give a finite, wrong FID."""
    with pytest.raises(UserError, match="imaginary part of 1 \\(clean-fid refuses above 1e-3\\)"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))


@pytest.mark.skipif(not fid_module.INCEPTION_FILE.is_file(),
                    reason=f"clean-fid's Inception network is not at {fid_module.INCEPTION_FILE} (on this project's "
                           "machines ../shared/tools/inception-offline puts it there)")
def test_inception_features_equal_clean_fids_own_folder_pipeline(tmp_path):
    """The real network: our in-memory features of uint8 images equal clean-fid's reading the same PNG files."""
    from cleanfid import fid as cleanfid
    from PIL import Image
    from test_images import SHARED_MNIST

    if SHARED_MNIST is not None:  # real digits (gray), else random colour images
        from data.images import load_mnist

        images = load_mnist(SHARED_MNIST, "test", download=False).images[:6]
    else:
        images = torch.randint(0, 256, (6, 3, 28, 28), dtype=torch.uint8)
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp_path / f"{i}.png")
    ours = fid_module.InceptionFeatures("clean")(images)
    theirs = cleanfid.get_folder_features(str(tmp_path), cleanfid.build_feature_extractor("clean", torch.device("cpu")),
                                          num_workers=0, batch_size=6, device=torch.device("cpu"), mode="clean",
                                          verbose=False)
    assert ours.shape == (6, 2048) and np.allclose(ours, theirs, rtol=0, atol=1e-4)


def test_samplers_parse_with_schedule_parameters():
    got = evaluate.parse_samplers(["euler:10,heun:25:cosine", "rk4:4:logit_normal:mean=0,std=1,dopri5", "midpoint"])
    assert [s.label for s in got] == ["euler:10", "heun:25:cosine", "rk4:4:logit_normal:mean=0,std=1", "dopri5",
                                      "midpoint:100"]


# End to end.


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "run"
    out = run_script("train.py", "-e", str(run), "model.width=32", "model.depth=2", "model.time_dim=16",
                     "train.batch_size=32", "data.size=512", "train.steps=20", "train.checkpoint_every=10",
                     "train.trackers=[]", "train.preview_every=0", "train.preview_n=16", "train.preview_steps=2")
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_folder(root / "data", {"a": [(8, 8)] * 6, "b": [(8, 8)] * 6})
    out = run_script("train.py", "-e", str(root / "run"), "data.name=imagefolder", f"data.path={root / 'data'}",
                     "model.name=DiT-S/4", "model.width=16", "model.depth=1", "model.heads=2", "train.batch_size=4",
                     "train.steps=2", "train.checkpoint_every=1", "train.trackers=[]", "train.preview_images=4",
                     "train.preview_steps=1")
    assert out.returncode == 0, out.stderr
    return root / "run"


def rows_of(run):
    return json.loads((run / "eval" / "report.json").read_text())["rows"]


PROTOCOL = {"step", "weights", "solver", "steps", "schedule", "atol", "rtol", "cfg_scale", "nfe", "n_samples", "seed",
            "reference", "mode", "features", "seconds", "versions", "date", "protocol", "checkpoint", "bspp",
            "processes", "device"}


def test_2d_report_has_every_row_and_field_and_is_not_recomputed(toy_run, tmp_path):
    args = ["-e", str(toy_run), "--samplers", "euler:4,dopri5", "--n-samples", "200", "--bpd", "--bpd-n", "50"]
    out = run_script("evaluate.py", *args)
    assert out.returncode == 0, out.stderr
    rows = rows_of(toy_run)
    assert len(rows) == 4 and {(r["step"], r["solver"]) for r in rows} == {(10, "euler"), (20, "euler"),
                                                                           (10, "dopri5"), (20, "dopri5")}
    for r in rows:
        assert PROTOCOL <= set(r) and math.isfinite(r["bpd"])
        assert {"torch", "accelerate", "clean-fid", "numpy", "scipy"} <= set(r["versions"])
    assert {r["bpd"] for r in rows if r["step"] == 20} == {rows[-1]["bpd"]}  # one per checkpoint, not per sampler
    assert {r["nfe"] for r in rows if r["solver"] == "euler"} == {4}
    assert all(r["atol"] == r["rtol"] == 1e-5 for r in rows if r["solver"] == "dopri5")
    assert all(r["atol"] is None and r["schedule"] == "linear" for r in rows if r["solver"] == "euler")
    # The same numbers by another route: sample.py's samples (same seeds) against the same dataset points.
    from config import load_config
    from data import build_dataset, reference_points

    dataset = build_dataset(load_config(toy_run / "config.yaml"))
    points = dataset.x[reference_points(len(dataset), 200, 0)].double()
    for r in (r for r in rows if r["step"] == 20):
        steps = ["--steps", "4"] if r["solver"] == "euler" else []
        made = run_script("sample.py", "--weights", str(toy_run / "checkpoints" / "step_0000020"), "--n-samples",
                          "200", "--solver", r["solver"], *steps, "--save-dir", str(tmp_path / r["solver"]))
        assert made.returncode == 0, made.stderr
        samples = torch.from_numpy(np.load(tmp_path / r["solver"] / "samples.npy")).double()
        assert r["w2"] == pytest.approx(w2(samples, points), rel=1e-5)
        assert r["mmd"] == pytest.approx(mmd(samples, points), rel=1e-4, abs=1e-7)
        assert r["nfe"] == json.loads((tmp_path / r["solver"] / "info.json").read_text())["nfe"]
    # report.csv and report.md hold every row of report.json; the best row by W2 is starred.
    with open(toy_run / "eval" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [(int(c["step"]), c["solver"], float(c["w2"])) for c in table] == [(r["step"], r["solver"], r["w2"])
                                                                             for r in rows]
    markdown = (toy_run / "eval" / "report.md").read_text()
    best = min(rows, key=lambda r: r["w2"])
    starred = [line for line in markdown.splitlines() if line.startswith("| ★")]
    assert len(starred) == 1 and f"**{best['w2']:.4f}**" in starred[0] and f"**{best['step']}**" in starred[0]
    assert Image.open(toy_run / "eval" / "fid.png").size == (1210, 462)  # two panels, 11 × 4.2 in at 110 dpi
    before = (toy_run / "eval" / "report.json").read_bytes()
    again = run_script("evaluate.py", *args)
    assert again.returncode == 0 and again.stdout.count("already in the report") == 4, again.stdout
    assert (toy_run / "eval" / "report.json").read_bytes() == before


def test_a_zero_atol_is_honoured_and_bits_per_dim_do_not_depend_on_the_batch(toy_run, tmp_path):
    """--atol 0 (a pure relative tolerance) is a tolerance, not 'unset'; each item's dequantization and Hutchinson
    noise, and its adaptive steps, are its own: --bspp changes no number of the row."""
    rows = []
    for bspp in ("7", "64"):
        out = run_script("evaluate.py", "-e", str(toy_run), "--checkpoints", "last", "--samplers", "dopri5", "--atol",
                         "0", "--rtol", "1e-3", "--n-samples", "50", "--bpd", "--bpd-n", "20", "--bspp", bspp,
                         "--out", str(tmp_path / bspp))
        assert out.returncode == 0, out.stderr
        (row,) = json.loads((tmp_path / bspp / "report.json").read_text())["rows"]
        rows.append(row)
    assert rows[0]["atol"] == 0.0 and rows[0]["rtol"] == 1e-3
    assert [rows[0][k] for k in ("w2", "mmd", "nfe")] == [rows[1][k] for k in ("w2", "mmd", "nfe")]
    assert rows[0]["bpd"] == pytest.approx(rows[1]["bpd"], rel=1e-9)


def test_two_processes_give_the_same_rows_as_one(toy_run, tmp_path):
    args = ["evaluate.py", "-e", str(toy_run), "--checkpoints", "last", "--samplers", "heun+euler:3",
            "--n-samples", "101", "--bspp", "16"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    one = run_script(*args, "--out", str(tmp_path / "one"))
    two = run_script(*args, "--out", str(tmp_path / "two"), launcher=launcher)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    (a,), (b,) = (json.loads((tmp_path / d / "report.json").read_text())["rows"] for d in ("one", "two"))
    assert b["processes"] == 2 and a["w2"] == b["w2"] and a["mmd"] == b["mmd"] and a["nfe"] == b["nfe"] == 5


def test_an_interrupted_evaluation_continues_where_it_stopped(image_run, tmp_path, monkeypatch):
    args = ["-e", str(image_run), "--samplers", "euler:2,heun:1", "--n-samples", "12", "--features", "pixels",
            "--kid", "--pr", "--stats-dir", str(tmp_path / "stats"), "--out", str(tmp_path / "eval")]
    real, calls = evaluate.sample_row, []

    def dies_on_the_third_row(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "sample_row", dies_on_the_third_row)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(args)
    first = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert len(first) == 2 and list((tmp_path / "stats").glob("*.npz"))  # reference statistics were cached
    monkeypatch.setattr(evaluate, "sample_row", real)
    evaluate.main(args)
    rows = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert len(rows) == 4 and all(r in rows for r in first)  # the two done rows untouched, two more added
    assert {(r["step"], r["solver"]) for r in rows} == {(1, "euler"), (2, "euler"), (1, "heun"), (2, "heun")}
    assert all(r["fid"] >= 0 and r["kid_std"] >= 0 and r["features"] == "pixels" for r in rows)
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in rows)
    assert "12 images" in rows[0]["reference"] and "precision and recall" in rows[0]["protocol"]


def test_folder_of_images_is_scored_against_a_reference(image_run, tmp_path):
    make_folder(tmp_path / "mine", {"": [(8, 8)] * 5})
    out = run_script("evaluate.py", "--folder", str(tmp_path / "mine"), "--ref", str(tmp_path / "mine"),
                     "--features", "pixels", "--stats-dir", str(tmp_path / "stats"))
    assert out.returncode == 0, out.stderr
    assert "5 images, FID 0.000" in out.stdout or "5 images, FID -0.000" in out.stdout, out.stdout


@pytest.mark.parametrize("kind", ["statistics", "folder"])
def test_a_reference_spelled_another_way_is_the_same_and_its_rows_are_not_scored_again(image_run, tmp_path, kind):
    """`--ref ../data/stats.npz` from one folder and `--ref /abs/data/stats.npz` from another name one reference:
    the report keys rows by it, so a second spelling must find the rows the first one scored."""
    make_folder(tmp_path / "ref", {"": [(8, 8)] * 5})
    if kind == "statistics":
        Reference.of(np.random.default_rng(0).normal(size=(10, 192)), "made here", (8, 8), "pixels").save(
            tmp_path / "ref.npz")
    name = "ref.npz" if kind == "statistics" else "ref"
    common = ["-e", str(image_run), "--checkpoints", "last", "--samplers", "euler:1", "--n-samples", "4",
              "--features", "pixels", "--out", str(tmp_path / "eval")]
    first = run_script(str(ROOT / "evaluate.py"), *common, "--ref", name, "--stats-dir", str(tmp_path / "s1"),
                       cwd=tmp_path)
    again = run_script("evaluate.py", *common, "--ref", str(tmp_path / "ref" / ".." / name),
                       "--stats-dir", str(tmp_path / "s2"))
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert again.stdout.count("already in the report") == 1, again.stdout
    (row,) = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert row["reference"] == str(tmp_path.resolve() / name)


@pytest.mark.parametrize(("args", "message"), [
    (["--samplers", "eulr:10"], "error: unknown solver 'eulr'; did you mean 'euler'?"),
    (["--ref", "/nonexistent/stats.npz"], "error: reference /nonexistent/stats.npz does not exist"),
    (["--ref", "{big}"], "error: reference {big} holds 16x16 images but the samples are 8x8"),
    (["--ref", "{legacy}"], "error: reference {legacy} holds inception-legacy_tensorflow features but the samples are "
                            "scored with pixels; give the --mode / --features it was made with"),
    (["--checkpoints", "7"], "error: run dir {run} has no checkpoint at step 7; it has 1, 2"),
    (["--samplers", "dopri5", "--atol", "0", "--rtol", "0"], "error: adaptive solvers need atol ≥ 0 and rtol ≥ 0, "
                                                             "not both 0; got atol 0, rtol 0"),
    (["--cfg-scale", "2"], "error: --cfg-scale 2.0 asks for classifier-free guidance but the model is unconditional"),
])
def test_bad_input_is_one_clear_line(image_run, tmp_path, args, message):
    make_folder(tmp_path / "big", {"": [(16, 16)] * 3})
    Reference.of(np.random.default_rng(0).normal(size=(10, 4)), "legacy", (8, 8),
                 "inception-legacy_tensorflow").save(tmp_path / "legacy.npz")
    fill = {"big": tmp_path / "big", "run": image_run, "legacy": tmp_path / "legacy.npz"}
    args = [a.format(**fill) for a in args]
    out = run_script("evaluate.py", "-e", str(image_run), "--n-samples", "4", "--features", "pixels",
                     "--stats-dir", str(tmp_path / "stats"), "--out", str(tmp_path / "eval"), *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(message.format(**fill)), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize(("name", "message"), [
    ("stats.npy", "is a .npy file; give a folder of images, an .npz with mu and sigma"),
    ("image.png", "is a .png file; give a folder of images, an .npz with mu and sigma"),
    ("broken.npz", "is not a readable .npz (ValueError)"),
])
def test_a_reference_file_that_is_not_an_npz_is_one_clear_line(tmp_path, name, message):
    make_folder(tmp_path / "mine", {"": [(8, 8)] * 3})
    np.save(tmp_path / "stats.npy", np.zeros((4, 4)))
    (tmp_path / "image.png").write_bytes((tmp_path / "mine" / "0.png").read_bytes())
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    out = run_script("evaluate.py", "--folder", str(tmp_path / "mine"), "--ref", str(tmp_path / name), "--features",
                     "pixels", "--stats-dir", str(tmp_path / "stats"))
    assert out.returncode == 2 and out.stderr.startswith(f"error: reference {tmp_path / name} {message}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_an_error_on_the_main_process_stops_every_process_with_its_line(image_run, tmp_path):
    """With 2 processes the main one makes the reference and the other waits for it: its error must reach the
    other process, which would otherwise be left in a collective (a traceback when gloo sees the peer gone, a
    wait until the timeout on NCCL across machines)."""
    make_folder(tmp_path / "big", {"": [(16, 16)] * 3})
    ranks = run_ranks("evaluate.py", "-e", str(image_run), "--n-samples", "4", "--features", "pixels", "--ref",
                      str(tmp_path / "big"), "--stats-dir", str(tmp_path / "stats"), "--out", str(tmp_path / "eval"))
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    assert ranks[0].stderr.strip() == (f"error: reference {tmp_path / 'big'} holds 16x16 images but the samples are "
                                       "8x8; give a reference at the samples' resolution")
    assert "Traceback" not in ranks[1].stderr and "error:" not in ranks[1].stderr  # the line is printed once


def test_run_without_checkpoints_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    out = run_script("evaluate.py", "-e", str(tmp_path / "empty"))
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: run dir {tmp_path / 'empty'} has no checkpoints (checkpoints/step_N); train first or give the "
        "run's folder")


def test_missing_inception_offline_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid_module, "INCEPTION_FILE", tmp_path / "inception-2015-12-05.pt")

    def offline():
        raise OSError("network is unreachable")

    monkeypatch.setattr(fid_module, "_download_inception", offline)
    fid_module._inception.cache_clear()
    make_folder(tmp_path / "mine", {"": [(8, 8)] * 3})
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--folder", str(tmp_path / "mine"), "--ref", str(tmp_path / "mine")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(
        f"error: clean-fid's Inception network is not at {tmp_path / 'inception-2015-12-05.pt'} and could not be "
        "downloaded (OSError); on a machine without network copy inception-2015-12-05.pt there"), err


def test_training_logs_a_small_n_quality_check_at_checkpoints(tmp_path, monkeypatch):
    """The in-training check is evaluate.py's protocol at small N: evaluate.py gives the same number."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where the reference statistics are cached
    out = run_script("train.py", "-e", str(tmp_path / "toy"), "model.width=16", "model.depth=1", "model.time_dim=8",
                     "train.batch_size=16", "data.size=256", "train.steps=10", "train.checkpoint_every=5",
                     "train.eval_every=5", "train.eval_n=64", "train.trackers=[]", "train.preview_every=0",
                     "train.preview_n=16", "train.preview_steps=2")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["w2"] for r in rows if "w2" in r}
    assert list(logged) == [5, 10]
    out = run_script("evaluate.py", "-e", str(tmp_path / "toy"), "--samplers", "euler:2", "--n-samples", "64")
    assert out.returncode == 0, out.stderr
    evaluated = {r["step"]: r["w2"] for r in rows_of(tmp_path / "toy")}
    assert evaluated == pytest.approx(logged, rel=1e-5)  # float32 in training, float64 in evaluate.py
    make_folder(tmp_path / "data", {"": [(8, 8)] * 8})
    out = run_script("train.py", "-e", str(tmp_path / "img"), "data.name=imagefolder", f"data.path={tmp_path / 'data'}",
                     "model.name=DiT-S/4", "model.width=16", "model.depth=1", "model.heads=2", "train.batch_size=4",
                     "train.steps=2", "train.eval_every=2", "train.eval_n=8", "train.eval_features=pixels",
                     "train.trackers=[]", "train.preview_images=4", "train.preview_steps=1")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "img" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["fid_pixels"] for r in rows if "fid_pixels" in r}
    assert list(logged) == [2]
    assert len(list((tmp_path / "cache" / "fm-toolkit" / "fid-stats").glob("imagefolder_*pixels*.npz"))) == 1
    out = run_script("evaluate.py", "-e", str(tmp_path / "img"), "--checkpoints", "2", "--samplers", "euler:1",
                     "--n-samples", "8", "--features", "pixels")
    assert out.returncode == 0, out.stderr
    assert rows_of(tmp_path / "img")[0]["fid"] == pytest.approx(logged[2], rel=1e-6)


def _add_rows(folder, first):
    report = evaluate.Report(folder)
    for k in range(first, first + 15):
        report.add({"step": k, "weights": "ema", "solver": "euler", "steps": 1, "schedule": "linear", "atol": None,
                    "rtol": None, "cfg_scale": 1.0, "nfe": 1, "n_samples": 2, "seed": 0, "reference": "r",
                    "mode": None, "features": None, "w2": float(k), "seconds": 0.0, "protocol": "test"})


def test_two_evaluations_writing_at_once_lose_no_row(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_add_rows, args=(tmp_path, first)) for first in (0, 100)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
        assert w.exitcode == 0
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert sorted(r["step"] for r in rows) == [*range(15), *range(100, 115)]
    assert not list(tmp_path.glob(".tmp_*"))  # no half-written file left behind
