"""Where the memory of a paper-scale training process goes, and what each DataLoader worker adds (issue 36).

    .venv/bin/python benchmarks/bench_memory.py [--full] [--json out.json]

Three parts, each in fresh child processes (peak RSS only grows within one):

1. **Bytes by parameter count** of every big object the `train` / `warmstart` stages of configs/paper.yaml hold: the
   1024 px generator, the IR-SE50 encoder with its 26 map-to-code heads, its EMA copy, gradients and Adam moments,
   the 256 px discriminator (and its Adam), ArcFace iresnet100, DECA's ResNet-50, LPIPS. Built on the meta device,
   so this costs no memory and runs in seconds.
2. **Reader workers** (mfim.data.shards.WORKER_CONTEXT): a parent holding a model starts two workers over 64 px
   fixture shards, reads batches, then rewrites its weights in place (what an optimiser step and the EMA update do)
   and reads again. Per worker: RSS, PSS and USS (private pages: what the worker alone costs) from
   /proc/<pid>/smaps_rollup, under ``fork`` and under ``spawn``. Default: a 512 MB stand-in model of 9.4 MB tensors
   (the size of one 512x512 3x3 conv); ``--full``: the real paper-size networks (random weights in the official file
   layouts of tests/official_files.py; needs ~9 GB and a few minutes), one worker each.
3. **Allocator tunables** (GLIBC_TUNABLES of the Makefile, mfim.runtime): RSS after a process loaded a checkpoint
   (a 380 MB state dict of such tensors; ``--full``: the paper build above) and freed the loaded copy, with and
   without the tunables, and after ``malloc_trim(0)`` (mfim.runtime.release_free_memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
MB = 2**20
CONV = (512, 512, 3, 3)  # the encoder's typical tensor: 9.4 MB in fp32


# ------------------------------------------------------------------------------------------------- measurement


def proc_mb(pid: int | str = "self") -> dict:
    """RSS, PSS, USS (private clean + dirty) and peak RSS of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            out[name] = int(rest.split()[0]) / 1024
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss": round(out["Rss"]), "pss": round(out["Pss"]), "uss": round(out["Private_Clean"] + out["Private_Dirty"]),
            "peak_rss": round(int(status["VmHWM"].split()[0]) / 1024)}


def run_child(args: list[str], tunables: bool = True, timeout: int = 1200) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MFIM_NO_REEXEC")}
    if tunables:
        env["GLIBC_TUNABLES"] = TUNABLES
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ 1. parameter bytes


def paper_params() -> dict:
    import yaml

    p = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    p["encoder"]["backbone_checkpoint"] = ""
    return p


def parameter_table() -> list[dict]:
    """(object, parameters, fp32 bytes) of the paper configuration, from modules built on the meta device."""
    import torch
    import torchvision

    from mfim.models.stylegan2 import Discriminator, Generator
    from mfim.nets.deca import FlameEncoder
    from mfim.nets.iresnet import IRESNET_LAYERS, IResNet
    from mfim.training.build import build_model

    p = paper_params()
    lpips = p["loss"]["lpips_net"]
    backbone = {"alex": "alexnet", "vgg": "vgg16"}[lpips]  # LPIPS: the backbone's conv features + 1x1 heads
    count = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    g = p["generator"]
    with torch.device("meta"):
        G = Generator(resolution=g["resolution"], style_dim=g["style_dim"], n_mlp=g["n_mlp"],
                      channel_base=g["channel_base"], channel_max=g["channel_max"])
        enc = build_model(p, G).encoder
        D = Discriminator(int(p["data"]["resolution"]), g["channel_base"], g["channel_max"])
        n = {"generator 1024 px (frozen)": count(G), "encoder IR-SE50 + 26 M2C + 6 M2M": count(enc),
             "encoder EMA copy": count(enc), "encoder gradients": count(enc), "encoder Adam moments (2x)": 2 * count(enc),
             f"discriminator {p['data']['resolution']} px": count(D), "discriminator gradients + Adam (3x)": 3 * count(D),
             "ArcFace iresnet100 (frozen)": count(IResNet(IRESNET_LAYERS[100])),
             "DECA ResNet-50 encoder (frozen)": count(FlameEncoder()),
             f"LPIPS {lpips} (frozen)": count(getattr(torchvision.models, backbone)().features)}
    rows = [{"object": k, "params_M": round(v / 1e6, 2), "fp32_GB": round(4 * v / 1e9, 2)} for k, v in n.items()]
    rows.append({"object": "total", "params_M": round(sum(n.values()) / 1e6, 1),
                 "fp32_GB": round(4 * sum(n.values()) / 1e9, 2)})
    return rows


