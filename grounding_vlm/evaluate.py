"""`amoe ground eval --run DIR --split val`: Acc@0.5 with greedy decoding constrained to location tokens.

For each expression the model reads [image] <bos> expression <sep> and generates exactly four
tokens greedily (with a KV cache: the image and prompt run once), each restricted to the location-token block (so the output always has four
location tokens); with `ordered_boxes` the third/fourth token is further restricted to bins >= the
first/second, so x2 >= x1 and y2 >= y1. The bins are mapped back to the ORIGINAL image's pixels and
scored with IoU >= 0.5 (xyxy). Boxes are scored in both conventions users meet: pixels of the original
image (`acc@0.5`, the headline) and 0-1000 normalised integers (`acc@0.5_norm1000`); each prediction
is written both ways. A prediction that still does not parse counts as a miss and is
reported (`unparsable`). Results go to one JSON per (run, dataset split) in the benchmarks schema
(task "grounding", metric "acc@0.5"), so `amoe leaderboard build` shows them.

A run trained with a mask head (`mask.weight` > 0) is also scored on referring segmentation: the
head's mask, upsampled to the original image and thresholded, against the ref's COCO mask
(pycocotools): `mask_ciou` (total intersection over total union) and `mask_miou` (mean per-expression
IoU), both with bootstrap intervals.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from distill.io import fingerprint, write_text_atomic

from .boxes import GroundingScore, dequantise_box, to_norm1000
from .mask import MaskScore, predicted_mask
from .data import ImageCache, check_text_lengths, encode_batch, load_split, processor_from
from .tokenizer import GroundingTokenizer

TASK = {"name": "grounding", "version": 1,
        "protocol": "greedy decoding of 4 location tokens (constrained), boxes rescaled to the original image, "
                    "Acc@0.5 = share of expressions with IoU >= 0.5 (xyxy); unparsable = miss"}


@torch.no_grad()
def greedy_box_tokens(model, tok: GroundingTokenizer, images: Sequence[torch.Tensor],
                      prompts: Sequence[Sequence[int]], ordered: bool = True, kv_cache: bool = True) -> list[list[int]]:
    """Four generated token ids per sample, each a location token (constrained greedy decoding).
    With `kv_cache` the image prefix and the prompt run once and each further token is one step of
    the text experts over the cached keys (`GroundingVLM.decode_step`); without it every token re-runs
    the whole sequence (the reference the cache is tested against)."""
    return decode_boxes(model, tok, images, prompts, ordered, kv_cache)[0]


@torch.no_grad()
def decode_boxes(model, tok: GroundingTokenizer, images: Sequence[torch.Tensor], prompts: Sequence[Sequence[int]],
                 ordered: bool = True, kv_cache: bool = True, masks: bool = False):
    """(four location tokens per sample, the prompt's forward output); with `masks` that output also
    holds the mask head's logits (`VLMOutput.masks`)."""
    ids = [list(p) for p in prompts]
    lo, bins = tok.loc_start, tok.bins
    generated: list[list[int]] = [[] for _ in ids]
    out = model(images, ids, cache_room=4 if kv_cache else 0, mask_at=[len(p) for p in prompts] if masks else None)
    last = torch.stack([lg[-1] for lg in out.logits]).float()                # (B, vocab)
    for k in range(4):
        loc = last[:, lo: lo + bins].clone()
        if ordered and k >= 2:   # x2 >= x1, y2 >= y1
            floor = torch.tensor([g[k - 2] - lo for g in generated], device=loc.device)
            loc[torch.arange(bins, device=loc.device)[None, :] < floor[:, None]] = float("-inf")
        choice = loc.argmax(dim=-1) + lo
        for i, c in enumerate(choice.tolist()):
            generated[i].append(c)
            ids[i].append(c)
        if k == 3:
            break
        if kv_cache:
            last = model.decode_step(out.cache, choice).float()
        else:
            last = torch.stack([lg[-1] for lg in model(images, ids).logits]).float()
    return generated, out


def result_identity(cfg: dict, split: str, suite: str | None = None,
                    dataset_id: str | None = None) -> tuple[str, str]:
    """(suite, dataset id) a result is filed under: as given (`--suite`, `--dataset-id`), else the
    config's `eval.suite` / `eval.dataset_id`, else read from the data: a mini-world's refer folder
    (its parent holds world.json) is ("miniworld", "mw-<dataset>-<split>"), any other RefCOCO-layout
    folder ("paper", "<dataset>-<split>"), the ids the built-in suites list. `{split}` in an id is
    replaced by the split."""
    ecfg, data = cfg.get("eval", {}), cfg["data"]
    mini = bool(data.get("root")) and (Path(data["root"]).parent / "world.json").is_file()
    name = data.get("dataset", "refcoco")
    dataset_id = dataset_id or ecfg.get("dataset_id") or (f"mw-{name}-{{split}}" if mini else f"{name}-{{split}}")
    return suite or ecfg.get("suite") or ("miniworld" if mini else "paper"), dataset_id.replace("{split}", split)


def evaluate(run_dir: str | Path, split: str, *, limit: int | None = None, batch_size: int | None = None,
             results_dir: str | Path | None = None, model_name: str | None = None, suite: str | None = None,
             dataset_id: str | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate a trained run on one split; writes RUN/eval/<split>.jsonl (predictions) and a result JSON
    under `results_dir` (default RUN/results). Returns the result record. The row is named after the
    run folder (`grounding-vlm:<run folder name>`) unless `model_name` is given."""
    from distill.results import Cell, jsonable, make_record, settings_digest, write_result
    from distill.stats import DEFAULTS as STATS_DEFAULTS, metric_intervals

    from .train import load_run

    t0 = time.time()
    run_dir = Path(run_dir)
    model, tok, cfg, latest = load_run(run_dir, device)
    ecfg = cfg.get("eval", {})
    data = load_split(cfg["data"], split)
    examples = data.examples[: limit] if limit else data.examples
    if not examples:
        raise ValueError(f"split {split!r} has no expressions to evaluate "
                         f"({data.missing_images} refs skipped for missing images)")
    check_text_lengths(examples, tok, model.config.max_text_len, f"{cfg['data'].get('dataset')} {split}",
                       extra_tokens=3)
    suite, dataset_id = result_identity(cfg, split, suite, dataset_id)
    bs = int(batch_size or ecfg.get("batch_size", 16))
    cache = ImageCache(processor_from(cfg["data"], model.config.vision.spatial_patch_size))
    score, score_1000 = GroundingScore(), GroundingScore()   # pixels (headline), 0-1000 normalised
    with_masks = model.mask_head is not None                 # referring segmentation: cIoU / mIoU too
    kv_cache = bool(ecfg.get("kv_cache", True))
    mask_score = MaskScore()
    lines = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(examples), desc=f"ground eval {split}", unit="expr")
    t_model = time.time()
    scored = []   # the expressions scored: all but those whose image does not decode
    for start in range(0, len(examples), bs):
        chunk = examples[start: start + bs]
        images, prompts, _, kept = encode_batch(chunk, tok, cache, with_target=False)
        gen, prefill = decode_boxes(model, tok, images, prompts, ordered=bool(ecfg.get("ordered_boxes", True)),
                                    kv_cache=kv_cache, masks=with_masks) if images else ([], None)
        scored += kept
        for j, (e, g) in enumerate(zip(kept, gen)):
            if with_masks:
                mask_iou = mask_score.add(predicted_mask(prefill.masks[j], e.height, e.width), e.mask())
            bins = tok.decode_box(g)
            box = None if bins is None else dequantise_box(bins, e.width, e.height, tok.bins)
            iou = score.add(box, list(e.box_xyxy))
            truth_1000 = to_norm1000(list(e.box_xyxy), e.width, e.height)
            pred_1000 = None if box is None else to_norm1000(box, e.width, e.height)
            score_1000.add(pred_1000, truth_1000)
            line = {"ref_id": e.ref_id, "image_id": e.image_id, "expression": e.expression,
                    "truth": list(e.box_xyxy), "pred": box, "iou": round(iou, 4),
                    "truth_1000": truth_1000, "pred_1000": pred_1000}
            if with_masks:
                line["mask_iou"] = round(mask_iou, 4)
            lines.append(json.dumps(line))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    model_s = time.time() - t_model
    write_text_atomic(run_dir / "eval" / f"{split}.jsonl", "".join(line + "\n" for line in lines))

    m = score.metrics()
    m["acc@0.5_norm1000"] = score_1000.metrics()["acc@0.5"]
    items = score.items() | {"acc@0.5_norm1000": score_1000.items()["acc@0.5"]}
    if with_masks:
        m |= mask_score.metrics()
        items |= mask_score.items()
    m["missing_images"] = float(data.missing_images)
    m["unreadable_images"] = float(len(cache.unreadable))
    name = model_name or f"grounding-vlm:{run_dir.resolve().name}"
    ordered = bool(ecfg.get("ordered_boxes", True))
    cell = Cell(model=name, task="grounding", dataset=dataset_id, resolution=None, limit=limit,
                settings=settings_digest(TASK["version"], {"ordered_boxes": ordered}))
    n_params = sum(p.numel() for p in model.parameters())
    record = make_record(
        cell, "ok", metrics=m,
        config=jsonable({"suite": suite, "run": run_dir.resolve().name, "checkpoint": latest.name, "split": split,
                         "limit": limit, "batch_size": bs, "task_cfg": {"ordered_boxes": ordered},
                         "boxes": {"scored_in": "pixels of the original image, xyxy (acc@0.5)",
                                   "also": "0-1000 normalised integers, xyxy (acc@0.5_norm1000)",
                                   "decoding": "greedy, constrained, " + ("KV cache" if kv_cache else "uncached")},
                         "train_config": cfg}),
        model={"name": name, "params": n_params, "active_params": _active_params(model),
               "init": cfg["init"].get("kind"), "fingerprint": fingerprint(json.loads(
                   (latest / "trainer.json").read_text()) | {"run": str(run_dir)})},
        dataset={"root": cfg["data"].get("root"), "dataset": cfg["data"].get("dataset"), "split": split,
                 # what was scored, item by item: paired comparisons of two runs check it
                 "fingerprint": scored_fingerprint(scored),
                 "split_by": cfg["data"].get("split_by"), **data.report(), "evaluated": len(scored),
                 "unreadable_images": cache.unreadable_report(cfg["data"].get("root"))},
        task=TASK, timings={"total_s": time.time() - t0, "model_s": model_s,
                            "ms_per_expression": 1000 * model_s / len(examples)}, device=device,
        intervals=metric_intervals(m, items, **STATS_DEFAULTS))
    path = write_result(Path(results_dir) if results_dir else run_dir / "results", record, items=items)
    record["_path"] = str(path)
    return record


def scored_fingerprint(examples) -> str:
    """Which expressions were scored, in order: results with equal fingerprints pair item by item."""
    return fingerprint([[e.ref_id, e.image_id, e.expression] for e in examples])[:16]


def _active_params(model) -> int:
    """Parameters one image token or text token touches: all but the unchosen routed experts."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for block in model.layers.values():
        if block.vision.kind == "moe":
            moe = block.vision.moe
            E, K = moe.args.num_experts, moe.args.top_k
            per = sum(getattr(moe.experts, w)[0].numel() for w in ("w1", "w2", "w3"))
            idle += (E - K) * per
    return total - idle
