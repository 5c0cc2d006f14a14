"""Scale: activation checkpointing, and sharded training through accelerate, FSDP2 and DeepSpeed ZeRO-2 (run on 2-3 CPU
processes over gloo by tests/sharded_on_cpu.py, since accelerate takes them only on accelerators)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script
from safetensors.torch import load_file
from test_images import mnist_subset

from config import load_config
from models import build_model
from models.checkpoint import checkpoint_name

DDP = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
       "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
# A small DiT on 64 MNIST digits, with a warmup (the learning rate changes every step) and 2 micro-steps per step;
# batch 12 splits over 2 and 3 processes.
TINY_DIT = ["model.name=DiT-S/4", "model.width=32", "model.depth=2", "model.heads=2", "data.name=mnist",
            "data.split=test", "data.download=false", "train.batch_size=12", "train.grad_accum=2",
            "train.warmup_steps=3", "train.checkpoint_every=2", "train.log_every=1", "train.preview_images=4",
            "train.preview_steps=2", "train.trackers=[]"]
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None and importlib.util.find_spec("transformers")


def sharded(config: str, processes: int) -> list[str]:
    """accelerate launch with configs/accelerate/CONFIG.yaml on CPU processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / f"configs/accelerate/{config}.yaml"), "--main_process_port", "0", "--num_processes",
            str(processes), str(ROOT / "tests/sharded_on_cpu.py")]


def fsdp(processes: int) -> list[str]:
    return sharded("fsdp", processes)


def run_deepspeed(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """train.py (or another script) under DeepSpeed ZeRO-2 with its CPU accelerator, wherever deepspeed is importable
    from (a scratch --target folder on PYTHONPATH included)."""
    import deepspeed

    path = os.pathsep.join([str(ROOT), str(Path(deepspeed.__file__).parents[1])])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([*sharded("deepspeed_zero2", processes), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def weights(run, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / checkpoint_name(step) / f"{name}.safetensors"))


def gradients(model, x, t, y=None) -> list[torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout draws in both runs
    (model(x, t, y) - x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name, shape, extra", [
    ("DiT-S/4", (4, 16, 16), ["model.depth=3", "model.width=64", "model.heads=4"]),
    ("unet-mnist", (1, 28, 28), ["model.dropout=0.2"])])
def test_activation_checkpointing_gives_the_same_gradients(name, shape, extra):
    cfg = load_config(None, [f"model.name={name}", *extra])
    torch.manual_seed(0)
    model = build_model(cfg, shape, num_classes=10).train()
    with torch.no_grad():  # leave the zero initialization (DiT's adaLN-Zero, the UNet's output), as trained weights do
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    x, t, y = torch.randn(4, *shape), torch.rand(4), torch.arange(4)
    plain = gradients(model, x, t, y)
    model.grad_checkpoint = True
    recomputed = gradients(model, x, t, y)
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))
    assert all(g.abs().sum() > 0 for g in plain)
    model.eval()
    with torch.no_grad():  # sampling: nothing is recomputed, the same output
        out = model(x, t, y)
        model.grad_checkpoint = False
        assert torch.equal(out, model(x, t, y))