# -------------------------------------------------------------------------------------------- 2. reader workers


def standin_model(mb: int) -> list:
    import torch

    n = max(1, int(mb * MB // (4 * torch.Size(CONV).numel())))
    return [torch.randn(CONV) for _ in range(n)]


def worker_measure(tensors: list, context: str, workers: int, batch: int = 8) -> dict:
    """Read batches with ``workers`` workers started by ``context``; their memory before and after this process
    rewrote ``tensors`` in place (an optimiser step / EMA update touches every weight page)."""
    import multiprocessing

    import torch

    import mfim.data.shards as S
    from mfim.data.pairs import pair_batches
    from tests.test_shards import make_fixture_shards

    with tempfile.TemporaryDirectory() as tmp:
        make_fixture_shards(Path(tmp), n_identities=8, per_identity=4, size=64)
        S.WORKER_CONTEXT = context
        t0 = time.perf_counter()
        batches = pair_batches(f"{tmp}/train-*.tar", None, batch, seed=0, augment=True, workers=workers)
        for _ in range(8):
            next(batches)
        start_s = time.perf_counter() - t0
        pids = [p.pid for p in multiprocessing.active_children() if p.pid != os.getpid()]
        before = [proc_mb(pid) for pid in pids]
        with torch.no_grad():
            for t in tensors:
                t.mul_(1.0001)
        for _ in range(8):
            next(batches)
        after = [proc_mb(pid) for pid in pids]
        parent = proc_mb()
        batches.close()
        del batches
    return {"context": context, "workers": len(pids), "first_8_batches_s": round(start_s, 1),
            "parent": parent, "worker_before_write": before, "worker_after_write": after,
            "total_pss_mb": parent["pss"] + sum(w["pss"] for w in after)}


# ------------------------------------------------------------------------------------ 3. allocator / paper build


def load_and_free(path: str) -> dict:
    """The start of a stage: load a checkpoint, copy it into the model's own tensors, free the loaded copy."""
    import gc

    import torch

    from mfim.runtime import release_free_memory

    base = proc_mb()
    state = torch.load(path, weights_only=True)
    model = [v.clone() for v in state.values()]
    loaded = proc_mb()
    del state
    gc.collect()
    freed = proc_mb()
    release_free_memory()
    trimmed = proc_mb()
    model_mb = sum(t.numel() * 4 for t in model) / MB
    return {"model_mb": round(model_mb), "start_rss": base["rss"], "loaded_rss": loaded["rss"],
            "after_free_rss": freed["rss"], "after_malloc_trim_rss": trimmed["rss"]}


def write_paper_files(root: Path) -> dict:
    """The paper's official weight files at full size with random weights (tests/official_files.py)."""
    from tests.official_files import write_deca_tar, write_iresnet_backbone, write_psp_ir_se50, write_stylegan2_pkl

    paths = {"generator": root / "stylegan2-ffhq-1024x1024.pkl", "ir_se50": root / "model_ir_se50.pth",
             "iresnet": root / "backbone.pth", "deca": root / "deca_model.tar"}
    write_stylegan2_pkl(paths["generator"])  # 1024 px, FFHQ widths, with its D
    write_psp_ir_se50(paths["ir_se50"])
    write_iresnet_backbone(paths["iresnet"], depth=100)
    write_deca_tar(paths["deca"])
    return {k: str(v) for k, v in paths.items()}


def build_paper(files: dict, timeline: list) -> dict:
    """What the train stage builds from configs/paper.yaml (mfim.training.build), RSS after each piece."""
    import copy

    import torch

    from mfim.nets.perceptual import load_lpips
    from mfim.training.build import (build_discriminator, build_identity_embedder, build_model,
                                     build_threedmm_encoder, load_frozen_generator)

    p = paper_params()
    p["generator"]["checkpoint"] = files["generator"]
    p["encoder"]["backbone_checkpoint"] = files["ir_se50"]
    p["nets"]["identity"]["iresnet_checkpoint"] = files["iresnet"]
    p["nets"]["threedmm"]["deca_checkpoint"] = files["deca"]
    cpu = torch.device("cpu")
    mark = lambda what: timeline.append({"after": what, **proc_mb()})  # noqa: E731
    mark("writing the official files (their networks freed)")
    G = load_frozen_generator(p, cpu)
    mark("generator 1024 px (official .pkl)")
    model = build_model(p, G)
    mark("encoder (IR-SE50 from pSp's file + heads)")
    nets = {"D": build_discriminator(p, G, cpu), "id": build_identity_embedder(p, cpu),
            "deca": build_threedmm_encoder("deca", cpu, params=p), "lpips": load_lpips(p["loss"]["lpips_net"])}
    mark("D 256 px, iresnet100, DECA, LPIPS")
    ema = copy.deepcopy(model.encoder)
    mark("encoder EMA copy")
    return {"model": model, "ema": ema, **nets}


def adam_state(built: dict, timeline: list) -> None:
    """The optimiser state of the first step: gradients and both Adam moments of the encoder and D."""
    import torch

    for name in ("model", "D"):
        module = built[name].encoder if name == "model" else built[name]
        params = [q for q in module.parameters() if q.requires_grad]
        for q in params:
            q.grad = torch.zeros_like(q)
        torch.optim.Adam(params, lr=0.0).step()
    timeline.append({"after": "gradients + Adam moments (encoder, D)", **proc_mb()})


def full_child() -> dict:
    from mfim.runtime import release_free_memory

    with tempfile.TemporaryDirectory() as tmp:
        timeline: list[dict] = [{"after": "start (torch imported)", **proc_mb()}]
        t0 = time.perf_counter()
        files = write_paper_files(Path(tmp))
        built = build_paper(files, timeline)
    built_s = time.perf_counter() - t0
    release_free_memory()
    timeline.append({"after": "malloc_trim(0)", **proc_mb()})
    weights = [t.data for m in (built["model"].encoder, built["ema"]) for t in m.parameters()]
    workers = {context: worker_measure(weights, context, workers=1, batch=2) for context in ("fork", "spawn")}
    adam_state(built, timeline)
    return {"timeline": timeline, "workers": workers, "files_and_build_s": round(built_s, 1)}


def child_main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "workers":
        import torch

        torch.set_num_threads(1)
        tensors = standin_model(int(argv[2]))
        out = {"model": proc_mb(), **worker_measure(tensors, argv[1], workers=2)}
    elif kind == "load":
        out = load_and_free(argv[1])
    else:
        out = full_child()
    print(json.dumps(out))


# --------------------------------------------------------------------------------------------------- report


def print_workers(title: str, r: dict) -> None:
    print(f"\n{title}: context {r['context']}, {r['workers']} worker(s), first batches in {r['first_8_batches_s']} s")
    print(f"  parent RSS {r['parent']['rss']} MB, PSS {r['parent']['pss']} MB, USS {r['parent']['uss']} MB")
    for i, (b, a) in enumerate(zip(r["worker_before_write"], r["worker_after_write"])):
        print(f"  worker {i}: RSS {b['rss']} -> {a['rss']} MB, PSS {b['pss']} -> {a['pss']} MB, "
              f"USS {b['uss']} -> {a['uss']} MB (before -> after the parent rewrote its weights)")
    print(f"  memory in use by all of them (sum of PSS): {r['total_pss_mb']} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the real paper-size networks (~9 GB, minutes)")
    ap.add_argument("--model-mb", type=int, default=512, help="size of the stand-in model (default mode)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child)
    result = {"parameters": parameter_table()}
    print(f"{'object (configs/paper.yaml)':44s} {'params (M)':>11s} {'fp32 GB':>8s}")
    for row in result["parameters"]:
        print(f"{row['object']:44s} {row['params_M']:11.2f} {row['fp32_GB']:8.2f}")
    if args.full:
        result["full"] = r = run_child(["full"], timeout=1800)
        print(f"\npaper build (GLIBC_TUNABLES set), {r['files_and_build_s']} s incl. writing the files:")
        for t in r["timeline"]:
            print(f"  after {t['after']:45s} RSS {t['rss']:6d} MB  peak {t['peak_rss']:6d} MB")
        for context, w in r["workers"].items():
            print_workers("paper build, reader worker", w)
    else:
        for context in ("fork", "spawn"):
            result[f"workers_{context}"] = r = run_child(["workers", context, str(args.model_mb)])
            print_workers(f"stand-in model of {args.model_mb} MB", r)
    with tempfile.TemporaryDirectory() as tmp:
        import torch

        n = 40  # 380 MB: the encoder's size / 4
        torch.save({f"w{i}": torch.randn(CONV) for i in range(n)}, f"{tmp}/ckpt.pt")
        print("\nload a checkpoint, free the loaded copy (RSS in MB):")
        for tunables in (True, False):
            r = result[f"load_tunables_{'on' if tunables else 'off'}"] = run_child(["load", f"{tmp}/ckpt.pt"],
                                                                                 tunables)
            print(f"  tunables {'on ' if tunables else 'off'}: model {r['model_mb']}, start {r['start_rss']}, "
                  f"loaded {r['loaded_rss']}, after free {r['after_free_rss']}, "
                  f"after malloc_trim {r['after_malloc_trim_rss']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
