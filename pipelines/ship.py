"""DVC stages of ship/dvc.yaml: remake a shipped checkpoint from its schedule (configs/ship/<file>.yaml).

    python pipelines/ship.py configs/ship/mfim_synth64.yaml [--device cuda]        # the whole remake (hours)
    python pipelines/ship.py configs/ship/mfim_synth64.yaml --check-first-phase 3  # a few steps against the reference
    python pipelines/ship.py configs/ship/mfim_synth64.yaml --promote [--force]    # data/ship/ -> checkpoints/

The remake writes data/ship/<file> and its record (<file stem>.json); each phase works in data/ship/<stem>/<phase>/
and a killed run continues at the phase it stopped in (docs/SHIPPING.md).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python pipelines/ship.py` puts pipelines/ first; the stages are imported as pipelines.*
    sys.path.insert(0, str(ROOT))

from mfim.runtime import ensure_allocator_env  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("schedule", type=Path)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), help="instead of the schedule's `device`")
    ap.add_argument("--check-first-phase", type=int, metavar="STEPS",
                    help="run only the first phase for STEPS steps on a small render set and compare its curve with "
                         "configs/ship/<stem>.reference.json")
    ap.add_argument("--record-reference", action="store_true", help="with --check-first-phase: write the reference")
    ap.add_argument("--promote", action="store_true", help="copy data/ship/<file> (+ .json) into checkpoints/")
    ap.add_argument("--force", action="store_true", help="with --promote: replace the file in checkpoints/")
    args = ap.parse_args(argv)

    from mfim.ship.schedule import load_schedule

    sched = load_schedule(args.schedule)
    if args.device:
        sched.device = args.device
    if args.promote:
        from mfim.ship.runner import promote

        print(f"ship: promoted -> {promote(sched, force=args.force)}")
        return {}
    if args.check_first_phase:
        from mfim.ship.check import check_first_phase

        result = check_first_phase(sched, args.check_first_phase, record=args.record_reference)
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
        if not args.record_reference and not result["ok"]:
            raise SystemExit(f"ship: first phase of {args.schedule} is off its reference: {result['worst']}")
        return result
    from mfim.ship.runner import run_schedule

    return run_schedule(sched)


if __name__ == "__main__":
    ensure_allocator_env()
    main()
