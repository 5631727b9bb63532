"""The DINOv3 text branch (dino.txt): a LiT-style text alignment on top of DINOv3 tokens.

The paper's image-text numbers ensemble two branches; this module is the second one. dino.txt
(facebookresearch/dinov3, hub entry `dinov3_vitl16_dinotxt_tet1280d20h24l`) is a frozen DINOv3 ViT-L,
a small *vision head* (2 transformer blocks + LayerNorm, `model.visual_model.head`) and a text
tower (`model.encode_text(token_ids)`), with a CLIP tokenizer (`tokenizer.tokenize(texts)`).
The official AMoE evaluation applies the head to a *student's* `dinov3` tokens: it runs
`visual_model.head` on [CLS, patches] of one image and takes the joint embedding
[head CLS | mean of head patches] (2 x 1024 = 2048-d). `DinoTxtBranch.image_embedding` does exactly
that for any (CLS, patches) pair in DINOv3 space: the DINOv3 teacher's own tokens, or a student's
after inverse PHI-S. (The release's code averages from index 5, written for [CLS, 4 registers,
patches], while passing no registers, so it drops the first 4 patches; we average every patch.)

Two sources, one interface:
- `hub`: the real head through torch.hub (remote code, opt-in like RADIO); `hub_load` is injectable
  so the route is tested offline;
- a local folder in the amoe mini format (`dinotxt_config.json`, `model.safetensors`, tokenizer
  files): the mini-world stand-in that `amoe teachers train` writes to `TEACHER/dinov3/dinotxt/`. Its
  module keeps the official attribute layout (`visual_model.head`, `text_model`, `encode_text`,
  `logit_scale`), so the branch code cannot tell the two apart.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.errors import AmoeError

HUB_REPO = "facebookresearch/dinov3"
HUB_ENTRY = "dinov3_vitl16_dinotxt_tet1280d20h24l"
CONFIG_FILE = "dinotxt_config.json"
FORMAT = "amoe-dinotxt-1"
SUBFOLDER = "dinotxt"   # where a mini-world DINOv3 teacher keeps its text head


class DinoTxtShapeError(AmoeError, ValueError):
    """The head's token width does not match the features it is applied to."""


# ---------------------------------------------------------------------- the mini module (official layout)
class VisionHead(nn.Module):
    """Transformer blocks over [CLS, patches] then a LayerNorm, as dino.txt's `VisionHead`."""

    def __init__(self, dim: int, heads: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True)
                                    for _ in range(blocks))
        self.ln_final = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.ln_final(tokens)


class TextTower(nn.Module):
    """A causal text transformer pooled at the last real token (the end-of-text position), projected."""

    def __init__(self, vocab: int, context: int, dim: int, heads: int, layers: int, embed_dim: int, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.token_embedding = nn.Embedding(vocab, dim)
        self.positional_embedding = nn.Parameter(torch.randn(context, dim) * 0.01)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True)
                                    for _ in range(layers))
        self.ln_final = nn.LayerNorm(dim)
        self.projection = nn.Linear(dim, embed_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=ids.device), 1)
        for block in self.blocks:
            x = block(x, src_mask=causal)
        last = ((ids != self.pad_id).sum(-1) - 1).clamp_min(0)
        return self.projection(self.ln_final(x[torch.arange(len(ids)), last]))


class VisualModel(nn.Module):
    def __init__(self, head: VisionHead):
        super().__init__()
        self.head = head


class MiniDinoTxt(nn.Module):
    """The mini-world dino.txt: the official attribute layout at mini-world sizes."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c = self.config
        self.visual_model = VisualModel(VisionHead(c["dim"], c["heads"], c["head_blocks"]))
        self.text_model = TextTower(c["vocab_size"], c["context_length"], c["text_dim"], c["text_heads"],
                                    c["text_layers"], 2 * c["dim"], c["pad_id"])
        self.logit_scale = nn.Parameter(torch.tensor(float(c.get("init_logit_scale", 2.659))))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(ids)


class MiniTokenizer:
    """`tokenize(texts) -> LongTensor (N, context_length)` over a transformers tokenizer (canonicalised,
    right-padded), the call dino.txt's CLIP tokenizer offers."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        from distill.encoders.common import canonicalize_text
        return self.tokenizer([canonicalize_text(t) for t in texts], padding="max_length", truncation=True,
                              max_length=self.context_length, return_tensors="pt")["input_ids"]


