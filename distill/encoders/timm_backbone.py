"""Any timm backbone as an image encoder: `timm:NAME[?pretrained=1|checkpoint=FILE&head=NAME]`.

Where users' CNN and ViT baselines live. `timm:vit_small_patch16_224?pretrained=1` downloads the hub
weights timm names; `checkpoint=FILE` loads a local state dict instead (timm's own loader); neither
builds random weights (a baseline that is a baseline). Image-only: no text head, so zero-shot and
retrieval cells are skipped with the reason and kNN / segmentation run.

- summary: `forward_head(forward_features(x), pre_logits=True)`, the model's own pooling (CLS or
  average for ViTs, global pool for CNNs);
- patches: for token models (ViT, DeiT, EVA...) the final tokens without the prefix (CLS, registers)
  on the patch grid; for feature-map models (CNNs, Swin) the last map's cells (the grid is the map's
  size, and `patch_size` the network's reduction, e.g. 32 for a ResNet).
- preprocessing: timm's `resolve_data_config` (mean, std, interpolation, input size); `resolution` R
  resizes (squash) to R x R, and ViTs resample their position table for that size (dynamic_img_size).
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from distill.encoders.common import ModuleEncoder, as_image_list, group_by_size, hub_error, no_grad_encode, resize_normalize
from distill.encoders.registry import register_loader
from distill.features import Features
from distill.io import load_state_dict_file

_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class TimmEncoder(ModuleEncoder):
    kind = "timm"

    def __init__(self, model, model_name: str, head: str = "timm"):
        from timm.data import resolve_data_config

        self.model = model.eval()
        self.model_name = model_name
        self.name = f"timm:{model_name}"
        self.heads = (head,)
        self.text_heads = ()
        cfg = resolve_data_config({}, model=model)
        self.image_size = tuple(int(v) for v in cfg["input_size"][1:])
        self.mean, self.std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
        self.interpolation = str(cfg.get("interpolation", "bicubic"))
        # the stride of the last features: a ViT's patch size, a CNN's or Swin's total reduction
        reductions = [int(f.get("reduction", 1)) for f in getattr(model, "feature_info", []) or []]
        if reductions:
            self.patch_size = max(reductions)
        elif hasattr(model, "patch_embed"):
            self.patch_size = int(model.patch_embed.patch_size[0])
        else:
            self.patch_size = 32

    def preprocess(self, image, resolution=None) -> torch.Tensor:
        side = (int(resolution),) * 2 if resolution else self.image_size
        return resize_normalize(image, side, self.mean, self.std, _INTERP.get(self.interpolation, Image.BICUBIC))

    def preprocess_config(self) -> dict:
        return {"mean": self.mean, "std": self.std, "interpolation": self.interpolation, "resize": "squash",
                "image_size": self.image_size}

    @no_grad_encode
    def encode(self, images) -> Features:
        images = [im.to(self.device, self.dtype) for im in as_image_list(images)]
        n = len(images)
        head = self.heads[0]
        summary, patches, grids = [None] * n, [None] * n, [None] * n
        for (H, W), idx in group_by_size(images).items():
            feats = self.model.forward_features(torch.stack([images[i] for i in idx]))
            pooled = self.model.forward_head(feats, pre_logits=True)
            if feats.ndim == 3:   # tokens (ViT, DeiT, EVA...): drop the prefix (CLS, registers)
                k = int(getattr(self.model, "num_prefix_tokens", 0))
                grid = (H // self.patch_size, W // self.patch_size)
                cells = feats[:, k:]
            else:                 # a feature map: (B, C, h, w), or (B, h, w, C) for NHWC models (Swin)
                if str(getattr(self.model, "output_fmt", "NCHW")) == "NHWC":
                    feats = feats.permute(0, 3, 1, 2)
                grid = tuple(int(v) for v in feats.shape[2:])
                cells = feats.flatten(2).transpose(1, 2)
            for j, i in enumerate(idx):
                summary[i], patches[i], grids[i] = pooled[j], cells[j], grid
        return Features(summary={head: torch.stack(summary)}, patches={head: patches}, grids=grids)

    def describe(self) -> dict:   # part of the fingerprint: architecture facts, never a file name
        return {"model": self.model_name, "patch_size": self.patch_size}


@register_loader("timm", "any timm backbone (CNN or ViT), image-only: summary = the model's pooled features, "
                 "patches = final tokens or feature-map cells", requires=("timm",),
                 example="timm:vit_small_patch16_224?pretrained=1",
                 options={"pretrained": "1 = timm's hub weights for NAME", "checkpoint": "local weights file",
                          "head": "head name (default timm)"})
def load_timm(arg: str, pretrained: bool | int = False, checkpoint: str | None = None, head: str = "timm",
              **unused) -> TimmEncoder:
    if unused:
        raise TypeError(f"timm loader got unknown option(s) {sorted(unused)}")
    import timm

    if not timm.is_model(arg):
        import difflib
        close = difflib.get_close_matches(arg, timm.list_models(), n=3, cutoff=0.6)
        raise ValueError(f"timm has no model '{arg}'" + (f"; did you mean {close}?" if close else "")
                         + " (see timm.list_models())")
    if bool(pretrained) == bool(checkpoint):
        raise ValueError(f"timm:{arg}: give exactly one of ?pretrained=1 (timm's hub weights) and "
                         "?checkpoint=FILE (a local state dict); random weights are no baseline")
    kwargs = {"num_classes": 0}
    try:
        kwargs["dynamic_img_size"] = True
        model = timm.create_model(arg, pretrained=bool(pretrained), **kwargs)
    except TypeError:   # CNNs take no dynamic_img_size
        kwargs.pop("dynamic_img_size")
        try:
            model = timm.create_model(arg, pretrained=bool(pretrained), **kwargs)
        except (OSError, RuntimeError) as e:
            raise hub_error("timm", arg, e) from e
    except (OSError, RuntimeError) as e:
        raise hub_error("timm", arg, e) from e
    if checkpoint:
        _load_checkpoint(model, arg, checkpoint)
    return TimmEncoder(model.float(), arg, head=head)


def _load_checkpoint(model, name: str, checkpoint: str) -> None:
    """Weights from a local file (distill.io.load_state_dict_file: safetensors, or torch with
    weights_only=True), checked key by key: only the classifier the backbone drops may be extra."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"timm:{name}: checkpoint {path} does not exist")
    state = load_state_dict_file(path)
    classifier = str(model.pretrained_cfg.get("classifier", "head"))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(k for k in set(state) - set(own) if not k.startswith(classifier + "."))
    if missing or extra:
        raise ValueError(f"timm:{name}: {path.name} does not fit the architecture ({len(missing)} missing keys, "
                         f"e.g. {missing[:3]}; {len(extra)} unexpected, e.g. {extra[:3]}); is it a {name} checkpoint?")
    model.load_state_dict({k: v for k, v in state.items() if k in own})
