"""The train stage across processes: the launcher (how many, how started), the global batch and its per-process
share, steps counted at the schedule's batch, the data position carried to another process count, the sample grid's
size cap."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mfim.data.shards import EpochPlan
from mfim.launch import process_count, torchrun_args
from mfim.training.run import grid_tile_size, per_process, position_for_world, scheduled_steps
from tests.defaults import default_group, write_params

SCRIPT = textwrap.dedent(
    """
    import os, sys
    print("argv", sys.argv[1:])
    print("tunables", "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""))
    print("world", os.environ.get("WORLD_SIZE"), "local_rank", os.environ.get("LOCAL_RANK"))
    """
)


def _launch(tmp_path, device: str, extra_env: dict) -> str:
    write_params(tmp_path / "params.yaml", {"project": {"device": device}, "train": {"gpus": "auto"}})
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MFIM_NO_REEXEC", "PET_NNODES")}
    env.update(PYTHONPATH=os.getcwd(), **extra_env)
    proc = subprocess.run([sys.executable, "-m", "mfim.launch", "script.py", "--flag", "x"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cpu_runs_one_process_in_place_with_the_allocator_tunables(tmp_path):
    out = _launch(tmp_path, "cpu", {})
    assert "argv ['--flag', 'x']" in out and "tunables True" in out and "world None" in out


def test_torchrun_starts_the_script_when_a_multi_node_rendezvous_is_configured(tmp_path):
    # PET_* are torchrun's own variables for its flags; here a 1-node "cluster" on this machine
    out = _launch(tmp_path, "cpu", {"PET_NNODES": "1", "PET_RDZV_BACKEND": "c10d",
                                    "PET_RDZV_ENDPOINT": "127.0.0.1:0", "PET_RDZV_ID": "mfim-test"})
    assert "argv ['--flag', 'x']" in out and "world 1 local_rank 0" in out and "tunables False" in out


def test_process_count_and_torchrun_flags(monkeypatch):
    assert process_count({"project": {"device": "cpu"}, "train": {"gpus": 8}}) == 1  # CPU: one process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert process_count({"project": {"device": "auto"}, "train": {"gpus": "auto"}}) == 4
    assert process_count({"project": {"device": "cuda"}, "train": {"gpus": 2}}) == 2
    assert process_count({"project": {"device": "auto"}, "warmstart": {"gpus": 3}}, "warmstart.gpus") == 3
    with pytest.raises(ValueError, match="train.gpus is 8 but this machine has 4 visible GPUs"):
        process_count({"project": {"device": "auto"}, "train": {"gpus": 8}})
    with pytest.raises(ValueError, match="train.gpus must be auto or a positive integer"):
        process_count({"project": {"device": "auto"}, "train": {"gpus": "all"}})
    assert torchrun_args(4, "s.py", ["a"], {}) == ["--standalone", "--nproc-per-node=4", "s.py", "a"]
    assert torchrun_args(4, "s.py", [], {"PET_NNODES": "2"}) == ["--nproc-per-node=4", "s.py"]


def test_the_batch_is_global_and_refused_in_one_line_when_it_does_not_split():
    assert per_process({"batch_size": 8}, "batch_size", 1) == 8  # one process: the value keeps its meaning
    assert per_process({"batch_size": 64}, "batch_size", 8) == 8
    assert per_process({"gt_swap_pairs": 0}, "gt_swap_pairs", 4) == 0
    with pytest.raises(ValueError) as e:
        per_process({"batch_size": 8}, "batch_size", 3)
    assert "\n" not in str(e.value) and "train.batch_size 8" in str(e.value) and "3 processes" in str(e.value)


def test_steps_are_counted_at_the_schedule_batch():
    assert scheduled_steps(default_group("train", steps=100, batch_size=8, schedule_batch=None)) == 100  # as given
    paper = default_group("train", steps=300000, batch_size=8, grad_accum=1, schedule_batch=8)
    assert scheduled_steps(paper) == 300000
    assert scheduled_steps({**paper, "batch_size": 64}) == 37500  # 2.4 M samples either way
    assert scheduled_steps({**paper, "batch_size": 16, "grad_accum": 2}) == 75000
    assert scheduled_steps({**paper, "batch_size": 48}) == 50000
    assert scheduled_steps({**paper, "steps": 10, "batch_size": 3, "schedule_batch": 2}) == 7  # 20 samples: rounded up


def _read_by(world: int, n: int, epoch: int, offset: int, seed: int = 5) -> set[int]:
    """Every sample the ranks of a ``world``-process run have read of ``epoch`` when each is at ``offset``."""
    return {int(i) for r in range(world) for i in EpochPlan(n, seed, r, world).epoch_indices(epoch)[:offset]}


@pytest.mark.parametrize("old,new", [(2, 1), (1, 4), (2, 4), (4, 2), (3, 2)])
def test_a_resume_with_another_process_count_continues_after_the_samples_read(old, new):
    n, step_batch = 48, 12  # global batch 12 splits over 1, 2, 3 and 4 processes
    for steps in (0, 1, 3):
        offset = steps * step_batch // old
        pos = position_for_world({"epoch": 2, "offset": offset}, old, new, n)
        assert pos["epoch"] == 2 and _read_by(new, n, 2, pos["offset"]) == _read_by(old, n, 2, offset)
    assert position_for_world({"epoch": 2, "offset": 5}, 2, 2, n) == {"epoch": 2, "offset": 5}
    assert position_for_world(None, old, new, n) is None


def test_an_epoch_tail_the_new_count_cannot_split_starts_the_next_epoch():
    # 11 samples: 1 process reads all 11; after 10 of them, 2 processes (epochs of 5 each) start epoch 1
    assert position_for_world({"epoch": 0, "offset": 10}, 1, 2, 11) == {"epoch": 1, "offset": 0}
    assert position_for_world({"epoch": 0, "offset": 8}, 1, 2, 11) == {"epoch": 0, "offset": 4}


def test_sample_grid_is_capped_at_a_browser_size():
    from mfim.evaluation.grids import image_grid

    small = [torch.zeros(6, 3, 64, 64)] * 4
    assert grid_tile_size(small, 2048) is None  # the embedded default's grid: native size
    big = [torch.zeros(6, 3, 1024, 1024)] * 2 + [torch.zeros(6, 3, 256, 256)] * 2
    size = grid_tile_size(big, 2048)
    grid = image_grid(big, size=size)
    assert max(grid.shape[:2]) <= 2048 and max(grid.shape[:2]) > 2048 - 6 * 2 - 7
    assert max(image_grid(big).shape[:2]) == 6 * 1024 + 7 * 2  # uncapped: 6,158 px
    assert grid_tile_size(big, 0) is None
    assert np.asarray(grid).dtype == np.uint8


def test_the_training_index_keeps_no_json_and_reads_the_same_samples(tmp_path):
    from mfim.data import shards as S
    from tests.test_shards import make_fixture_shards

    make_fixture_shards(tmp_path)
    pattern = str(tmp_path / "train-*.tar")
    full, lean = S.ShardIndex(pattern), S.ShardIndex(pattern, keep_metas=False)
    assert lean.metas is None and lean.keys == full.keys and np.array_equal(lean.identities, full.identities)
    for i in (0, len(full) - 1):
        a, b = full.read(i), lean.read(i)
        assert a.key == b.key and np.array_equal(a.image, b.image) and a.meta == b.meta


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, time, torch
    from mfim.training.distributed import init_from_env
    init_from_env(torch.device("cpu"))
    print("worker", os.getpid(), flush=True)
    time.sleep(120)
    """
)


