"""Runs that survive a cluster: stop signals, one writer per run folder, config changes on resume, a full disk, logs."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, finish, run_script, start_ranks, start_script, wait_for
from safetensors.torch import load_file

from cluster import STOPPED
from models.checkpoint import checkpoint_name, list_checkpoints

COMMON = ["model.width=32", "model.depth=2", "model.time_dim=16", "train.batch_size=32", "data.size=512",
          "train.log_every=5", "train.preview_every=0", "train.preview_n=64", "train.preview_steps=2",
          "train.trackers=[]", "train.checkpoint_every=1000", "flow.coupling=ot"]


def weights(run, step, name="model"):
    return load_file(str(run / "checkpoints" / checkpoint_name(step) / f"{name}.safetensors"))


def same_weights(run_a, run_b, step) -> bool:
    for name in ("model", "ema"):
        a, b = weights(run_a, step, name), weights(run_b, step, name)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def logged_steps(run) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigterm_at_a_random_step_saves_that_step_and_resumes_bitwise(tmp_path):
    """SIGTERM mid-run: the current step finishes, a checkpoint is written at it, exit status 75; running the same
    command again ends bitwise where an uninterrupted run ends."""
    args = ["train.py", "-e", str(tmp_path / "run"), *COMMON, "train.steps=400"]
    job = start_script(*args)
    wait_for(lambda: logged_steps(tmp_path / "run") >= random.randint(2, 20), what="training to start")
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == STOPPED, err
    (step, path), = list_checkpoints(tmp_path / "run")
    assert 10 <= step < 400 and f"stopped by SIGTERM at step {step} of 400, checkpoint {path}; run the same command " \
                                "to resume" in out
    assert "SIGTERM: stopping at the next safe point" in err and "Traceback" not in err
    resumed = run_script(*args)
    assert resumed.returncode == 0 and f"resumed from {path} at step {step}" in resumed.stdout, resumed.stderr
    once = run_script("train.py", "-e", str(tmp_path / "once"), *COMMON, "train.steps=400")
    assert once.returncode == 0, once.stderr
    assert same_weights(tmp_path / "run", tmp_path / "once", 400)


def test_sigterm_to_the_whole_process_group_with_loader_workers(tmp_path):
    """A scheduler (and Ctrl-C) signals every process of the job, the data loader's workers too: they leave it
    to the training process, which stops cleanly and ends them."""
    import os

    args = ["train.py", "-e", str(tmp_path / "run"), *COMMON, "data.num_workers=2", "train.steps=100000"]
    job = start_script(*args, new_session=True)
    wait_for(lambda: logged_steps(tmp_path / "run") >= 2, what="training to start")
    os.killpg(job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == STOPPED and "Traceback" not in err, err
    (step, path), = list_checkpoints(tmp_path / "run")
    assert f"stopped by SIGTERM at step {step} of 100000" in out


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """Two gloo processes; SIGTERM reaches rank 1 only. Both stop after the same step, one checkpoint is written by
    them together, both exit 75, and the resumed pair ends bitwise where an uninterrupted pair ends."""
    args = ["train.py", "-e", str(tmp_path / "run"), *COMMON, "train.steps=300"]
    ranks = start_ranks(*args)
    wait_for(lambda: logged_steps(tmp_path / "run") >= 2, what="training to start")
    ranks[1].send_signal(signal.SIGTERM)
    stopped = finish(ranks)
    assert [r.returncode for r in stopped] == [STOPPED, STOPPED], [r.stderr for r in stopped]
    (step, path), = list_checkpoints(tmp_path / "run")
    assert f"stopped by SIGTERM at step {step} of 300" in stopped[0].stdout
    assert {p.name for p in (path / "train_state").iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl"}
    resumed = finish(start_ranks(*args))
    assert [r.returncode for r in resumed] == [0, 0], [r.stderr for r in resumed]
    once = finish(start_ranks("train.py", "-e", str(tmp_path / "once"), *COMMON, "train.steps=300"))
    assert [r.returncode for r in once] == [0, 0], [r.stderr for r in once]
    assert same_weights(tmp_path / "run", tmp_path / "once", 300)


def test_a_repeated_signal_is_one_request_and_a_second_one_exits_at_once(tmp_path):
    """A launcher passes on the signal it got (Ctrl-C reaches it and the training process): a repeat within a second
    is the same request. A second signal after that exits at once, without saving."""
    import time

    twice = start_script("-c", BUSY_BEFORE_TRAINING, "-e", str(tmp_path / "twice"), *COMMON, "train.steps=50")
    wait_for(lambda: (tmp_path / "twice" / "busy").exists(), what="the busy start")
    twice.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    twice.send_signal(signal.SIGTERM)
    out, err = twice.communicate(timeout=60)
    assert twice.returncode == STOPPED and "stopped by SIGTERM at step 1 of 50" in out, err
    again = start_script("-c", BUSY_BEFORE_TRAINING, "-e", str(tmp_path / "again"), *COMMON, "train.steps=50")
    wait_for(lambda: (tmp_path / "again" / "busy").exists(), what="the busy start")
    again.send_signal(signal.SIGINT)
    time.sleep(1.5)
    again.send_signal(signal.SIGINT)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 128 + signal.SIGINT and "SIGINT again: exiting now, without saving" in err, err
    assert not list_checkpoints(tmp_path / "again")


BUSY_BEFORE_TRAINING = """
import sys, time
import data
build = data.build_loader
def build_loader(*args, **kwargs):  # the start of training takes a while (as a large dataset's first batch)
    open(sys.argv[sys.argv.index("-e") + 1] + "/busy", "w").close()
    time.sleep(6)
    return build(*args, **kwargs)