def save_mini_dinotxt(model: MiniDinoTxt, tokenizer, folder: str | Path) -> Path:
    from distill.io import save_tensors_atomic, write_json_atomic
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    save_tensors_atomic(folder / "model.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    write_json_atomic(folder / CONFIG_FILE, {"format": FORMAT, **model.config})   # written last: the marker
    return folder


def is_mini_dinotxt(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def _load_mini(folder: Path):
    from transformers import AutoTokenizer

    from distill.io import load_tensors
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.pop("format", None) != FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE}: not an {FORMAT} file")
    model = MiniDinoTxt(config)
    model.load_state_dict(load_tensors(folder / "model.safetensors"))
    return model.eval(), MiniTokenizer(AutoTokenizer.from_pretrained(folder), config["context_length"])


# ---------------------------------------------------------------------- the branch
class DinoTxtBranch:
    """A dino.txt model (real or mini) used as a text branch on DINOv3-space tokens."""

    def __init__(self, model, tokenizer, source: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.head = model.visual_model.head
        self.width = int(self.head.ln_final.normalized_shape[0])

    def fingerprint(self) -> str:
        """The text tower's identity (its weights), the same whichever encoder carries the branch."""
        if getattr(self, "_fingerprint", None) is None:
            from distill.encoders.common import weights_digest
            self._fingerprint = "dinotxt-" + weights_digest(self.model)
        return self._fingerprint

    def to(self, device, dtype=None) -> "DinoTxtBranch":
        self.model.to(device=device, dtype=dtype) if dtype is not None else self.model.to(device)
        return self

    def check_width(self, width: int, what: str) -> None:
        if int(width) != self.width:
            raise DinoTxtShapeError(f"the dino.txt head ({self.source}) takes {self.width}-d DINOv3 tokens but "
                                    f"{what} gives {int(width)}-d ones; use a head trained for that DINOv3 width")

    @torch.no_grad()
    def image_embedding(self, cls: torch.Tensor, patches: list[torch.Tensor]) -> torch.Tensor:
        """(N, C) CLS and N (n_i, C) patch sets -> (N, 2C) joint embeddings [head CLS | mean head patch].
        Images with equal patch counts share one call."""
        self.check_width(cls.shape[-1], "the image features")
        p = next(self.head.parameters())
        out: list[torch.Tensor | None] = [None] * len(patches)
        by_len: dict[int, list[int]] = {}
        for i, x in enumerate(patches):
            by_len.setdefault(int(x.shape[0]), []).append(i)
        for idx in by_len.values():
            seq = torch.stack([torch.cat([cls[i][None], patches[i]]) for i in idx]).to(p.device, p.dtype)
            h = self.head(seq)
            joint = torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1)
            for j, i in enumerate(idx):
                out[i] = joint[j]
        return torch.stack(out)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer.tokenize(list(texts))
        if isinstance(ids, torch.Tensor):
            ids = ids.to(next(self.model.parameters()).device)
        return self.model.encode_text(ids)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp()) if hasattr(self.model, "logit_scale") else 1.0


def is_hub(source) -> bool:
    """Whether a `dinotxt=` value asks for the real head through torch.hub (else it names a folder)."""
    return source is True or str(source).lower() in ("1", "true", "yes", "hub")


def load_dinotxt(source: str | Path | bool, hub_load: Callable | None = None, trust_remote_code=None,
                 repo: str = HUB_REPO, entry: str = HUB_ENTRY, **hub_kwargs) -> DinoTxtBranch:
    """`source`: a mini folder (see module doc), or "hub" / "1" / True for the real head via torch.hub.
    `hub_kwargs` go to the hub entry (`weights=`, `backbone_weights=`, `source="local"` with a clone)."""
    if not is_hub(source):
        folder = Path(str(source)).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"dino.txt head '{source}' is neither a folder nor 'hub'")
        if not is_mini_dinotxt(folder):
            raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; not a dino.txt head folder (the mini-world "
                                    "teacher writes one to TEACHER/dinov3/dinotxt/)")
        model, tokenizer = _load_mini(folder)
        return DinoTxtBranch(model, tokenizer, str(folder))
    from distill.encoders.common import require_remote_code
    require_remote_code("dinov3", f"the dino.txt text head ({repo}:{entry}) through torch.hub", trust_remote_code)
    if "dinotxt_weights" in hub_kwargs:   # the release's eval scripts spell the head weights so
        hub_kwargs["weights"] = hub_kwargs.pop("dinotxt_weights")
    try:
        out = (hub_load or torch.hub.load)(repo, entry, **hub_kwargs)
    except (OSError, RuntimeError) as e:
        raise OSError(f"dinov3: torch.hub could not load {repo}:{entry} ({e}). Offline, clone the repo and pass "
                      "dinotxt_repo=LOCAL_CLONE with dinotxt_source=local and local weights= / backbone_weights= "
                      "files.") from e
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"dino.txt hub entry must return (model, tokenizer); got {type(out).__name__}")
    return DinoTxtBranch(out[0], out[1], f"{repo}:{entry}")


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     groups: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric softmax loss (dino.txt's); pairs of one group count as positives of each other."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()
    pos = (groups[:, None] == groups[None, :]).float()
    target = pos / pos.sum(-1, keepdim=True)
    return (-(target * F.log_softmax(logits, -1)).sum(-1).mean()
            - (target * F.log_softmax(logits.t(), -1)).sum(-1).mean()) / 2