def test_activation_checkpointing_of_a_model_without_blocks_is_refused(tmp_path, tiny):
    out = run_script("train.py", "-e", str(tmp_path / "run"), *tiny, "train.steps=1", "train.grad_checkpoint=true")
    assert out.returncode == 2 and "train.grad_checkpoint recomputes the blocks of DiT and UNet models" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    """The tiny DiT's arguments, and its run on 2 DDP processes (4 steps), which the sharded runs compare with."""
    tmp = tmp_path_factory.mktemp("ddp")
    common = [f"data.path={mnist_subset(tmp / 'mnist')}", *TINY_DIT]
    out = run_script("train.py", "-e", str(tmp / "ddp"), *common, "train.steps=4", launcher=DDP)
    assert out.returncode == 0, out.stderr[-3000:]
    return common, tmp / "ddp"


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_dit):
    """The tiny DiT trained 4 steps: FSDP on 2 processes straight through; FSDP stopped at step 2 and resumed;
    FSDP resumed at step 2 on 3 processes."""
    tmp = tmp_path_factory.mktemp("fsdp")
    common, runs = tiny_dit[0], {name: tmp / name for name in ("straight", "resumed", "three")}
    runs["ddp"] = tiny_dit[1]
    out = {}
    out["straight"] = run_script("train.py", "-e", str(runs["straight"]), *common, "train.steps=4", launcher=fsdp(2))
    out["first"] = run_script("train.py", "-e", str(runs["resumed"]), *common, "train.steps=2", launcher=fsdp(2))
    out["resumed"] = run_script("train.py", "-e", str(runs["resumed"]), *common, "train.steps=4", launcher=fsdp(2))
    shutil.copytree(runs["resumed"], runs["three"])
    shutil.rmtree(runs["three"] / "checkpoints" / checkpoint_name(4))
    out["three"] = run_script("train.py", "-e", str(runs["three"]), *common, "train.steps=4", launcher=fsdp(3))
    return runs, out, common


def test_fsdp_trains_as_ddp_does(fsdp_runs):
    runs, out, _ = fsdp_runs
    assert out["straight"].returncode == 0, out["straight"].stderr[-3000:]
    assert "2 process(es)" in out["straight"].stdout
    # Each process holds half of every sharded parameter: the weights files are full nonetheless.
    for name in ("model", "ema"):
        sharded, replicated = weights(runs["straight"], 4, name), weights(runs["ddp"], 4, name)
        assert sharded.keys() == replicated.keys()
        assert all(torch.allclose(sharded[k], replicated[k], atol=1e-6) for k in sharded), name
        assert not all(torch.equal(sharded[k], weights(runs["straight"], 2, name)[k]) for k in sharded)
    assert (runs["straight"] / "samples" / "step_0000004.png").is_file()
    assert (runs["straight"] / "checkpoints" / checkpoint_name(4) / "train_state" / "pytorch_model_fsdp_0").is_dir()


def test_fsdp_resumes_bitwise_and_on_another_number_of_processes(fsdp_runs):
    runs, out, _ = fsdp_runs
    for name in ("first", "resumed", "three"):
        assert out[name].returncode == 0, out[name].stderr[-3000:]
    assert "resumed from" in out["resumed"].stdout and "3 process(es)" in out["three"].stdout
    for name in ("model", "ema"):
        a, b = weights(runs["straight"], 4, name), weights(runs["resumed"], 4, name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ after resuming"
        three = weights(runs["three"], 4, name)  # the same data and draws; reductions in another order
        assert all(torch.allclose(a[k], three[k], atol=1e-5) for k in a), name


def test_fsdp_weights_sample_without_accelerate_and_checkpoints_resume_only_as_trained(fsdp_runs, tmp_path):
    runs, _, common = fsdp_runs
    out = run_script("sample.py", "--weights", str(runs["straight"] / "checkpoints" / checkpoint_name(4)),
                     "--n-samples", "3", "--steps", "2", "--save-dir", str(tmp_path / "samples"))
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "samples").glob("*.png"))) == 3
    shutil.copytree(runs["straight"], tmp_path / "run")
    out = run_script("train.py", "-e", str(tmp_path / "run"), *common, "train.steps=6")  # one process, no FSDP
    assert out.returncode == 2 and "holds the training state of FSDP and this run uses DDP" in out.stderr
    assert "Traceback" not in out.stderr
    assert (tmp_path / "run" / "checkpoints" / checkpoint_name(4) / "ema.safetensors").is_file()


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed (with transformers, which accelerate's DeepSpeed plugin "
                                               "imports) is not installed: pip install --no-build-isolation deepspeed "
                                               "transformers")