data.build_loader = build_loader
import train
train.build_loader = build_loader
train.main(sys.argv[1:])
"""


def test_one_writer_per_run_folder_and_none_left_after_a_crash(tmp_path):
    first = start_script("train.py", "-e", str(tmp_path / "run"), *COMMON, "train.steps=100000")
    wait_for(lambda: logged_steps(tmp_path / "run") >= 1, what="the first run to start")
    second = run_script("train.py", "-e", str(tmp_path / "run"), *COMMON, "train.steps=100000")
    assert second.returncode == 2
    assert second.stderr.strip().startswith(f"error: run folder {tmp_path / 'run'} is being trained by process "
                                            f"{first.pid} on "), second.stderr
    assert "wait for it to finish, stop it, or choose another folder with -e" in second.stderr
    first.send_signal(signal.SIGKILL)  # a crash: no time to release anything
    first.communicate(timeout=60)
    third = run_script("train.py", "-e", str(tmp_path / "run"), *COMMON, "train.steps=20")
    assert third.returncode == 0, third.stderr
    # evaluate.py on a folder being trained stays allowed: it writes only eval/.
    busy = start_script("train.py", "-e", str(tmp_path / "run"), *COMMON, "train.steps=100000")
    wait_for(lambda: logged_steps(tmp_path / "run") >= 6, what="the run to start again")
    evaluated = run_script("evaluate.py", "-e", str(tmp_path / "run"), "--checkpoints", "last", "--samplers", "euler:2",
                           "--n-samples", "50")
    busy.kill()
    busy.communicate(timeout=60)
    assert evaluated.returncode == 0, evaluated.stderr


@pytest.mark.parametrize(("change", "shown"), [
    (["flow.coupling=independent"], "flow.coupling 'ot' → 'independent'"),
    (["train.lr=3e-4"], "train.lr 0.001 → 0.0003"),
    (["data.size=256"], "data.size 512 → 256"),
    (["model.width=64", "train.seed=1"], "model.width 32 → 64, train.seed 0 → 1"),
])
def test_a_changed_config_is_refused_naming_each_key_unless_accepted(tmp_path, change, shown):
    first = run_script("train.py", "-e", str(tmp_path), *COMMON, "train.steps=10", "train.checkpoint_every=5")
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "config.yaml").read_text()
    out = run_script("train.py", "-e", str(tmp_path), *COMMON, "train.steps=20", *change)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: run folder {tmp_path} was trained with another config: {shown}; start a new run with another -e, "
        "or continue this one with the change on purpose with --accept-changes"), out.stderr
    assert (tmp_path / "config.yaml").read_text() == before  # nothing written
    if "model.width=64" in change:  # accepting it fails on the weights' shapes: the folder stays as it was
        failed = run_script("train.py", "-e", str(tmp_path), *COMMON, "train.steps=20", *change, "--accept-changes")
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
        assert (tmp_path / "config.yaml").read_text() == before
        resumed = run_script("train.py", "-e", str(tmp_path), *COMMON, "train.steps=20")
        assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
        return
    accepted = run_script("train.py", "-e", str(tmp_path), *COMMON, "train.steps=20", *change, "--accept-changes")
    assert accepted.returncode == 0 and f"config: changed with --accept-changes: {shown}" in accepted.stdout


def test_allowed_config_changes_are_applied_and_logged(tmp_path):
    first = run_script("train.py", "-e", str(tmp_path), *COMMON, "train.steps=10", "train.checkpoint_every=5")
    assert first.returncode == 0, first.stderr
    out = run_script("train.py", "-e", str(tmp_path), *COMMON, "train.steps=30", "train.checkpoint_every=10",
                     "train.log_every=10", "train.keep_last=1", "sample.solver=heun")
    assert out.returncode == 0, out.stderr
    assert ("config: changed train.steps 10 → 30, train.log_every 5 → 10, train.checkpoint_every 5 → 10, "
            "train.keep_last 3 → 1, sample.solver 'euler' → 'heun'") in out.stdout
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30]  # keep_last 1, checkpoints every 10
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [5, 10, 20, 30]


ENOSPC_AT_STEP_10 = """
import errno, sys
import models.checkpoint as checkpoint
real = checkpoint.save_file
def save_file(tensors, path, metadata=None):
    if "step_0000010" in path:  # half a file written, then the disk is full
        open(path, "wb").write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    real(tensors, path, metadata=metadata)
