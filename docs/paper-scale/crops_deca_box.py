"""How far DECA's landmark-placed box moves from the canonical window of an FFHQ-aligned face (issue 36).

DECA crops a square from the 68 landmarks of the face (``mfim.nets.deca.deca_crop_box``); without landmarks our
crop uses the box of the canonical FFHQ landmarks, the same for every aligned face. This script measures, on BFM
heads turned in yaw (``mfim.data.synth``), the offset of the landmark box's centre from the canonical one and the
ratio of their sides, in pixels of DECA's 224 px crop, for two kinds of landmarks:

* ``bfm``: the 68 BFM landmark vertices projected: fixed points on the mesh, so on a turned head the far jaw points
  move inside the silhouette;
* ``dlib``: dlib's 68 points detected on the render, the face aligned from them -- what the ``align`` stage does to
  every input and the shards store (like DECA's FAN, dlib's jaw follows the visible outline).

Quick (about a minute on one core): ``python docs/paper-scale/crops_deca_box.py [--people 6]``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mfim.config import embedded_default
from mfim.data.synth import SynthConfig, Synthesizer, face_center, make_background, placement, render_face
from mfim.nets.align import canonical_fractions_from_shape
from mfim.nets.bfm import BFMModel
from mfim.nets.deca import DECA_INPUT_SIZE, deca_crop_box
from mfim.nets.face_crops import canonical_landmark_box, landmark_box

YAWS_DEG = (-30, -20, -10, 0, 10, 20, 30)


def box_offset(fractions: np.ndarray, size: int = 1024) -> tuple[np.ndarray, float]:
    """(centre offset (x, y), side ratio) of DECA's box from these landmarks (fractions of the aligned crop) against
    the canonical box, the offset in pixels of the 224 px crop."""
    box = deca_crop_box(landmark_box(fractions * size))  # continuous coordinates: a fraction times the side
    ref = deca_crop_box(canonical_landmark_box(size))
    side = ref[2] - ref[0]
    offset = ((box[:2] + box[2:]) - (ref[:2] + ref[2:])) / 2 / side * DECA_INPUT_SIZE
    return offset, float((box[2] - box[0]) / side)


def heads(people: int, seed: int):
    """(yaw_deg, shape, exp, pose) of ``people`` BFM identities at each yaw of YAWS_DEG, random pitch and expression."""
    synth = Synthesizer(SynthConfig.from_params({**embedded_default()["synthesize"], "seed": seed}))
    rng = np.random.default_rng(seed)
    for person in range(people):
        who = synth.identity(person)
        for yaw in YAWS_DEG:
            exp = np.clip(rng.standard_normal(synth.exp_std.shape), -2.5, 2.5) * synth.exp_std
            pose = np.radians([yaw, rng.uniform(-15, 15), rng.uniform(-10, 10)])
            yield synth, who, yaw, exp.astype(np.float32), pose


def measure(people: int, seed: int, with_dlib: bool) -> dict[str, list]:
    landmarker = None
    if with_dlib:
        from mfim.nets.landmarks import DlibFaceLandmarker

        landmarker = DlibFaceLandmarker()
    rows: dict[str, list] = {"bfm": [], "dlib": []}
    canvas, width = 256, 110.0
    for synth, who, yaw, exp, pose in heads(people, seed):
        bfm: BFMModel = synth.bfm
        centre = face_center(bfm, pose, width, np.array([0.5, 0.5]), canvas)
        camera = placement(bfm, pose, width, centre, canvas)
        with torch.no_grad():
            lm3d = bfm.landmarks3d(torch.as_tensor(who.shape)[None], torch.as_tensor(exp)[None]).double()
        true_lm = BFMModel.project(lm3d, torch.from_numpy(camera)[None], canvas)[0, :, :2].numpy()
        rows["bfm"].append((yaw, *box_offset(canonical_fractions_from_shape(true_lm))))
        if landmarker is not None:
            rng = np.random.default_rng([seed, who.identity, yaw + 90])
            render = render_face(bfm, synth.albedo(who), who.shape, exp, camera, canvas, make_background(rng, canvas))
            face = landmarker.largest(render.image)
            if face is not None:
                rows["dlib"].append((yaw, *box_offset(canonical_fractions_from_shape(face.landmarks))))
    return rows


def summary(rows: list) -> list[str]:
    lines = ["| yaw | n | centre offset x: mean / max abs (224 px) | y: mean / max abs | side ratio min-max |",
             "| --- | --- | --- | --- | --- |"]
    for yaw in sorted({abs(r[0]) for r in rows}):
        part = [r for r in rows if abs(r[0]) == yaw]
        off = np.array([r[1] for r in part])
        ratio = np.array([r[2] for r in part])
        lines.append(f"| ±{yaw}° | {len(part)} | {np.abs(off[:, 0]).mean():.1f} / {np.abs(off[:, 0]).max():.1f} | "
                     f"{np.abs(off[:, 1]).mean():.1f} / {np.abs(off[:, 1]).max():.1f} | "
                     f"{ratio.min():.3f}-{ratio.max():.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-dlib", action="store_true", help="only the BFM landmark vertices (no render, no detector)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.people, args.seed, not args.no_dlib)
    for kind, part in rows.items():
        if part:
            print(f"\n{kind} landmarks ({len(part)} heads)")
            print("\n".join(summary(part)))


if __name__ == "__main__":
    main()
