"""Training loop: per-term decrease, λ=0 removes a term's gradient, bit-exact resume, crash-safe checkpoints, NaN
stop, and 2-process gloo data parallelism matching 1 process on the same global batch."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mfim.criteria.id_loss import IDLoss
from mfim.criteria.recon_loss import ReconLoss
from mfim.criteria.threedmm_loss import ThreeDMMLoss
from mfim.models.mfim import MFIM
from mfim.training.checkpoint import atomic_torch_save, load_checkpoint
from mfim.training.objective import LossWeights, MFIMObjective
from mfim.training.presets import apply_preset
from mfim.training.trainer import Trainer, TrainingDiverged
from tests.stubs import Stub3DMM, StubDiscriminator, StubEmbedder, StubGenerator
from tests.defaults import loss_weights, params_with, train_config, unit_encoder

RES = 16


def batch_norm_instead_of_group_norm(module: torch.nn.Module) -> None:
    """The paper's IR-SE50 norm (BatchNorm) in the small backbone, which has GroupNorm."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.GroupNorm):
            setattr(module, name, torch.nn.BatchNorm2d(child.num_channels))
        else:
            batch_norm_instead_of_group_norm(child)


def build(weights: LossWeights, seed=0, dist_info=None, norm="group", scramble=False, style_maps=True, **cfg):
    torch.manual_seed(seed)
    model = MFIM(StubGenerator(RES, channels=8, w_dim=8), unit_encoder(input_size=RES, width=8,
                 style_map_resolutions=(8,), style_maps=style_maps), coarse_max_res=4)
    if norm == "batch":
        batch_norm_instead_of_group_norm(model.encoder)
    torch.manual_seed(seed + 1)
    objective = MFIMObjective(weights, id_loss=IDLoss(StubEmbedder()), recon=ReconLoss(None),
                              threedmm=ThreeDMMLoss(Stub3DMM()), discriminator=StubDiscriminator())
    if scramble:  # other trainable weights, the same frozen networks
        with torch.no_grad():
            for p in list(model.encoder.parameters()) + list(objective.discriminator.parameters()):
                p.add_(torch.randn_like(p))
    return Trainer(model, objective, train_config(lr=2e-3, d_lr=2e-3, log_every=1, **{"steps": 600, **cfg}),
                                                  torch.device("cpu"),
                   dist_info)


def fixed_batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return {"src": torch.rand(n, 3, RES, RES, generator=g) * 2 - 1, "tgt": torch.rand(n, 3, RES, RES, generator=g) * 2 - 1}


class ListSource:
    """Deterministic, resumable batch source: batch k is a pure function of (seed, k)."""

    def __init__(self, seed=0, n=4):
        self.seed, self.n, self.pos = seed, n, 0

    def __iter__(self):
        return self

    def __next__(self):
        b = fixed_batch(self.seed * 1000 + self.pos, self.n)
        self.pos += 1
        return b

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


ONLY = dict(id=0.0, l1=0.0, lpips=0.0, adv=0.0, r1=0.0, shape=0.0, pose=0.0, exp=0.0, recon_cross_identity=1.0,
            background_l1=0.0)


@pytest.mark.parametrize("term", ["id", "l1", "adv", "shape", "pose", "exp"])
def test_each_term_decreases_on_a_fixed_batch(term):
    w = loss_weights(**{**ONLY, term: 1.0})
    tr = build(w)
    if tr.opt_d is not None:  # keep D fixed so the adversarial term is a stationary target
        for g in tr.opt_d.param_groups:
            g["lr"] = 0.0
    batch = fixed_batch()
    first = tr.train_step([batch])[term]
    for _ in range(15):
        last = tr.train_step([batch])[term]
    assert last < first * 0.97, (term, first, last)


def grads_of(weights: LossWeights):
    tr = build(weights)
    b = fixed_batch()
    x_swap = tr.model(b["src"], b["tgt"])
    total, _ = tr.objective.encoder_terms(x_swap, b["src"], b["tgt"])
    tr.model.encoder.zero_grad()
    total.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in tr.model.encoder.parameters()]


def test_zero_lambda_removes_the_term_gradient():
    both = grads_of(loss_weights(**{**ONLY, "l1": 1.0, "id": 1.0}))
    l1_only = grads_of(loss_weights(**{**ONLY, "l1": 1.0}))
    id_zero = grads_of(loss_weights(**{**ONLY, "l1": 1.0, "id": 0.0}))
    assert all(torch.equal(a, b) for a, b in zip(id_zero, l1_only))
    assert any(not torch.allclose(a, b) for a, b in zip(both, l1_only))


