"""`amoe curate embed|cluster|sample|evaluate|perf` -- hierarchical k-means data curation.

Under torchrun `embed` splits the pool's shards over ranks and `cluster --engine torch` splits the points:
    torchrun --nproc_per_node 8 -m amoe.cli curate embed --encoder SPEC --pool SHARDS --out emb
    torchrun --nproc_per_node 8 -m amoe.cli curate cluster --embeddings emb --config paper --engine torch --out cl
"""
from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("curate", help="curate a pool: embed, hierarchical k-means, balanced sampling",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="curate_command", metavar="STEP")

    e = sub.add_parser("embed", help="embed pool images with a registry encoder into memory-mapped arrays")
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--encoder", help="encoder spec for distill.encoders.registry.load_encoder")
    who.add_argument("--oracle-concepts", action="store_true",
                     help="mini-world diagnostic: ground-truth concept multi-hots instead of an encoder "
                          "(the best case any encoder can give the curation)")
    e.add_argument("--pool", required=True, help="webdataset shards (dir, dir/shards, brace pattern) or an "
                                                  "image-list .txt (one path per line)")
    e.add_argument("--out", required=True, help="embeddings directory (resumable)")
    e.add_argument("--head", default=None, help="summary head to keep (default: the encoder's first head)")
    e.add_argument("--resolution", type=int, default=None, help="side budget for preprocessing")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.set_defaults(func=_embed)

    c = sub.add_parser("cluster", help="multi-level k-means with resampling")
    c.add_argument("--embeddings", required=True, help="directory written by `amoe curate embed`")
    c.add_argument("--config", required=True, help="clustering config JSON or bundled name (paper, miniworld)")
    c.add_argument("--out", required=True, help="clusters directory (resumable per level)")
    c.add_argument("--engine", default=None, choices=("faiss", "torch"), help="override the config's engine")
    c.set_defaults(func=_cluster)

    s = sub.add_parser("sample", help="balanced hierarchical sampling to a parquet manifest")
    s.add_argument("--clusters", required=True, help="directory written by `amoe curate cluster`")
    s.add_argument("--target", type=int, required=True, help="number of samples to keep")
    s.add_argument("--out", required=True, help="manifest path (.parquet)")
    s.add_argument("--strategy", default="random", choices=("random", "closest"),
                   help="leaf selection: random (default; keeps atypical images) or closest to the centroid")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_sample)

    v = sub.add_parser("evaluate", help="concept coverage / balance of a manifest vs random (mini-world pools)")
    v.add_argument("--manifest", required=True)
    v.add_argument("--pool", required=True, help="the pool's shards (with metadata['concepts'])")
    v.add_argument("--seeds", type=int, default=5, help="random samples to average")
    v.add_argument("--clusters", default=None, help="draw random samples only from the clustered points")
    v.set_defaults(func=_evaluate)

    f = sub.add_parser("perf", help="wall time and peak memory of clustering vs number of points (JSON)")
    f.add_argument("--sizes", default="50000,200000,1000000", help="comma-separated point counts")
    f.add_argument("--dim", type=int, default=128)
    f.add_argument("--engine", default="faiss", choices=("faiss", "torch"))
    f.add_argument("--split", type=int, default=None, metavar="N",
                   help="compare a level 1 split N ways against the flat engine at the same k")
    f.add_argument("--point-dtype", default="float32", choices=("float32", "float16"),
                   help="how the points are held (the paper config: float16)")
    f.add_argument("--json", action="store_true", help="print JSON (the default output is a table)")
    f.set_defaults(func=_perf)

    q = sub.add_parser("plan", help="per-rank memory of each clustering level at a given scale (no data needed)")
    q.add_argument("config", help="clustering config JSON or bundled name (paper, miniworld)")
    q.add_argument("--world-size", type=int, required=True, help="number of ranks")
    q.add_argument("--points", type=int, required=True, help="embeddings in the pool (the paper: 2300000000)")
    q.add_argument("--dim", type=int, default=768, help="embedding width (DINOv3 ViT-B: 768)")
    q.add_argument("--device-gib", type=float, default=80.0, help="accelerator memory per rank, GiB")
    q.add_argument("--host-gib-per-rank", type=float, default=128.0, help="host memory per rank, GiB")
    q.add_argument("--ranks-per-node", type=int, default=8, help="ranks sharing one node's page cache")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    q.add_argument("--plan-out", default=None, help="also write the plan JSON to this file")
    q.set_defaults(func=_plan)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _embed(args) -> int:
    if args.oracle_concepts:
        from distill.curation.evaluate import write_concept_embeddings

        out = write_concept_embeddings(args.pool, args.out)
        print(f"wrote ground-truth concept embeddings of {args.pool} into {out}")
        return 0
    from distill.curation.embed import embed_pool
    from distill.encoders.registry import load_encoder
    from distill.distributed import setup, teardown

    info = setup(args.device)
    try:
        encoder = load_encoder(args.encoder).to(info.device)
        out = embed_pool(encoder, args.pool, args.out, head=args.head, resolution=args.resolution,
                         batch_size=args.batch_size, progress=info.is_main)
        if info.is_main:
            meta = json.loads((out / "embeddings.json").read_text())
            print(f"embedded {meta['rows']} samples ({meta['valid']} valid, dim {meta['dim']}) into {out}")
    finally:
        teardown(info)
    return 0


