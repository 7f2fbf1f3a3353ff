"""Which generator inputs carry the identity dlib reads? (docs/EXPERIMENTS.md §15)

    python docs/experiments/identity_layers.py [MODEL.pt]      (repo root, after `dvc repro shard`)

For the 40 people of the eval split (identity_diagnostic.people: render A, another render B, a target T of the
next person), invert A and T (codes and maps, the refiner included), synthesise from mixes of the two inversions
-- style codes by generator resolution, style maps by resolution -- and print dlib's top-1 retrieval of each mix
against B (the person, not the image) with its mean L2 to B and to T.
"""

import sys

import numpy as np
import torch

sys.path.insert(0, "docs/experiments")
from identity_diagnostic import BATCH, batched, mean_l2, people, top1  # noqa: E402

from mfim.models.mfim import load_swapper  # noqa: E402
from mfim.nets.identity import DlibIdentityEmbedder  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    model, _ = load_swapper(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/mfim_synth64.pt")
    A, B, T = people("eval", 40, model.encoder.cfg.input_size)
    dlib = DlibIdentityEmbedder()
    embed = lambda x: np.concatenate(batched(lambda b: dlib.embed_aligned(b.clamp(-1, 1)), x))  # noqa: E731
    code_res = {layer.index: layer.resolution for layer in model.generator.style_layers}
    map_res = {layer.index: layer.resolution for layer in model.generator.noise_layers}

    def invert(x):
        with torch.no_grad():
            parts = [model.invert(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
        join = lambda ds: {k: torch.cat([d[k] for d in ds]) for k in ds[0]}  # noqa: E731
        return join([p[0] for p in parts]), join([p[1] for p in parts])

    (codes_a, maps_a), (codes_t, maps_t) = invert(A), invert(T)
    e_b, e_t = embed(B), embed(T)

    def show(name, codes, maps):
        with torch.no_grad():
            x = torch.cat([model.synthesize({k: v[i : i + BATCH] for k, v in codes.items()},
                                            {k: v[i : i + BATCH] for k, v in maps.items()})
                           for i in range(0, len(A), BATCH)])
        e = embed(x)
        print(f"{name:44s} dlib top-1 -> B {top1(e, e_b):.3f}  L2 -> B {mean_l2(e, e_b):.3f}  -> T {mean_l2(e, e_t):.3f}",
              flush=True)

    def codes_split(cut):  # the target's codes up to ``cut`` px, the source's above
        return {k: (codes_t[k] if code_res[k] <= cut else codes_a[k]) for k in codes_a}

    def maps_from(t_res):  # the target's maps at the resolutions in ``t_res``, the source's elsewhere
        return {k: (maps_t[k] if map_res[k] in t_res else maps_a[k]) for k in maps_a}

    resolutions = sorted(set(map_res[k] for k in maps_a))
    show("codes A, maps A (the reconstruction)", codes_a, maps_a)
    show("codes A, maps T", codes_a, maps_t)
    show("codes A, no maps", codes_a, {})
    for r in resolutions:
        show(f"codes A, maps A but T's at {r} px", codes_a, maps_from({r}))
    swap_cut = model.coarse_max_res
    show(f"codes T <= {swap_cut} px, maps T (the swap)", codes_split(swap_cut), maps_t)
    for r in resolutions:
        show(f"the swap, but A's maps at {r} px", codes_split(swap_cut), maps_from(set(resolutions) - {r}))
    for cut in (4, 8, 16, 32):
        show(f"codes T <= {cut} px, maps A", codes_split(cut), maps_a)
    show("codes T, maps A", codes_t, maps_a)


if __name__ == "__main__":
    main()
