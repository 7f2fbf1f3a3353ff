"""`mfim analyze IMAGE... [--json]`: what the auxiliary networks see in a photo.

Per image: every face's box, 68 landmarks and detection rotation, and for each face (FFHQ-aligned first) the identity
embeddings (MobileFaceNet 512-d, dlib 128-d), 3DMM shape / expression / pose (degrees, 3DDFA_V2) and Hopenet
yaw / pitch / roll. A network whose module or weights are missing is reported as "unavailable: <reason>" in its field;
a file that cannot be read gets an "error" field; the run goes on either way.
"""

from __future__ import annotations

import sys

NETWORK_FIELDS = ("identity_mobilefacenet", "identity_dlib", "threedmm", "headpose_hopenet")


def register(sub) -> None:
    from mfim.resources import MAX_CROP, MAX_UPSAMPLE, bounded_int, crop_bytes

    p = sub.add_parser("analyze", help="faces, landmarks, identity, 3DMM and head pose of photos")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print one JSON list (one object per image)")
    p.add_argument("--detector", choices=["hog", "cnn"], default="hog")
    p.add_argument("--upsample", type=bounded_int(0, MAX_UPSAMPLE), default=1,
                   help=f"detector upsampling passes, each doubles the side (0 to {MAX_UPSAMPLE}; default 1)")
    p.add_argument("--size", type=bounded_int(16, MAX_CROP, crop_bytes), default=256,
                   help=f"aligned crop size the networks see (16 to {MAX_CROP}; default 256)")
    p.add_argument("--largest", action="store_true", help="only the largest face of each image")
    p.add_argument("--no-networks", action="store_true", help="detection and landmarks only")
    p.add_argument("--device", default="cpu", help="torch device for the networks (default cpu)")
    p.set_defaults(func=run)


def _reason(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, ModuleNotFoundError):
        return f"unavailable: module {e.name} is not installed"
    return f"unavailable: {type(e).__name__}: {msg}" if msg else f"unavailable: {type(e).__name__}"


class NetworkHooks:
    """The optional networks, built on first use; a network that cannot be built stays 'unavailable: reason'."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._built: dict = {}

    def _get(self, name: str):
        if name not in self._built:
            try:
                self._built[name] = (self._build(name), None)
            except Exception as e:  # missing module, missing weights, bad install: report, never crash
                self._built[name] = (None, _reason(e))
        return self._built[name]

    def _build(self, name: str):
        if name == "identity_mobilefacenet":
            from mfim.nets.identity import MobileFaceNetEmbedder

            return MobileFaceNetEmbedder(device=self.device)
        if name == "identity_dlib":
            from mfim.nets.identity import DlibIdentityEmbedder

            return DlibIdentityEmbedder()
        if name == "threedmm":
            from mfim.nets.threedmm import build_threedmm_encoder

            return build_threedmm_encoder("tddfa", device=self.device)
        if name == "headpose_hopenet":
            from mfim.nets.headpose import HopenetOnnx

            try:
                return HopenetOnnx(device=self.device)
            except TypeError:  # constructor without a device argument
                return HopenetOnnx()
        raise KeyError(name)

    def run(self, aligned_uint8) -> dict:
        """{field: value or 'unavailable: reason'} for one FFHQ-aligned face (H×W×3 uint8)."""
        import numpy as np
        import torch

        out = {}
        x = torch.from_numpy(np.array(aligned_uint8, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        x = x.to(self.device)
        for name in NETWORK_FIELDS:
            net, reason = self._get(name)
            if net is None:
                out[name] = reason
                continue
            try:
                with torch.no_grad():
                    out[name] = self._call(name, net, x, aligned_uint8)
            except Exception as e:
                out[name] = _reason(e)
        return out

    @staticmethod
    def _call(name: str, net, x, aligned_uint8):
        import math

        import numpy as np

        def floats(t, nd=5):
            a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
            return [round(float(v), nd) for v in np.asarray(a, dtype=np.float64).reshape(-1)]

        if name == "identity_mobilefacenet":
            return floats(net(x)[0])
        if name == "identity_dlib":
            return floats(net.embed_aligned([aligned_uint8])[0])
        if name == "threedmm":
            p = net(x)
            yaw, pitch, roll = (math.degrees(v) for v in floats(p.pose[0], 8))
            return {
                "shape": floats(p.shape[0]),
                "expression": floats(p.exp[0]),
                "pose_deg": {"yaw": round(yaw, 3), "pitch": round(pitch, 3), "roll": round(roll, 3)},
            }
        if name == "headpose_hopenet":
            yaw, pitch, roll = floats(net(x)[0], 3)
            return {"yaw": yaw, "pitch": pitch, "roll": roll}
        raise KeyError(name)


def analyze_image(path, landmarker, hooks: NetworkHooks | None, size: int = 256, largest: bool = False) -> dict:
    """The analysis of one image file as a JSON-ready dict (an 'error' field instead when it cannot be read)."""
    from mfim.imageio import ImageRejected, read_rgb
    from mfim.nets.align import align_face

    result: dict = {"file": str(path)}
    try:
        img = read_rgb(path)
    except ImageRejected as e:
        result["error"] = str(e)
        return result
    result["height"], result["width"] = (int(v) for v in img.shape[:2])
    faces = landmarker.detect(img)
    result["n_faces"] = len(faces)
    if not faces:
        result["error"] = "no face found"
        result["faces"] = []
        return result
    if largest:
        faces = faces[:1]
    entries = []
    for face in faces:
        entry = face.to_dict()
        if hooks is not None:
            aligned = align_face(img, face.landmarks, size, 4 * size)
            entry["aligned_transform"] = [round(v, 6) for v in aligned.transform.to_list()]
            entry.update(hooks.run(aligned.image))
        entries.append(entry)
    result["faces"] = entries
    return result


def _print_human(res: dict) -> None:
    if "error" in res and not res.get("faces"):
        print(f"{res['file']}: {res['error']}")
        return
    print(f"{res['file']}: {res['width']}x{res['height']}, {res['n_faces']} face(s)")
    for i, f in enumerate(res["faces"]):
        box = ", ".join(f"{v:.0f}" for v in f["box"])
        rot = f", found after rotating {f['rotation']}°" if f["rotation"] else ""
        print(f"  face {i}: box ({box}), score {f['score']:.2f}{rot}")
        for name in NETWORK_FIELDS:
            if name not in f:
                continue
            v = f[name]
            if isinstance(v, str):
                text = v
            elif isinstance(v, list):
                text = f"{len(v)}-d embedding"
            elif name == "threedmm":
                p = v["pose_deg"]
                text = f"pose yaw {p['yaw']:.1f}° pitch {p['pitch']:.1f}° roll {p['roll']:.1f}°"
            else:
                text = f"yaw {v['yaw']:.1f}° pitch {v['pitch']:.1f}° roll {v['roll']:.1f}°"
            print(f"    {name}: {text}")


def run(args) -> int:
    import json

    from mfim.nets.landmarks import DlibFaceLandmarker

    landmarker = DlibFaceLandmarker(args.detector, args.upsample)
    hooks = None if args.no_networks else NetworkHooks(args.device)
    results = []
    for path in args.images:
        try:
            res = analyze_image(path, landmarker, hooks, args.size, args.largest)
        except Exception as e:  # one bad file must not end the run
            res = {"file": str(path), "error": f"{type(e).__name__}: {e}"}
        results.append(res)
        if not args.json:
            _print_human(res)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0 if any("faces" in r and r["faces"] for r in results) else 1
