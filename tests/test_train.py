"""End to end: train.py run as a user runs it, in a subprocess."""

import json
import shutil
import sys

import pytest
import torch
from conftest import ROOT, run_ranks, run_script
from PIL import Image
from safetensors.torch import load_file

from models.checkpoint import checkpoint_name


def weights(run, step, name):
    return load_file(str(run / "checkpoints" / checkpoint_name(step) / f"{name}.safetensors"))


def assert_same_weights(run_a, run_b, step):
    for name in ("model", "ema"):
        a, b = weights(run_a, step, name), weights(run_b, step, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ"


def test_train_writes_the_run_folder_and_resuming_is_bitwise_identical(tmp_path, tiny):
    """N steps in one go equal N/2, a hard stop, and the same command again: model and EMA, bitwise."""
    common = [*tiny, "flow.coupling=ot", "train.checkpoint_every=5", "train.preview_every=10",
              "train.lr_schedule=cosine", "train.warmup_steps=3", "train.grad_accum=2"]
    once = run_script("train.py", "-e", str(tmp_path / "once"), *common, "train.steps=20")
    assert once.returncode == 0, once.stderr
    run = tmp_path / "once"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "log.txt", "metrics.jsonl", "samples", "checkpoints"}
    assert Image.open(run / "samples" / "step_0000010.png").size == (500, 500)  # points over the data
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000010", "step_0000015", "step_0000020"]
    ckpt = run / "checkpoints" / "step_0000020"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "ema.safetensors", "config.yaml", "train_state"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert {"loss", "lr", "grad_norm", "samples_per_s"} <= rows[0].keys()
    assert any(k.startswith("loss_t/") for k in rows[0])

    # The same command twice: killed right after the step-10 checkpoint, then run again.
    half = run_script("-c", KILL_AFTER_CHECKPOINT, "-e", str(tmp_path / "twice"), *common, "train.steps=20")
    assert half.returncode == -9, half.stderr
    again = run_script("train.py", "-e", str(tmp_path / "twice"), *common, "train.steps=20")
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr
    assert_same_weights(run, tmp_path / "twice", 20)


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
real = os.rename
def rename(src, dst):
    real(src, dst)
    if str(dst).endswith("step_0000010"):  # the step-10 checkpoint is complete: stop dead
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
import train
train.main(sys.argv[1:])
"""

KILL_DURING_CHECKPOINT = """
import os, signal, sys
import models.checkpoint as ckpt
real = ckpt.save_weights
def save_weights(model, path, metadata=None):
    real(model, path, metadata)
    if "step_0000010" in str(path) and path.name == "model.safetensors":  # half-way through writing step 10
        os.kill(os.getpid(), signal.SIGKILL)