def test_presets_switch_terms_and_maps():
    p = {"train": {"config": "C"}, "encoder": {"style_maps": True}, "loss": {"shape": 2.0, "pose": 1.0, "exp": 1.0}}
    q = apply_preset(p)
    assert q["encoder"]["style_maps"] and q["loss"]["shape"] == 2.0 and q["loss"]["pose"] == 0 and q["loss"]["exp"] == 0
    assert not apply_preset({**p, "train": {"config": "A"}})["encoder"]["style_maps"]
    with pytest.raises(ValueError):
        apply_preset({**p, "train": {"config": "Z"}})


FULL = loss_weights(id=1.0, l1=1.0, lpips=0.0, adv=0.1, r1=1.0, r1_every=2, shape=0.5, pose=0.5, exp=0.5,
                    recon_cross_identity=1.0, background_l1=0.0)


def test_resume_is_bit_exact(tmp_path):
    n = 3
    a = build(FULL, checkpoint_every=100)
    src_a = ListSource()
    a.fit(src_a, steps=2 * n, progress=False)

    b = build(FULL, checkpoint_every=100)
    src_b = ListSource()
    b.fit(src_b, steps=n, progress=False)
    b.save(tmp_path / "ck.pt", data_state=src_b.state_dict())
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it

    c = build(FULL, checkpoint_every=100)  # same frozen networks (they come from files, not the checkpoint) ...
    with torch.no_grad():  # ... but scrambled trainable weights: those must all come from the checkpoint
        for p in list(c.model.encoder.parameters()) + list(c.D.parameters()) + list(c.ema.encoder.parameters()):
            p.add_(torch.randn_like(p))
    src_c = ListSource()
    src_c.load_state_dict(c.resume(tmp_path / "ck.pt"))
    c.fit(src_c, steps=2 * n, progress=False)

    assert c.step == a.step == 2 * n
    for p, q in zip(a.model.encoder.state_dict().values(), c.model.encoder.state_dict().values()):
        assert torch.equal(p, q)
    for p, q in zip(a.ema.encoder.state_dict().values(), c.ema.encoder.state_dict().values()):
        assert torch.equal(p, q)
    for p, q in zip(a.D.state_dict().values(), c.D.state_dict().values()):
        assert torch.equal(p, q)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    tr = build(FULL, checkpoint_every=1)
    tr.checkpoint_path = tmp_path / "ck.pt"
    tr.fit(ListSource(), steps=2, progress=False)
    good = load_checkpoint(tmp_path / "ck.pt")
    bad = fixed_batch()
    bad["src"][0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="step 2"):
        tr.fit(iter([bad] * 5), steps=4, progress=False)
    kept = load_checkpoint(tmp_path / "ck.pt")
    assert kept["step"] == good["step"] == 2


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    from mfim.training import checkpoint
    path = sys.argv[1]
    checkpoint.atomic_torch_save({"step": 1, "w": torch.ones(1000)}, path)
    print("first", flush=True)
    real_fsync = os.fsync
    def slow_fsync(fd):
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = slow_fsync
    checkpoint.atomic_torch_save({"step": 2, "w": torch.zeros(10_000_000)}, path)
    """
)


def _kill_during_second_write(path):
    """Run KILL_SCRIPT: one complete checkpoint at ``path``, then SIGKILL while the second is being written."""
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "first"
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_checkpoint_killed_mid_write_leaves_previous_usable(tmp_path):
    path = tmp_path / "ck.pt"
    _kill_during_second_write(path)
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(1000))
    assert any(p.name.endswith(".part") for p in tmp_path.iterdir())  # the half-written file never took the name


def test_stale_part_files_of_a_killed_write_are_removed_at_start(tmp_path, caplog):
    from mfim.training.checkpoint import remove_stale_parts

    path = tmp_path / "checkpoint.pt"
    _kill_during_second_write(path)
    (tmp_path / ".other.pt.x.part").write_bytes(b"not ours")  # another output's temp file is left alone
    parts = [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint.pt.") and p.name.endswith(".part")]
    assert parts
    with caplog.at_level("WARNING"):
        assert remove_stale_parts(path, tmp_path / "mfim.pt") == parts
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.x.part", "checkpoint.pt"]
    assert "interrupted write of checkpoint.pt" in caplog.text
    assert load_checkpoint(path)["step"] == 1  # the last complete checkpoint is still there


def test_background_checkpoint_is_the_state_at_save_time(tmp_path, monkeypatch):
    """save(background=True) returns while the write is still under way; training goes on meanwhile, and the file
    holds the state of the step it was saved at, not the weights the later steps made."""
    import threading

    from mfim.training import trainer as trainer_module

    tr = build(FULL)
    tr.train_step([fixed_batch()])
    at_save = {k: v.clone() for k, v in tr.model.encoder.state_dict().items()}
    release, writing = threading.Event(), threading.Event()
    real_save = trainer_module.atomic_torch_save

    def held_save(state, path):  # the writer starts serialising only after the next step changed the weights
        writing.set()
        assert release.wait(60)
        return real_save(state, path)

    monkeypatch.setattr(trainer_module, "atomic_torch_save", held_save)
    path = tmp_path / "ck.pt"
    assert tr.save(path, data_state={"pos": 1}, background=True) == path
    assert writing.wait(60) and not path.exists()  # returned mid-write
    tr.train_step([fixed_batch(1)])  # the live weights move on
    release.set()
    tr.wait_for_save()
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and ck["data"] == {"pos": 1}
    for k, v in at_save.items():
        assert torch.equal(ck["encoder"][k], v)
    assert any(not torch.equal(v, tr.model.encoder.state_dict()[k]) for k, v in at_save.items())


BACKGROUND_KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    sys.path.insert(0, os.getcwd())
    from tests.test_training import build, fixed_batch, FULL
    path = sys.argv[1]
    tr = build(FULL)
    tr.train_step([fixed_batch()])
    tr.save(path)
    def slow_fsync(fd):
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = slow_fsync
    tr.train_step([fixed_batch(1)])
    tr.save(path, background=True)
    print("returned", flush=True)
    time.sleep(60)
    """
)


