"""The swapper as a registered MLflow model: pyfunc with a signature, `mfim swap --model models:/mfim@champion`, and
`mlflow models serve` answering a swap on 127.0.0.1 with a watermarked image and its provenance."""

import base64
import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch

from mfim import watermark as wm
from mfim.models.mfim import MFIM, save_swapper
from mfim.models.stylegan2 import Generator
from tests.servers import free_port, stop, wait_until_it_answers
from tests.defaults import unit_encoder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny randomly initialised swapper registered as mfim v1 with alias champion, in its own sqlite store."""
    import mlflow

    from mfim.mlflow_model import register_swapper, set_champion

    root = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    G = Generator(resolution=64, style_dim=32, n_mlp=2, channel_base=1024, channel_max=16)
    model = MFIM(G, unit_encoder(input_size=64, width=8, code_channels=16), coarse_max_res=16)
    ck = root / "mfim.pt"
    save_swapper(model, ck, meta={"align_output_size": 128, "data_resolution": 64})
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("t", artifact_location=(root / "art").as_uri())
    with mlflow.start_run(experiment_id=exp):
        v = register_swapper(ck)
        assert set_champion(v, holds=True)
        again = register_swapper(ck)  # the same checkpoint again: the same version, no second copy
    assert str(again.version) == str(v.version) == "1"
    return {"uri": uri, "root": root, "checkpoint": ck}


def _b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def _check_answer(row: dict, checkpoint) -> None:
    from PIL import Image
    import io

    from mfim.assets import sha256_file

    assert row["error"] == ""
    raw = base64.b64decode(row["image"])
    image = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert min(image.shape[:2]) >= 256  # upscaled as `mfim swap` does, so the mark has room
    assert wm.detect(image)["watermarked"]
    rec = json.loads(row["provenance"])
    assert rec["synthetic"] is True and rec["watermark"] == wm.SCHEME
    assert rec["checkpoint_sha256"] == sha256_file(checkpoint)
    embedded = json.loads(Image.open(io.BytesIO(raw)).text["mfim"])  # the record travels inside the PNG too
    assert embedded == rec


def test_registered_model_has_signature_and_alias(store):
    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    info = mlflow.models.get_model_info("models:/mfim@champion")
    assert info.signature.inputs.input_names() == ["source", "target"]
    assert info.signature.outputs.input_names() == ["image", "provenance", "error"]
    assert str(mlflow.MlflowClient().get_model_version_by_alias("mfim", "champion").version) == "1"


def test_pyfunc_predict_marks_every_image(store, photo_paths):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pyfunc.load_model("models:/mfim@champion")
    blank = base64.b64encode(b"not an image").decode()
    out = model.predict(pd.DataFrame({"source": [_b64(photo_paths["obama"]), blank],
                                      "target": [_b64(photo_paths["biden"])] * 2}))
    _check_answer(out.iloc[0].to_dict(), store["checkpoint"])
    assert out.iloc[1]["image"] == "" and "not an image" in out.iloc[1]["error"]


def test_cli_swap_takes_a_models_uri(store, photo_paths, tmp_path, monkeypatch):
    from mfim import cli
    from mfim.assets import sha256_file
    from mfim.provenance import read_record

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    out = tmp_path / "out.png"
    rc = cli.main(["swap", "-s", str(photo_paths["obama"]), "-t", str(photo_paths["biden"]), "-o", str(out), "-q",
                   "--model", "models:/mfim@champion"])
    assert rc == 0 and read_record(out)["checkpoint_sha256"] == sha256_file(store["checkpoint"])
    rc = cli.main(["swap", "-s", str(photo_paths["obama"]), "-t", str(photo_paths["biden"]), "-o",
                   str(tmp_path / "o2.png"), "-q", "--model", "models:/mfim@nosuchalias"])
    assert rc == 2


@pytest.mark.timeout(240)
def test_served_model_answers_a_swap_on_localhost(store, photo_paths):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mfim@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until_it_answers(f"http://127.0.0.1:{port}/ping", server, 150)
        body = json.dumps({"dataframe_split": {"columns": ["source", "target"],
                                               "data": [[_b64(photo_paths["obama"]), _b64(photo_paths["biden"])]]}})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())
        rows = answer["predictions"]
        assert len(rows) == 1
        _check_answer(rows[0], store["checkpoint"])
    finally:
        stop(server)
