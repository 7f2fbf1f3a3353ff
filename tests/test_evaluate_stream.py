"""The evaluate stage streams: its metrics equal those of one in-memory pass over every image, with a small random
MFIM (written by save_swapper, generator at twice the data resolution like the paper's 1024 vs 256 px) and stub
evaluation networks (tests/stubs.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mfim.data.shards import resize_square
from mfim.evaluation import metrics as M
from mfim.evaluation.grids import from_uint8
from mfim.imageio import read_rgb
from tests.stubs import StubEvaluators, StubFeatureNet, StubLPIPS, stub_evaluation_networks, write_evalsets
from tests.defaults import EVAL_BASE, params_with, unit_encoder

RES = 32  # data resolution: the real images; the generator makes 64 px swaps


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mfim.models.mfim import MFIM, save_swapper
    from mfim.models.stylegan2 import Generator

    torch.manual_seed(0)
    G = Generator(resolution=64, style_dim=32, n_mlp=2, channel_base=1024, channel_max=16)
    model = MFIM(G, unit_encoder(input_size=RES, width=8, code_channels=16), coarse_max_res=16)
    with torch.no_grad():  # a fresh encoder starts at the average codes: every swap would be the same image
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ck") / "mfim.pt"
    save_swapper(model, path, meta={"data_resolution": RES})
    return path


def in_memory(model, pairs, triplets) -> dict:
    """Every image stacked, one forward per network, statistics with numpy: what streaming must reproduce."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    def stack(paths):
        return from_uint8(np.stack([resize_square(read_rgb(p), RES) for p in paths]))

    def down(x):
        return F.interpolate(x, size=(RES, RES), mode="area")

    ev = StubEvaluators(batch_size=10_000)
    x_src, x_tgt = stack(pairs.source_path), stack(pairs.target_path)
    with torch.no_grad():
        x_swap, x_rec = model.swap(x_src, x_tgt), model.reconstruct(x_tgt)
        lpips = StubLPIPS()(down(x_rec), x_tgt).flatten().numpy()
        fr, ff = (StubFeatureNet()(x).double().numpy() for x in (x_tgt, down(x_swap)))
    f_src, f_tgt, f_swap = (ev.features(x) for x in (x_src, x_tgt, x_swap))
    ids = pairs.source_identity.to_numpy()
    gallery_ids = np.unique(ids)
    gallery = np.stack([f_src.identity[ids == i].mean(0) for i in gallery_ids])
    out = {
        "swap.identity": M.l2_distance(f_swap.identity, f_src.identity).mean(),
        "swap.id_retrieval": M.id_retrieval(f_swap.identity, gallery, np.searchsorted(gallery_ids, ids)).mean(),
        "swap.shape": M.l2_distance(f_swap.shape, f_src.shape).mean(),
        "swap.expression": M.l2_distance(f_swap.exp, f_tgt.exp).mean(),
        "swap.pose": M.l2_distance(f_swap.pose, f_tgt.pose).mean(),
        "swap.pose_hn": M.l2_distance(f_swap.pose_hn, f_tgt.pose_hn).mean(),
        "swap.train_id_similarity_source": M.cosine_similarity(f_swap.id_train, f_src.id_train).mean(),
        "reconstruction.self_swap_l1": (down(x_rec) - x_tgt).abs().flatten(1).mean(1).mean().item(),
        "reconstruction.self_swap_lpips": lpips.mean(),
        "fd.value": calculate_frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0),
                                               np.cov(ff, rowvar=False)),
    }
    t_tgt, t_gb, t_lc = (stack(triplets[f"{c}_path"]) for c in ("target", "global", "local"))
    with torch.no_grad():
        results = {"local": model.swap(t_lc, t_tgt), "id_mixing": model.mix(t_tgt, t_gb, t_lc),
                   "global": model.swap(t_gb, t_tgt)}
    f_gb, f_lc = ev.features(t_gb), ev.features(t_lc)
    for row, x in results.items():
        f = ev.features(x)
        r_id_gb = M.relative_distance(M.l2_distance(f.identity, f_gb.identity),
                                      M.l2_distance(f.identity, f_lc.identity))[0]
        r_sh_gb = M.relative_distance(M.l2_distance(f.shape, f_gb.shape), M.l2_distance(f.shape, f_lc.shape))[0]
        out[f"id_mixing.{row}.r_id_gb"], out[f"id_mixing.{row}.r_shape_gb"] = r_id_gb.mean(), r_sh_gb.mean()
    return out


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_streamed_metrics_equal_the_in_memory_ones(tmp_path, checkpoint, monkeypatch, one_thread):
    import pandas as pd

    from mfim.evaluation.evaluate import SWAP_METRICS, run_evaluation
    from mfim.models.mfim import load_swapper

    stub_evaluation_networks(monkeypatch.setattr)
    evalsets = write_evalsets(tmp_path / "evalsets", n_images=9, n_pairs=11, n_triplets=7)
    params = params_with(EVAL_BASE, {"project": {"device": "cpu", "threads": 1},
              "evaluate": {"batch_size": 4, "bootstrap": 50}})  # 4 per batch: 11 pairs end on a partial batch
    out = run_evaluation(params, model_path=checkpoint, evalsets_dir=evalsets, shards_dir=tmp_path / "no_shards",
                         raw_dir=tmp_path / "no_raw", reports_dir=tmp_path / "reports")

    model, _ = load_swapper(checkpoint)
    want = in_memory(model, pd.read_parquet(evalsets / "pairs.parquet"), pd.read_parquet(evalsets / "triplets.parquet"))
    for key, value in want.items():
        assert _get(out, key) == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # what the report and the tables read is all there, and metrics.json is the returned dict
    assert set(SWAP_METRICS) <= set(out["swap"]) and out["n_pairs"] == 11 and out["n_triplets"] == 7
    assert out["fd"]["name"] == "fd_stub" and set(out["id_mixing"]) == {"local", "id_mixing", "global"}
    assert "identity_verification_auc" in out["evaluators_on_real_images"]
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text()) == out
    detail = json.loads((tmp_path / "reports" / "metrics_detail.json").read_text())
    assert detail["fd"]["resolution"] == RES and "generated images area-downsampled from 64 px" in detail["fd"]["note"]
    for grid in ("swaps", "id_mixing", "style_maps", "paste_back"):
        assert (tmp_path / "reports" / "grids" / f"{grid}.png").is_file()


