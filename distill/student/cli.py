"""`amoe student perf`: packed vs padded-per-image throughput of the student on mixed resolutions.

Prints one JSON object. Speed claims are made with this command, never with timed tests.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time

import torch


def register(subparsers) -> None:
    parser = subparsers.add_parser("student", help="SigLino student tools")
    sub = parser.add_subparsers(dest="student_command", metavar="SUBCOMMAND")
    perf = sub.add_parser("perf", help="benchmark packed vs padded forward / forward+backward (prints JSON)")
    perf.add_argument("--config", default="moe-cpu-small",
                      help="student config name (see distill/student/configs.json) [moe-cpu-small]")
    perf.add_argument("--images", type=int, default=16, help="number of images [16]")
    perf.add_argument("--max-tokens", type=int, default=2048, help="tokens per packed sequence [2048]")
    perf.add_argument("--max-images-per-seq", type=int, default=16)
    perf.add_argument("--min-side", type=int, default=128, help="smallest native side in px [128]")
    perf.add_argument("--max-side", type=int, default=512, help="largest native side in px [512]")
    perf.add_argument("--mix", default="range", choices=["range", "paper"],
                      help="range: sides uniform in [--min-side, --max-side]; paper: the paper's stage-2 mix "
                           "(256 / 384 / 512 / 768 px, native aspect; --max-tokens grows to fit)")
    perf.add_argument("--device", default="auto", help="cpu | cuda | auto [auto]")
    perf.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                      help="auto: bf16 on CUDA, fp32 on CPU")
    perf.add_argument("--attention-backend", default="auto", choices=["auto", "flex", "segments", "sdpa"])
    perf.add_argument("--expert-backend", default="auto", choices=["auto", "loop", "grouped"])
    perf.add_argument("--eager-flex", action="store_true",
                      help="keep flex_attention eager on CUDA (it is compiled by default there)")
    perf.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up; the median "
                      "is reported [3]")
    perf.add_argument("--seed", type=int, default=0)
    perf.add_argument("--json", action="store_true", help="print only the JSON object (always JSON)")
    perf.set_defaults(func=run_perf)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def mixed_resolution_images(n: int, seed: int, min_side: int, max_side: int, patch: int = 16,
                            sides: tuple[int, ...] | None = None):
    """Seeded native sizes: area-equivalent side in [min_side, max_side] (or drawn from `sides`),
    aspect 1:2..2:1, sides rounded to multiples of the patch size and clamped to [min_side, max_side]."""
    g = torch.Generator().manual_seed(seed)
    images = []
    if sides:
        min_side, max_side = patch, 2 * max(sides)
    for _ in range(n):
        if sides:
            side = float(sides[int(torch.randint(len(sides), (), generator=g))])
        else:
            side = min_side + (max_side - min_side) * torch.rand((), generator=g).item()
        aspect = math.exp(math.log(0.5) + (math.log(2) - math.log(0.5)) * torch.rand((), generator=g).item())
        h = side * math.sqrt(aspect)
        w = side / math.sqrt(aspect)

        def snap(v):
            return int(min(max(round(v / patch) * patch, min_side), max_side))

        images.append(torch.randn(3, snap(h), snap(w), generator=g).clamp_(-1, 1))
    return images


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from distill.memory import peak_rss_mib
    return peak_rss_mib()          # process-wide high-water mark (monotone: this command never resets it)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(outputs) -> torch.Tensor:
    total = 0.0
    for out in outputs:
        for group in (out.patch_features, out.summary_features):
            for v in group.values():
                total = total + v.float().square().mean()
    return total


def _time(fn, repeats, device) -> list[float]:
    """Seconds of each of `repeats` calls after one warm-up (which also compiles and builds kernels)."""
    fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _spread(times: list[float]) -> dict:
    return {"median": round(statistics.median(times), 4), "min": round(min(times), 4),
            "max": round(max(times), 4)}


def load_warning(threads: int) -> str | None:
    """A warning when the box is busier than the threads this benchmark uses (figures then mislead)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load > threads:
        return (f"load average {load:.2f} exceeds the {threads} thread(s) used: other work shares the CPU, so "
                "these timings are not an idle-box measurement")
    return None


