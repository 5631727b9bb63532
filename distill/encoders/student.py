"""SigLino students as encoders: the official release (`siglino:`) and our own exports (`student:`).

Export format (written by `save_student`, used by distill/train/export.py and `export_random_student`):

    DIR/model.safetensors   the state dict in the official SigLino key layout
    DIR/config.json         {"format": "amoe-student", "student_config": {...StudentConfig...},
                             "teachers": {head: {"spec": ENCODER_SPEC, "head": TEACHER_HEAD}},
                             "phis": {head: {"summary"|"patches"|"registers": "phis/FILE"}}, ...}
    DIR/phis/*.safetensors  PHI-S statistics of the targets the student was trained on

config.json is written last, so a directory with a valid config.json is a complete export.

Feature spaces. A student trained with PHI-S predicts *standardised* teacher features. By default the
encoder applies each teacher's inverse PHI-S (`PhiS.inverse`) to the summary and patch outputs of
that teacher's head, so `summary["siglip2"]` lives in the SigLIP2 teacher's own space -- the space of
the teacher's text tower, which is what zero-shot needs (AMoE does zero-shot exactly so: student image
features against the teacher's text embeddings). `phis_inverse=False` keeps the standardised outputs.
The "siglino" head (the backbone) has no teacher and is never transformed.

Text branches. "siglip2": the SigLIP2 teacher's text tower on `summary["siglip2"]`. "dinotxt": the
DINOv3 branch of the paper's ensemble -- a dino.txt head (distill/encoders/dinotxt.py) applied to the
student's `dinov3` CLS and patch tokens (in DINOv3 space), against dino.txt's text tower. An export
finds the head in its DINOv3 teacher's folder (`TEACHER/dinotxt/`); `?dinotxt=hub|PATH` names one.
Where none is found, `describe()["dinotxt_missing"]` gives the reason and the other heads still run.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from distill.encoders.common import (ModuleEncoder, as_bool, as_image_list, hub_error, is_local, no_grad_encode,
                                     pad_stack, require_remote_code)
from distill.encoders.registry import register_loader
from distill.features import Features
from distill.io import load_tensors, resolve_spec, save_tensors_atomic, write_json_atomic
from distill.student import ImageProcessor, Student, get_config, load_official_checkpoint
from distill.student.config import CONFIGS_FILE, known_configs
from distill.student.processor import chw_to_patches

FORMAT = "amoe-student"
STUDENT_HEADS = ("siglino", "siglip2", "dinov3")
PHIS_KINDS = ("summary", "patches")


def release_config_for(path: str | Path) -> str | None:
    """Config name for an official checkpoint file name (amoe-0.3B.pt -> siglino-0.3B), from configs.json."""
    stem = Path(path).name
    for suffix in (".pt", ".pth", ".safetensors"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    table = json.loads(CONFIGS_FILE.read_text())
    for name, entry in table.items():
        if name.startswith("_"):
            continue
        ckpt = entry.get("checkpoint")
        if ckpt and Path(ckpt).stem == stem:
            return name
    return stem if stem in known_configs() else None


def active_param_count(model: Student) -> int:
    """Parameters one token passes through: routed experts count top_k / num_experts of their weights."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.moe_layers():
        expert = sum(p.numel() for p in m.experts.parameters())
        total -= expert - expert * m.args.top_k // m.args.num_experts
    return total