def test_a_protocol_without_triplets_evaluates_its_pairs_and_says_so(tmp_path, checkpoint, monkeypatch, one_thread):
    from mfim.evaluation import report
    from mfim.evaluation.evaluate import run_evaluation
    from mfim.provenance import read_record

    stub_evaluation_networks(monkeypatch.setattr)
    evalsets = write_evalsets(tmp_path / "evalsets", n_images=6, n_pairs=5, n_triplets=0)
    (evalsets / "protocol.json").write_text('{"protocol": "ffpp"}')
    params = params_with(EVAL_BASE, {"project": {"device": "cpu", "threads": 1},
                                     "evaluate": {"batch_size": 4, "bootstrap": 20}})
    out = run_evaluation(params, model_path=checkpoint, evalsets_dir=evalsets, shards_dir=tmp_path / "no_shards",
                         raw_dir=tmp_path / "no_raw", reports_dir=tmp_path / "reports")
    assert out["n_pairs"] == 5 and out["n_triplets"] == 0 and out["id_mixing"] == {}
    assert np.isfinite(out["swap"]["identity"])
    grid = tmp_path / "reports" / "grids" / "id_mixing.png"
    assert "no ID-mixing triplets in the ffpp protocol" in read_record(grid)["note"]
    table = report.mixing_table(out)
    assert "| **ID mixing (ours)** | – | – | – | – |" in table