checkpoint.save_file = save_file
import train
train.main(sys.argv[1:])
"""


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_to_resume_from(tmp_path):
    common = [*COMMON, "train.checkpoint_every=5", "train.steps=15"]
    full = run_script("-c", ENOSPC_AT_STEP_10, "-e", str(tmp_path / "run"), *common)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert full.stderr.strip().splitlines()[-1].startswith(
        f"error: no space left on the device while writing {tmp_path / 'run' / 'checkpoints' / '.tmp_step_0000010'}")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000005"]  # no partial one
    resumed = run_script("train.py", "-e", str(tmp_path / "run"), *common)  # space freed: the same command
    assert resumed.returncode == 0 and "step_0000005 at step 5" in resumed.stdout, resumed.stderr
    once = run_script("train.py", "-e", str(tmp_path / "once"), *common)
    assert once.returncode == 0 and same_weights(tmp_path / "run", tmp_path / "once", 15)


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (needs mount rights: root in a container that allows it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode().strip() or made.returncode}); the "
                    "injected ENOSPC test covers checkpoints")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_really_full_disk_stops_training_sampling_and_evaluation_with_one_line(tmp_path, small_disk):
    run = small_disk / "run"
    out = run_script("train.py", "-e", str(run), *COMMON, "model.width=64", "train.steps=200",
                     "train.checkpoint_every=5", "train.keep_last=100")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no space left on the device while writing ") and "MiB free there)" in line
    checkpoints = list_checkpoints(run)
    assert checkpoints and not list((run / "checkpoints").glob(".tmp_*"))
    last = checkpoints[-1][1]  # the newest complete checkpoint loads and samples
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    made = run_script("sample.py", "--weights", str(last), "--n-samples", "10", "--steps", "2", "--save-dir",
                      str(tmp_path / "samples"))
    assert made.returncode == 0, made.stderr
    subprocess.run(["mount", "-o", "remount,size=" + str(_used_kib(small_disk) + 8) + "k", str(small_disk)],
                   check=True)
    samples = run_script("sample.py", "--weights", str(last), "--n-samples", "3000", "--steps", "2", "--save-dir",
                         str(small_disk / "samples"))
    assert samples.returncode == 2 and samples.stderr.strip().startswith(
        f"error: no space left on the device while writing {small_disk / 'samples'}"), samples.stderr
    assert not list((small_disk / "samples").glob(".tmp_*"))  # every sample file is whole or absent
    report = run_script("evaluate.py", "-e", str(run), "--checkpoints", str(checkpoints[-1][0]), "--samplers",
                        "euler:2", "--n-samples", "50", "--out", str(small_disk / "eval"))
    assert report.returncode == 2 and "error: no space left on the device while writing" in report.stderr


def _used_kib(mount) -> int:
    import shutil

    return shutil.disk_usage(mount).used // 1024


def test_a_log_file_gets_plain_progress_lines_not_bar_refreshes(tmp_path):
    out = run_script("train.py", "-e", str(tmp_path), *COMMON, "train.steps=20")  # stderr is a pipe here
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "training: 20/20 (100%)" in out.stderr, out.stderr


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "run"
    out = run_script("train.py", "-e", str(run), *COMMON, "train.steps=20")
    assert out.returncode == 0, out.stderr
    return run


def test_sigterm_stops_sampling_after_the_current_batch_and_the_same_command_finishes(toy_checkpoint, tmp_path):
    args = ["sample.py", "--weights", str(toy_checkpoint / "checkpoints" / "step_0000020"), "--n-samples", "3000",
            "--bspp", "20", "--solver", "rk4", "--steps", "50", "--save-dir", str(tmp_path / "stopped")]
    job = start_script(*args)
    wait_for(lambda: len(list((tmp_path / "stopped").glob("0*.npy"))) >= 100, what="samples to appear")
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    written = len(list((tmp_path / "stopped").glob("0*.npy")))
    assert job.returncode == STOPPED and written < 3000, err
    assert f"stopped by SIGTERM: {written} of 3000 samples in {tmp_path / 'stopped'}; run the same command to " \
           "continue" in err
    assert not list((tmp_path / "stopped").glob(".tmp_*"))  # the batch under way was finished, not cut
    again = run_script(*args)
    assert again.returncode == 0 and f"3000 samples ({written} already in" in again.stdout, again.stderr
    once = run_script(*args[:-1], str(tmp_path / "once"))
    assert once.returncode == 0
    assert all((tmp_path / "stopped" / f"{k:06d}.npy").read_bytes() == (tmp_path / "once" / f"{k:06d}.npy").read_bytes()
               for k in range(3000))


def test_sigterm_stops_an_evaluation_keeping_the_finished_rows(toy_checkpoint, tmp_path):
    args = ["evaluate.py", "-e", str(toy_checkpoint), "--samplers", "euler:2,rk4:400", "--n-samples", "500",
            "--bspp", "10", "--out", str(tmp_path / "eval")]
    job = start_script(*args)
    wait_for(lambda: (tmp_path / "eval" / "report.json").is_file(), what="the first row")
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == STOPPED, err
    assert "stopped by SIGTERM: the rows finished are in the report, the one under way is dropped; run the same " \
           "command to continue" in err
    rows = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert [r["solver"] for r in rows] == ["euler"]
    again = run_script(*args)
    assert again.returncode == 0 and again.stdout.count("already in the report") == 1, again.stderr
    assert [r["solver"] for r in json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]] == ["euler",
                                                                                                       "rk4"]


@pytest.mark.parametrize("world", ["1", "2"])
@pytest.mark.parametrize("body, status, stderr", [("pass", 0, ""), ("sys.exit(2)", 2, ""),
                                                  ("sys.exit('error: bad')", 1, "error: bad")])
def test_a_process_of_a_multi_process_run_exits_with_its_status_and_all_its_output(tmp_path, world, body, status,
                                                                                  stderr):
    """train.py, sample.py and evaluate.py exit through run_main; a process of a multi-process run skips the
    interpreter's teardown (gloo's threads can abort it), which must lose neither its status nor its piped output."""
    script = tmp_path / "script.py"
    script.write_text("import sys\nfrom cluster import run_main\n\ndef main():\n    print('x' * 100)\n"
                      f"    print('last line')\n    {body}\n\nrun_main(main)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # piped output is buffered, as it is
    env.update(PYTHONPATH=str(ROOT), WORLD_SIZE=world)                       # for a launcher's processes
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == status
    assert done.stdout.endswith("last line\n") and done.stderr.strip() == stderr
