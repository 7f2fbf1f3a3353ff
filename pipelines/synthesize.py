"""DVC stage `synthesize`: render the embedded default data set (BFM faces with exact ground truth).

Reads params.yaml group `synthesize`; writes data/raw/images/{train,eval}/*.png, data/raw/ground_truth.parquet and
reports/synthesize.json.
"""

from __future__ import annotations

import argparse

from mfim.config import load_params
from mfim.data.synth import SynthConfig, synthesize_dataset
from mfim.runtime import ensure_allocator_env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/raw")
    parser.add_argument("--report", default="reports/synthesize.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if params["data"]["source"] != "synthetic":
        # Real photos (align.input_dir) replace the renders; keep the stage's outputs so the DAG stays whole.
        import json
        from pathlib import Path

        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "SKIPPED").write_text("data.source is not 'synthetic': nothing rendered\n")
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps({"skipped": True, "data_source": params["data"]["source"]}) + "\n")
        print("synthesize: skipped (data.source is not 'synthetic')")
        return
    cfg = SynthConfig.from_params(params["synthesize"])
    table = synthesize_dataset(cfg, args.out, report_path=args.report)
    print(f"synthesize: {len(table)} images, {table['identity'].nunique()} identities -> {args.out}")


if __name__ == "__main__":
    # Without it glibc maps and unmaps the renderer's per-image buffers: ~20% of CPU time in the kernel. The render
    # workers are spawned from this process and inherit the setting.
    ensure_allocator_env()
    from mfim.config import exit_on_params_error

    with exit_on_params_error("synthesize"):
        main()
