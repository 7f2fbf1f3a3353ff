"""Style maps that act, and the inversion warm start: the two fixes that let the embedded default leave the average face.
"""

from pathlib import Path

import pytest
import torch

from mfim.models.mfim import MFIM
from mfim.models.stylegan2 import Generator
from mfim.training.warmstart import (
    WarmStartConfig,
    regression_loss,
    run_warmstart,
    sample_generator,
    style_statistics,
)
from tests.defaults import params_with, unit_encoder, warmstart_config


def tiny_generator(noise_strength: float = 1e-3) -> Generator:
    """A small StyleGAN2 whose noise strengths are as small as the shipped 64 px generator's (4e-3 .. 1e-4)."""
    torch.manual_seed(0)
    G = Generator(32, style_dim=32, n_mlp=2, channel_base=1024, channel_max=16)
    with torch.no_grad():
        for conv in G.synthesis.convs:
            conv.noise.strength.fill_(noise_strength)
        G.mapping.w_avg.copy_(G.mapping(torch.randn(256, 32), update_w_avg=False).mean(0))
    return G.eval().requires_grad_(False)


def make(injection: str, maps=(8, 16), **kw) -> MFIM:
    torch.manual_seed(1)
    cfg = unit_encoder(input_size=32, width=8, code_channels=16, style_map_resolutions=maps,
                       style_map_injection=injection, **kw)
    return MFIM(tiny_generator(), cfg, coarse_max_res=8, mix_global_res=(16,))


def map_effect_after_one_step(model: MFIM) -> float:
    """Mean |image with maps - image without| after one Adam step of self-reconstruction from initialisation."""
    torch.manual_seed(2)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    opt = torch.optim.Adam(model.encoder.parameters(), lr=1e-3)
    model.train()
    torch.nn.functional.l1_loss(model.reconstruct(x), x).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        codes, maps = model.encode_target(x)
        codes.update(model.encode_codes(x, model.src_indices))
        assert maps, "no style maps"
        return float((model.synthesize(codes, maps) - model.synthesize(codes, {})).abs().mean())


def test_style_maps_change_the_image_after_one_step():
    # the direct path: a visible change (the image spans [-1, 1]); through the frozen noise strength (1e-3 here, as
    # in the shipped generator) the same step moves the image by three orders of magnitude less
    direct = map_effect_after_one_step(make("direct"))
    literal = map_effect_after_one_step(make("strength"))
    assert direct > 1e-2
    assert literal < 1e-3 * direct * 10


def test_direct_maps_start_at_zero_and_own_a_trainable_gain():
    m = make("direct", style_map_gain=0.5)
    out = m.encoder(torch.randn(2, 3, 32, 32), with_maps=True)
    assert out.maps and all(torch.count_nonzero(v) == 0 for v in out.maps.values())
    gains = dict(m.encoder.map_gain.named_parameters())
    assert len(gains) == len(out.maps) and all(g.requires_grad and float(g.detach()) == 0.5 for g in gains.values())
    assert len(make("strength").encoder.map_gain) == 0


def test_direct_map_replaces_the_noise_of_its_layer():
    m = make("direct", maps=(8,))
    G = m.generator
    idx = [n.index for n in G.noise_layers if n.resolution == 8]
    styles = G.styles_from_ws(G.w_avg.reshape(1, 1, -1).expand(1, G.num_ws, -1))
    zero = [torch.zeros(1, 1, 8, 8) if n.index in idx else None for n in G.noise_layers]
    no_noise_there = [torch.zeros(8, 8) if n.index in idx else None for n in G.noise_layers]
    with torch.no_grad():
        a = G.synthesize(styles, noise_mode="const", style_maps=zero)
        b = G.synthesize(styles, noise=no_noise_there, noise_mode="const")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_style_statistics_are_the_spread_of_generator_styles():
    m = make("direct")
    std = style_statistics(m, n=512, batch=128, seed=0)
    G = m.generator
    with torch.no_grad():
        ws = G.mapping(torch.randn(2048, G.z_dim), truncation_cutoff=G.num_ws, update_w_avg=False)
        ref = [s.std(0) for s in G.styles_from_ws(ws)]
    for rec, r in zip(G.style_layers, ref):
        assert std[rec.index].shape == r.shape
        torch.testing.assert_close(std[rec.index].mean(), r.mean(), rtol=0.15, atol=0)


def test_style_mixed_samples_tie_layers_to_two_latents():
    m = make("direct")
    torch.manual_seed(3)
    images, codes = sample_generator(m, 6, mixing_prob=1.0)
    assert images.shape == (6, 3, 32, 32) and torch.isfinite(images).all()
    G = m.generator
    first, last = G.style_layers[0].index, G.style_layers[-1].index
    assert not torch.equal(codes[first], codes[last])