def _numbers(d, prefix=""):
    """dotted key -> value of every leaf of a metrics json."""
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _numbers(sub, f"{prefix}{key}.").items()}
    if isinstance(d, list):
        return {k: v for i, sub in enumerate(d) for k, v in _numbers(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: d}


def _evaluate(tmp_path, name, checkpoint, evalsets, batch=4, **kw):
    from mfim.evaluation.evaluate import run_evaluation

    params = params_with(EVAL_BASE, {"project": {"device": "cpu", "threads": 1},
                                     "evaluate": {"batch_size": batch, "bootstrap": 50,
                                                  "workers": kw.pop("workers", 0)}})
    reports = tmp_path / name
    out = run_evaluation(params, model_path=checkpoint, evalsets_dir=evalsets, shards_dir=tmp_path / "no_shards",
                         raw_dir=tmp_path / "no_raw", reports_dir=reports, **kw)
    detail = json.loads((reports / "metrics_detail.json").read_text())
    detail.pop("seconds"), detail.pop("grids")  # time and where the reports went
    return out, detail, (reports / "eval_pairs.csv").read_text(), (reports / "grids" / "swaps.png").read_bytes()


def _assert_same_outputs(got_outputs, want_outputs) -> None:
    """Two runs' outputs (report dicts and files) equal, one by one."""
    for got, want in zip(got_outputs, want_outputs):
        if isinstance(got, dict):
            _assert_same(got, want)
        else:
            assert got == want


def _assert_same(a, b, rel=0.0):
    na, nb = _numbers(a), _numbers(b)
    assert na.keys() == nb.keys()
    for k in na:
        if isinstance(na[k], float) and rel:
            assert na[k] == pytest.approx(nb[k], rel=rel, abs=1e-12, nan_ok=True), k
        else:
            assert na[k] == nb[k] or (na[k] != na[k] and nb[k] != nb[k]), k


def test_features_of_each_distinct_image_once_give_the_per_pair_metrics(tmp_path, checkpoint, monkeypatch,
                                                                        one_thread):
    """Caching by image (each source and target featurised, self-swapped and Fréchet-featured once) must give what
    the former per-pair pass gave (tests/per_pair_evaluation.py, commit 05abea1's code): every metric, interval,
    per-pair row and grid pixel. 30 pairs over 9 images: each image ~3 times a source and ~3 times a target.
    Equal to float32 rounding, not bitwise: a network's output for one image moves in the last bits with the other
    images of its batch, and a distinct image's batch is not its pair's (0/1 retrieval outcomes are identical)."""
    import mfim.evaluation.features as features
    from tests import per_pair_evaluation

    stub_evaluation_networks(monkeypatch.setattr)
    evalsets = write_evalsets(tmp_path / "evalsets", n_images=9, n_pairs=30, n_triplets=7)
    cached = _evaluate(tmp_path, "cached", checkpoint, evalsets)
    monkeypatch.setattr(features, "Streamer", per_pair_evaluation.PerPairStreamer)
    per_pair = _evaluate(tmp_path, "per_pair", checkpoint, evalsets)
    _assert_same(cached[0], per_pair[0], rel=1e-6)
    _assert_same(cached[1], per_pair[1], rel=1e-6)
    assert cached[3] == per_pair[3]  # the grid's PNG, byte for byte
    a, b = (pd.read_csv(io.StringIO(t)) for t in (cached[2], per_pair[2]))
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)
    assert (a.id_retrieval == b.id_retrieval).all()


def test_decoding_in_worker_processes_changes_nothing(tmp_path, checkpoint, monkeypatch, one_thread):
    stub_evaluation_networks(monkeypatch.setattr)
    evalsets = write_evalsets(tmp_path / "evalsets", n_images=8, n_pairs=10, n_triplets=5)
    one = _evaluate(tmp_path, "main", checkpoint, evalsets)
    two = _evaluate(tmp_path, "workers", checkpoint, evalsets, workers=2)
    _assert_same(one[0], two[0])
    _assert_same(one[1], two[1])
    assert one[2] == two[2]


