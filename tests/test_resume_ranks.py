"""Every rank's RNG states in the train checkpoint: a 2-process gloo run resumed from its checkpoint equals the
uninterrupted 2-process run bit for bit (the ID loss's jittered views draw from each rank's own torch RNG, so rank 1
continuing with rank 0's states -- what a checkpoint of rank 0's alone gave -- changes the result), and a resume with
another process count reseeds each rank from (seed, step, rank), repeatably, saying so."""

import os
import random
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import torch

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, os.getcwd())
    from mfim.criteria.id_loss import IDLoss
    from mfim.training.distributed import DistInfo
    from tests.test_training import build, fixed_batch, FULL
    rank, world, mode, ck, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + out + ".rdv", rank=rank, world_size=world)
    tr = build(FULL, dist_info=DistInfo(rank, world, rank))
    tr.objective.id_loss = IDLoss(tr.objective.id_loss.embedder, views=2)  # draws from this rank's torch RNG
    torch.manual_seed(100 + rank)  # each rank its own stream, as run_training seeds them (seed + rank)
    first, last = (2, 4) if mode == "resume" else (0, 2 if mode == "first" else 4)
    if mode == "resume":
        torch.manual_seed(1234)  # disturbed: what the run continues with must come from the checkpoint
        tr.resume(ck, seed=0)
    for step in range(first, last):
        b = fixed_batch(step, n=4)
        tr.train_step([{k: v[2 * rank:2 * rank + 2] for k, v in b.items()}])
    if mode == "first":
        tr.save(ck)  # every rank calls it; rank 0 writes
    elif rank == 0:
        torch.save({"encoder": tr.model.encoder.state_dict(), "ema": tr.ema.encoder.state_dict(),
                    "D": tr.D.state_dict()}, out)
    dist.destroy_process_group()
    """
)


def run_two(tmp_path, mode: str, ck, out) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(r), "2", mode, str(ck), str(out)], env=env)
             for r in (0, 1)]
    assert all(p.wait(timeout=300) == 0 for p in procs)


def test_a_resumed_two_process_run_equals_the_uninterrupted_one(tmp_path):
    run_two(tmp_path, "full", "-", tmp_path / "full.pt")
    ck = tmp_path / "ck.pt"
    run_two(tmp_path, "first", ck, tmp_path / "first.pt")
    saved = torch.load(ck, weights_only=True)
    assert len(saved["rng_ranks"]) == 2  # each rank's own, and they differ
    assert not torch.equal(saved["rng_ranks"][0]["torch"], saved["rng_ranks"][1]["torch"])
    run_two(tmp_path, "resume", ck, tmp_path / "resumed.pt")
    a, b = torch.load(tmp_path / "full.pt", weights_only=True), torch.load(tmp_path / "resumed.pt", weights_only=True)
    for part in ("encoder", "ema", "D"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"


def test_another_process_count_reseeds_each_rank_from_seed_step_and_rank(capsys):
    from mfim.training.checkpoint import reseed, rng_state
    from mfim.training.distributed import DistInfo
    from mfim.training.trainer import Trainer
    from tests.test_training import FULL, build

    tr = build(FULL)  # one process
    saved = tr.state_dict(rng_ranks=[rng_state(), rng_state()])  # as made by 2 processes
    saved["step"] = 7
    draws = []
    for rank in (0, 1, 0):  # rank 1 of a 3-process run: its restore alone (no process group needed)
        who = tr if rank == 0 else SimpleNamespace(dist=DistInfo(rank, 3, rank))
        torch.manual_seed(99)
        Trainer.restore_rng(who, saved, seed=5)
        draws.append((torch.rand(3), np.random.rand(), random.random()))
    assert "2 processes, this run has 1: each rank's RNGs are reseeded from (seed 5, step 7, rank)" in \
        capsys.readouterr().out
    assert all(torch.equal(x, y) for x, y in zip(draws[0][:1], draws[2][:1])) and draws[0][1:] == draws[2][1:]
    assert not torch.equal(draws[0][0], draws[1][0])  # rank 1's stream is its own
    reseed(5, 7, 0)
    assert torch.equal(torch.rand(3), draws[0][0])
    reseed(5, 8, 0)
    assert not torch.equal(torch.rand(3), draws[0][0])  # the step counts
