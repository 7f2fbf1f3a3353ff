"""Where does a swapper lose identity? (docs/EXPERIMENTS.md §9)

    python docs/experiments/identity_diagnostic.py MODEL.pt [n_people]      (repo root, after `dvc repro shard`)

Per split (train, eval): n_people people, render A and another render B of each, and a target T of the next person.
Reconstruct A, swap A onto T; top-1 retrieval among the n people, with dlib (the evaluation embedder) and with
MobileFaceNet (the ID loss's network): recon -> A (its own input), recon -> B (another render of the person), real
A -> B (what the embedder can do at all), swap -> B. Then, on the eval split, the swap with parts of the target's
contribution removed at inference (style maps of some resolutions; the code split moved to 4 px), to see which part
carries the target's identity.
"""

import sys

import numpy as np
import torch

from mfim.data.shards import ShardIndex, split_pattern
from mfim.evaluation.grids import from_uint8
from mfim.models.mfim import load_swapper
from mfim.nets.identity import DlibIdentityEmbedder, MobileFaceNetEmbedder

BATCH = 16


def batched(fn, x):
    with torch.no_grad():
        return [fn(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def top1(query: np.ndarray, gallery: np.ndarray) -> float:
    """Share of queries whose nearest gallery entry (cosine) is the one at the same row."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return float(np.mean((q @ g.T).argmax(1) == np.arange(len(q))))


def mean_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, axis=1).mean())


def people(split: str, n: int, res: int):
    """(A, B, T): render 0 and 1 of n people, and render 2 of the next person as each one's target."""
    index = ShardIndex(split_pattern("data/shards", split))
    members: dict[int, list[int]] = {}
    for i, ident in enumerate(index.identities):
        members.setdefault(int(ident), []).append(i)
    ids = sorted(k for k, v in members.items() if k >= 0 and len(v) >= 3)[:n]
    read = lambda picks: from_uint8(np.stack([index.read(i, res).image for i in picks]))  # noqa: E731
    out = (read([members[k][0] for k in ids]), read([members[k][1] for k in ids]),
           read([members[ids[(j + 1) % len(ids)]][2] for j in range(len(ids))]))
    index.close()
    return out


def swap_without(model, a, t, drop_map_res=(), split=None):
    """The swap of a onto t with the target's style maps at ``drop_map_res`` left out and, when ``split`` is given,
    the target's codes only up to that resolution (nothing left out: ``model.swap``)."""
    res_noise = {n.index: n.resolution for n in model.generator.noise_layers}
    res_style = {l.index: l.resolution for l in model.generator.style_layers}
    cut = model.coarse_max_res if split is None else split
    tgt, src = model.encoder(t, with_maps=True), model.encoder(a, with_maps=False)
    codes = {k: model.average_style(k) + (tgt.codes[k] if r <= cut else src.codes[k]) for k, r in res_style.items()}
    maps = {k: m for k, m in tgt.maps.items() if res_noise[k] not in drop_map_res}
    return model.synthesize(codes, maps)


def swaps(model, A, T, drop_map_res=(), split=None) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([swap_without(model, A[j : j + BATCH], T[j : j + BATCH], drop_map_res, split)
                          for j in range(0, len(A), BATCH)])


def main() -> None:
    torch.set_num_threads(2)
    model, _ = load_swapper(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    res = model.encoder.cfg.input_size
    dlib, mfn = DlibIdentityEmbedder(), MobileFaceNetEmbedder()
    by_dlib = lambda x: np.concatenate(batched(lambda b: dlib.embed_aligned(b.clamp(-1, 1)), x))  # noqa: E731
    by_mfn = lambda x: torch.cat(batched(mfn, x)).numpy()  # noqa: E731
    for split in ("train", "eval"):
        A, B, T = people(split, n, res)
        R = torch.cat(batched(model.reconstruct, A))
        S = swaps(model, A, T)
        for name, embed in (("dlib", by_dlib), ("mobilefacenet", by_mfn)):
            a, b, r, s = embed(A), embed(B), embed(R), embed(S)
            print(f"{split:5s} {name:13s} recon L1 {float((R - A).abs().mean()):.3f} | top-1 recon->A {top1(r, a):.3f}"
                  f" recon->B {top1(r, b):.3f} real A->B {top1(a, b):.3f} swap->B {top1(s, b):.3f}", flush=True)
    b, t = by_dlib(B), by_dlib(T)  # the loop's last split: eval
    for drop, split in (((), None), ((16,), None), ((8, 16), None), ((), 4), ((16,), 4)):
        S = swaps(model, A, T, drop, split)
        s = by_dlib(S)
        print(f"eval swap without maps at {drop or 'none'}, split {split or model.coarse_max_res} px: dlib top-1 "
              f"{top1(s, b):.3f}, L2 to source {mean_l2(s, b):.3f} / target {mean_l2(s, t):.3f}, "
              f"L1 to target {float((S - T).abs().mean()):.3f}", flush=True)


if __name__ == "__main__":
    main()