ckpt.save_weights = save_weights
import train
train.main(sys.argv[1:])
"""


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_to_resume_from(tmp_path, tiny):
    common = [*tiny, "train.checkpoint_every=5", "train.steps=15"]
    reference = run_script("train.py", "-e", str(tmp_path / "ref"), *common)
    assert reference.returncode == 0, reference.stderr
    killed = run_script("-c", KILL_DURING_CHECKPOINT, "-e", str(tmp_path / "run"), *common)
    assert killed.returncode == -9
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == [".tmp_step_0000010", "step_0000005"]  # the partial one was never named step_*
    resumed = run_script("train.py", "-e", str(tmp_path / "run"), *common)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "step_0000005" in resumed.stdout
    assert_same_weights(tmp_path / "ref", tmp_path / "run", 15)


def test_truncated_checkpoint_on_resume_fails_clearly_and_keeps_earlier_ones(tmp_path, tiny):
    common = [*tiny, "train.checkpoint_every=5", "train.steps=10", "train.keep_last=5"]
    assert run_script("train.py", "-e", str(tmp_path), *common).returncode == 0
    optimizer = tmp_path / "checkpoints" / "step_0000010" / "train_state" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    before = (tmp_path / "checkpoints" / "step_0000005" / "ema.safetensors").read_bytes()
    out = run_script("train.py", "-e", str(tmp_path), *common, "train.steps=20")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: checkpoint ")
    assert "step_0000010 cannot be loaded" in out.stderr and "delete it" in out.stderr
    assert (tmp_path / "checkpoints" / "step_0000005" / "ema.safetensors").read_bytes() == before


def test_wsd_keeps_the_rate_then_falls_linearly_to_lr_min_over_its_last_fraction(tmp_path, tiny):
    """Warmup-stable-decay as train.py logs it: warmup to lr, lr until the last decay_fraction of the steps after
    warmup, then a straight line that would reach lr_min one step after the last."""
    out = run_script("train.py", "-e", str(tmp_path / "run"), *tiny, "train.steps=24", "train.warmup_steps=4",
                     "train.lr=1e-3", "train.lr_min=1e-4", "train.lr_schedule=wsd", "train.decay_fraction=0.25",
                     "train.log_every=1", "train.preview_every=0")
    assert out.returncode == 0, out.stderr
    lr = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    decayed = [1e-4 + 9e-4 * k / 5 for k in (5, 4, 3, 2, 1)]  # a quarter of the 20 steps after warmup: the last 5
    assert lr == pytest.approx([2.5e-4, 5e-4, 7.5e-4, *[1e-3] * 16, *decayed])


@pytest.mark.parametrize("args, message", [
    (["train.lrr=1"], "error: unknown config key train.lrr; did you mean train.lr?"),
    (["train.steps=ten"], "error: config key train.steps must be int, got 'ten'"),
    (["model.name=mpl"], "error: config key model.name: unknown name 'mpl'; did you mean 'mlp'?"),
    (["flow.path=curve"], "error: config key flow.path: unknown name 'curve'"),
    (["flow.coupling=sinkhorn"], "error: config key flow.coupling: unknown name 'sinkhorn'"),
    (["data.name=tensor_file", "data.path=/nonexistent/x.npy"], "error: data file '/nonexistent/x.npy' does not exist"),
    (["train.lr_schedule=step"],
     "error: config key train.lr_schedule must be one of constant, cosine, wsd, got 'step'"),
    (["train.decay_fraction=0"], "error: config key train.decay_fraction must be in (0, 1], got 0"),
    (["model.class_cond=true"], "error: model.class_cond is set but moons has no labels"),
    (["flow.label_dropout=0.1"], "error: flow.label_dropout drops class labels, which an unconditional model"),
    (["train.eval_every=5", "train.eval_n=1000"], "error: train.eval_n 1000 exceeds the 512 points of the dataset"),
    (["data.name=mnist", "data.path=/nonexistent", "data.download=false", "model.name=unet-mnist"],
     "error: MNIST train files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz) are not in /nonexistent"),
])
def test_bad_input_gives_one_clear_line_and_exit_2(tmp_path, tiny, args, message):
    out = run_script("train.py", "-e", str(tmp_path / "run"), *tiny, *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == message or out.stderr.strip().startswith(message)
    assert len(out.stderr.strip().splitlines()) == 1


def test_unwritable_run_dir(tmp_path, tiny):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = run_script("train.py", "-e", str(blocker / "run"), *tiny)
    assert out.returncode == 2 and out.stderr.startswith("error: run folder") and "not writable" in out.stderr


def test_nan_loss_stops_with_a_clear_message_and_the_last_good_checkpoint_intact(tmp_path, tiny):
    data = tmp_path / "x.npy"
    import numpy as np

    np.save(data, np.full((64, 2), 1e30, np.float32))  # squares overflow fp32: the loss is infinite
    out = run_script("train.py", "-e", str(tmp_path / "run"), *tiny, "data.name=tensor_file", f"data.path={data}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "the loss or its gradient became NaN or infinite" in out.stderr and "checkpoint is none" in out.stderr
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


INFINITE_GRADIENT_FROM_STEP_7 = """
import sys, torch
import models