def test_deepspeed_zero2_trains_as_ddp_does_resumes_bitwise_and_samples(tiny_dit, tmp_path):
    common, ddp = tiny_dit
    straight = run_deepspeed("train.py", "-e", str(tmp_path / "straight"), *common, "train.steps=4")
    assert straight.returncode == 0, straight.stderr[-3000:]
    for name in ("model", "ema"):  # ZeRO-2 splits the optimizer state and gradients: the same training
        a, b = weights(tmp_path / "straight", 4, name), weights(ddp, 4, name)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    for steps in (2, 4):
        out = run_deepspeed("train.py", "-e", str(tmp_path / "resumed"), *common, f"train.steps={steps}")
        assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout
    for name in ("model", "ema"):
        a, b = weights(tmp_path / "straight", 4, name), weights(tmp_path / "resumed", 4, name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ after resuming"
    out = run_script("sample.py", "--weights", str(tmp_path / "straight" / "checkpoints" / checkpoint_name(4)),
                     "--n-samples", "2", "--steps", "2", "--save-dir", str(tmp_path / "samples"))
    assert out.returncode == 0, out.stderr
    # DeepSpeed cannot re-split its optimizer state over another number of processes: refused in one line.
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / checkpoint_name(4))
    out = run_deepspeed("train.py", "-e", str(tmp_path / "resumed"), *common, "train.steps=4", processes=3)
    assert out.returncode != 0
    assert "holds DeepSpeed's optimizer state split over 2 processes and this run has 3" in out.stderr


def test_alphaflow_and_shortcut_train_under_fsdp(tiny_dit, tmp_path):
    """AlphaFlow's extra forward pass of the sharded model, mid-curriculum, and a shortcut model and MeanFlow's
    interval splitting with targets from the online model train under FSDP; their EMA targets, which FSDP keeps in
    shards, are one clear line."""
    common, _ = tiny_dit
    for name, extra in (("alpha", ["flow.objective=alphaflow", "flow.alpha_steps=[0,4]", "model.time_scale=1"]),
                        ("shortcut", ["flow.objective=shortcut", "flow.shortcut_ema=false"]),
                        ("split", ["flow.objective=meanflow", "flow.meanflow_ratio=1", "flow.meanflow_split=0.5",
                                   "flow.meanflow_split_ema=false", "model.time_scale=1"])):
        out = run_script("train.py", "-e", str(tmp_path / name), *common, *extra, "train.steps=2", launcher=fsdp(2))
        assert out.returncode == 0, out.stderr[-3000:]
        assert all(torch.isfinite(v).all() for v in weights(tmp_path / name, 2, "model").values())
    out = run_script("train.py", "-e", str(tmp_path / "ema"), *common, "flow.objective=shortcut", "train.steps=2",
                     launcher=fsdp(2))
    assert out.returncode != 0 and "use DDP (no FSDP config) or flow.shortcut_ema=false" in out.stderr
    out = run_script("train.py", "-e", str(tmp_path / "split_ema"), *common, "flow.objective=meanflow",
                     "flow.meanflow_split=0.5", "train.steps=2", launcher=fsdp(2))
    assert out.returncode != 0 and "use DDP (no FSDP config) or flow.meanflow_split_ema=false" in out.stderr


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed (with transformers, which accelerate's DeepSpeed plugin "
                                               "imports) is not installed: pip install --no-build-isolation deepspeed "
                                               "transformers")
def test_meanflow_trains_under_deepspeed_with_bf16_weights(tiny_dit, tmp_path):
    """DeepSpeed casts the weights to bf16; MeanFlow's JVP reads them as float32 copies: the run trains to finite
    weights and samples in one jump (it used to stop inside the JVP on a float32 input meeting bf16 weights)."""
    common, _ = tiny_dit
    out = run_deepspeed("train.py", "-e", str(tmp_path / "run"), *common, "flow.objective=meanflow",
                        "model.time_scale=1", "-mp", "bf16", "train.steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run", 2, "model").values())
    sampled = run_script("sample.py", "--weights", str(tmp_path / "run" / "checkpoints" / checkpoint_name(2)),
                         "--n-samples", "2", "--solver", "meanflow", "--steps", "1", "--save-dir", str(tmp_path / "s"))
    assert sampled.returncode == 0, sampled.stderr
