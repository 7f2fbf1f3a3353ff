"""DVC stage `evalsets`: pair and triplet manifests for evaluation (data/evalsets/).

`evalsets.protocol`: synthetic (eval split of the shards: held-out identities), ffpp (FaceForensics++ videos:
frames extracted and aligned) or celebahq (a CelebA-HQ folder). Writes pairs.parquet, triplets.parquet and
protocol.json (every protocol choice); FF++ also rejects.csv. A missing real data set stops the stage with a message
saying which data set and where to get it. FF++ frame extraction resumes video by video after a kill (each video's
frames.json names the video and aligner settings its frames were made with; mfim.data.evalsets.extract_ffpp_frames).
"""

from mfim.runtime import ensure_allocator_env

SHARDS_DIR = "data/shards"
ALIGNED_DIR = "data/aligned"
OUT_DIR = "data/evalsets"


def main(params_path: str = "params.yaml") -> dict:
    import logging
    import shutil
    from pathlib import Path

    import pandas as pd

    from mfim.atomic import atomic_write
    from mfim.config import load_params, lookup
    from mfim.data import evalsets as E
    from mfim.data.shards import split_pattern

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    params = load_params(params_path)
    e = lookup(params, "evalsets")
    protocol_name = e["protocol"]
    seed = int(e["seed"])
    rejects: list[dict] = []
    try:
        if protocol_name == "synthetic":
            pairs, triplets, protocol = E.synthetic_from_shards(
                split_pattern(SHARDS_DIR, "eval"), ALIGNED_DIR, int(e["pairs"]), int(e["triplets"]), seed)
            protocol["resolution"] = int(lookup(params, "data.resolution"))
        elif protocol_name == "ffpp":
            a = lookup(params, "align")
            aligner_args = (int(a["output_size"]), a["detector"], int(a["upsample"]), int(a["transform_size"]),
                            bool(a["enable_padding"]))
            f = e["ffpp"]
            pairs, triplets, protocol, rejects = E.build_ffpp(
                f["root"], OUT_DIR, f["compression"], int(f["frames_per_video"]),
                f["splits_json"] or None,
                aligner_factory=lambda: E.dlib_aligner(*aligner_args),
                aligner_settings=E.dlib_aligner_settings(*aligner_args))
            protocol["aligned_size"] = int(a["output_size"])
        elif protocol_name == "celebahq":
            c = e["celebahq"]
            pairs, triplets, protocol = E.build_celebahq(c["root"], int(c["pairs_per_target"]), seed,
                                                         max_pairs=int(e["pairs"]), max_triplets=int(e["triplets"]))
        else:
            raise SystemExit(f"evalsets: unknown protocol {protocol_name!r} (synthetic | ffpp | celebahq)")
    except E.MissingDatasetError as err:
        raise SystemExit(f"evalsets: {err}") from None
    summary = E.write_evalsets(OUT_DIR, pairs, triplets, protocol)
    if protocol_name == "ffpp":
        text = pd.DataFrame(rejects, columns=["file", "reason"]).to_csv(index=False).encode()
        atomic_write(Path(OUT_DIR) / "rejects.csv", lambda fh: fh.write(text))
    else:  # the output folder persists (dvc.yaml): no FF++ frames or rejects of an earlier protocol stay in it
        shutil.rmtree(Path(OUT_DIR) / "ffpp", ignore_errors=True)
        (Path(OUT_DIR) / "rejects.csv").unlink(missing_ok=True)
    print(f"evalsets ({protocol_name}): {summary['pairs']} pairs, {summary['triplets']} triplets -> {OUT_DIR}")

    import mlflow

    from mfim.tracking import start_run

    with start_run("evalsets", params, ["evalsets"]):
        mlflow.log_metrics({"pairs": float(summary["pairs"]), "triplets": float(summary["triplets"]),
                            "rejects": float(len(rejects))})
        mlflow.log_artifact(str(Path(OUT_DIR) / "protocol.json"))
    return summary


if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import exit_on_params_error

    with exit_on_params_error("evalsets"):
        main()
