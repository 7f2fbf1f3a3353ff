"""MFIM training-step time, throughput and peak memory: the embedded default and the paper-scale configuration.

    .venv/bin/python benchmarks/bench_train.py [--paper] [--steps 3] [--device cpu|cuda]

Each configuration runs in its own child process (so peak RSS / CUDA peak memory belong to it alone) with randomly
initialised networks of the right sizes -- timing does not depend on trained weights. For every configuration the
same child also times a baseline: the frozen generator's forward + backward alone on the same batch (the part of a
step no encoder design can remove). The ratio step / baseline shows what the encoder, the loss networks and the
discriminator add on top.

Embedded default: params.yaml (64 px, small encoder, MobileFaceNet ID loss, LPIPS-Alex, 3DDFA_V2-sized 3DMM loss).
Paper scale (--paper): configs/paper.yaml sizes -- 1024 px official StyleGAN2 (30 M), IR-SE50 encoder at 256 px --
at batch 2 on CPU (batch 8 per GPU on CUDA). The 3DMM loss uses 3DDFA_V2 in both (DECA weights are not available
here; DECA's ResNet-50 costs about as much as the IR-SE50 encoder's forward).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_mod
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(cfg: dict, queue) -> None:
    import torch

    from mfim.config import load_params
    from mfim.criteria.id_loss import IDLoss
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.criteria.threedmm_loss import ThreeDMMLoss
    from mfim.models.encoder import EncoderConfig
    from mfim.models.mfim import MFIM
    from mfim.models.stylegan2 import Discriminator, Generator
    from mfim.nets.identity import MobileFaceNetEmbedder
    from mfim.nets.perceptual import load_lpips
    from mfim.nets.threedmm import TDDFAEncoder
    from mfim.training.objective import LossWeights, MFIMObjective
    from mfim.training.trainer import TrainConfig, Trainer

    params = load_params(cfg["params"])
    gen, enc_p = params["generator"], params["encoder"]
    size = int(params["data"]["resolution"])  # encoder input and the discriminator's (and the loss networks') size
    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    G = Generator(**{k: gen[k] for k in ("resolution", "style_dim", "n_mlp", "channel_base", "channel_max")})
    G = G.to(device).eval().requires_grad_(False)
    enc = EncoderConfig.from_params(params, input_size=size)
    model = MFIM(G, enc, coarse_max_res=int(enc_p["coarse_max_res"]), mix_global_res=tuple(enc_p["mix_global_res"]))
    objective = MFIMObjective(
        # the paper's eq. (6) weights (the timing should not depend on the embedded default's tuning)
        LossWeights.from_params(load_params(ROOT / "configs" / "paper.yaml")["loss"]),
        id_loss=IDLoss(MobileFaceNetEmbedder(device=device)),
        recon=ReconLoss(load_lpips("alex").to(device).eval().requires_grad_(False)),
        threedmm=ThreeDMMLoss(TDDFAEncoder(device=device)),
        discriminator=Discriminator(size, gen["channel_base"], gen["channel_max"]).to(device),
    )
    trainer = Trainer(model, objective, TrainConfig.from_params(params["train"]), device)
    b, s = cfg["batch"], enc.input_size
    batch = {"src": torch.rand(b, 3, s, s, device=device) * 2 - 1, "tgt": torch.rand(b, 3, s, s, device=device) * 2 - 1}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # baseline: the frozen generator forward + backward (into its styles) on this batch
    def g_fwd_bwd():
        with torch.no_grad():
            ws = G.broadcast(G.mapping(torch.randn(b, G.z_dim, device=device)))
            styles = [t.detach().requires_grad_(True) for t in G.styles_from_ws(ws)]
        G.synthesize(styles).square().mean().backward()

    g_fwd_bwd()
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        g_fwd_bwd()
    sync()
    base = (time.perf_counter() - t0) / cfg["steps"]

    trainer.train_step([batch])  # warm-up (also the R1 step)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        trainer.train_step([batch])
    sync()
    step = (time.perf_counter() - t0) / cfg["steps"]
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    queue.put(
        {
            "name": cfg["name"],
            "batch": b,
            "s_per_step": step,
            "img_per_s": b / step,
            "baseline_generator_fwd_bwd_s": base,
            "ratio_step_to_baseline": step / base,
            "peak_memory_mb": peak,
            "encoder_params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6,
            "generator_params_m": sum(p.numel() for p in G.parameters()) / 1e6,
        }
    )


def configs(paper: bool, device: str, steps: int) -> list[dict]:
    """The sizes come from the parameter files themselves (random weights; no official file is read)."""
    out = [{"name": "embedded default (params.yaml)", "params": str(ROOT / "params.yaml"), "batch": 8, "steps": steps,
            "threads": 2, "device": device}]
    if paper:
        out.append({"name": "paper scale (configs/paper.yaml)", "params": str(ROOT / "configs" / "paper.yaml"),
                    "batch": 8 if device == "cuda" else 2,
                    "steps": max(1, steps // 2) if device == "cpu" else steps, "threads": 2, "device": device})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paper", action="store_true", help="also the paper-scale configuration (slow on CPU)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for cfg in configs(args.paper, args.device, args.steps):
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(cfg, q))
        p.start()
        r = None
        while r is None:  # a child that dies (e.g. out of memory) must not leave us waiting forever
            try:
                r = q.get(timeout=5)
            except queue_mod.Empty:
                if not p.is_alive():
                    raise SystemExit(f"{cfg['name']}: the benchmark process died (exit code {p.exitcode})") from None
        p.join()
        results.append(r)
        print(
            f"{r['name']}: batch {r['batch']}, {r['s_per_step']:.2f} s/step, {r['img_per_s']:.2f} img/s, "
            f"peak {r['peak_memory_mb']:.0f} MB; generator fwd+bwd alone {r['baseline_generator_fwd_bwd_s']:.2f} s "
            f"-> step/baseline = {r['ratio_step_to_baseline']:.2f}x  (encoder {r['encoder_params_m']:.1f} M, "
            f"generator {r['generator_params_m']:.1f} M params)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