def test_latent_regression_lowers_its_loss_on_a_fixed_batch():
    m = make("direct")
    std = style_statistics(m, n=256, seed=0)
    torch.manual_seed(4)
    images, codes = sample_generator(m, 8, mixing_prob=0.9)
    opt = torch.optim.Adam(m.encoder.parameters(), lr=2e-3)
    m.train()
    losses = []
    for _ in range(40):
        loss, _ = regression_loss(m, images, codes, std, image_l1=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0]


def test_run_warmstart_both_phases_and_ema(monkeypatch):
    from mfim.criteria.recon_loss import ReconLoss

    m = make("direct")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    real = iter(lambda: {"src": x[:2], "tgt": x[2:]}, None)
    cfg = warmstart_config(regression_steps=3, recon_steps=2, batch_size=4, log_every=2, ema_decay=0.5, image_l1=1.0,
                           refine_steps=0, checkpoint_every=0)
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    state, ema, rows = run_warmstart(m, cfg, real, ReconLoss(None), progress=False)
    assert [r["step"] for r in rows] == [2, 3, 4, 5]
    assert "regression_code" in rows[0] and "recon_l1" in rows[-1]
    changed = [k for k in state if not torch.equal(state[k], before[k])]
    assert changed and set(ema) == set(state)
    assert any(not torch.equal(ema[k], state[k]) for k in changed)  # EMA lags the live weights


def test_config_rejects_unknown_keys():
    """A misspelt key is refused by the params schema (naming the key it meant), never dropped."""
    from mfim.params_schema import ParamsError, validate
    from tests.defaults import default_group, default_params

    params = default_params()
    params["warmstart"]["regresion_steps"] = 3
    with pytest.raises(ParamsError, match="unknown key warmstart.regresion_steps .*warmstart.regression_steps"):
        validate(params)
    cfg = WarmStartConfig.from_params(default_group("warmstart", regression_steps=5, refine_steps=200))
    assert cfg.steps == 5 + default_group("warmstart")["recon_steps"] + 200


# --- checkpoint / resume ------------------------------------------------------------------------------------------


class PositionedBatches:
    """Real batches that are a function of their position, resumable as mfim.data.shards.BatchIterator."""

    def __init__(self, position=None):
        self.n = int((position or {}).get("n", 0))

    def __next__(self):
        g = torch.Generator().manual_seed(1000 + self.n)
        self.n += 1
        x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
        return {"src": x[:2], "tgt": x[2:]}

    def state_dict(self):
        return {"n": self.n}


class Killed(Exception):
    pass


RESUME_CFG = warmstart_config(regression_steps=3, recon_steps=2, refine_steps=3, batch_size=4, log_every=1,
                              ema_decay=0.5, lr=1e-3, refine_lr=1e-3, checkpoint_every=2, image_l1=1.0)


def warm_start(tmp_path, resume=None, kill_at=None, on_step=None):
    """The three phases on a fresh tiny model with a refiner (checkpoint every 2 steps to tmp_path/checkpoint.pt)."""
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.training.warmstart import Checkpointing, resume_position

    def on_log(step, row):
        if step == kill_at:
            raise Killed(step)
        if on_step is not None:
            on_step(step)

    m = make("direct", refine_iterations=1)
    ck = Checkpointing(tmp_path / "checkpoint.pt", RESUME_CFG.checkpoint_every, "fp")
    return run_warmstart(m, RESUME_CFG, PositionedBatches(resume_position(resume)), ReconLoss(None), seed=3,
                         progress=False, on_log=on_log, checkpoint=ck, resume=resume)


