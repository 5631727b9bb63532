"""Pieces every loader shares: hub errors, the remote-code opt-in, weight digests, resizing,
grouping images by size, parameter counts, and a base class for encoders that wrap nn.Modules."""
from __future__ import annotations

import hashlib
import math
import os
import re
import string
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn

from distill.encoders.base import Encoder
from distill.errors import AmoeError
from distill.io import fingerprint as json_fingerprint

TRUST_ENV = "AMOE_TRUST_REMOTE_CODE"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HubUnreachableError(AmoeError, OSError):
    """A model id could not be fetched (offline, no network, or not in the local cache)."""


class RemoteCodeNotAllowedError(AmoeError, PermissionError):
    """A loader would run code downloaded from a hub, and the user has not opted in."""


def is_local(arg: str) -> bool:
    return Path(arg).expanduser().exists()


def looks_like_path(arg: str) -> bool:
    """Hub ids are 'name' or 'namespace/name'; anything else path-like is a local path."""
    return arg.startswith(("/", ".", "~")) or arg.count("/") > 1 or "\\" in arg


def check_source(kind: str, arg: str) -> str:
    """A local path that does not exist is an error about the path, not about the hub."""
    if is_local(arg):
        return str(Path(arg).expanduser())
    if looks_like_path(arg):
        raise FileNotFoundError(f"{kind}: '{arg}' does not exist (a local model directory was expected; "
                                "hub ids look like 'namespace/name')")
    return arg


def hub_error(kind: str, model_id: str, err: BaseException) -> HubUnreachableError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the hub is unreachable or the id is wrong"
    return HubUnreachableError(
        f"{kind}: could not load '{model_id}' ({why}; no local copy in the cache): {err}\n"
        f"Download it on a connected machine, e.g. `huggingface-cli download {model_id} --local-dir DIR`, "
        f"copy DIR here and use '{kind}:DIR' (a local directory is never fetched).")


def require_remote_code(kind: str, what: str, trust_remote_code: bool | None) -> None:
    """Code from a hub runs only after an explicit opt-in: a kwarg or AMOE_TRUST_REMOTE_CODE=1."""
    if trust_remote_code or os.environ.get(TRUST_ENV, "") in ("1", "true", "yes"):
        return
    raise RemoteCodeNotAllowedError(
        f"{kind}: loading {what} runs Python code downloaded from a model hub. Opt in explicitly with "
        f"load_encoder(..., trust_remote_code=True), the spec suffix '?trust_remote_code=1', "
        f"or the environment variable {TRUST_ENV}=1.")


def as_bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def as_list(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [s for s in (x.strip() for x in v.split(",")) if s]
    return [str(x) for x in v]


def weights_digest(module_or_sd: nn.Module | dict, sample: int = 4096) -> str:
    """A content digest of the weights without hashing every byte: names, shapes, dtypes and a
    strided sample of each tensor (enough to tell two checkpoints apart, fast on multi-GB models)."""
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, nn.Module) else module_or_sd
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() > sample:
            flat = flat[:: max(1, flat.numel() // sample)][:sample]
        if flat.is_complex():
            flat = torch.view_as_real(flat)
        h.update(flat.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def aspect_size(height: int, width: int, side: int, multiple: int) -> tuple[int, int]:
    """(H', W') with area about side^2, the image's aspect ratio, sides rounded to `multiple` (>= one)."""
    scale = math.sqrt(side * side / float(height * width))
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def pil_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):   # the image itself when already RGB: callers never modify it
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"expected a PIL image (or an HWC uint8 array), got {type(image).__name__}")


def resize_normalize(image, size_hw: tuple[int, int], mean, std, resample=Image.BICUBIC) -> torch.Tensor:
    """PIL -> resized, /255, (x - mean)/std CHW float32 tensor."""
    img = pil_rgb(image)
    h, w = size_hw
    if img.size != (w, h):
        img = img.resize((w, h), resample)
    # the same float32 operations as (x / 255 - mean) / std, in place on a contiguous CHW copy: about 6x
    # cheaper than on the permuted view (the input pipeline runs this for every image and teacher)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return x.sub_(m).div_(s)


def as_image_list(images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() != 4:
            raise ValueError(f"expected a list of CHW tensors or an NCHW batch; got shape {tuple(images.shape)}")
        return list(images)
    images = list(images)
    if not images:
        raise ValueError("encode() got no images")
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dim() != 3:
            raise ValueError(f"image {i}: expected a CHW tensor from preprocess(); got "
                             f"{getattr(im, 'shape', type(im).__name__)}")
    return images


def group_by_size(images: list[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """Indices of images sharing one (H, W): fixed-grid models run each group as one batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape[-2:]), []).append(i)
    return groups


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def canonicalize_text(text: str) -> str:
    """SigLIP's text rule (big_vision 'canonicalize'): lower-case, drop punctuation, squash spaces.
    Without it SigLIP-family zero-shot drops by about 12 points."""
    text = _PUNCT.sub("", text.lower())
    return " ".join(text.split())


class ModuleEncoder(Encoder):
    """An Encoder around one or more nn.Modules: device/dtype moves, fingerprint, params."""

    kind: str = "module"

    def modules(self) -> list[nn.Module]:
        return [v for v in vars(self).values() if isinstance(v, nn.Module)]

    def to(self, device, dtype=None):
        self.weights_id()  # digest the weights as loaded, so a later cast does not change the fingerprint's weights part
        super().to(device, dtype)
        for m in self.modules():
            m.to(device=self.device, dtype=self.dtype)
        return self

    def eval(self):
        for m in self.modules():
            m.eval()
        return self

    @property
    def num_params(self) -> int:
        # a module may also be held as a submodule of another (open_clip's trunk): count each once
        return sum({id(p): p.numel() for m in self.modules() for p in m.parameters()}.values())

    @property
    def active_params(self) -> int:
        return self.num_params

    def weights_id(self) -> str:
        """Digest of the weights, computed once (on load, before any dtype cast)."""
        if getattr(self, "_weights_id", None) is None:
            self._weights_id = json_fingerprint([weights_digest(m) for m in self.modules()])
        return self._weights_id

    def describe(self) -> dict:
        """Architecture facts that change the features (part of the fingerprint; never a path)."""
        return {}

    def fingerprint(self) -> str:
        # not the name/path: the same weights read from another directory give the same features
        return json_fingerprint({"kind": self.kind, "weights": self.weights_id(),
                                 "preprocess": self.preprocess_config(), "dtype": str(self.dtype),
                                 "extra": self.describe()})


def no_grad_encode(fn: Callable) -> Callable:
    def wrapper(self, *a, **kw):
        # no_grad, not inference_mode: callers may still do in-place ops or use features as loss targets
        with torch.no_grad():
            return fn(self, *a, **kw)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def pad_stack(rows: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (L_i, C) rows to (N, L, C) and return the (N, L) validity mask."""
    rows = list(rows)
    L = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), L, rows[0].shape[1])
    mask = torch.zeros(len(rows), L, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return out, mask
