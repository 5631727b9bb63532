"""`amoe encoders list` and `amoe encoders show SPEC`."""
from __future__ import annotations

import json


def _list(args) -> int:
    from distill.encoders.registry import list_loaders

    rows = []
    for info in list_loaders():
        missing = info.missing_packages()
        rows.append({"kind": info.kind, "description": info.description, "example": info.example,
                     "available": not missing, "missing_packages": missing, "options": info.options})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = "ok" if r["available"] else f"missing {', '.join(r['missing_packages'])}"
        print(f"{r['kind']:<10} [{state}] {r['description']}\n{'':<10} e.g. {r['example']}")
    return 0


def describe_encoder(enc, sample_resolution: int | None = None) -> dict:
    """Heads, widths, grid and parameter counts; widths come from one encoded grey image."""
    from PIL import Image

    img = Image.new("RGB", (64, 48), (128, 128, 128))
    x = enc.preprocess(img, resolution=sample_resolution)
    feats = enc.encode([x.to(enc.device, enc.dtype)])
    info = {
        "name": enc.name,
        "kind": getattr(enc, "kind", type(enc).__name__),
        "heads": list(enc.heads),
        "text_heads": list(enc.text_heads),
        "summary_dims": {h: int(v.shape[-1]) for h, v in feats.summary.items()},
        "patch_dims": {h: int(v[0].shape[-1]) for h, v in feats.patches.items()},
        "sample_input": list(x.shape), "sample_grid": list(feats.grids[0]),
        "registers": None if feats.registers is None else list(feats.registers.shape[1:]),
        "patch_size": enc.patch_size,
        "num_params": getattr(enc, "num_params", None),
        "active_params": getattr(enc, "active_params", None),
        "fingerprint": enc.fingerprint(),
        "preprocess": enc.preprocess_config(),
    }
    return info


def _show(args) -> int:
    from distill.encoders.registry import load_encoder

    kwargs = {"trust_remote_code": True} if args.trust_remote_code else {}
    enc = load_encoder(args.spec, **kwargs)   # user errors reach amoe.cli's one-line error surface
    print(json.dumps(describe_encoder(enc, args.resolution), indent=2, default=str))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("encoders", help="the encoder registry: list loaders, inspect a model")
    sub = p.add_subparsers(dest="encoders_command", metavar="SUBCOMMAND")
    lst = sub.add_parser("list", help="registered encoder kinds, descriptions, whether their packages import")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=_list)
    show = sub.add_parser("show", help="load SPEC and print heads, widths and parameter counts as JSON")
    show.add_argument("spec", help="e.g. siglip2:DIR, dinov3:DIR, student:DIR, siglino:FILE.pt, or a bare path")
    show.add_argument("--resolution", type=int, default=None, help="sample resolution (default: the model's)")
    show.add_argument("--trust-remote-code", action="store_true",
                      help="allow loaders that run hub code (RADIO, SigLino remote, dino.txt)")
    show.set_defaults(func=_show)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