def assert_same_states(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return warm_start(tmp_path_factory.mktemp("whole"))


# killed before any checkpoint; resumed inside phase 1 (generator samples: the RNG state), 2 (data position), 3
@pytest.mark.parametrize("kill_at", [1, 3, 5, 7])
def test_a_run_killed_part_way_resumes_to_the_uninterrupted_result(tmp_path, kill_at, uninterrupted):
    from mfim.training.checkpoint import load_checkpoint

    whole, whole_ema, whole_rows = uninterrupted
    with pytest.raises(Killed):
        warm_start(tmp_path, kill_at=kill_at)
    path = tmp_path / "checkpoint.pt"
    state = load_checkpoint(path) if path.is_file() else None
    assert (state is None) == (kill_at < RESUME_CFG.checkpoint_every)
    if state is not None:
        assert state["step"] == kill_at - 1 and state["fingerprint"] == "fp"
    resumed, resumed_ema, resumed_rows = warm_start(tmp_path, resume=state)
    assert_same_states(whole, resumed)
    assert_same_states(whole_ema, resumed_ema)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(resumed_rows) == drop(whole_rows)
    assert any(not torch.equal(whole[k], make("direct", refine_iterations=1).encoder.state_dict()[k]) for k in whole
               if k.startswith("refiner."))  # phase 3 trained the refiner


def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    """A real SIGKILL of the process right after step 5 (a checkpoint at 4), then the resume in this process."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from mfim.training.checkpoint import load_checkpoint

    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import torch\n"
        "torch.set_num_threads(int(sys.argv[3]))\n"  # this process's count: another one sums in another order
        "sys.path.insert(0, sys.argv[1])\n"
        "import test_warmstart as t\n"
        "t.warm_start(Path(sys.argv[2]), on_step=lambda s: s == 5 and os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path),
                           str(torch.get_num_threads())], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4
    resumed, resumed_ema, _ = warm_start(tmp_path, resume=state)
    whole, whole_ema, _ = uninterrupted
    assert_same_states(whole, resumed)
    assert_same_states(whole_ema, resumed_ema)


# --- torchrun / DDP -----------------------------------------------------------------------------------------------


def _ddp_rank(rank: int, world: int, init_file: str, out: str):
    import torch.distributed as dist

    from mfim.criteria.recon_loss import ReconLoss
    from mfim.training.distributed import DistInfo
    from mfim.training.warmstart import Checkpointing

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = make("direct")
        cfg = warmstart_config(regression_steps=2, recon_steps=2, batch_size=2, log_every=1, checkpoint_every=3,
                               image_l1=1.0, refine_steps=0)
        batches = PositionedBatches({"n": 100 * rank})  # each rank its own images
        seen = []
        ck = Checkpointing(Path(out) / "checkpoint.pt", cfg.checkpoint_every, "fp")
        state, ema, rows = run_warmstart(m, cfg, batches, ReconLoss(None), seed=3, progress=False,
                                         dist=DistInfo(rank, world), checkpoint=ck,
                                         on_log=lambda step, row: seen.append(step))
        torch.save({"encoder": state, "ema": ema, "rows": rows, "logged": seen}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_train_one_encoder(tmp_path):
    """torchrun's case on CPU: two processes, DDP over the encoder, each rank its own samples and images; the
    weights stay equal on both ranks, rank 0 alone logs and writes the checkpoint, which holds both ranks' RNG."""
    import torch.multiprocessing as mp

    from mfim.training.checkpoint import load_checkpoint

    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_states(r0["encoder"], r1["encoder"])
    assert_same_states(r0["ema"], r1["ema"])
    assert r0["logged"] == [1, 2, 3, 4] and r1["logged"] == []
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(r0["rows"]) == drop(r1["rows"])  # the logged losses are averages over the ranks
    untrained = make("direct").encoder.state_dict()
    assert any(not torch.equal(r0["encoder"][k], untrained[k]) for k in untrained)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == 3 and len(ck["ranks"]) == 2
    assert not torch.equal(ck["ranks"][0]["rng"]["torch"], ck["ranks"][1]["rng"]["torch"])  # seed + rank
    assert [r["position"] for r in ck["ranks"]] == [{"n": 1}, {"n": 101}]


def test_the_stage_command_starts_torchrun_on_every_gpu(tmp_path, monkeypatch):
    import importlib.util
    import os

    import yaml

    from mfim.config import load_params
    from mfim.launch import relaunch_on_every_gpu

    spec = importlib.util.spec_from_file_location("warmstart_stage", Path(__file__).parents[1] / "pipelines" /
                                                  "warmstart.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    params = {"project": {"device": "auto"}, "train": {"init_checkpoint": "data/warmstart/encoder.pt"}}
    execs = []
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append(argv))

    def started_under(params_file_values: dict) -> list | None:
        """The torchrun argv the stage's __main__ would exec (mfim.launch.relaunch_on_every_gpu), or None."""
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_with(params_file_values)))
        execs.clear()
        loaded = load_params(tmp_path / "params.yaml")
        if stage.feeds_train(loaded):
            relaunch_on_every_gpu(loaded, stage.__file__)
        return execs[0] if execs else None

    for gpus, expected in ((0, None), (1, None), (4, "--nproc-per-node=4")):  # mfim.launch's count and flags
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        argv = started_under(params)
        assert (argv if argv is None else argv[4]) == expected
    assert started_under(params)[2:4] == ["torch.distributed.run", "--standalone"]
    monkeypatch.setenv("WORLD_SIZE", "4")  # already one of torchrun's processes
    assert started_under(params) is None
    monkeypatch.delenv("WORLD_SIZE")
    for change in ({"project": {"device": "cpu"}}, {"train": {"init_checkpoint": "checkpoints/mfim.pt"}}):
        assert started_under({**params, **change}) is None