def test_a_killed_evaluation_resumes_from_its_parts_and_gives_the_uninterrupted_result(tmp_path, checkpoint,
                                                                                      monkeypatch, one_thread):
    """Killed after 5 finished batches (the image batches, then the first pair batches), the rerun computes only the
    missing ones and writes exactly the uninterrupted run's reports; the progress folder is gone afterwards."""
    import mfim.evaluation.features as features

    stub_evaluation_networks(monkeypatch.setattr)
    evalsets = write_evalsets(tmp_path / "evalsets", n_images=9, n_pairs=17, n_triplets=9)
    whole = _evaluate(tmp_path, "whole", checkpoint, evalsets)

    written = []
    real_write = features.FeatureStore.write

    def write(self, kind, index, arrays):
        if kill_after is not None and len(written) == kill_after:
            raise KeyboardInterrupt("killed")
        real_write(self, kind, index, arrays)
        written.append((kind, index))

    monkeypatch.setattr(features.FeatureStore, "write", write)
    progress = tmp_path / "progress"
    kill_after = 5
    with pytest.raises(KeyboardInterrupt):
        _evaluate(tmp_path, "resumed", checkpoint, evalsets, progress_dir=progress)
    on_disk = sorted((p.parent.name, int(p.stem)) for p in progress.glob("*/*.npz"))
    assert on_disk == sorted(written) and len(written) == 5 and ("pairs", 0) in written  # killed inside the pairs
    kill_after, first = None, list(written)
    resumed = _evaluate(tmp_path, "resumed", checkpoint, evalsets, progress_dir=progress)
    redone = written[len(first):]
    pairs_done = sum(kind == "pairs" for kind, _ in first)  # of 5 pair batches (17 pairs, 4 a batch)
    assert redone == [("pairs", j) for j in range(pairs_done, 5)] + [("triplets", j) for j in range(3)]
    _assert_same_outputs(resumed, whole)
    assert not progress.exists()


def test_progress_of_other_inputs_is_discarded(tmp_path):
    from mfim.evaluation.features import FeatureStore

    store = FeatureStore(tmp_path / "p", "aaaa")
    store.write("pairs", 0, {"x": np.ones(3)})
    assert FeatureStore(tmp_path / "p", "aaaa").has("pairs", 0)
    with pytest.raises(RuntimeError, match="progress of other inputs"):  # a rank other than 0 never empties it
        FeatureStore(tmp_path / "p", "bbbb", owner=False)
    assert FeatureStore(tmp_path / "p", "aaaa", owner=False).has("pairs", 0)
    assert not FeatureStore(tmp_path / "p", "bbbb").has("pairs", 0)


