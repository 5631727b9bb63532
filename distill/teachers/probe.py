"""A fixed probe input and the teacher's outputs on it, recorded in train_log.json.

The trainer records the probe outputs of the in-memory model, saves, reloads the dir offline and
compares: a save that does not reproduce the model fails the run instead of shipping. Loaders
elsewhere (the encoder registry) can compare against the same numbers."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .common import TeacherError

PROBE_TEXT = "A red circle to the left of a blue square."
TOLERANCE = 1e-4


def probe_image() -> Image.Image:
    """A deterministic 112x80 RGB image (gradients and a block), non-square to exercise NaFlex."""
    y, x = np.mgrid[0:80, 0:112]
    rgb = np.stack([x * 2, y * 3, (x + y) % 256], -1).astype(np.uint8)
    rgb[20:50, 30:70] = (200, 30, 40)
    return Image.fromarray(rgb)


@torch.no_grad()
def probe_outputs(kind: str, model, proc) -> dict[str, list[float]]:
    was_training = model.training
    model.eval()
    if kind == "siglip2":
        from .tokenizer import encode
        inp = proc.image_processor(images=[probe_image()], return_tensors="pt")
        img = model.get_image_features(**inp).pooler_output[0]
        ids = encode(proc.tokenizer, [PROBE_TEXT], model.config.text_config.max_position_embeddings)
        txt = model.get_text_features(input_ids=ids).pooler_output[0]
        out = {"image_embeds": img, "text_embeds": txt, "input_ids": ids[0].float()}
    else:
        inp = proc(images=[probe_image()], return_tensors="pt")
        o = model(pixel_values=inp["pixel_values"])
        out = {"pooler_output": o.pooler_output[0], "mean_patch": o.last_hidden_state[0, 1:].mean(0)}
    model.train(was_training)
    return {k: [round(float(v), 6) for v in t[:16]] for k, t in out.items()}


def check_roundtrip(expected: dict, got: dict, where: str) -> None:
    for k, ref in expected.items():
        diff = float(np.abs(np.asarray(ref) - np.asarray(got.get(k, [np.inf] * len(ref)))).max())
        if not diff <= TOLERANCE:
            raise TeacherError(f"{where}: reloaded model differs from the trained one on the probe ({k}: max abs "
                               f"diff {diff:.2e} > {TOLERANCE}); the saved files are not usable")