def test_killed_during_a_background_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "ck.pt"
    proc = subprocess.Popen([sys.executable, "-c", BACKGROUND_KILL_SCRIPT, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=os.getcwd(), env=dict(os.environ, OMP_NUM_THREADS="1"))
    said = {proc.stdout.readline().strip(), proc.stdout.readline().strip()}
    assert said == {"writing", "returned"}  # the training thread went on while the writer was mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert load_checkpoint(path)["step"] == 1
    assert any(p.name.endswith(".part") for p in tmp_path.iterdir())


@pytest.mark.parametrize("bad", [b"", b"PK\x03\x04 truncated zip", "truncated", "not_a_dict"])
def test_corrupt_checkpoint_is_moved_aside_and_training_starts_over(tmp_path, caplog, bad):
    from mfim.training.checkpoint import load_resumable

    path = tmp_path / "checkpoint.pt"
    if bad == "truncated":
        atomic_torch_save({"step": 3, "w": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:1500])
    elif bad == "not_a_dict":
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(bad)
    content = path.read_bytes()
    with caplog.at_level("WARNING"):
        assert load_resumable(path) is None
    assert not path.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint.pt.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content  # kept for inspection, byte for byte
    assert "moved it to checkpoint.pt.corrupt-" in caplog.text and "starting over" in caplog.text
    # the next run writes a fresh checkpoint and resumes from it normally
    atomic_torch_save({"step": 1}, path)
    assert load_resumable(path) == {"step": 1}
    assert load_resumable(tmp_path / "none.pt") is None


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, os.getcwd())
    from tests.test_training import build, fixed_batch, FULL
    from mfim.training.distributed import DistInfo
    rank, world, out, norm, accum = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    maps = sys.argv[6] == "maps"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method="file://" + out + ".rdv", rank=rank, world_size=world)
    # rank 1 starts from other trainable weights (the frozen nets come from files): DDP must start from rank 0's
    tr = build(FULL, dist_info=DistInfo(rank, world, rank), norm=norm, scramble=rank > 0, grad_accum=accum,
               style_maps=maps)
    for step in range(3):
        b = fixed_batch(step, n=8)
        size = 8 // accum  # micro-batch m is rows [m * size, (m + 1) * size) of the global batch, split over ranks
        per = size // world
        mine = [{k: v[m * size + rank * per:m * size + (rank + 1) * per] for k, v in b.items()} for m in range(accum)]
        logs = tr.train_step(mine)
    means = tr._reduce_window(logs, {k: 1 for k in logs})
    if rank == 0:
        torch.save({"encoder": tr.model.encoder.state_dict(), "ema": tr.ema.encoder.state_dict(),
                    "D": tr.D.state_dict(), "logs": means}, out)
    if world > 1:
        dist.destroy_process_group()
    """
)


# the small backbone's norm, as configuration A (no style maps: encoder parameters no step uses); the paper IR-SE50's,
# with style maps and gradient accumulation (DDP's no_sync on the first micro-batch)
@pytest.mark.parametrize("norm,accum,maps", [("group", 1, "no_maps"), ("batch", 2, "maps")])
def test_two_process_gloo_matches_one_process(tmp_path, norm, accum, maps):
    """DDP on 2 processes (half of each micro-batch each, different initial weights) = 1 process on the global
    batch: the encoder (with batch norm: synchronised statistics and running buffers), its EMA, D (R1 at steps 0,
    2) and the logged terms."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = tmp_path / "one.pt"
    subprocess.run([sys.executable, "-c", DDP_SCRIPT, "0", "1", str(one), norm, str(accum), maps], check=True, env=env,
                   timeout=300)
    two = tmp_path / "two.pt"
    procs = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(r), "2", str(two), norm, str(accum), maps], env=env)
             for r in (0, 1)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    if norm == "batch":
        assert any(k.endswith("running_var") for k in a["encoder"])
    for part in ("encoder", "ema", "D"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")
    assert a["logs"].keys() == b["logs"].keys()
    for k in a["logs"]:  # the last step's terms, averaged over the 2 ranks = the 1-process terms (means of a batch)
        assert b["logs"][k] == pytest.approx(a["logs"][k], rel=1e-4, abs=1e-6), k


def test_cross_identity_pairs_weigh_less_in_reconstruction():
    rec = ReconLoss(None)
    x, y = torch.zeros(2, 3, 4, 4), torch.stack([torch.full((3, 4, 4), 0.2), torch.full((3, 4, 4), 1.0)])
    assert float(rec(x, y)["l1"]) == pytest.approx(0.6)
    # pair 0 same identity (weight 1), pair 1 different people (weight 0.25): (0.2 + 0.25) / 1.25
    assert float(rec(x, y, torch.tensor([1.0, 0.25]))["l1"]) == pytest.approx(0.36)
    tr = build(loss_weights(**{**ONLY, "l1": 1.0, "recon_cross_identity": 0.0}))
    b = fixed_batch()
    x_swap = tr.model(b["src"], b["tgt"])
    with pytest.raises(ValueError, match="same_identity"):
        tr.objective.encoder_terms(x_swap, b["src"], b["tgt"])
    _, terms = tr.objective.encoder_terms(x_swap, b["src"], b["tgt"], torch.tensor([True, False, False, False]))
    assert float(terms["l1"]) == pytest.approx(float((x_swap[0] - b["tgt"][0]).abs().mean()), rel=1e-5)


def test_background_l1_sees_only_the_background_of_cross_pairs():
    from mfim.criteria.recon_loss import BackgroundL1

    bg_loss = BackgroundL1()
    bg = bg_loss.background(32, "cpu", torch.float32)[0, 0]
    assert bg[16, 16] == 0 and bg[0, 0] == 1 and 0.3 < float(bg.mean()) < 0.8  # the face centre is excluded
    tgt = torch.zeros(2, 3, 32, 32)
    face_only = tgt + 0.7 * (bg == 0).float()  # differs from the target inside the face only
    cross = torch.tensor([1.0, 1.0])
    assert float(bg_loss(face_only, tgt, cross)) == 0.0
    moved = tgt + 0.5  # a uniform shift: its mean over the (soft) background is the shift itself
    assert float(bg_loss(moved, tgt, cross)) == pytest.approx(0.5, rel=1e-5)
    assert float(bg_loss(moved, tgt, torch.tensor([1.0, 0.0]))) == pytest.approx(0.5, rel=1e-5)
    # in the objective: same-identity pairs do not count, and a batch without a cross pair has no such term
    tr = build(loss_weights(**{**ONLY, "background_l1": 1.0}))
    b = fixed_batch()
    x_swap = tr.model(b["src"], b["tgt"])
    with pytest.raises(ValueError, match="same_identity"):
        tr.objective.encoder_terms(x_swap, b["src"], b["tgt"])
    _, none = tr.objective.encoder_terms(x_swap, b["src"], b["tgt"], torch.ones(4, dtype=torch.bool))
    assert "background_l1" not in none
    flags = torch.tensor([False, True, True, True])
    total, terms = tr.objective.encoder_terms(x_swap, b["src"], b["tgt"], flags)
    mask = tr.objective.background.background(RES, "cpu", torch.float32)
    want = float(((x_swap[0] - b["tgt"][0]).abs() * mask[0]).sum() / (mask.sum() * 3))
    assert float(terms["background_l1"]) == pytest.approx(want, rel=1e-5)
    # no gradient reaches the image inside the face
    x = x_swap.detach().requires_grad_(True)
    tr.objective.encoder_terms(x, b["src"], b["tgt"], flags)[0].backward()
    assert float(x.grad[:, :, mask[0, 0] == 0].abs().max()) == 0.0 and float(x.grad.abs().max()) > 0


def test_loss_network_targets_stay_float32_under_bf16_autocast():
    """The no-grad targets (R(x_src), 3DMM of source and target) are computed in fp32 inside the trainer's bf16
    autocast; the swap's own branch is autocast as before."""
    tr = build(loss_weights(**{**ONLY, "id": 1.0, "shape": 1.0, "pose": 1.0, "exp": 1.0}))
    seen = []
    for net in (tr.objective.id_loss.embedder.net[0], tr.objective.threedmm.encoder.head):
        net.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.dtype)))
    b = fixed_batch()
    x_swap = tr.model(b["src"], b["tgt"]).detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tr.objective.encoder_terms(x_swap, b["src"], b["tgt"])
    targets = [dtype for grad, dtype in seen if not grad]
    swap_branch = [dtype for grad, dtype in seen if grad]
    assert len(targets) == 3 and all(d == torch.float32 for d in targets)  # R(x_src), 3DMM(src), 3DMM(tgt)
    assert len(swap_branch) == 2 and all(d == torch.bfloat16 for d in swap_branch)