def run_perf(args) -> int:
    from .model import Student
    from .packing import PAPER_STAGE2_SIDES, plan_packing

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    model = Student(args.config, attention_backend=args.attention_backend, expert_backend=args.expert_backend,
                    compile_flex=not args.eager_flex)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    model.to(device=device, dtype=dtype)
    patch = model.config.spatial_patch_size
    images = [im.to(device=device, dtype=dtype)
              for im in mixed_resolution_images(args.images, args.seed, args.min_side, args.max_side, patch,
                                                sides=PAPER_STAGE2_SIDES if args.mix == "paper" else None)]
    grids = [(im.shape[1] // patch, im.shape[2] // patch) for im in images]
    P = model.config.n_prefix_tokens
    counts = [P + h * w for h, w in grids]
    max_tokens = max(args.max_tokens, max(counts))   # the paper mix's largest image must fit one sequence
    plan = plan_packing(counts, max_tokens, args.max_images_per_seq)
    real_tokens = sum(counts)

    # padded-per-image baseline: the release's layout, one image per row padded to the longest
    patches = [model._patchify_chw(im, i)[0] for i, im in enumerate(images)]
    L = max(p.shape[0] for p in patches)
    pixel_values = torch.zeros(len(images), L, patches[0].shape[1], device=device, dtype=dtype)
    mask = torch.zeros(len(images), L, device=device)
    for i, p in enumerate(patches):
        pixel_values[i, : p.shape[0]] = p
        mask[i, : p.shape[0]] = 1
    shapes = torch.tensor(grids, dtype=torch.long, device=device)

    def packed_fwd():
        with torch.no_grad():
            model.forward_packed(images, plan=plan)

    def packed_fwdbwd():
        model.zero_grad(set_to_none=True)
        _loss(model.forward_packed(images, plan=plan)).backward()

    # the padded layout's own kernel is masked attention over whole rows (as the release runs it);
    # under the per-segment backend padding would be skipped, which is packing by another name
    padded_backend = "sdpa" if model._backend(None, device) == "segments" else None

    def padded_fwd():
        with torch.no_grad():
            model(pixel_values, mask, shapes, attention_backend=padded_backend)

    def padded_fwdbwd():
        model.zero_grad(set_to_none=True)
        _loss([model(pixel_values, mask, shapes, attention_backend=padded_backend)]).backward()

    results = {}
    for mode, fwd, fwdbwd in (("packed", packed_fwd, packed_fwdbwd), ("padded", padded_fwd, padded_fwdbwd)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ts_f = _time(fwd, args.repeats, device)
        mem_f = _peak_memory_mib(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ts_fb = _time(fwdbwd, args.repeats, device)
        mem_fb = _peak_memory_mib(device)
        t_f, t_fb = statistics.median(ts_f), statistics.median(ts_fb)
        results[mode] = {"forward_s": round(t_f, 4), "forward_tokens_per_s": round(real_tokens / t_f, 1),
                         "fwd_bwd_s": round(t_fb, 4), "fwd_bwd_tokens_per_s": round(real_tokens / t_fb, 1),
                         "forward_s_spread": _spread(ts_f), "fwd_bwd_s_spread": _spread(ts_fb),
                         "peak_memory_mib_forward": round(mem_f, 1), "peak_memory_mib_fwd_bwd": round(mem_fb, 1)}
    results["packed"].update({"sequences": plan.num_sequences, "sequence_length": max(plan.sequence_tokens),
                              "fill_ratio": round(plan.fill_ratio, 4),
                              "compute_fill_ratio": round(real_tokens / (plan.num_sequences * max(plan.sequence_tokens)), 4)})
    results["padded"].update({"rows": len(images), "row_length": P + L,
                              "fill_ratio": round(real_tokens / (len(images) * (P + L)), 4)})
    # attention work: query-key scores per head and layer, computed against needed (sum n_i^2)
    needed = sum(c * c for c in counts)
    backend = model._backend(None, device)
    S = max(plan.sequence_tokens)
    results["packed"]["attention_scores"] = {"needed": needed,
                                             "computed": needed if backend == "segments" else plan.num_sequences * S * S}
    results["padded"]["attention_scores"] = {"needed": needed, "computed": len(images) * (P + L) ** 2,
                                             "backend": padded_backend or backend}
    bound = {"token_wise_layers": round(results["packed"]["fill_ratio"] / results["padded"]["fill_ratio"], 3),
             "attention": round(results["padded"]["attention_scores"]["computed"]
                                / results["packed"]["attention_scores"]["computed"], 3)}
    warning = load_warning(torch.get_num_threads())
    if warning:
        print(f"amoe student perf: warning: {warning}", file=sys.stderr)
    moe = model.moe_layers()
    report = {
        "command": "amoe student perf",
        "config": args.config,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "attention_backend": model._backend(None, device),
        "expert_backend": moe[0].resolve_backend(pixel_values.new_zeros(1, model.config.dim)) if moe else "dense",
        "attention_path": model.attention_path(device),
        "images": len(images),
        "image_sizes_px": [list(im.shape[1:]) for im in images],
        "real_tokens": real_tokens,
        "max_tokens": max_tokens,
        "mix": args.mix,
        "repeats": args.repeats,
        "packed": results["packed"],
        "padded": results["padded"],
        "speedup_packed_vs_padded": {
            "forward": round(results["padded"]["forward_s"] / results["packed"]["forward_s"], 3),
            "fwd_bwd": round(results["padded"]["fwd_bwd_s"] / results["packed"]["fwd_bwd_s"], 3)},
        "speedup_bound": bound,
        "load_average_1min": round(os.getloadavg()[0], 2),
        **({"warning": warning} if warning else {}),
        "memory_note": ("CUDA max_memory_allocated per phase" if device.type == "cuda" else
                        "CPU: process peak RSS (ru_maxrss), monotone over the run: packed is measured first"),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0