# --- the DVC stage: SIGKILL part-way, `dvc repro` runs its command again ----------------------------------------


def stage_workspace(root: Path, workers: int) -> Path:
    """A workspace the `warmstart` stage command runs in: a tiny generator file, 32 px fixture shards, params."""
    import yaml

    from mfim.weights.mfim_format import save_checkpoint
    from tests.test_shards import make_fixture_shards

    root.mkdir(parents=True)
    save_checkpoint(root / "data" / "generator" / "generator.pt", tiny_generator())
    make_fixture_shards(root / "data" / "shards", size=32)
    params = params_with({
        "project": {"seed": 0, "device": "cpu", "threads": 1, "mlflow": {"experiment": "warmstart-test"}},
        "data": {"resolution": 32},
        "generator": {"noise_mode": "const"},
        "encoder": {"width": 8, "code_channels": 16, "style_map_resolutions": [8, 16], "coarse_max_res": 8,
                    "mix_global_res": [16], "refine_iterations": 0, "refine_map_resolutions": None},
        "loss": {"lpips_net": "alex"},
        "train": {"init_checkpoint": "data/warmstart/encoder.pt", "augment": True},
        "warmstart": {"regression_steps": 2, "recon_steps": 16, "batch_size": 4, "log_every": 1, "ema_decay": 0.5,
                      "recon_lpips": 0.0, "checkpoint_every": 3, "workers": workers, "image_l1": 1.0,
                      "refine_steps": 0},
    })
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def stage_process(work: Path) -> "subprocess.Popen":
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "MLFLOW_TRACKING_URI": (work / "mlruns").as_uri(),
           "MLFLOW_ALLOW_FILE_STORE": "true", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(repo / "pipelines" / "warmstart.py")], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_stage_killed_by_sigkill_and_run_again_gives_the_uninterrupted_output(tmp_path):
    """The stage command SIGKILLed once its first checkpoint is on disk (in phase 2, reading the real images in two
    spawned workers), then run again as `dvc repro` would (with workers 0: a bookkeeping key, not in the
    fingerprint): the encoder and EMA equal those of a run never interrupted, and the finished run leaves no
    checkpoint."""
    import json
    import signal
    import time

    import yaml

    whole = stage_workspace(tmp_path / "whole", workers=0)
    out = stage_process(whole).communicate(timeout=600)[0]
    assert "resuming" not in out and (whole / "data" / "warmstart" / "encoder.pt").is_file(), out[-3000:]

    work = stage_workspace(tmp_path / "killed", workers=2)
    proc = stage_process(work)
    checkpoint = work / "data" / "warmstart" / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=120)[0]  # EOF once the orphaned reader workers, which share the pipe, exited
    assert proc.returncode == -signal.SIGKILL and checkpoint.is_file(), out[-3000:]
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] % 3 == 0 and saved["ranks"][0]["position"]["offset"] > 0  # part-way through phase 2
    assert not (work / "data" / "warmstart" / "encoder.pt").exists()

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["warmstart"]["workers"] = 0
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    rerun = stage_process(work)
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0 and "resuming from" in out, out[-3000:]
    assert not checkpoint.exists()
    a, b = (torch.load(w / "data" / "warmstart" / "encoder.pt", weights_only=True) for w in (whole, work))
    assert_same_states(a["encoder"], b["encoder"])
    assert_same_states(a["encoder_ema"], b["encoder_ema"])
    ra, rb = (json.loads((w / "reports" / "warmstart.json").read_text()) for w in (whole, work))
    assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


def test_release_free_memory_returns_what_the_tunables_keep():
    """Under GLIBC_TUNABLES' 16 GB trim threshold a freed 200 MB stays resident; malloc_trim(0) returns it."""
    import subprocess
    import sys

    from mfim.runtime import GLIBC_TUNABLES

    script = (
        "import torch\n"
        "from mfim.runtime import release_free_memory\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "x = [torch.ones(512, 512, 3, 3) for _ in range(21)]\n"
        "held = rss()\n"
        "del x\n"
        "freed = rss()\n"
        "release_free_memory()\n"
        "print(held - freed, held - rss())\n"
    )
    env = {"GLIBC_TUNABLES": GLIBC_TUNABLES, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    kept_free, after_trim = map(float, out.stdout.split())
    assert kept_free < 20 and after_trim > 180, out.stdout + out.stderr[-2000:]