def _cluster(args) -> int:
    from distill.curation.hierarchy import cluster_embeddings
    from distill.distributed import setup, teardown

    info = setup("auto")
    try:
        h = cluster_embeddings(args.embeddings, args.config, args.out, engine_name=args.engine,
                               progress=info.is_main)
        if info.is_main:
            print(f"clustered {len(h.rows)} points: " +
                  " -> ".join(str(len(l.centroids)) for l in h.levels) + f" centroids, in {args.out}")
    finally:
        teardown(info)
    return 0


def _sample(args) -> int:
    from distill.curation.sample import sample_manifest

    df = sample_manifest(args.clusters, args.target, args.out, strategy=args.strategy, seed=args.seed)
    print(f"wrote {len(df)} samples from {df['shard'].nunique()} shard(s) to {args.out}")
    return 0


def _evaluate(args) -> int:
    from distill.curation.evaluate import evaluate_manifest

    universe = None
    if args.clusters:
        from distill.curation.embed import EmbeddingSet
        from distill.curation.hierarchy import load_hierarchy

        h = load_hierarchy(args.clusters)
        idx = EmbeddingSet(h.meta["source"]["embeddings"]).index.set_index("row").loc[h.rows]
        universe = list(zip(idx["shard"].astype(str), idx["key"].astype(str)))
    print(json.dumps(evaluate_manifest(args.manifest, args.pool, seeds=args.seeds, universe=universe), indent=2))
    return 0


def _plan(args) -> int:
    from distill.curation.hierarchy import load_cluster_config
    from distill.config import ConfigError
    from distill.curation.plan import advice, format_plan, plan_levels
    from distill.io import write_json_atomic

    try:
        plan = plan_levels(load_cluster_config(args.config), args.world_size, args.points, args.dim,
                           args.device_gib, args.host_gib_per_rank, args.ranks_per_node)
    except (ValueError, ConfigError) as e:
        print(f"amoe curate plan: {e}", file=sys.stderr)
        return 2
    plan["advice"] = advice(plan)
    if args.plan_out:
        write_json_atomic(args.plan_out, plan)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    for line in plan["advice"]:
        print(f"amoe curate plan: {line}", file=sys.stderr)
    return 0 if plan["fits_device"] and plan["fits_host"] else 1


def _perf(args) -> int:
    from distill.curation.perf import run_perf

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.split:
        from distill.curation.perf import run_split_perf

        res = run_split_perf(sizes, args.split, dim=args.dim, engine=args.engine, point_dtype=args.point_dtype)
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            for kind in ("flat", "split"):
                for r in res[kind]["runs"]:
                    print(f"{kind:5s} {r['points']:>9d} points x {r['dim']}: {r['wall_s']:8.2f} s  "
                          f"peak RSS {r['peak_rss_mb']:8.1f} MB (clustering {r['clustering_grew_mb']} MB, "
                          f"planned {r['planned_mb']} MB)")
        return 0
    res = run_perf(sizes, dim=args.dim, engine=args.engine, point_dtype=args.point_dtype)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for r in res["runs"]:
            print(f"{r['points']:>9d} points x {r['dim']}: {r['wall_s']:8.2f} s  peak RSS {r['peak_rss_mb']:8.1f} MB")
    return 0

