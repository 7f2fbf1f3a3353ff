"""Weight files as DVC dependencies (issue 13 §1): a stage reruns when the bytes of a weight file it reads change at
the same path, and stays clean when they do not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mfim.assets.manifest import STAGES, manifest_path, stage_manifest, stage_weights
from tests.defaults import params_with

ROOT = Path(__file__).parents[1]

PAPER_LIKE = params_with({
    "nets": {"threedmm": {"deca_checkpoint": "w/deca_model.tar"}, "identity": {"iresnet_checkpoint": ""},
             "headpose": {"hopenet_checkpoint": "w/hopenet.pkl"}},
    "generator": {"checkpoint": "w/G.pkl"},
    "encoder": {"backbone": "ir_se50", "backbone_checkpoint": "w/ir_se50.pth"},
    "loss": {"threedmm_encoder": "deca", "lpips_net": "alex"},
    "evaluate": {"threedmm_encoder": "tddfa", "fid": {"inception_checkpoint": "w/inception.pth"}},
    "source_fit": {"steps": 0},  # the paper's feed-forward swap: no fit, so no anchor network
})
NO_SHIPPED = {"threedmm": {"regressor": {"shipped_checkpoint": ""}, "evaluator": {"shipped_checkpoint": ""}}}


def test_each_stage_lists_the_weights_it_reads():
    _, train = stage_weights("train", PAPER_LIKE)
    assert set(train) == {"generator.checkpoint", "encoder.backbone_checkpoint", "nets.threedmm.deca_checkpoint"}
    assets, evaluate = stage_weights("evaluate", PAPER_LIKE)
    assert set(evaluate) == {"nets.headpose.hopenet_checkpoint", "evaluate.fid.inception_checkpoint"}
    assert "tddfa_mb1_onnx" in assets and "hopenet_onnx" not in assets and "mobilefacenet_onnx" in assets
    # the embedded default: nothing by path, the registry assets instead
    assets, official = stage_weights("train", params_with({"loss": {"threedmm_encoder": "fitted"}}))
    assert official == {} and {"mobilefacenet_onnx", "lpips_alex"} <= set(assets)
    # a regressor started from 3DDFA_V2's weights reads them; the small one does not
    assert "tddfa_mb1_onnx" not in stage_weights("fit_regressor", params_with({}))[0]
    for group in ("regressor", "evaluator"):
        assets, _ = stage_weights("fit_regressor", params_with({"threedmm": {group: {"backbone": "mobilenet_v1"}}}))
        assert {"tddfa_mb1_onnx", "tddfa_param_stats", "bfm_noneck"} <= set(assets) and len(assets) == len(set(assets))
    # a loss network fitted elsewhere (checkpoints/) is a weight file of the stage: replacing it refits nothing
    # silently
    regressor = {"threedmm": {"regressor": {"shipped_checkpoint": "c/r.pt"}}}
    _, official = stage_weights("fit_regressor", params_with(NO_SHIPPED, regressor))
    assert official == {"threedmm.regressor.shipped_checkpoint": "c/r.pt"}
    evaluator = {"threedmm": {"evaluator": {"shipped_checkpoint": "c/e.pt"}}}
    _, official = stage_weights("fit_regressor", params_with(regressor, evaluator))
    assert official == {"threedmm.regressor.shipped_checkpoint": "c/r.pt",
                        "threedmm.evaluator.shipped_checkpoint": "c/e.pt"}


def test_manifest_records_bytes_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MFIM_HOME", str(tmp_path / "home"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "deca_model.tar").write_bytes(b"a" * 100)
    m = stage_manifest("threedmm", params_with(PAPER_LIKE, {"threedmm": {"encoder": "deca"}}))
    entry = m["official"]["nets.threedmm.deca_checkpoint"]
    assert entry["bytes"] == 100 and len(entry["sha256"]) == 64
    m = stage_manifest("evaluate", PAPER_LIKE)
    assert m["official"]["evaluate.fid.inception_checkpoint"]["missing"] is True
    from mfim.assets.registry import get

    assert m["registry"]["lpips_alex"]["sha256"] == get("lpips_alex").sha256  # not fetched: the pinned checksum


def test_dvc_yaml_makes_every_reading_stage_depend_on_its_manifest():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    weights = stages["weights"]
    assert weights["always_changed"] is True
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in weights["outs"]}
    assert outs == {str(manifest_path(s)) for s in STAGES}
    for s in STAGES:
        assert str(manifest_path(s)) in stages[s]["deps"], s


def _dvc(project: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MFIM_HOME=str(project / "home"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _status(project: Path) -> dict:
    return json.loads(_dvc(project, "status", "--json") or "{}")


@pytest.mark.slow
def test_replaced_weight_file_reruns_only_the_stages_that_read_it(tmp_path):
    project = tmp_path / "p"
    (project / "pipelines").mkdir(parents=True)
    (project / "w").mkdir()
    shutil.copy(ROOT / "pipelines" / "weights.py", project / "pipelines" / "weights.py")
    deca = project / "w" / "deca_model.tar"
    deca.write_bytes(b"original DECA weights")
    (project / "params.yaml").write_text(yaml.safe_dump(PAPER_LIKE))
    weights = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["weights"]
    weights["deps"] = ["pipelines/weights.py"]  # the repo's stage, without the library folder this copy lacks
    copy = f'{sys.executable} -c "import shutil,sys; shutil.copy(sys.argv[1], sys.argv[2])"'
    stages = {"weights": weights}
    for s in ("train", "evaluate"):  # stand-ins that record which manifest they were made from
        stages[s] = {"cmd": f"{copy} data/weights/{s}.json {s}.out", "deps": [f"data/weights/{s}.json"],
                     "outs": [f"{s}.out"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    _dvc(project, "init", "-q")
    _dvc(project, "repro", "-q")
    assert _status(project) == {"weights": ["always changed"]}

    deca.write_bytes(b"original DECA weights")  # same bytes, new mtime
    _dvc(project, "repro", "-q", "-s", "weights")
    assert _status(project) == {"weights": ["always changed"]}

    deca.write_bytes(b"other DECA weights, same path")
    _dvc(project, "repro", "-q", "-s", "weights")
    status = _status(project)
    assert status["train"] == [{"changed deps": {"data/weights/train.json": "modified"}}]
    assert "evaluate" not in status  # evaluation reads no DECA under these params
    _dvc(project, "repro", "-q")
    made_from = json.loads((project / "train.out").read_text())
    assert made_from["official"]["nets.threedmm.deca_checkpoint"]["bytes"] == len(b"other DECA weights, same path")


def test_the_source_fits_expression_anchor_makes_the_loss_3dmm_network_an_evaluate_weight():
    deca = {"loss": {"threedmm_encoder": "deca"}, "nets": {"threedmm": {"deca_checkpoint": "w/deca_model.tar"}}}
    _, official = stage_weights("evaluate", params_with(deca, {"source_fit": {"steps": 50, "exp": 0.1}}))
    assert official.get("nets.threedmm.deca_checkpoint") == "w/deca_model.tar"
    for fit in ({"steps": 0, "exp": 0.1}, {"steps": 50, "exp": 0.0}):  # no anchor run: not a weight of the stage
        _, official = stage_weights("evaluate", params_with(deca, {"source_fit": fit}))
        assert "nets.threedmm.deca_checkpoint" not in official
