"""Which weight files each pipeline stage reads, and a per-stage manifest of their bytes (sha256).

Why: weight files are named by params (paths), and DVC hashes only declared deps, so replacing deca_model.tar with
other weights at the same path left every stage "up to date" (issue 13). The paths cannot be deps themselves: they
are empty in the embedded default (whose registry assets live in the user's cache, outside the repo) and a dep must
exist. So the `weights` stage (always run, cheap) writes data/weights/<stage>.json with the sha256 of every weight
file that stage reads under the current params, and each stage depends on its own manifest: DVC reruns a stage
exactly when the bytes of one of its weight files changed, and only that stage.

Registry assets not fetched yet are recorded with their pinned sha256, which the fetcher verifies, so fetching one
does not change a manifest; a cached copy is hashed, so a replaced one does. An official file that is configured but
absent is recorded as missing (the stage that reads it then fails with its own error naming the key).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mfim.config import lookup

MANIFEST_DIR = Path("data/weights")
STAGES = ("synthesize", "align", "threedmm", "fit_regressor", "evalsets", "pretrain_generator", "warmstart", "train",
          "evaluate")

_TDDFA = ("tddfa_mb1_onnx", "tddfa_param_stats")
_BFM = ("bfm_noneck", "tddfa_param_stats")


def manifest_path(stage: str, root: str | Path = ".") -> Path:
    return Path(root) / MANIFEST_DIR / f"{stage}.json"


def _official(params: dict, key: str) -> dict[str, str]:
    """{params key: path} when the key is set (official weights are read only by path)."""
    value = lookup(params, key) or ""
    return {key: str(value)} if value else {}


def _landmarks(params: dict) -> list[str]:
    return ["dlib_landmarks68"] + (["dlib_cnn_detector"] if lookup(params, "align.detector") == "cnn" else [])


def _threedmm(params: dict, name: str) -> tuple[list[str], dict[str, str]]:
    if name == "tddfa":
        return list(_TDDFA), {}
    if name == "deca":
        return [], _official(params, "nets.threedmm.deca_checkpoint")
    return ["tddfa_param_stats"], {}  # fitted: its weights are a DVC output; BFM statistics may scale its loss


def _identity(params: dict) -> tuple[list[str], dict[str, str]]:
    """The training ID network: ArcFace iresnet by path, else MobileFaceNet from the registry."""
    official = _official(params, "nets.identity.iresnet_checkpoint")
    return ([] if official else ["mobilefacenet_onnx"]), official


def stage_weights(stage: str, params: dict) -> tuple[list[str], dict[str, str]]:
    """(registry asset names, {params key: path of an official file}) that ``stage`` reads under ``params``."""
    assets: list[str] = []
    official: dict[str, str] = {}

    def add(pair: tuple[list[str], dict[str, str]]) -> None:
        assets.extend(pair[0])
        official.update(pair[1])

    if stage in ("synthesize", "fit_regressor"):  # BFM renders
        assets += _BFM
        if stage == "fit_regressor" and any(lookup(params, f"threedmm.{g}.backbone") == "mobilenet_v1"
                                            for g in ("regressor", "evaluator")):
            assets += [a for a in _TDDFA if a not in assets]  # started from 3DDFA_V2's weights
        if stage == "fit_regressor":  # a loss network / evaluator fitted elsewhere, used as is (checkpoints/)
            for group in ("regressor", "evaluator"):
                official.update(_official(params, f"threedmm.{group}.shipped_checkpoint"))
    elif stage == "align":
        assets += _landmarks(params)
    elif stage == "evalsets":
        if lookup(params, "evalsets.protocol") != "synthetic":  # real frames are detected + aligned
            assets += _landmarks(params)
    elif stage == "threedmm":
        add(_threedmm(params, str(lookup(params, "threedmm.encoder"))))
    elif stage == "pretrain_generator":
        official.update(_official(params, "generator.checkpoint"))
    elif stage == "warmstart":
        assets.append(f"lpips_{lookup(params, 'loss.lpips_net')}")
    elif stage == "train":
        official.update(_official(params, "generator.checkpoint"))
        if lookup(params, "encoder.backbone") == "ir_se50":
            official.update(_official(params, "encoder.backbone_checkpoint"))
        add(_identity(params))
        assets.append(f"lpips_{lookup(params, 'loss.lpips_net')}")
        add(_threedmm(params, str(lookup(params, "loss.threedmm_encoder"))))
    elif stage == "evaluate":
        add(_identity(params))  # the training ID network's similarity is reported too
        identity = lookup(params, "evaluate.identity_embedder")
        assets += ["dlib_face_recognition", "dlib_landmarks5"] if identity == "dlib" else ["mobilefacenet_onnx"]
        add(_threedmm(params, str(lookup(params, "evaluate.threedmm_encoder"))))
        if int(lookup(params, "source_fit.steps") or 0) > 0 and float(lookup(params, "source_fit.exp") or 0) > 0:
            add(_threedmm(params, str(lookup(params, "loss.threedmm_encoder"))))  # the fit's anchor
        hopenet = _official(params, "nets.headpose.hopenet_checkpoint")
        official.update(hopenet)
        assets += [] if hopenet else ["hopenet_onnx"]
        official.update(_official(params, "evaluate.fid.inception_checkpoint"))
        assets += ["lpips_alex"] + _landmarks(params)  # LPIPS metrics / FD substitute; paste-back grid landmarks
    elif stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages that read weights: {', '.join(STAGES)}")
    return sorted(set(assets)), dict(sorted(official.items()))


class _Hasher:
    """sha256 per file, once per process (several stages read the same multi-GB files)."""

    def __init__(self):
        self._seen: dict[tuple, str] = {}

    def __call__(self, path: Path) -> str:
        from mfim.assets.store import sha256_file

        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._seen:
            self._seen[key] = sha256_file(path)
        return self._seen[key]


def stage_manifest(stage: str, params: dict, hasher: _Hasher | None = None) -> dict:
    """What DVC compares for ``stage``: the bytes of each weight file it reads (paths shown for people)."""
    from mfim.assets.registry import get
    from mfim.assets.store import cached_path

    hasher = hasher or _Hasher()
    assets, official = stage_weights(stage, params)
    out: dict = {"stage": stage, "official": {}, "registry": {}}
    for key, value in official.items():
        path = Path(value).expanduser()
        if path.is_file():
            out["official"][key] = {"path": value, "sha256": hasher(path), "bytes": path.stat().st_size}
        else:
            out["official"][key] = {"path": value, "missing": True}
    for name in assets:
        asset, cached = get(name), cached_path(get(name))
        out["registry"][name] = {"sha256": hasher(cached) if cached.is_file() else asset.sha256}
    return out


def write_manifests(params: dict, root: str | Path = ".") -> dict[str, Path]:
    """data/weights/<stage>.json for every stage in ``STAGES``; returns {stage: path}."""
    from mfim.atomic import atomic_write

    hasher = _Hasher()
    written = {}
    for stage in STAGES:
        text = json.dumps(stage_manifest(stage, params, hasher), indent=1, sort_keys=True) + "\n"
        path = manifest_path(stage, root)
        os.makedirs(path.parent, exist_ok=True)
        written[stage] = atomic_write(path, lambda f, t=text: f.write(t.encode()))
    return written


__all__ = ["MANIFEST_DIR", "STAGES", "manifest_path", "stage_manifest", "stage_weights", "write_manifests"]
