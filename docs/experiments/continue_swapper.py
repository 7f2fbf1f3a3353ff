"""Append a continuation run of the `train` stage to the shipped swapper's record.

    python docs/experiments/continue_swapper.py OUT.pt RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a `train` run (`mfim.training.run.run_training(params, out_dir=RUN_DIR/train,
reports_dir=RUN_DIR)`) that started from the previous file of the chain (`train.init_checkpoint`), with
`RUN_DIR/params.yaml` the exact params it ran with and `RUN_DIR/wall.json` its wall time. The newest run's swapper
(EMA encoder + generator) plus the discriminator it trained against (its RUN_DIR/train/checkpoint.pt; when that was
not kept, the D the run started from, and the record says so) becomes OUT.pt; the .json beside it keeps the
previous record whole under "previous" and adds each continuation's params, curve and time, so the chain from
the warm start to the shipped file stays reproducible by this pipeline's own stages.
"""

import json
import sys
from pathlib import Path

import torch
import yaml

from mfim.assets import sha256_file

out = Path(sys.argv[1])
runs = [Path(p) for p in sys.argv[2:]]
record_path = out.with_suffix(".json")
previous = json.loads(record_path.read_text())

continuations = []
for run in runs:
    params = yaml.safe_load((run / "params.yaml").read_text())
    continuations.append({
        "run": run.name,
        # synthesize: the data set it trained on (a continuation may use more people than the default's).
        "params": {k: params[k] for k in ("data", "synthesize", "loss", "train", "encoder", "project") if k in params},
        "train": json.loads((run / "train.json").read_text()),
        "train_curve": (run / "plots/train_loss.csv").read_text().splitlines(),
        "wall_clock": json.loads((run / "wall.json").read_text()),
    })

last = runs[-1] / "train"
swapper = torch.load(last / "mfim.pt", map_location="cpu", weights_only=True)
if (last / "checkpoint.pt").is_file():
    swapper["discriminator"] = torch.load(last / "checkpoint.pt", map_location="cpu", weights_only=True)["discriminator"]
    d_from = f"{last / 'checkpoint.pt'} (the run's own D)"
else:  # train.keep_checkpoint false deleted the run's checkpoint: keep the D the run started from
    swapper["discriminator"] = torch.load(out, map_location="cpu", weights_only=True)["discriminator"]
    d_from = "the previous file's D (the run's own checkpoint.pt was not kept), i.e. the D the run started from"
torch.save(swapper, out)
digest = sha256_file(out)
record = {
    "output": str(out),
    "output_sha256": digest,
    "previous": previous,
    "continuations": continuations,
    "discriminator_from": d_from,
}
record_path.write_text(json.dumps(record, indent=1) + "\n")
print(out, digest)
