"""`mfim assets list|fetch [NAMES]`."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("assets", help="list or fetch the pretrained assets")
    s = p.add_subparsers(dest="assets_command", metavar="ACTION")
    f = s.add_parser("fetch", help="download, verify and cache registry assets (idempotent)")
    f.add_argument("names", nargs="*", help="asset names (default: every registry asset)")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=run_fetch)
    ls = s.add_parser("list", help="show which assets are present, missing, and their licences")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)
    p.set_defaults(func=run_list, json=False)


def run_fetch(args) -> int:
    from mfim.assets import REGISTRY, fetch

    names = args.names or [n for n, a in REGISTRY.items() if not a.official]
    for n in names:
        if n not in REGISTRY:
            raise SystemExit(f"mfim assets fetch: unknown asset {n!r} (see `mfim assets list`)")
        if REGISTRY[n].official:
            raise SystemExit(
                f"mfim assets fetch: {n} is an official file no registry carries; "
                f"{REGISTRY[n].source.obtain}, then set `{REGISTRY[n].params_key}` in params.yaml"
            )
    for n in names:
        path = fetch(n, progress=not args.quiet)
        if not args.quiet:
            print(f"{n:28s} {path}")
    return 0


def run_list(args) -> int:
    import json

    from mfim.assets import mfim_home, status

    rows = status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"cache: {mfim_home()}")
    print(f"{'name':26s} {'state':8s} {'source':20s} licence")
    for r in rows:
        state = "present" if r["present"] else "missing"
        print(f"{r['name']:26s} {state:8s} {r['kind']:20s} {r['licence']}")
    return 0
