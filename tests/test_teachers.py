"""The mini-world teachers: fast training, HF dirs that load back offline, markers, resume, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distill.config import ConfigError
from distill.teachers import MARKER, TeacherError, load_recipe, teachers_complete, train_teachers
from distill.teachers.common import RECIPES_FILE
from distill.teachers.probe import PROBE_TEXT, probe_image, probe_outputs
from distill.teachers.tokenizer import canonicalize, encode

QUICKSTART = Path(__file__).resolve().parents[1] / "amoe" / "quickstart.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from benchmarks.world import make_world
    size = json.loads(QUICKSTART.read_text())["fast"]["world"]["size"]
    out = tmp_path_factory.mktemp("teachers") / "world"
    make_world(out, size=size, seed=0, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers") / "out"
    report = train_teachers(world, out, fast=True, progress=False)
    return out, report


def test_fast_training_writes_complete_hf_dirs(trained, world):
    out, report = trained
    assert teachers_complete(out)
    for name in ("siglip2", "dinov3"):
        d = out / name
        assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
        assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))  # never pickle
        log = json.loads((d / "train_log.json").read_text())
        assert log["steps"] == len(log["losses"]) == load_recipe(fast=True)[name]["steps"]
        assert all(torch.isfinite(torch.tensor(log["losses"])))
        assert log["seconds"] > 0 and log["machine"]["cpu_count"]
        assert report[name]["losses"] == log["losses"]
        # the per-step losses also in the trainers' shared format (metrics.jsonl)
        from distill.train.metrics import read_metrics
        metrics = read_metrics(d)
        assert [m["step"] for m in metrics] == list(range(1, log["steps"] + 1))
        assert [m["loss"] for m in metrics] == log["losses"]
    assert not list(out.glob(".*.partial"))  # work dirs are moved into place
    # the SigLIP2 teacher reads the world's pretraining set beside the pool (64 images in the fast world)
    world_cfg = json.loads(QUICKSTART.read_text())["fast"]["world"]["size"]
    pretrain, pool = world_cfg["pretrain"]["images"], world_cfg["pool"]["images"]
    cls_train = json.loads((world / "world.json").read_text())["parts"]["classification"]["train_images"]
    repeat = load_recipe(fast=True)["siglip2"]["classification_repeat"]
    assert report["siglip2"]["pairs"] == repeat * cls_train + pool + pretrain   # every pool/pretrain image has a caption
    assert report["dinov3"]["images"] == pool + pretrain   # both teachers read it (docs/teachers.md)
    # the DINOv3 recipe's whole views have no masked patches: iBOT and the masked-pixel term are off
    assert not any(report["dinov3"]["ibot_losses"]) and not any(report["dinov3"]["pixel_losses"])
    assert all(v > 0 for v in report["dinov3"]["presence_losses"])
    # the sigmoid loss goes down on the mini-world even in the short fast run
    sig = report["siglip2"]["losses"]
    assert sum(sig[-5:]) / 5 < sum(sig[:5]) / 5


def test_siglip2_loads_back_offline_with_same_outputs(trained):
    from transformers import AutoTokenizer, Siglip2Model, Siglip2Processor
    out, report = trained
    d = out / "siglip2"
    model = Siglip2Model.from_pretrained(d).eval()
    proc = Siglip2Processor.from_pretrained(d)
    got = probe_outputs("siglip2", model, proc)
    for key, ref in report["siglip2"]["probe"].items():  # recorded from the in-memory model before saving
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(ref), atol=1e-4), key
    # the training-only presence head (weak supervision) is trained but never saved
    from safetensors.torch import load_file
    assert load_recipe(fast=True)["siglip2"]["presence_weight"] > 0
    presence = report["siglip2"]["presence_losses"]
    assert len(presence) == report["siglip2"]["steps"] and all(v > 0 for v in presence)
    assert not [k for k in load_file(d / "model.safetensors") if "presence" in k]
    # NaFlex inputs through the saved image processor
    inp = proc.image_processor(images=[probe_image()], return_tensors="pt")
    assert inp["pixel_values"].shape[-1] == 3 * model.config.vision_config.patch_size ** 2
    assert inp["pixel_values"].shape[1] == proc.image_processor.max_num_patches
    assert {"pixel_attention_mask", "spatial_shapes"} <= set(inp)
    # the tokenizer loads through AutoTokenizer too, canonicalises, pads on the right to the model's length
    tok = AutoTokenizer.from_pretrained(d)
    n = model.config.text_config.max_position_embeddings
    ids = encode(tok, [PROBE_TEXT, canonicalize(PROBE_TEXT).upper() + "!!"], n)
    assert ids.shape == (2, n) and torch.equal(ids[0], ids[1])
    assert ids[0, -1].item() == tok.pad_token_id
    assert tok.unk_token_id not in ids[0].tolist()


def test_dinov3_loads_back_offline_with_same_outputs(trained):
    from transformers import AutoImageProcessor, DINOv3ViTModel
    out, report = trained
    d = out / "dinov3"
    model = DINOv3ViTModel.from_pretrained(d).eval()
    proc = AutoImageProcessor.from_pretrained(d)
    assert model.config.num_register_tokens == 4
    assert list(proc.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    got = probe_outputs("dinov3", model, proc)
    for key, ref in report["dinov3"]["probe"].items():
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(ref), atol=1e-4), key
    # RoPE: any multiple of the patch size works; last_hidden = [CLS, 4 registers, patches]
    x = torch.randn(1, 3, 48, 80)
    h = model(pixel_values=x).last_hidden_state
    assert h.shape[1] == 1 + 4 + (48 // 16) * (80 // 16)


def test_completion_marker_and_resume(trained, world, tmp_path):
    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert teachers_complete(copy)
    (copy / "dinov3" / MARKER).unlink()  # e.g. killed before the marker was written
    assert not teachers_complete(copy)
    assert not teachers_complete(tmp_path / "nothing-here")
    # a re-run skips the complete teacher and retrains only the incomplete one
    report = train_teachers(world, copy, fast=True, progress=False)
    assert report["siglip2"] == {"status": "skipped (complete)"}
    assert report["dinov3"]["steps"] > 0 and teachers_complete(copy)
    # a different recipe is not "complete": that teacher is retrained
    # (here: crops and masked patches, which the default's whole views leave out, so iBOT and the
    # masked-pixel term run too)
    assert load_recipe(fast=True)["dinov3"]["mask_prob"] == 0
    report = train_teachers(world, copy, fast=True, progress=False, only=["dinov3"],
                            dinov3={"steps": 2, "warmup_steps": 1, "mask_prob": 1.0, "global_scale": [0.35, 1.0],
                                    "presence_weight": 1.0, "use_pretrain": False})
    assert len(report["dinov3"]["losses"]) == 2
    for term in ("presence_losses", "ibot_losses", "pixel_losses"):
        assert all(v > 0 for v in report["dinov3"][term]), term
    world_cfg = json.loads(QUICKSTART.read_text())["fast"]["world"]["size"]
    assert report["dinov3"]["images"] == world_cfg["pool"]["images"]   # asked to, the pool alone


def test_a_killed_teacher_resumes_mid_training_to_the_same_weights(trained, world, tmp_path, monkeypatch):
    """Teacher loops checkpoint through the shared checkpoint layout: SigLIP2 killed in step 11 (last
    checkpoint at 8), DINOv3's dino.txt head killed in step 7 (its own loop done, the head's last
    checkpoint at 4); the rerun continues from there and ends with the bytes and losses of the run
    that was never stopped. The checkpoints go when the teacher is done."""
    import distill.teachers.dinotxt as dinotxt
    import distill.teachers.siglip2 as siglip2

    class Killed(Exception):
        pass

    def dies_after(module, n=None):
        real, calls = module.optimizer_step, []

        def step(*a, **kw):
            calls.append(1)
            if n is not None and len(calls) > n:
                raise Killed()
            return real(*a, **kw)
        monkeypatch.setattr(module, "optimizer_step", step)
        return calls

    out, report = trained
    mine = tmp_path / "t"
    dies_after(siglip2, 10)
    with pytest.raises(Killed):
        train_teachers(world, mine, fast=True, progress=False, only=["siglip2"], checkpoint_every=4)
    assert json.loads((mine / ".siglip2.run" / "checkpoints" / "latest.json").read_text())["step"] == 8
    monkeypatch.undo()
    dies_after(dinotxt, 6)
    with pytest.raises(Killed):
        train_teachers(world, mine, fast=True, progress=False, only=["dinov3"], checkpoint_every=4)
    assert json.loads((mine / ".dinov3.run" / "checkpoints" / "latest.json").read_text())["step"] == 20
    assert json.loads((mine / ".dinov3.run" / "dinotxt" / "checkpoints" / "latest.json").read_text())["step"] == 4
    monkeypatch.undo()
    import distill.teachers.dinov3 as dinov3
    steps = {m.__name__: dies_after(m) for m in (siglip2, dinov3, dinotxt)}    # counted, not killed
    again = train_teachers(world, mine, fast=True, progress=False, checkpoint_every=4)
    assert {k.rsplit(".", 1)[1]: len(v) for k, v in steps.items()} == {"siglip2": 25 - 8, "dinov3": 0, "dinotxt": 10 - 4}
    for rel in ("siglip2/model.safetensors", "dinov3/model.safetensors", "dinov3/dinotxt/model.safetensors"):
        assert (mine / rel).read_bytes() == (out / rel).read_bytes(), rel
    assert again["siglip2"]["losses"] == report["siglip2"]["losses"]
    assert again["dinov3"]["dino_losses"] == report["dinov3"]["dino_losses"]
    assert again["dinov3"]["dinotxt"]["losses"] == report["dinov3"]["dinotxt"]["losses"]
    assert not list(mine.glob(".*.run"))


def test_bad_world_and_bad_recipe_give_clear_errors(tmp_path, world):
    with pytest.raises(TeacherError, match="amoe world make"):
        train_teachers(tmp_path / "missing", tmp_path / "out", fast=True)
    (tmp_path / "not-a-world").mkdir()
    with pytest.raises(TeacherError, match="world.json"):
        train_teachers(tmp_path / "not-a-world", tmp_path / "out", fast=True)
    no_pretrain = tmp_path / "old-world"
    shutil.copytree(world, no_pretrain, ignore=shutil.ignore_patterns("pretrain"))
    with pytest.raises(TeacherError, match=r"no pretrain part, which the siglip2 and dinov3 recipes read.*amoe world "
                                           r"make.*--set siglip2.use_pretrain=false --set dinov3.use_pretrain=false$"):
        train_teachers(no_pretrain, tmp_path / "out", fast=True)
    with pytest.raises(TeacherError, match=r"which the dinov3 recipe reads.*--set dinov3.use_pretrain=false$"):
        train_teachers(no_pretrain, tmp_path / "out", fast=True, only=["dinov3"])
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' in 'siglip2' of the teacher recipe \(did you mean 'steps'"):
        train_teachers(world, tmp_path / "out", fast=True, siglip2={"stepz": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'siglip3' in the teacher recipe \(did you mean 'siglip2'"):
        load_recipe(fast=True, siglip3={})
    assert not (tmp_path / "out" / "siglip2").exists()


def test_recipes_are_data_and_fast_only_overrides_known_keys():
    data = json.loads(RECIPES_FILE.read_text())
    for name, over in data["fast"].items():
        assert name in data["default"], name
        if isinstance(over, dict):
            assert set(over) <= set(data["default"][name]), name
    fast, default = load_recipe(fast=True), load_recipe()
    assert fast["siglip2"]["steps"] < default["siglip2"]["steps"]
    assert default["dinov3"]["num_register_tokens"] == 4


def test_dinov3_recipe_init_range_reaches_the_weights():
    """`dinov3.initializer_range` is DINOv3ViTConfig's field: HF draws every Linear / Conv2d weight with that
    std (HF's default 0.02 suits ViT-L widths; the recipe's ~1/sqrt(width) avoids the small-width plateau,
    docs/teachers.md)."""
    from distill.teachers.dinov3 import build_model
    recipe = load_recipe(dinov3={"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2})["dinov3"]
    assert recipe["initializer_range"] != 0.02   # not HF's default, which plateaus at this width
    for std in (0.02, recipe["initializer_range"]):
        model = build_model({**recipe, "initializer_range": std})
        assert model.config.initializer_range == std
        w = model.get_parameter("model.layer.0.mlp.up_proj.weight")
        assert w.std().item() == pytest.approx(std, rel=0.15)


def test_cli_train_and_eval(world, trained, tmp_path, capsys):
    from amoe.cli import main
    assert main(["teachers", "train", "--world", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "amoe world make" in capsys.readouterr().err
    out, _ = trained
    assert main(["teachers", "train", "--world", str(world), "--out", str(out), "--fast"]) == 0
    assert "skipped (complete)" in capsys.readouterr().out
    # their scores come from the benchmark tasks, as every encoder's do
    metrics_file = tmp_path / "metrics.json"
    assert main(["bench", "teachers", "--world", str(world), "--teachers", str(out), "--limit", "24",
                 "--out", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                 "--json", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert {"zeroshot/mw-cls", "knn/mw-cls", "retrieval/mw-ret", "segmentation/mw-seg"} <= set(metrics["siglip2"])
    assert {"siglip2/top1", "siglip2/mean_per_class_recall"} <= set(metrics["siglip2"]["zeroshot/mw-cls"])
    assert "dinotxt/top1" in metrics["dinov3"]["zeroshot/mw-cls"]     # the DINOv3 teacher's dino.txt head
    assert "dinov3/top1" in metrics["dinov3"]["knn/mw-cls"] and "dinov3/miou" in metrics["dinov3"]["segmentation/mw-seg"]
    assert "dinov3/miou" in metrics["dinov3"]["segmentation/mw-seg"]
    assert "siglip2/top1_shape" in metrics["siglip2"]["linear/mw-cls"]  # what each factor of the classes gets
    assert metrics["failed"] == 0 and len(list((tmp_path / "results").glob("*.json"))) == 10
    assert main(["bench", "teachers", "--world", str(world), "--teachers", str(tmp_path / "none")]) == 2


def test_parallel_training_one_process_per_teacher(world, tmp_path):
    # the default recipe trains the two teachers side by side in spawned processes
    out = tmp_path / "par"
    report = train_teachers(world, out, fast=True, progress=False, parallel=True)
    assert teachers_complete(out)
    for name in ("siglip2", "dinov3"):
        assert report[name]["recipe"] == load_recipe(fast=True)[name]
        assert report[name]["machine"]["torch_threads"] == 1
    again = train_teachers(world, out, fast=True, progress=False, parallel=True)
    assert again == {"siglip2": {"status": "skipped (complete)"}, "dinov3": {"status": "skipped (complete)"}}
    # reproducible: the same seed gives bit-identical weights side by side and one after the other
    serial = tmp_path / "serial"
    train_teachers(world, serial, fast=True, progress=False, parallel=False)
    for rel in ("siglip2/model.safetensors", "dinov3/model.safetensors", "dinov3/dinotxt/model.safetensors"):
        assert (out / rel).read_bytes() == (serial / rel).read_bytes(), rel


def test_ceiling_reports_floors_and_supervised_ceilings(world, tmp_path, capsys):
    from amoe.cli import main
    out = tmp_path / "ceiling.json"
    assert main(["teachers", "ceiling", "--world", str(world), "--seconds", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["raw_pixels"]) == {"linear_top1"}   # kNN / segmentation floors: pixels:24 in the harness
    sup = result["supervised"]
    assert set(sup) == {"cnn_classification", "vit_classification", "vit_segmentation"}
    assert all(r["steps"] >= 1 and r["seconds"] >= 1.0 for r in sup.values())
    values = [*result["raw_pixels"].values(), sup["cnn_classification"]["top1"], sup["vit_classification"]["top1"],
              sup["vit_segmentation"]["miou"]]
    assert all(0.0 <= v <= 100.0 for v in values)
    assert main(["teachers", "ceiling", "--world", str(tmp_path / "nope")]) == 2
    assert "amoe world make" in capsys.readouterr().err


def _teacher_rank(rank: int, port: int, world: str, out: str) -> None:
    import os
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    train_teachers(world, out, fast=True, progress=False)


@pytest.mark.distributed
def test_two_ranks_train_the_teachers_one_process_trains(world, trained, tmp_path):
    """Under torchrun each teacher trains data-parallel (DDP, half of every global batch per rank, the
    contrastive losses gathering the other rank's rows, masked-patch means over the global count):
    the weights and the logged losses are the single-process run's, and only rank 0 writes."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    mp.start_processes(_teacher_rank, args=(port, str(world), str(two)), nprocs=2, join=True, start_method="spawn")
    one = trained[0]
    assert teachers_complete(two)
    for rel in ("siglip2/model.safetensors", "dinov3/model.safetensors", "dinov3/dinotxt/model.safetensors"):
        a, b = load_file(one / rel), load_file(two / rel)
        assert a.keys() == b.keys()
        for k in a:   # Adam turns round-off-sized gradient differences into steps of up to lr (1e-3, 2e-3)
            assert torch.allclose(a[k], b[k], atol=1e-3), (rel, k)
    for name in ("siglip2", "dinov3"):
        log1, log2 = (json.loads((d / name / "train_log.json").read_text()) for d in (one, two))
        assert log2["ranks"] == 2 and log1["ranks"] == 1
        assert log2["losses"] == pytest.approx(log1["losses"], rel=1e-3, abs=1e-4)
    assert sorted(p.name for p in two.iterdir() if not p.name.endswith(".lock")) == ["dinov3", "siglip2"]


def test_a_batch_that_does_not_split_over_the_ranks_is_named():
    from distill.distributed import DistInfo
    from distill.teachers.common import Ranks

    ranks = Ranks(DistInfo(rank=1, world_size=3))
    assert ranks.block(12, "siglip2") == slice(4, 8)
    with pytest.raises(TeacherError, match=r"batch_size 10 does not split over 3 ranks.*siglip2.batch_size"):
        ranks.block(10, "siglip2")


def test_tokenizer_keeps_words_whole_so_captions_share_their_words():
    # Learnt on a few repeated prompts, BPE used to merge whole captions into one token each, so
    # "a photo of a red circle" and "... red square" shared no id and the text tower saw opaque labels.
    from distill.teachers.tokenizer import train_tokenizer
    prompts = [t.format(f"{c} {s}") for t in ("a photo of a {}.", "a drawing of a {}.")
               for c in ("red", "green", "blue") for s in ("circle", "square", "star")] * 20
    tok = train_tokenizer(prompts, 512, 16)
    pieces = {p: tok.convert_ids_to_tokens(encode(tok, [p], 16)[0].tolist()) for p in prompts}
    for prompt, words in pieces.items():
        assert all("▁" not in w[1:] for w in words), words   # no piece spans two words
        # the loaded tokenizer does not split words, yet gives what word-by-word encoding gives
        first, *rest = canonicalize(prompt).split(" ")
        by_word = [p for w in [first] + [" " + w for w in rest] for p in tok.tokenize(w)]
        assert [w for w in words if w != "<pad>"] == by_word
    circle, square = pieces["a photo of a red circle."], pieces["a photo of a red square."]
    assert "▁red" in circle and "▁red" in square and "▁circle" in circle and "▁square" in square
    assert circle[:5] == ["a", "▁photo", "▁of", "▁a", "▁red"]


def test_teacher_fingerprint_changes_with_the_tokenizer_version(monkeypatch):
    import distill.teachers.common as common
    recipe = common.load_recipe()
    before = common.teacher_fingerprint("siglip2", recipe, {"seed": 0}, 0)
    monkeypatch.setattr(common, "TOKENIZER_VERSION", common.TOKENIZER_VERSION + 1)
    assert common.teacher_fingerprint("siglip2", recipe, {"seed": 0}, 0) != before


def test_presence_targets_and_loss_match_a_hand_computation():
    """The teachers' weak supervision from the world's metadata: which shapes and colours an image (or
    a DINOv3 crop) holds, and a softmax cross-entropy per kind against the uniform distribution over
    the ones present."""
    import math

    from distill.teachers.common import presence_cross_entropy
    from distill.teachers.data import object_vocab, presence_vector
    from distill.teachers.dinov3 import presence_targets

    objects = [{"shape": "star", "colour": "red"}, {"shape": "circle", "colour": "red"}]
    vocab = object_vocab(objects + [{"shape": "square", "colour": "blue"}])
    assert vocab == (["circle", "square", "star"], ["blue", "red"])
    assert presence_vector(objects, vocab) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert presence_vector([], vocab) == [0.0] * 5
    # per-patch ids (0 = background) of two crops: the second holds only background
    labels = torch.tensor([[[0, 1, 3, 3], [0, 2, 2, 2]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    targets = presence_targets(labels, (3, 2))
    assert targets.tolist() == [[1, 0, 1, 0, 1], [0, 0, 0, 0, 0]]
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5, -0.5], [4.0, 0.0, 0.0, 1.0, 1.0]])
    z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    shapes = -((1 - z) + (3 - z)) / 2
    colours = -(-0.5 - math.log(math.exp(0.5) + math.exp(-0.5)))
    loss = presence_cross_entropy(logits, targets, 3)
    assert loss.tolist() == pytest.approx([shapes + colours, 0.0])
    # by area: each name weighted by what its objects cover (boxes x, y, w, h; patches of a crop)
    boxed = [o | {"bbox": [0, 0, w, h]} for o, (w, h) in zip(objects, [(4, 4), (2, 2)])]
    assert presence_vector(boxed, vocab, by_area=True) == [4.0, 0.0, 16.0, 0.0, 20.0]
    assert presence_targets(labels, (3, 2), by_area=True).tolist() == [[1, 0, 2, 0, 3], [0, 0, 0, 0, 0]]
    weighted = presence_cross_entropy(logits[:1], torch.tensor([[1.0, 0.0, 3.0, 0.0, 3.0]]), 3)
    assert weighted.item() == pytest.approx(-((1 - z) + 3 * (3 - z)) / 4 + colours)
