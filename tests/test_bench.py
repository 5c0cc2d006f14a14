"""The measuring code of bench/: the FID of the solver × schedule grid and its resumable store of scores."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from mnist_fid import FrechetReference, frechet  # noqa: E402
from solvers_nfe import Scores, load_ema  # noqa: E402

from errors import UserError  # noqa: E402


def test_the_bench_frechet_distance_equals_clean_fids_sqrtm_form():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((32, 32))
    real = rng.standard_normal((400, 32)) @ mix
    for fake in (rng.standard_normal((20, 32)) @ mix + 0.3,  # fewer samples than features: a singular covariance
                 2 * rng.standard_normal((300, 32)) @ mix):
        mu1, s1 = fake.mean(0), np.cov(fake, rowvar=False)
        mu2, s2 = real.mean(0), np.cov(real, rowvar=False)
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
        assert frechet(fake, FrechetReference(mu2, s2)) == pytest.approx(expected, rel=1e-6)


def test_scores_are_kept_after_each_measurement_and_never_mixed_across_protocols(tmp_path):
    path, protocol, calls = tmp_path / "scores.json", {"checkpoint": "step_1 sha256 ab", "n": 10}, []

    def measure(value):
        def run():
            calls.append(value)
            return 4, value
        return run

    first = Scores(path, protocol)
    assert first.get("euler:4:linear", measure(1.5)) == (4, 1.5)
    assert json.loads(path.read_text())["scores"] == {"euler:4:linear": [4, 1.5]}  # on disk before the next one
    again = Scores(path, protocol)  # a run cut off goes on: known scores are not measured again
    assert again.get("euler:4:linear", measure(9.0)) == (4, 1.5)
    assert again.get("midpoint:2:linear", measure(2.5)) == (4, 2.5)
    assert calls == [1.5, 2.5]
    with pytest.raises(UserError, match="another protocol"):
        Scores(path, {**protocol, "n": 11})
    assert len(json.loads(path.read_text())["scores"]) == 2  # the file is left as it was


def test_a_run_folder_without_checkpoints_is_named_in_the_error(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path} has no checkpoint"):
        load_ema(tmp_path, "cpu")


def test_the_zoo_bench_reads_a_cell_as_worse_only_beyond_the_larger_seed_spread():
    from flow_zoo_2d import verdict

    def row(*cells):
        return {"step_ms": 1.0, "w2": {str(n): cell for n, cell in zip((1, 2, 4), cells)}}

    results = {"p | linear / velocity | ours": row((1.00, 0.01), (0.50, 0.01), (0.30, 0.01)),
               "p | linear / velocity | torchcfm": row((0.90, 0.05), (0.60, 0.05), (0.28, 0.05)),
               "p | linear / noise | ours": row((9.0, 0.0), (9.0, 0.0), (9.0, 0.0))}  # no peer: not read
    lines = verdict(results)
    assert lines[0].endswith("1 better, 1 within, 1 worse:")
    assert lines[1:] == ["- p linear / velocity @ NFE 1: 1.000 ± 0.010 against 0.900 ± 0.050"]
    assert verdict({"p | linear / noise | ours": row((9.0, 0.0))}) == []
