"""The fit_regressor stage fits the loss network only when a configured network reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.defaults import fit_config

REPO = Path(__file__).resolve().parents[1]


def _params(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_the_embedded_default_reads_the_regressor_and_the_paper_configuration_does_not():
    from pipelines.fit_regressor import regressor_readers

    assert regressor_readers(_params("params.yaml")) == ["loss.threedmm_encoder"]
    paper = _params("configs/paper.yaml")
    assert paper["loss"]["threedmm_encoder"] == "deca" and paper["evaluate"]["threedmm_encoder"] == "tddfa"
    assert regressor_readers(paper) == []
    paper["evaluate"]["threedmm_encoder"] = "fitted"
    assert regressor_readers(paper) == ["evaluate.threedmm_encoder"]


def test_the_paper_configuration_gets_a_marker_in_seconds(tmp_path, monkeypatch):
    """No shards, no table: the stage must not even look for its fitting inputs, and the marker names why."""
    import time

    from mfim.nets.threedmm_regressor import load_fitted_regressor
    from pipelines import fit_regressor

    params = _params("configs/paper.yaml")
    params["project"]["mlflow"]["tracking_uri"] = (tmp_path / "mlruns").as_uri()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    report = fit_regressor.main("params.yaml")
    assert time.monotonic() - t0 < 60
    assert report["skipped"] and "loss.threedmm_encoder: deca" in report["why"]
    assert json.loads(Path(fit_regressor.REPORT).read_text())["skipped"]
    ckpt = torch.load(fit_regressor.OUT, weights_only=True)
    assert "not needed" in ckpt["why"]
    with pytest.raises(ValueError, match="not needed"):
        load_fitted_regressor(fit_regressor.OUT)


def test_distilling_a_flame_width_table_gives_a_flame_width_regressor(tmp_path, one_thread):
    """`target: estimate` on DECA's table: the head is as wide as FLAME (100 / 50), not BFM's 40 / 10. (The paper
    smoke checked this through the stage, which the paper configuration now skips.)"""
    from mfim.data import threedmm_table as T
    from mfim.data.regressor_fit import fit_from_table
    from mfim.nets.threedmm_regressor import RegressorConfig, load_fitted_regressor
    from tests.test_shards import make_fixture_shards
    from tests.test_threedmm_table import FlameWidthEncoder

    make_fixture_shards(tmp_path, n_identities=4, per_identity=4)
    pattern = str(tmp_path / "train-*.tar")
    T.run_precompute([pattern], FlameWidthEncoder(), "deca", tmp_path / "params.parquet")
    report = fit_from_table(pattern, tmp_path / "params.parquet", tmp_path / "regressor.pt", "estimate",
                            RegressorConfig(input_size=16, width=8), fit_config(epochs=1, batch_size=8, augment=False),
                            log=lambda *_: None)
    assert (report["config"]["n_shape"], report["config"]["n_exp"]) == (100, 50)
    model = load_fitted_regressor(tmp_path / "regressor.pt")
    est = model(torch.zeros(2, 3, 32, 32))
    assert est.shape.shape == (2, 100) and est.exp.shape == (2, 50)