class InfiniteGradient(torch.autograd.Function):  # the identity, whose gradient overflows from the 7th backward on
    calls = 0

    @staticmethod
    def forward(ctx, v):
        return v

    @staticmethod
    def backward(ctx, grad):
        InfiniteGradient.calls += 1
        return grad * (float("inf") if InfiniteGradient.calls >= 7 else 1.0)

build = models.build_model
def build_model(*args, **kwargs):
    model = build(*args, **kwargs)
    forward = model.forward
    model.forward = lambda *a, **k: InfiniteGradient.apply(forward(*a, **k))
    return model
models.build_model = build_model
import train
train.main(sys.argv[1:])
"""


def test_an_infinite_gradient_with_a_finite_loss_stops_before_a_bad_checkpoint(tmp_path, tiny):
    """The loss stays finite; the gradient of step 7 is infinite and would make the weights NaN. The check at
    step 10 must see it, and save no checkpoint at step 10."""
    out = run_script("-c", INFINITE_GRADIENT_FROM_STEP_7, "-e", str(tmp_path), *tiny, "train.steps=20",
                     "train.checkpoint_every=5")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: the loss or its gradient became NaN or infinite before step 10; training stopped and the last good "
        "checkpoint is step 5; lower train.lr or set train.grad_clip")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000005"]
    assert all(torch.isfinite(w).all() for w in weights(tmp_path, 5, "model").values())


def test_an_error_in_training_leaves_no_thread_running(tmp_path, tiny, monkeypatch):
    """OT-CFM prepares the next batch in a thread; a stop by error must close it (and the trackers) too."""
    import threading

    import train

    data = tmp_path / "x.npy"
    import numpy as np

    np.save(data, np.full((64, 2), 1e30, np.float32))  # an infinite loss at the first check
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(["-e", str(tmp_path / "run"), *tiny, "flow.coupling=ot", "data.name=tensor_file",
                    f"data.path={data}"])
    assert stop.value.code == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]


def test_an_error_on_the_main_process_stops_every_training_process_with_its_line(tmp_path, tiny):
    """The in-training quality check runs on the main process; a reference that cannot be read stops both."""
    from test_images import make_folder

    make_folder(tmp_path / "data", {"": [(8, 8)] * 8})
    ranks = run_ranks("train.py", "-e", str(tmp_path / "run"), "data.name=imagefolder",
                      f"data.path={tmp_path / 'data'}", "model.name=DiT-S/4", "model.width=16", "model.depth=1",
                      "model.heads=2", "train.batch_size=4", "train.steps=4", "train.checkpoint_every=2",
                      "train.eval_every=2", "train.eval_n=8", "train.eval_features=pixels",
                      "train.eval_ref=/nonexistent/stats.npz", "train.trackers=[]", "train.preview_images=4",
                      "train.preview_steps=1")
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    assert ranks[0].stderr.strip().splitlines()[-1].startswith("error: reference /nonexistent/stats.npz does not "
                                                               "exist")
    assert "Traceback" not in ranks[1].stderr and "error:" not in ranks[1].stderr


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    out = run_script("train.py", "-e", str(tmp_path / "run"), "--dry-run", "train.lr=3e-4")
    assert out.returncode == 0 and "lr: 0.0003" in out.stdout and not (tmp_path / "run").exists()


def test_two_processes_match_one_process(tmp_path, tiny):
    """OT-CFM couples the global batch, so 1 and 2 processes train the same model (up to fp rounding)."""
    shutil.copy(ROOT / "train.py", tmp_path / "train.py")
    common = [*tiny, "flow.coupling=ot", "train.steps=6", "train.checkpoint_every=6"]
    one = run_script("train.py", "-e", str(tmp_path / "one"), *common)
    assert one.returncode == 0, one.stderr
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    two = run_script("train.py", "-e", str(tmp_path / "two"), *common, launcher=launcher)
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in two.stdout
    a, b = weights(tmp_path / "one", 6, "model"), weights(tmp_path / "two", 6, "model")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
