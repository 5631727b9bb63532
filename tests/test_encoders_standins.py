"""Builders for the encoder tests: tiny models of the real classes, saved the way real ones are.

No tests here: the real-class directories (Siglip2Model / SiglipModel / DINOv3ViTModel +
processors + an offline-trained tokenizer) and the stand-ins for remote-code models (RADIO) are
shared by test_encoders.py and test_encoders_student.py.
"""
from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

WORDS = "a photo of the cat dog red blue green circle square triangle small large picture".split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)] * 2, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def _text_cfg(vocab: int, width: int, length: int = 64) -> dict:
    return dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=length, pad_token_id=0, bos_token_id=2,
                eos_token_id=2)


def make_siglip2_dir(path: Path, width: int = 32, processor: bool = True, tokenizer: bool = True,
                     max_num_patches: int = 64, seed: int = 0, text_length: int = 64) -> Path:
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor

    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = Siglip2Config(text_config=_text_cfg(tok.vocab_size, width, text_length),
                        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                           num_attention_heads=2, num_patches=64, patch_size=16))
    Siglip2Model(cfg).eval().save_pretrained(path)
    ip = Siglip2ImageProcessor(max_num_patches=max_num_patches)
    if processor and tokenizer:
        Siglip2Processor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    elif processor:
        ip.save_pretrained(path)
    elif tokenizer:
        tok.save_pretrained(path)
    return Path(path)


def make_siglip_dir(path: Path, width: int = 32, image_size: int = 32) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tok = make_tokenizer()
    cfg = SiglipConfig(text_config=_text_cfg(tok.vocab_size, width),
                       vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=image_size, patch_size=16))
    SiglipModel(cfg).eval().save_pretrained(path)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def make_dinov3_dir(path: Path, width: int = 48, processor: bool = True) -> Path:
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    cfg = DINOv3ViTConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
                          patch_size=16, num_register_tokens=4, image_size=64)
    DINOv3ViTModel(cfg).eval().save_pretrained(path)
    if processor:
        DINOv3ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return Path(path)


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- RADIO stand-in (the output contract)
RadioOutput = namedtuple("RadioOutput", ["summary", "features"])


class CharTokenizer:
    """Stands in for a RADIO adaptor tokenizer: texts -> (N, L) ids."""

    def __call__(self, texts):
        ids = torch.zeros(len(texts), 16, dtype=torch.long)
        for i, t in enumerate(texts):
            codes = [ord(c) % 97 for c in t[:16]]
            ids[i, : len(codes)] = torch.tensor(codes)
        return ids


class TextAdaptor(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.tokenizer = CharTokenizer()
        self.emb = nn.Embedding(97, width)
        self.proj = nn.Linear(24, width)

    def encode_text(self, tokens, normalize: bool = False):
        return self.emb(tokens).mean(1)

    def forward(self, summary, features):
        return self.proj(summary), self.proj(features)


class TinyRADIO(nn.Module):
    """Mimics RADIO's contract: [0,1] input, patch 16, dict of (summary, features) per adaptor."""

    patch_size = 16
    min_resolution_step = 16
    preferred_resolution = (64, 64)

    def __init__(self, adaptor_names=None, width: int = 24):
        super().__init__()
        self.embed = nn.Conv2d(3, width, 16, 16)
        self.adaptors = nn.ModuleDict({n: TextAdaptor(width + 8) for n in (adaptor_names or [])})
        self.seen_range = None

    def forward(self, x):
        self.seen_range = (float(x.min()), float(x.max()))
        f = self.embed(x).flatten(2).transpose(1, 2)      # (N, T, D)
        s = torch.cat([f.mean(1), f.amax(1)], -1)[:, :24]
        if not self.adaptors:
            return RadioOutput(s, f)
        out = {"backbone": RadioOutput(s, f)}
        for name, a in self.adaptors.items():
            out[name] = RadioOutput(*a(s, f))
        return out