def test_dlib_in_worker_processes_is_the_evaluators_own_embedding(tmp_path, photos):
    """The workers take dlib's embeddings from the decoded uint8 images (distinct images) and from the device's
    generated images (swaps, a spawned pool); Evaluators.features takes them from the [-1, 1] tensor: the same
    descriptors, bit for bit."""
    from types import SimpleNamespace

    from mfim.data.shards import resize_square
    from mfim.evaluation.features import BatchReader, SwapIdentity
    from mfim.nets.identity import DlibIdentityEmbedder
    from PIL import Image

    paths = []
    for name in ("obama", "biden", "obama2"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(resize_square(photos[name], 96)).save(paths[-1])
    keys = np.array(["a", "b", "c"])
    item = BatchReader(str(tmp_path / "none-*.tar"), 96, {"image": (keys, np.array(paths, dtype=object))},
                       [(0, 3)], [0], dlib=True)[0]
    x = from_uint8(item["images"]["image"])
    want = DlibIdentityEmbedder().embed_aligned(x)
    np.testing.assert_array_equal(item["identity"]["image"], want)
    pool = SwapIdentity(SimpleNamespace(dlib=object()), workers=2)
    try:
        np.testing.assert_array_equal(pool.submit(x)(), want)
    finally:
        pool.close()


KILLED_CHILD = """
import os, signal, sys
import numpy as np
import mfim.evaluation.features as features
from tests.stubs import stub_evaluation_networks
from tests.test_evaluate_stream import _evaluate
from pathlib import Path

stub_evaluation_networks(lambda obj, name, value: setattr(obj, name, value))
savez, calls = np.savez, []

def savez_then_die(f, **arrays):  # SIGKILL half-way through writing part number 4: no cleanup of any kind runs
    calls.append(1)
    if len(calls) == 4:
        f.write(b"PK half a zip")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    savez(f, **arrays)

features.np.savez = savez_then_die
tmp, checkpoint, evalsets = map(Path, sys.argv[1:4])
_evaluate(tmp, "killed", checkpoint, evalsets, progress_dir=tmp / "progress")
"""


def test_a_sigkilled_evaluation_resumes_and_gives_the_uninterrupted_result(tmp_path, checkpoint, monkeypatch,
                                                                         one_thread):
    import os
    import subprocess
    import sys

    stub_evaluation_networks(monkeypatch.setattr)
    evalsets = write_evalsets(tmp_path / "evalsets", n_images=6, n_pairs=9, n_triplets=4)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(tmp_path), str(checkpoint), str(evalsets)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    progress = tmp_path / "progress"
    assert len(list(progress.glob("*/*.npz"))) == 3 and list(progress.glob("*/.*.part"))  # 3 parts, one half-written
    resumed = _evaluate(tmp_path, "resumed", checkpoint, evalsets, progress_dir=progress)
    whole = _evaluate(tmp_path, "whole", checkpoint, evalsets)
    _assert_same_outputs(resumed, whole)
    assert not progress.exists()


RANK_SCRIPT = """
import sys
from pathlib import Path
from mfim.evaluation.evaluate import run_evaluation
from tests.stubs import stub_evaluation_networks

stub_evaluation_networks(lambda obj, name, value: setattr(obj, name, value))
tmp, checkpoint, evalsets = map(Path, sys.argv[1:4])
from tests.defaults import EVAL_BASE, params_with
params = params_with(EVAL_BASE, {"project": {"device": "cpu", "threads": 1},
                                 "evaluate": {"batch_size": 4, "bootstrap": 50}})
out = run_evaluation(params, model_path=checkpoint, evalsets_dir=evalsets, shards_dir=tmp / "no_shards",
                     raw_dir=tmp / "no_raw", reports_dir=tmp / "ranks", progress_dir=tmp / "progress")
print("REPORTED" if out is not None else "RANK DONE", flush=True)
"""


def test_torchrun_ranks_split_the_batches_and_rank_0_reports_the_single_process_result(tmp_path, checkpoint,
                                                                                        monkeypatch, one_thread):
    """Two gloo ranks on CPU (what every GPU's rank does under torchrun): each computes every other batch into the
    shared progress folder, rank 0 collects: the reports of one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    stub_evaluation_networks(monkeypatch.setattr)
    evalsets = write_evalsets(tmp_path / "evalsets", n_images=7, n_pairs=13, n_triplets=6)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path), str(checkpoint), str(evalsets)],
                          env=env, capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(done.stdout.split()) == ["DONE", "RANK", "REPORTED"]
    single = _evaluate(tmp_path, "single", checkpoint, evalsets)
    reports = tmp_path / "ranks"
    detail = json.loads((reports / "metrics_detail.json").read_text())
    detail.pop("seconds"), detail.pop("grids")
    ranks = (json.loads((reports / "metrics.json").read_text()), detail, (reports / "eval_pairs.csv").read_text(),
             (reports / "grids" / "swaps.png").read_bytes())
    for got, want in zip(ranks, single):
        if isinstance(got, dict):
            _assert_same(got, want)
        else:
            assert got == want
    assert not (tmp_path / "progress").exists()


def test_the_real_evaluation_networks_with_dlib_in_workers_give_the_one_process_reports(tmp_path, checkpoint,
                                                                                       monkeypatch, one_thread):
    """The stage's own networks (dlib, 3DDFA_V2, Hopenet, MobileFaceNet, LPIPS, the Fréchet substitute): with
    evaluate.workers 2 (decoding and the distinct images' dlib in DataLoader workers, the swaps' dlib in a spawned
    pool) every reported number is the one-process run's."""
    import mfim.evaluation.evaluate as evaluate
    from mfim.evaluation.evaluate import run_evaluation

    monkeypatch.setattr(evaluate, "log_to_mlflow", lambda *a, **k: None)
    evalsets = write_evalsets(tmp_path / "evalsets", n_images=5, n_pairs=7, n_triplets=3)
    reports = []
    for workers in (0, 2):
        params = params_with(EVAL_BASE, {"project": {"device": "cpu", "threads": 1},
                  "evaluate": {"batch_size": 4, "bootstrap": 20, "workers": workers, "shape_encoder": "",
                               "expression_encoder": ""}})
        out = run_evaluation(params, model_path=checkpoint, evalsets_dir=evalsets, shards_dir=tmp_path / "none",
                             raw_dir=tmp_path / "none", reports_dir=tmp_path / f"r{workers}")
        reports.append((out, (tmp_path / f"r{workers}" / "eval_pairs.csv").read_text()))
    assert reports[0][0]["evaluators_on_real_images"]  # dlib separated the labelled people: it ran
    _assert_same(reports[1][0], reports[0][0])
    assert reports[1][1] == reports[0][1]


def test_one_grid_walk_gives_the_per_pair_grids_bit_for_bit(tmp_path, checkpoint, one_thread):
    """_pair_grid and _triplet_grid share one batch walk (Streamer._grid); their images must be the very tensors the
    former per-pair pass put in its grids (tests/per_pair_evaluation.py, an independent loop), keep=5 with batches
    of 3 so the walk stops inside the second batch."""
    from mfim.evaluation.features import FeatureStore, ImageReader, Streamer
    from mfim.models.mfim import load_swapper
    from tests import per_pair_evaluation

    evalsets = write_evalsets(tmp_path / "evalsets", n_images=6, n_pairs=9, n_triplets=7)
    pairs, triplets = pd.read_parquet(evalsets / "pairs.parquet"), pd.read_parquet(evalsets / "triplets.parquet")
    model, _ = load_swapper(checkpoint)
    model.eval()
    streamer = Streamer(model, pairs, triplets, "none-*.tar", RES, None, None, None, batch=3, device="cpu",
                        store=FeatureStore(tmp_path / "store", "x"))
    with torch.no_grad(), ImageReader("none-*.tar", RES) as reader:
        want_pairs = per_pair_evaluation.stream_pairs(model, pairs, reader, StubEvaluators(), StubLPIPS(),
                                                      _StubFD(), 3, "cpu", keep=5).grid
        want_triplets = per_pair_evaluation.stream_triplets(model, triplets, reader, StubEvaluators(), 3, "cpu",
                                                            keep=5).grid
    for got, want in ((streamer._pair_grid(5), want_pairs), (streamer._triplet_grid(5), want_triplets)):
        assert list(got.images) == list(want.images)
        for name in want.images:
            assert got[name].shape[0] == 5 and torch.equal(got[name], want[name].float()), name


class _StubFD:
    """FrechetDistance's add / report, doing nothing (the grid test needs the pass, not the statistics)."""

    def add(self, *_):
        pass

    def report(self):
        return {}


def test_each_image_and_each_swap_gets_the_landmarks_deca_crops_with(tmp_path, checkpoint, monkeypatch, one_thread):
    """evaluate.threedmm_encoder: deca places DECA's box from landmarks as training and the threedmm table do: the
    distinct images their own (shard landmarks written at 64 px, read at 32: (x + 0.5) / 2 - 0.5), a swap and every
    ID-mixing result their target's at the generator's 64 px (which gives back the shard's own numbers); NaN rows
    for an image whose shard has no landmarks (eval/00001) or that is read from its PNG (eval/00005)."""
    import mfim.data.shards as S
    import mfim.evaluation.evaluators as evaluators
    from mfim.evaluation.features import distinct_images
    from tests.test_shards import fixture_image, fixture_meta

    truth, samples = {}, []
    for i in range(5):
        key, meta = f"eval/{i:05d}", {**fixture_meta(i, i // 2, split="eval"), "resolution": 2 * RES}
        meta["landmarks"] = None if i == 1 else [[2 * x, 2 * y] for x, y in meta["landmarks"]]
        truth[key] = None if i == 1 else np.asarray(meta["landmarks"], np.float64)
        samples.append((key, fixture_image(i, 2 * RES), {**meta, "key": key}))
    S.write_split_shards(samples, tmp_path / "shards", "eval", 10**9)
    calls = []

    class Spy(StubEvaluators):
        def features(self, images, landmarks=None):
            calls.append((images.shape[-1], None if landmarks is None else np.array(landmarks, np.float64)))
            return super().features(images)

    stub_evaluation_networks(monkeypatch.setattr)
    monkeypatch.setattr(evaluators, "Evaluators", Spy)
    evalsets = write_evalsets(tmp_path / "evalsets", n_images=6, n_pairs=10, n_triplets=5, size=RES)
    params = params_with(EVAL_BASE, {"project": {"device": "cpu", "threads": 1},
                                     "evaluate": {"batch_size": 4, "bootstrap": 20}})
    from mfim.evaluation.evaluate import run_evaluation

    run_evaluation(params, model_path=checkpoint, evalsets_dir=evalsets, shards_dir=tmp_path / "shards",
                   raw_dir=tmp_path / "no_raw", reports_dir=tmp_path / "reports")

    def expect(keys, size):  # None for a batch without any landmarks (every crop canonical, as before)
        nan = np.full((68, 2), np.nan)
        lm = np.stack([nan if truth.get(k) is None else (truth[k] + 0.5) * size / (2 * RES) - 0.5 for k in keys])
        return None if np.isnan(lm).all() else lm

    pairs, triplets = (pd.read_parquet(evalsets / f) for f in ("pairs.parquet", "triplets.parquet"))
    images, _ = distinct_images(pairs, triplets)
    n_targets = pairs.target_key.nunique()
    want = [(RES, expect(images.key[a:min(a + 4, n_targets)], RES)) for a in range(0, n_targets, 4)]  # targets lead
    want += [(RES, expect(images.key[a:min(a + 4, len(images))], RES)) for a in range(n_targets, len(images), 4)]
    want += [(64, expect(pairs.target_key[a:a + 4], 64)) for a in range(0, len(pairs), 4)]
    want += [(64, expect(triplets.target_key[a:a + 4], 64)) for a in range(0, len(triplets), 4) for _ in range(3)]
    assert len(calls) == len(want) and sum(lm is not None for _, lm in want) >= len(want) // 2
    for (size, got), (want_size, lm) in zip(calls, want):
        assert size == want_size and (got is None) == (lm is None)
        if lm is not None:
            np.testing.assert_allclose(got, lm, atol=1e-4)  # NaN rows in the same places


def test_evaluators_hand_deca_each_batch_its_landmarks():
    """Evaluators.features gives a landmark-cropping 3DMM network (DECA) its batch's rows of ``landmarks``; without
    landmarks every crop is the canonical one, as before."""
    from types import SimpleNamespace

    from mfim.evaluation.evaluators import Evaluators
    from tests.test_deca_landmarks import LandmarkSpy

    ev = object.__new__(Evaluators)
    zeros = lambda n: lambda x: torch.zeros(len(x), n)  # noqa: E731
    ev.__dict__.update(device=torch.device("cpu"), batch_size=2, threedmm=LandmarkSpy(), regressor=None,
                       normalizer=SimpleNamespace(normalize=lambda p: p), shape_k=None, jaw_pose=False,
                       headpose=zeros(3), train_embedder=zeros(4), dlib=None, eval_embedder=None)
    x, lm = torch.rand(5, 3, 32, 32) * 2 - 1, np.random.default_rng(0).uniform(0, 31, (5, 68, 2))
    ev.features(x, landmarks=lm)
    assert [c[0] for c in ev.threedmm.calls] == [32, 32, 32]
    for (_, got), a in zip(ev.threedmm.calls, (0, 2, 4)):
        np.testing.assert_array_equal(np.asarray(got), lm[a:a + 2])
    ev.threedmm.calls.clear()
    ev.features(x)
    assert [c[1] for c in ev.threedmm.calls] == [None, None, None]
