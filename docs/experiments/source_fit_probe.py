"""Does fitting the inverted codes at test time bring back the person? (docs/EXPERIMENTS.md §16)

    python docs/experiments/source_fit_probe.py MODEL.pt STEPS LR [--maps] [--all-codes] [--pixel W] [--id W]

identity_diagnostic.people's A, B, T for the 40 eval people. Starting from the encoder's inversion of A, Adam on
offsets to its style codes (the ID codes only, or ``--all-codes``; and to its style maps with ``--maps``) against A:
W x (L1 + LPIPS) + id x (1 - cos MobileFaceNet). Prints the reconstruction's L1 to A before / after, and dlib's top-1
retrieval against B of the encoder's reconstruction, the fitted one, and the swap of A onto T with the fitted ID codes
and T's own coarse codes and maps. mfim.models.source_fit is the shipped form (ID codes only, maps fixed).
"""

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, "docs/experiments")
from identity_diagnostic import BATCH, batched, people, top1  # noqa: E402

from mfim.models.mfim import load_swapper  # noqa: E402
from mfim.nets.identity import DlibIdentityEmbedder, MobileFaceNetEmbedder  # noqa: E402
from mfim.nets.perceptual import load_lpips  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("steps", type=int)
    ap.add_argument("lr", type=float)
    ap.add_argument("--maps", action="store_true")
    ap.add_argument("--all-codes", action="store_true")
    ap.add_argument("--pixel", type=float, default=1.0)
    ap.add_argument("--id", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = load_swapper(args.model)
    model.requires_grad_(False)
    lpips, dlib, mobilefacenet = load_lpips("alex"), DlibIdentityEmbedder(), MobileFaceNetEmbedder(device="cpu")
    A, B, T = people("eval", 40, model.encoder.cfg.input_size)
    embed = lambda x: np.concatenate(batched(lambda b: dlib.embed_aligned(b.clamp(-1, 1)), x))  # noqa: E731
    recon, fitted, swapped = [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(A), BATCH):
        a, t = A[i : i + BATCH], T[i : i + BATCH]
        with torch.no_grad():
            codes, maps = model.invert(a)
            t_codes, t_maps = model.invert(t)
            recon.append(model.synthesize(codes, maps))
            a_id = F.normalize(mobilefacenet(a), dim=1)
        moving = codes if args.all_codes else {k: codes[k] for k in model.src_indices}
        dc = {k: torch.zeros_like(v, requires_grad=True) for k, v in moving.items()}
        dm = {k: torch.zeros_like(v, requires_grad=True) for k, v in maps.items()} if args.maps else {}
        opt = torch.optim.Adam([*dc.values(), *dm.values()], lr=args.lr)
        current = lambda: ({k: c + dc[k] if k in dc else c for k, c in codes.items()},  # noqa: E731
                           {k: m + dm[k] if k in dm else m for k, m in maps.items()})
        for _ in range(args.steps):
            y = model.synthesize(*current())
            loss = args.pixel * ((y - a).abs().mean() + lpips(y, a).mean())
            if args.id:
                loss = loss + args.id * (1 - (F.normalize(mobilefacenet(y), dim=1) * a_id).sum(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            c, m = current()
            fitted.append(model.synthesize(c, m))
            swapped.append(model.synthesize({**t_codes, **{k: c[k] for k in model.src_indices}}, t_maps))
    R, Rf, S = (torch.cat(x).clamp(-1, 1) for x in (recon, fitted, swapped))
    e_b = embed(B)
    print(f"{time.perf_counter() - t0:.0f} s; recon L1 to A {(R - A).abs().mean():.3f} -> {(Rf - A).abs().mean():.3f}; "
          f"dlib top-1 -> B: recon {top1(embed(R), e_b):.3f}, fitted {top1(embed(Rf), e_b):.3f}, "
          f"swap with fitted ID codes {top1(embed(S), e_b):.3f}")


if __name__ == "__main__":
    main()