def test_train_seed_defaults_to_the_project_seed_and_overrides_it():
    from mfim.training.run import params_fingerprint, train_seed

    base = params_with({"project": {"seed": 3}, "train": {"seed": None}})
    seeded = params_with(base, {"train": {"seed": 1}})
    assert train_seed(base) == 3 and train_seed(seeded) == 1
    with pytest.raises(KeyError, match="project.seed"):  # no seed of its own in code: params.yaml has both keys
        train_seed({"train": {"seed": None}})
    assert params_fingerprint(base) != params_fingerprint(seeded)


def test_init_encoder_from_warm_start_drops_map_heads_for_configuration_a(tmp_path, capsys):
    from mfim.training.run import init_encoder
    from mfim.training.warmstart import save_warmstart

    src = build(loss_weights(**{**ONLY, "l1": 1.0}))
    with torch.no_grad():
        for p in src.model.encoder.parameters():
            p.add_(0.01)
    state = src.model.encoder.state_dict()
    path = save_warmstart(tmp_path / "ws.pt", state, state, {})
    torch.manual_seed(0)
    model_a = MFIM(StubGenerator(RES, channels=8, w_dim=8), unit_encoder(input_size=RES, width=8, style_maps=False),
                   coarse_max_res=4)
    tr_a = Trainer(model_a, MFIMObjective(loss_weights(**{**ONLY, "l1": 1.0}), recon=ReconLoss(None)),
                   train_config(steps=600), torch.device("cpu"))
    init_encoder(tr_a, path)
    said = capsys.readouterr().out  # what is dropped is said, not silent
    assert "are not loaded" in said and "m2m." in said and "map_gain." in said
    for k, v in tr_a.model.encoder.state_dict().items():
        assert torch.equal(v, state[k]) and torch.equal(tr_a.ema.encoder.state_dict()[k], state[k])
    # a file lacking heads this configuration needs is refused, not half-loaded
    path2 = save_warmstart(tmp_path / "ws_a.pt", tr_a.model.encoder.state_dict(), tr_a.model.encoder.state_dict(), {})
    with pytest.raises(ValueError, match="lacks"):
        init_encoder(build(loss_weights(**{**ONLY, "l1": 1.0})), path2)
