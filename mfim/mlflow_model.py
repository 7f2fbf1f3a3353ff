"""The trained swapper as an MLflow model: a pyfunc flavour with a signature, registered as ``mfim``.

Request: a table with columns ``source`` and ``target``, each a base64-encoded image file (PNG or JPEG), one swap per
row; parameter ``roi`` (default false) pastes the swapped face back into the target photo (configuration E+).
Answer: columns ``image`` (base64 PNG of the swap), ``provenance`` (its JSON record) and ``error`` (empty, or why the
row has no image, e.g. "source a.png: no face found").

Every row goes through the code `mfim swap` runs (mfim.commands.swap.Runner): the same detection and alignment, the
same upscaling, and mfim.provenance.save_image, so each image the model returns carries the invisible watermark and
the synthetic-provenance record (checkpoint sha256, software version, inputs' sha256), served or not.

The checkpoint file travels as the model's artifact: registering a model copies it into the artifact store once
(a version of an already registered checkpoint, same sha256, is reused instead of copied again).
"""

from __future__ import annotations

import base64
import json
import logging
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

log = logging.getLogger(__name__)

REGISTERED_NAME = "mfim"
CHAMPION = "champion"
SHA_TAG = "mfim.checkpoint_sha256"  # on each model version: which checkpoint bytes it serves


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "source"), ColSpec("string", "target")]),
        outputs=Schema([ColSpec("string", "image"), ColSpec("string", "provenance"), ColSpec("string", "error")]),
        params=ParamSchema([ParamSpec("roi", "boolean", False)]),
    )


class SwapperModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of mfim.inference.FaceSwapper (CPU unless MFIM_SERVE_DEVICE says otherwise)."""

    def load_context(self, context) -> None:
        import os

        from mfim.inference import FaceSwapper

        self.checkpoint = context.artifacts["checkpoint"]
        self.swapper = FaceSwapper.from_checkpoint(self.checkpoint, device=os.environ.get("MFIM_SERVE_DEVICE", "cpu"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        roi = bool((params or {}).get("roi", False))
        rows = [self._one(r["source"], r["target"], roi) for _, r in model_input.iterrows()]
        return pd.DataFrame(rows, columns=["image", "provenance", "error"])

    def _one(self, source_b64: str, target_b64: str, roi: bool) -> dict:
        from mfim.commands.swap import Job, Runner
        from mfim.provenance import read_record

        runner = Runner(self.swapper, "swap", roi=roi, progress=False, keep_going=True,
                        checkpoint=Path(self.checkpoint).name)
        with tempfile.TemporaryDirectory(prefix="mfim-serve-") as tmp:
            tmp = Path(tmp)
            try:
                src, tgt = _decoded(source_b64, tmp / "source"), _decoded(target_b64, tmp / "target")
            except ValueError as e:
                return {"image": "", "provenance": "", "error": str(e)}
            out = tmp / "swap.png"
            runner.run(Job(tgt, {"source": src}, out, "target"))
            if not out.is_file():
                reason = runner.rejects[-1][1] if runner.rejects else "no output"
                return {"image": "", "provenance": "", "error": reason}
            return {"image": base64.b64encode(out.read_bytes()).decode("ascii"),
                    "provenance": json.dumps(read_record(out), sort_keys=True), "error": ""}


def _decoded(b64: str, stem: Path) -> Path:
    """The request's base64 image as a file named by its format (what mfim.imageio reads); ValueError if not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(b64, validate=True)
    except (ValueError, TypeError):
        raise ValueError(f"{stem.name}: not base64") from None
    stem.write_bytes(data)
    try:
        with Image.open(stem) as im:
            fmt = (im.format or "").lower()
    except UnidentifiedImageError:
        raise ValueError(f"{stem.name}: not an image file") from None
    path = stem.with_suffix({"jpeg": ".jpg"}.get(fmt, f".{fmt}"))
    stem.rename(path)
    return path


def requirements() -> list[str]:
    """The mfim package's own dependencies (the serving environment also needs mfim itself: `pip install -e .`)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [r for r in (requires("mfim") or []) if "extra ==" not in r]
    except PackageNotFoundError:
        return []


def log_swapper(checkpoint: str | Path, name: str = "model"):
    """Log ``checkpoint`` as a pyfunc model in the active run; returns mlflow's ModelInfo."""
    from mfim import __version__
    from mfim.assets import sha256_file

    return mlflow.pyfunc.log_model(
        name=name,
        python_model=SwapperModel(),
        artifacts={"checkpoint": str(checkpoint)},
        signature=signature(),
        pip_requirements=requirements(),
        metadata={"mfim_version": __version__, "checkpoint_sha256": sha256_file(checkpoint)},
    )


def register_swapper(checkpoint: str | Path, tags: dict | None = None, name: str = REGISTERED_NAME):
    """A version of registered model ``name`` for ``checkpoint`` (in the active run): the existing one with the same
    sha256, else a new one logged from this run. Returns the ModelVersion."""
    from mfim.assets import sha256_file

    client = mlflow.MlflowClient()
    sha = sha256_file(checkpoint)
    try:
        for v in client.search_model_versions(f"name = '{name}'"):
            if v.tags.get(SHA_TAG) == sha:
                return v
    except mlflow.exceptions.MlflowException:  # no registered model of that name yet
        pass
    info = log_swapper(checkpoint)
    version = mlflow.register_model(info.model_uri, name, tags={SHA_TAG: sha, **(tags or {})})
    return version


def set_champion(version, holds: bool, name: str = REGISTERED_NAME) -> bool:
    """Point alias ``champion`` at ``version`` when the quality checks hold; otherwise leave it where it was."""
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version.version, "mfim.checks_hold", str(holds).lower())
    if holds:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return holds
