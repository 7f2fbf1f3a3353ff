"""Image or person? Retrieval of reconstructions and swaps against another render of the person (EXPERIMENTS §16).

    python docs/experiments/id_crop_probe.py MODEL.pt      (repo root, after `dvc repro shard`)

Per split (eval, train): identity_diagnostic.people's A, B, T for 40 people; the reconstruction R of A and the swap
S of A onto T. Top-1 retrieval among the 40 with dlib (the evaluator) and with the ID loss's MobileFaceNet on the
ArcFace crop and on wider crops (the template shrunk towards the crop centre by ``s``: s < 1 shows more of the face
outline and surroundings, as dlib's padded chip does): A -> B (what the network can do at all), R -> B and S -> B
(the person), S -> A (the source image itself), S -> T (the target's person).
"""

import sys

import numpy as np
import torch

sys.path.insert(0, "docs/experiments")
from identity_diagnostic import BATCH, batched, people, top1  # noqa: E402

from mfim.models.mfim import load_swapper  # noqa: E402
from mfim.nets.face_crops import ARCFACE_TEMPLATE_112, aligned_from_template, warp  # noqa: E402
from mfim.nets.identity import DlibIdentityEmbedder, MobileFaceNetEmbedder  # noqa: E402

CROP_SCALES = (1.0, 0.85, 0.7, 0.55)


def main() -> None:
    torch.set_num_threads(2)
    model, _ = load_swapper(sys.argv[1])
    mobilefacenet, dlib = MobileFaceNetEmbedder(device="cpu"), DlibIdentityEmbedder()

    def mobilefacenet_at(scale):
        template = 56 + scale * (ARCFACE_TEMPLATE_112 - 56)  # 56 = the 112 px crop's centre

        def embed(x):
            m = aligned_from_template(x.shape[-1], template)
            return mobilefacenet.embed_crops(warp(x, m, 112, fill=-1.0)).numpy()

        return embed

    embedders = {"dlib": dlib.embed_aligned} | {f"MobileFaceNet s={s}": mobilefacenet_at(s) for s in CROP_SCALES}
    for split in ("eval", "train"):
        A, B, T = people(split, 40, model.encoder.cfg.input_size)
        with torch.no_grad():
            S = torch.cat([model.swap(A[i : i + BATCH], T[i : i + BATCH]) for i in range(0, len(A), BATCH)])
            R = torch.cat([model.swap(A[i : i + BATCH], A[i : i + BATCH]) for i in range(0, len(A), BATCH)])
        images = {"A": A, "B": B, "T": T, "S": S.clamp(-1, 1), "R": R.clamp(-1, 1)}
        for name, embed in embedders.items():
            e = {k: np.concatenate(batched(embed, v)) for k, v in images.items()}
            print(f"{split:5s} {name:20s} A->B {top1(e['A'], e['B']):.3f}  R->B {top1(e['R'], e['B']):.3f}  "
                  f"S->B {top1(e['S'], e['B']):.3f}  S->A {top1(e['S'], e['A']):.3f}  S->T {top1(e['S'], e['T']):.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