def test_torchrun_workers_end_when_the_launcher_is_killed(tmp_path):
    """SIGKILL reaches the launcher (torchrun's agent) only; its workers must not train on beside the next run."""
    import signal
    import time

    write_params(tmp_path / "params.yaml", {"project": {"device": "cpu"}})
    (tmp_path / "script.py").write_text(ORPHAN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), PET_NNODES="1", PET_RDZV_BACKEND="c10d",
               PET_RDZV_ENDPOINT="127.0.0.1:0", PET_RDZV_ID="mfim-orphan")
    proc = subprocess.Popen([sys.executable, "-m", "mfim.launch", "script.py"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, text=True)
    line = ""
    while not line.startswith("worker"):
        line = proc.stdout.readline()
        assert line, "the launcher ended before its worker started"
    worker = int(line.split()[1])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for _ in range(100):
        try:  # gone, or a zombie nobody reaped yet (in a container, PID 1 may not)
            if "\nState:\tZ" in (Path("/proc") / str(worker) / "status").read_text():
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its launcher")


def test_self_starting_stages_use_the_launchers_count_and_flags(monkeypatch):
    """warmstart and evaluate start themselves under torchrun through mfim.launch.torchrun_command: the same count
    (every visible GPU, one process on CPU or inside torchrun) and flags as the train stage's launcher."""
    from mfim.launch import torchrun_command

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in ("PET_NNODES", "PET_RDZV_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    params = {"project": {"device": "auto"}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gpus, expected in ((1, None), (3, "--nproc-per-node=3")):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        argv = torchrun_command(params, "/x/stage.py", key=None)
        assert (argv if argv is None else argv[4]) == expected
    assert argv == [sys.executable, "-m", "torch.distributed.run", *torchrun_args(3, "/x/stage.py", [], {})]
    assert torchrun_command({"project": {"device": "cpu"}}, "/x/stage.py", key=None) is None
    monkeypatch.setenv("WORLD_SIZE", "3")  # already one of torchrun's processes
    assert torchrun_command(params, "/x/stage.py", key=None) is None


def test_a_self_starting_stage_runs_in_place_on_cpu_and_under_torchrun_with_a_rendezvous(tmp_path):
    write_params(tmp_path / "params.yaml", {"project": {"device": "cpu"}})
    (tmp_path / "stage.py").write_text(textwrap.dedent(
        """
        import os
        from mfim.launch import relaunch_on_every_gpu
        relaunch_on_every_gpu({"project": {"device": "cpu"}}, __file__)
        print("world", os.environ.get("WORLD_SIZE"))
        """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_") and k != "WORLD_SIZE"}
    env.update(PYTHONPATH=os.getcwd())
    run = lambda extra: subprocess.run([sys.executable, "stage.py"], cwd=tmp_path, env={**env, **extra},  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    one = run({})
    assert one.returncode == 0 and "world None" in one.stdout, one.stderr[-2000:]
    rdzv = run({"PET_NNODES": "1", "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "127.0.0.1:0",
                "PET_RDZV_ID": "mfim-stage-test"})
    assert rdzv.returncode == 0 and "world 1" in rdzv.stdout, rdzv.stderr[-2000:]
