"""The VLM's text vocabulary: words + special tokens + location tokens for boxes.

Real runs point at a tokenizer directory (any `PreTrainedTokenizerFast`, e.g. an LLM's); the
mini-world trains a small BPE tokenizer offline on its referring expressions with `tokenizers`.
Either way the location tokens `<loc_0000>` ... are appended as one contiguous block of ids, so
constrained decoding is a slice of the logits.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
            "sep_token": "<sep>"}


def loc_token(i: int) -> str:
    return f"<loc_{i:04d}>"


def train_tokenizer(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A lower-casing byte-level BPE trained on `texts` (offline, seconds)."""
    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


class GroundingTokenizer:
    """Wraps a fast tokenizer; owns the prompt/target format of the grounding task.

    sequence = [image tokens] <bos> expression <sep> <loc_x1> <loc_y1> <loc_x2> <loc_y2> <eos>
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, bins: int):
        missing = {k: v for k, v in SPECIALS.items() if getattr(tokenizer, k, None) is None}
        if missing:
            tokenizer.add_special_tokens(missing)
        locs = [loc_token(i) for i in range(bins)]
        have = tokenizer.convert_tokens_to_ids(locs[0])
        if have is None or have == tokenizer.unk_token_id:
            tokenizer.add_tokens(locs, special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids(locs)
        if ids != list(range(ids[0], ids[0] + bins)):
            raise ValueError("location tokens must have contiguous ids; the tokenizer already holds "
                             "some <loc_*> tokens out of order — use a tokenizer without them")
        self.hf = tokenizer
        self.bins = bins
        self.loc_start = ids[0]

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    def loc_ids(self) -> range:
        return range(self.loc_start, self.loc_start + self.bins)

    def encode_prompt(self, expression: str) -> list[int]:
        return self.encode_prompts([expression])[0]

    def encode_prompts(self, expressions: list[str]) -> list[list[int]]:
        """`encode_prompt` of many expressions in one tokenizer call (a split's worth at once)."""
        if not expressions:
            return []
        bos, sep = self.hf.bos_token_id, self.hf.sep_token_id
        return [[bos, *words, sep] for words in self.hf(expressions, add_special_tokens=False)["input_ids"]]

    def encode_target(self, box_bins: list[int]) -> list[int]:
        return [self.loc_start + b for b in box_bins] + [self.eos_id]

    def decode_box(self, ids: list[int] | torch.Tensor) -> list[int] | None:
        """The first four generated ids as box bins, or None if any is not a location token."""
        ids = [int(i) for i in ids][:4]
        if len(ids) < 4 or not all(self.loc_start <= i < self.loc_start + self.bins for i in ids):
            return None
        x1, y1, x2, y2 = (i - self.loc_start for i in ids)
        if x2 < x1 or y2 < y1:
            return None
        return [x1, y1, x2, y2]

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))

    @classmethod
    def load(cls, path: str | Path, bins: int) -> "GroundingTokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}: point `tokenizer` at a directory saved "
                                    "with save_pretrained (a fast tokenizer)")
        return cls(PreTrainedTokenizerFast.from_pretrained(str(path)), bins)
