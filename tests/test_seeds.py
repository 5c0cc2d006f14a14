"""Seeds: every key gives its own draws (torch's CPU generator keeps 32 bits of manual_seed; seeds.py keeps all of the
key), for sampling, training and data order, and the same key the same draws whatever the batch."""

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import TINY, run_script

import seeds
from config import load_config
from data import build_dataset, build_loader, build_source
from flows import BatchShard, build_objective
from flows.solvers import _generator, class_labels, noise, per_sample_normal, sample_generators


def test_the_cpu_state_layout_is_torchs_own():
    """Writing mt19937's seeding of 5 (its initialisation recurrence) through seeds' state layout gives torch's
    manual_seed(5) draws: the layout seeds.py writes the hashed words into is the one torch reads."""
    words = [5]
    for j in range(1, seeds.MT_WORDS):
        words.append((1812433253 * (words[-1] ^ (words[-1] >> 30)) + j) & 0xFFFFFFFF)
    g = torch.Generator()
    g.set_state(seeds._cpu_state(np.array(words, dtype=np.uint32), 5))
    assert torch.equal(torch.randn(100, generator=g), torch.randn(100, generator=torch.Generator().manual_seed(5)))


def test_keys_that_torch_would_fold_together_give_different_draws():
    """The constructions the toolkit used to seed with: seed·2^32 + k, and offsets of 2^60 and more, all of which
    torch's manual_seed folds onto the low 32 bits."""
    assert torch.equal(torch.randn(3, generator=torch.Generator().manual_seed(5 + 2**33)),
                       torch.randn(3, generator=torch.Generator().manual_seed(5)))  # what went wrong
    keys = [("sample", 0, 5, 0), ("sample", 1, 5, 0), ("sample", 2**33, 5, 0), ("sample", 0, 5 + 2**32, 0),
            ("sample", 0, 2**40, 0), ("sample", 0, 5, 4), ("train", 0, 5), ("sample", 2**64 - 1, 2**64 - 1, 0)]
    draws = [torch.randn(8, generator=seeds.generator(*key)) for key in keys]
    for a, b in itertools.combinations(range(len(keys)), 2):
        assert not torch.equal(draws[a], draws[b]), (keys[a], keys[b])
    again = torch.randn(8, generator=seeds.generator(*keys[0]))
    assert torch.equal(again, draws[0])  # a key's draws are its own, every time
    assert seeds._encode(("sample", 0, 2**32)) != seeds._encode(("sample", 2**32, 0))
    with pytest.raises(ValueError, match="integers in \\[0, 2\\^64\\)"):
        seeds.generator("sample", -1, 0)


def test_two_seeds_give_different_noise_labels_and_conditions():
    a, b = noise(0, list(range(16)), (3,)), noise(1, list(range(16)), (3,))
    assert not torch.equal(a, b)
    assert not torch.equal(class_labels(None, 64, 10, 0), class_labels(None, 64, 10, 1))
    # Sample k of seed 1 is no sample of seed 0 (seed·2^32 + k made (1, k) the same as (0, k)).
    assert not any(torch.equal(b[0], row) for row in noise(0, list(range(64)), (3,)))


def test_the_streams_of_one_sample_are_independent():
    """Stream 0 (x0), 1 (label), 2 (Latent-CFM's c), 3 (restoration noise) and 4 (SDE noise) of sample k: no two
    alike, and uncorrelated over 4000 samples (|r| within 4 standard errors of 0)."""
    n = 4000
    first = {stream: torch.stack([torch.randn(1, generator=_generator(0, k, stream))[0] for k in range(n)])
             for stream in range(5)}
    for a, b in itertools.combinations(range(5), 2):
        r = torch.corrcoef(torch.stack([first[a], first[b]]))[0, 1]
        assert abs(r) < 4 / n**0.5, (a, b, float(r))
    injected = per_sample_normal(sample_generators(0, list(range(50)), 4), (2,))
    assert not torch.equal(injected, noise(0, list(range(50)), (2,)))


def draws_of_step_0(train_seed: int):
    from flows.batches import micro_steps

    cfg = load_config(None, [f"train.seed={train_seed}", "data.size=256"])
    dataset = build_dataset(cfg)
    objective = build_objective(cfg, build_source(cfg, dataset.shape))
    loader = iter(build_loader(dataset, 32, 0, 1, seed=train_seed, start=0))
    x1, draw = next(micro_steps(loader, objective, BatchShard(), train_seed, 0, torch.device("cpu"), ahead=False))
    return x1, draw


def test_a_training_seed_changes_the_draws_of_step_0():
    x1_a, a = draws_of_step_0(1)
    x1_b, b = draws_of_step_0(2)
    assert not torch.equal(a.t, b.t) and not torch.equal(a.x0, b.x0)
    assert not torch.equal(x1_a, x1_b)  # the data order too
    x1_again, again = draws_of_step_0(1)
    assert torch.equal(again.t, a.t) and torch.equal(again.x0, a.x0) and torch.equal(x1_again, x1_a)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "run"
    out = run_script("train.py", "-e", str(run), *TINY, "train.steps=20", "train.preview_every=0")
    assert out.returncode == 0, out.stderr
    return run / "checkpoints" / "step_0000020"


def test_seeds_out_of_range_are_one_line(tmp_path, toy_run):
    out = run_script("train.py", "-e", str(tmp_path / "r"), "train.seed=4294967296", "--dry-run")
    assert out.returncode == 2 and "train.seed must be in [0, 4294967295], got 4294967296" in out.stderr
    out = run_script("sample.py", "--weights", str(toy_run), "--n-samples", "2", "--seed", "-1",
                     "--save-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "--seed must be in [0, 18446744073709551615], got -1" in out.stderr


def test_sample_py_seeds_and_pairs_seeds_differ(tmp_path, toy_run):
    """`--seed 0` and `--seed 1` write different samples and different pairs; a seed above 2^32 is its own too."""
    outs = {}
    for seed in (0, 1, 2**32):
        out = run_script("sample.py", "--weights", str(toy_run), "--n-samples", "20", "--steps", "4",
                         "--seed", str(seed), "--save-dir", str(tmp_path / f"s{seed}"))
        assert out.returncode == 0, out.stderr
        outs[seed] = np.load(tmp_path / f"s{seed}" / "samples.npy")
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2**32])
    from data.pairs import PairsDataset

    x0s = []
    for seed in (0, 7):
        out = run_script("sample.py", "--weights", str(toy_run), "--pairs", "--n-samples", "10", "--steps", "2",
                         "--seed", str(seed), "--save-dir", str(tmp_path / f"p{seed}"))
        assert out.returncode == 0, out.stderr
        assert json.loads((tmp_path / f"p{seed}" / "pairs.json").read_text())["seed"] == seed
        x0s.append(PairsDataset(tmp_path / f"p{seed}").x0)
    assert not torch.equal(x0s[0], x0s[1])