class SiglinoEncoder(ModuleEncoder):
    """Our `Student` (official weights or a distilled export) behind the Encoder interface."""

    kind = "siglino"

    def __init__(self, model: Student, name: str, kind: str = "siglino", phis: Mapping | None = None,
                 teachers: Mapping[str, Mapping[str, str]] | None = None, max_tokens: int = 4096,
                 teacher_loader: Callable | None = None, identity: Mapping | None = None,
                 dinotxt: Callable | None = None, dinotxt_missing: str | None = None):
        self.model = model.eval()
        self.name = name
        self.kind = kind
        self.phis = {h: dict(v) for h, v in (phis or {}).items()}    # head -> kind -> PhiS
        self.teacher_specs = {h: dict(v) for h, v in (teachers or {}).items()}
        self.max_tokens = int(max_tokens)
        self.patch_size = model.config.spatial_patch_size
        self._teacher_loader = teacher_loader
        self._teachers: dict[str, Any] = {}
        self._teacher_errors: dict[str, Exception] = {}
        self._identity = dict(identity or {})
        self._dinotxt_load = dinotxt            # () -> DinoTxtBranch, called on first use
        self._dinotxt = None
        self.dinotxt_missing = dinotxt_missing

    def runtime_info(self) -> dict:
        info = super().runtime_info()
        if isinstance(self.model, Student):
            info["attention"] = self.model.attention_path(self.device)
        return info

    @property
    def dinotxt(self):
        """The DINOv3 text branch, loaded on first use; None (with `dinotxt_missing` saying why) if absent."""
        if self._dinotxt is None and self._dinotxt_load is not None and self.dinotxt_missing is None:
            try:
                self._dinotxt = self._dinotxt_load()
                self._dinotxt.check_width(self.model.config.teachers_dim[self.model.config.teachers.index("dinov3")],
                                          f"{self.name}'s dinov3 adapter")
            except (OSError, ValueError, KeyError) as e:
                from distill.encoders.dinotxt import DinoTxtShapeError
                if isinstance(e, DinoTxtShapeError):
                    raise
                self.dinotxt_missing = f"the dino.txt head could not be loaded: {e}"
                warnings.warn(f"{self.name}: {self.dinotxt_missing}")
                self._dinotxt = None
            if self._dinotxt is not None:
                self._dinotxt.to(self.device)
        return self._dinotxt

    @property
    def heads(self) -> tuple[str, ...]:
        return STUDENT_HEADS + (("dinotxt",) if self.dinotxt is not None else ())

    # ------------------------------------------------------------------ images
    def _processor(self, resolution) -> ImageProcessor:
        if resolution is None:
            return ImageProcessor(patch_size=self.patch_size)
        side = int(resolution)
        # the release's eval setting: max_pixels = side^2; min_pixels must not exceed it
        return ImageProcessor(patch_size=self.patch_size, min_pixels=min(128 * 128, side * side),
                              max_pixels=side * side)

    def preprocess(self, image, resolution=None) -> torch.Tensor:
        return self._processor(resolution).to_tensor(image)

    def preprocess_config(self) -> dict:
        return {"processor": ImageProcessor(patch_size=self.patch_size).config(),
                "resolution_rule": "max_pixels = R^2, min_pixels = min(128^2, R^2)"}

    @no_grad_encode
    def encode(self, images) -> Features:
        images = [im.to(self.device, self.dtype) for im in as_image_list(images)]
        p = self.patch_size
        longest = max((im.shape[1] // p) * (im.shape[2] // p) for im in images) + self.model.n_prefix
        outs = self.model.forward_packed(images, max_tokens=max(self.max_tokens, longest))
        feats = self._to_teacher_space(Features.concat([o.to_features() for o in outs]))
        if self.dinotxt is not None and "dinov3" in feats.summary:
            feats.summary["dinotxt"] = self.dinotxt.image_embedding(feats.summary["dinov3"],
                                                                    feats.patches["dinov3"]).to(self.dtype)
        return feats

    def _to_teacher_space(self, feats: Features) -> Features:
        for head, by_kind in self.phis.items():
            if head not in feats.summary:
                continue
            if "summary" in by_kind:
                feats.summary[head] = by_kind["summary"].inverse(feats.summary[head].float()).to(self.dtype)
            if "patches" in by_kind and head in feats.patches:
                feats.patches[head] = [by_kind["patches"].inverse(x.float()).to(self.dtype)
                                       for x in feats.patches[head]]
        return feats

    # ------------------------------------------------------------------ text: borrowed from the teachers
    def _teacher(self, head: str):
        if head not in self._teachers:
            spec = self.teacher_specs[head]["spec"]
            loader = self._teacher_loader
            if loader is None:
                from distill.encoders.registry import load_encoder as loader
            self._teachers[head] = loader(spec)
        return self._teachers[head]

    def unavailable_heads(self) -> dict[str, str]:
        """Text heads missing because something could not be loaded here (a teacher folder that moved,
        a dino.txt head that failed), not because the model lacks them: a cell skipped for these is
        retried by the next run."""
        self.text_heads  # noqa: B018  (loads the teachers, recording failures)
        out = {h: f"the {h} teacher could not be loaded: {e}" for h, e in self._teacher_errors.items()}
        if self.dinotxt_missing and self.dinotxt_missing.startswith("the dino.txt head could not be loaded"):
            out["dinotxt"] = self.dinotxt_missing
        return out

    @property
    def text_heads(self) -> tuple[str, ...]:
        """Heads whose recorded teacher has a text tower for its head (loads those teachers)."""
        out = []
        for head, t in self.teacher_specs.items():
            if head in self.heads and t.get("spec"):
                try:
                    teacher = self._teacher(head)
                except Exception as e:  # e.g. a teacher directory that moved: no text here, say why once
                    if head not in self._teacher_errors:
                        self._teacher_errors[head] = e
                        warnings.warn(f"{self.name}: the {head} teacher ({t['spec']}) could not be loaded, so "
                                      f"'{head}' has no text tower: {e}")
                    continue
                if t.get("head", head) in teacher.text_heads:
                    out.append(head)
        if self.dinotxt is not None:
            out.append("dinotxt")
        return tuple(out)

    def encode_text(self, texts: list[str], head: str) -> torch.Tensor:
        if head == "dinotxt" and self.dinotxt is not None:
            return self.dinotxt.encode_text(texts).to(self.device, self.dtype)
        if head not in self.teacher_specs:
            self.require_head(head, text=True)  # raises MissingHeadError naming the text heads there are
        teacher = self._teacher(head)
        t_head = self.teacher_specs[head].get("head", head)
        teacher.require_head(t_head, text=True)
        if teacher.device != self.device:
            teacher.to(self.device)
        return teacher.encode_text(texts, t_head).to(self.device, self.dtype)

    def text_fingerprint(self, head: str) -> str:
        """The borrowed tower's own identity: a student's prompts share the teacher's cache entries."""
        if head == "dinotxt" and self.dinotxt is not None:
            return self.dinotxt.fingerprint()
        if head in self.teacher_specs:
            return self._teacher(head).text_fingerprint(self.teacher_specs[head].get("head", head))
        return self.fingerprint()

    def logit_scale(self, head: str) -> float:
        if head == "dinotxt" and self.dinotxt is not None:
            return self.dinotxt.logit_scale()
        if head in self.teacher_specs:
            return self._teacher(head).logit_scale(self.teacher_specs[head].get("head", head))
        return super().logit_scale(head)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def active_params(self) -> int:
        return active_param_count(self.model)

    def weights_id(self) -> str:
        if getattr(self, "_weights_id", None) is None:
            from distill.encoders.common import weights_digest
            from distill.io import fingerprint
            phis = {h: {k: weights_digest({"mean": s.mean, "eigvecs": s.eigvecs, "alpha": s.alpha})
                        for k, s in v.items()} for h, v in self.phis.items()}
            # the dino.txt head shapes the `dinotxt` features, so a cache must not outlive a new head
            txt = weights_digest(self.dinotxt.model) if self.dinotxt is not None else None
            self._weights_id = fingerprint([weights_digest(self.model), phis] + ([txt] if txt else []))
        return self._weights_id

    def describe(self) -> dict:
        c = self.model.config
        return {"config": c.to_dict(), "teachers": self.teacher_specs, "phis_inverse": sorted(self.phis),
                "dinotxt": self._dinotxt.source if self._dinotxt is not None else None,
                **({"dinotxt_missing": self.dinotxt_missing} if self.dinotxt_missing else {}), **self._identity}


class RemoteSiglinoEncoder(SiglinoEncoder):
    """A `tiiuae/siglino-*` Hugging Face model run through its own (remote) code. Its forward is taken
    to follow the release: forward(pixel_values (N, L, 768), padding_mask, spatial_shapes) -> a mapping
    with "summary_features" / "patch_features" per head. Preprocessing is the release processor."""

    def __init__(self, model, name: str, patch_size: int = 16):
        self.model = model.eval()
        self.name = name
        self.kind = "siglino"
        self.phis, self.teacher_specs, self._teachers, self._teacher_errors = {}, {}, {}, {}
        self._teacher_loader = None
        self._identity = {}
        self._dinotxt_load, self._dinotxt, self.dinotxt_missing = None, None, "remote SigLino models get no text branch"
        self.patch_size = patch_size
        self.max_tokens = 0

    @no_grad_encode
    def encode(self, images) -> Features:
        images = [im.to(self.device, self.dtype) for im in as_image_list(images)]
        per = [chw_to_patches(im, self.patch_size) for im in images]
        grids = [g for _, g in per]
        pixel_values, mask = pad_stack([p for p, _ in per])
        shapes = torch.tensor(grids, dtype=torch.long, device=self.device)
        out = self.model(pixel_values=pixel_values, padding_mask=mask.to(pixel_values.dtype), spatial_shapes=shapes)
        summary = {h: out["summary_features"][h] for h in STUDENT_HEADS if h in out["summary_features"]}
        patches = {h: [out["patch_features"][h][i, : g[0] * g[1]] for i, g in enumerate(grids)]
                   for h in STUDENT_HEADS if h in out["patch_features"]}
        return Features(summary=summary, patches=patches, grids=grids, cls=summary.get("siglino"))

    @property
    def text_heads(self) -> tuple[str, ...]:
        return ()

    @property
    def active_params(self) -> int:
        return self.num_params

    def describe(self) -> dict:
        return {"remote": True}


# ====================================================================== the export format

def save_student(state_dict: Mapping[str, torch.Tensor], config, export_dir, metadata: Mapping | None = None) -> Path:
    """Write DIR/model.safetensors, then DIR/config.json (the completion marker)."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    cfg = get_config(config)
    meta = dict(metadata or {})
    if meta.get("format", FORMAT) != FORMAT:
        raise ValueError(f"metadata format {meta['format']!r} is not {FORMAT!r}")
    meta["format"] = FORMAT
    meta["student_config"] = cfg.to_dict()
    meta.setdefault("teachers", {})
    meta.setdefault("phis", {})
    cfg_file = export_dir / "config.json"
    if cfg_file.exists():  # an export being replaced is incomplete until the new config.json lands
        cfg_file.unlink()
    save_tensors_atomic(export_dir / "model.safetensors", dict(state_dict), metadata={"format": FORMAT})
    write_json_atomic(cfg_file, meta)
    return export_dir


def read_student_config(path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no config.json; not an amoe-student export (export with "
                                "`amoe distill` or export_random_student)")
    cfg = json.loads(f.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{f}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
    return cfg


def student_export_complete(path) -> bool:
    """True when DIR holds a readable config.json, a readable model.safetensors and every PHI-S file."""
    p = Path(path)
    try:
        cfg = read_student_config(p)
        get_config(cfg["student_config"])
        from safetensors import safe_open
        with safe_open(str(p / "model.safetensors"), framework="pt") as f:
            if not list(f.keys()):
                return False
        return all((p / rel).is_file() for kinds in cfg.get("phis", {}).values() for rel in kinds.values())
    except Exception:
        return False


def _teacher_width(folder: Path, kind: str) -> int:
    f = folder / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"teacher directory {folder} has no config.json (expected a Hugging Face "
                                f"save_pretrained directory of the {kind} teacher)")
    cfg = json.loads(f.read_text())
    if kind == "siglip2":
        vc = cfg.get("vision_config") or {}
        width = vc.get("hidden_size")
    else:
        width = cfg.get("hidden_size")
    if not width:
        raise ValueError(f"{f}: cannot read the {kind} teacher's width (hidden_size)")
    return int(width)


def export_random_student(path, config="tiny-moe", seed: int = 0, teachers=None, init: str = "standard") -> Path:
    """A randomly initialised student in the export format: the random-init baseline. With `teachers`
    (a directory holding siglip2/ and dinov3/ teacher models) the adapters take the teachers' widths
    and the teachers are recorded as the text-tower sources.

    `init`: "standard" (default) draws every layer's weights, so features vary across images;
    "release" is the training initialisation, whose zeroed residual projections make every image's
    summary features the same vector (a baseline that always answers class 0)."""
    if init not in ("standard", "release"):
        raise ValueError(f"init must be 'standard' or 'release', got {init!r}")
    cfg = get_config(config)
    teacher_meta = {}
    if teachers is not None:
        tdir = Path(teachers).expanduser().resolve()
        widths = {k: _teacher_width(tdir / k, k) for k in ("siglip2", "dinov3")}
        cfg.teachers = ("siglip2", "dinov3")
        cfg.teachers_dim = (widths["siglip2"], widths["dinov3"])
        cfg = get_config(cfg.to_dict())  # re-validate (MAP head needs siglip2 width % 16 == 0)
        # stored relative to the export dir, so the run folder holding both can be moved
        rel = Path(os.path.relpath(tdir, Path(path).expanduser().resolve()))
        teacher_meta = {k: {"spec": f"{k}:{rel / k}", "head": k} for k in ("siglip2", "dinov3")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Student(cfg)
        model.init_weights(torch.Generator().manual_seed(seed), zero_residual=init == "release")
    meta = {"teachers": teacher_meta, "phis": {}, "recipe": "random-init", "init": init, "step": 0,
            "seed": int(seed)}
    return save_student(model.state_dict(), cfg, path, metadata=meta)


# ====================================================================== loaders

@register_loader("student", "our distilled SigLino student export (model.safetensors + config.json); heads "
                 "siglino/siglip2/dinov3 mapped back to teacher space by inverse PHI-S; text via the teachers",
                 requires=("safetensors",), example="student:runs/miniworld/export",
                 options={"phis_inverse": "apply inverse PHI-S (default true)",
                          "attention_backend / expert_backend": "Student runtime options",
                          "dinotxt": "the DINOv3 text branch: hub (remote code) or a head folder; default: the "
                                     "DINOv3 teacher's dinotxt/ folder"})
def load_student(arg: str, phis_inverse=True, attention_backend: str = "auto", expert_backend: str = "auto",
                 teacher_loader: Callable | None = None, max_tokens: int = 4096, dinotxt=None,
                 trust_remote_code=None, hub_load: Callable | None = None, **unused) -> SiglinoEncoder:
    if unused:
        raise TypeError(f"student loader got unknown option(s) {sorted(unused)}")
    path = Path(arg).expanduser()
    cfg = read_student_config(path)
    model = Student(cfg["student_config"], attention_backend=attention_backend, expert_backend=expert_backend)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: config.json present but model.safetensors missing (incomplete export)")
    model.load_state_dict(load_tensors(weights))
    phis = {}
    if as_bool(phis_inverse) and cfg.get("phis"):
        try:
            from distill.phis import PhiS
        except ImportError as e:
            raise ImportError(f"{path} holds PHI-S statistics but distill.phis is not importable ({e}); "
                              "load with ?phis_inverse=false to get the standardised outputs") from e
        for head, kinds in cfg["phis"].items():
            loaded = {k: PhiS.load(path / rel) for k, rel in kinds.items() if k in PHIS_KINDS}
            if loaded:
                phis[head] = loaded
    teachers = {h: {"spec": resolve_spec(t["spec"], path), "head": t.get("head", h)}
                for h, t in (cfg.get("teachers") or {}).items() if t.get("spec")}
    load_txt, missing = _dinotxt_source(dinotxt, teachers.get("dinov3"), trust_remote_code, hub_load)
    return SiglinoEncoder(model, f"student:{path}", kind="student", phis=phis, teachers=teachers,
                          max_tokens=max_tokens, teacher_loader=teacher_loader,
                          identity={"recipe": cfg.get("recipe"), "step": cfg.get("step")},
                          dinotxt=load_txt, dinotxt_missing=missing)


def _dinotxt_source(dinotxt, dinov3_teacher: Mapping | None, trust_remote_code=None, hub_load=None):
    """(loader, missing reason) of a student's DINOv3 text branch: `dinotxt` given (hub or a folder), else
    the `dinotxt/` folder of its recorded DINOv3 teacher."""
    from functools import partial

    from distill.encoders.dinotxt import SUBFOLDER, is_mini_dinotxt, load_dinotxt
    if dinotxt not in (None, "", "auto"):
        if dinotxt in (False, 0, "0", "false"):
            return None, "disabled (?dinotxt=0)"
        return partial(load_dinotxt, dinotxt, hub_load=hub_load, trust_remote_code=trust_remote_code), None
    if not dinov3_teacher:
        return None, "no DINOv3 teacher recorded and no ?dinotxt= given"
    folder = Path(dinov3_teacher["spec"].partition("?")[0].split(":", 1)[-1]) / SUBFOLDER
    if not is_mini_dinotxt(folder):
        return None, (f"the DINOv3 teacher has no dino.txt head ({folder} missing); train it with `amoe teachers "
                      "train` or pass ?dinotxt=hub|PATH")
    return partial(load_dinotxt, str(folder)), None


def _single_checkpoint(folder: Path) -> Path:
    cands = sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
    if len(cands) != 1:
        raise FileNotFoundError(f"{folder}: expected exactly one .pt checkpoint, found {[c.name for c in cands]}; "
                                "point at the file itself")
    return cands[0]


@register_loader("siglino", "official SigLino / AMoE release through our Student (amoe-0.3B.pt, dense-30M.pt ...; "
                 "strict load, weights_only) or HF tiiuae/siglino-* via remote code (opt-in)",
                 requires=("safetensors",), example="siglino:/ckpt/amoe-0.3B.pt",
                 options={"config": "config name when the file name does not say it (e.g. siglino-0.3B)",
                          "siglip2_text": "encoder spec whose SigLIP2 text tower scores the siglip2 head, e.g. "
                                          "siglip2:google/siglip2-so400m-patch16-naflex",
                          "dinotxt": "the DINOv3 text branch: hub (remote code) or a head folder",
                          "trust_remote_code": "required for HF ids", "hf_load": "(Python) replacement loader"})
def load_siglino(arg: str, config=None, trust_remote_code=None, hf_load: Callable | None = None,
                 attention_backend: str = "auto", expert_backend: str = "auto", max_tokens: int = 4096,
                 siglip2_text: str | None = None, dinotxt=None, hub_load: Callable | None = None,
                 teacher_loader: Callable | None = None, **unused) -> SiglinoEncoder:
    if unused:
        raise TypeError(f"siglino loader got unknown option(s) {sorted(unused)}")
    p = Path(arg).expanduser()
    if p.is_dir() and (p / "config.json").is_file() and "auto_map" in json.loads((p / "config.json").read_text()):
        return _load_remote_siglino(str(p), trust_remote_code, hf_load)
    if p.is_dir():
        p = _single_checkpoint(p)
    if p.is_file():
        name = config or release_config_for(p)
        if name is None:
            raise ValueError(f"cannot infer the SigLino config from the file name '{p.name}'; pass it, e.g. "
                             f"'siglino:{arg}?config=siglino-0.3B' (known: {', '.join(known_configs())})")
        state = load_official_checkpoint(p)  # weights_only=True; read first so a bad file fails before the build
        model = Student(name, attention_backend=attention_backend, expert_backend=expert_backend)
        model.load_state_dict(state)  # strict
        # the paper's two text branches: SigLIP2's text tower (a siglip2:/openclip: spec) and dino.txt
        teachers = {"siglip2": {"spec": siglip2_text, "head": "siglip2"}} if siglip2_text else {}
        load_txt, missing = _dinotxt_source(dinotxt if dinotxt is not None else False, None, trust_remote_code,
                                            hub_load)
        if dinotxt is None:
            missing = "no dino.txt head given (pass ?dinotxt=hub or ?dinotxt=PATH)"
        return SiglinoEncoder(model, f"siglino:{p}", kind="siglino", max_tokens=max_tokens, teachers=teachers,
                              teacher_loader=teacher_loader, dinotxt=load_txt, dinotxt_missing=missing,
                              identity={"config_name": name if isinstance(name, str) else None})
    if "/" in arg and not arg.startswith((".", "/", "~")):
        return _load_remote_siglino(arg, trust_remote_code, hf_load)
    raise FileNotFoundError(f"siglino: '{arg}' is not a checkpoint file, a directory, or a Hugging Face id "
                            "like tiiuae/siglino-moe-0.3-0.6B")


def _load_remote_siglino(model_id: str, trust_remote_code, hf_load: Callable | None) -> RemoteSiglinoEncoder:
    require_remote_code("siglino", f"'{model_id}' (Hugging Face remote code)", trust_remote_code)
    if hf_load is None:
        def hf_load(mid):
            from transformers import AutoModel
            return AutoModel.from_pretrained(mid, trust_remote_code=True, dtype=torch.float32)
    try:
        model = hf_load(model_id)
    except OSError as e:
        if not is_local(model_id):
            raise hub_error("siglino", model_id, e) from e
        raise
    return RemoteSiglinoEncoder(model, f"siglino:{model_id}")
