"""The early-fusion grounding VLM: one decoder over image patch tokens and text tokens.

Mixture-of-Transformers style: every layer holds two sets of parameters, one per modality.
- vision experts = the SigLino student's own `TransformerBlock` (attention projections, QK-norm,
  sinks, norms, FFN or token-choice MoE), so a student checkpoint maps onto them 1:1;
- text experts = the same shapes (attention projections, sinks, RMSNorms) with a dense SwiGLU FFN.
Attention is shared: queries/keys/values of both modalities go through ONE softmax over the union
of keys, restricted by `PackedLayout` (images bidirectional within their sample, text causal and
seeing its sample's image, nothing crossing samples). Image tokens keep the student's 2-D golden
RoPE; text tokens get RoPE angle 0 (identity) and learned 1-D positions instead.

Because image tokens never attend to text, the image-token states of any forward equal the
student's forward on those images when the vision experts hold the student's weights.

Inside a forward the packed sequence is held modality-sorted: all image tokens (in sample order)
then all text tokens; the attention mask is permuted the same way. Attention is permutation
equivariant, so this is exact and saves scattering tokens between the two parameter sets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.config import parse_dataclass
from distill.student.attention import rms_norm
from distill.student.config import StudentConfig, get_config
from distill.student.model import TransformerBlock
from distill.student.moe import FeedForward
from distill.student.processor import chw_to_patches
from distill.student.rope import apply_golden_rope, golden_freqs, grid_coordinates, rotation_angles

from .mask import MaskHead
from .sequence import PackedLayout


@dataclass
class VLMConfig:
    vision: StudentConfig           # the student architecture the vision experts follow
    vocab_size: int                 # text vocabulary incl. specials and location tokens
    text_ffn_dim: int = 0           # 0 = 4 * dim
    max_text_len: int = 64          # learned text positions
    mask_head: bool = False         # referring segmentation (grounding_vlm.mask.MaskHead)
    text: str = "scratch"           # "scratch": text experts at the student's width; "lm": a pretrained LM's
    lm: dict | None = None          # text "lm": the LM's transformers config (to_dict), architecture only
    lm_vocab: int = 0               # text "lm": ids below it are the LM's tokens, the rest new ones
    box_positions: bool = True      # text "scratch": text queries read where each patch sits (MoTBlock; the
                                    # LM's bridge has its own)

    def __post_init__(self):
        if not isinstance(self.vision, StudentConfig):
            self.vision = get_config(self.vision)
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.text_ffn_dim <= 0:
            self.text_ffn_dim = 4 * self.vision.dim
        if self.text not in ("scratch", "lm"):
            raise ValueError(f"model text side {self.text!r} is unknown; choose 'scratch' or 'lm'")
        if self.text == "lm" and not (self.lm and 0 < self.lm_vocab < self.vocab_size):
            raise ValueError("text 'lm' needs the LM's config and lm_vocab below vocab_size")

    def to_dict(self) -> dict[str, Any]:
        out = {"vision": self.vision.to_dict(), "vocab_size": self.vocab_size,
               "text_ffn_dim": self.text_ffn_dim, "max_text_len": self.max_text_len, "mask_head": self.mask_head}
        if self.text == "lm":     # the LM's bridge carries its own box positions
            out |= {"text": self.text, "lm": self.lm, "lm_vocab": self.lm_vocab}
        else:
            out["box_positions"] = self.box_positions
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VLMConfig":
        d = dict(d)
        if isinstance(d.get("vision"), str):          # a named student config
            d["vision"] = get_config(d["vision"]).to_dict()
        d.setdefault("box_positions", False)          # models saved before box positions existed had none
        return parse_dataclass(cls, d, "", top="the grounding model config")


class VisionEmbed(nn.Module):
    """Patch projection, CLS + registers and the golden RoPE table: the student's input side."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        D = cfg.dim
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.storage_tokens = (nn.Parameter(torch.zeros(1, cfg.n_storage_tokens, D))
                               if cfg.n_storage_tokens > 0 else None)
        self.register_buffer("freqs_cis_golden", golden_freqs(cfg.n_heads, cfg.head_dim, cfg.rope_min_freqs,
                                                              cfg.rope_max_freqs))
        self.img_projector = nn.Linear(cfg.patch_dim, D, bias=False)

    def prefix(self) -> torch.Tensor:
        parts = [self.cls_token] + ([self.storage_tokens] if self.storage_tokens is not None else [])
        return torch.cat(parts, dim=1)[0]


class TextBlock(nn.Module):
    """The text experts of one layer: same attention shapes as the vision side, a dense SwiGLU FFN, and
    (`box_positions`, see MoTBlock) the map from a patch's box-frame position to a value offset."""

    def __init__(self, cfg: StudentConfig, ffn_dim: int, box_positions: bool):
        super().__init__()
        from distill.student.attention import Attention

        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.use_qk_norm,
                                   qk_norm_eps=None)
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, ffn_dim, "silu")
        self.box_position = (nn.Linear(4 * FOURIER_BANDS, cfg.n_kv_heads * cfg.head_dim, bias=False)
                             if box_positions else None)


class MoTBlock(nn.Module):
    """One layer. Where each patch sits: image tokens know it only through RoPE, which shapes attention
    scores but not the values a text query reads, so a text token could find *which* patch an
    expression names but not read *where* it is, which is what the box tokens must say. With
    `box_positions`, text queries read every image value plus a learned projection of its patch
    centre's box-frame position (`box_frame_features`); image queries read the plain values, so the
    image states stay the student's."""

    def __init__(self, layer_id: int, cfg: VLMConfig):
        super().__init__()
        self.vision = TransformerBlock(layer_id, cfg.vision)
        self.text = TextBlock(cfg.vision, cfg.text_ffn_dim, cfg.box_positions)

    def _qkv(self, att, x):
        n = x.shape[0]
        q = att.wq(x).view(n, att.n_heads, att.head_dim)
        k = att.wk(x).view(n, att.n_kv_heads, att.head_dim)
        v = att.wv(x).view(n, att.n_kv_heads, att.head_dim)
        return q, k, v

    def _text_qkv(self, xt: torch.Tensor):
        return self._qkv(self.text.attention, self.text.attention_norm(xt))

    def _heads(self, q, k, v):
        """qk-norm and the interleaved GQA repeat (before RoPE, as the student does)."""
        va = self.vision.attention
        if va.use_qk_norm:
            q, k = rms_norm(q, None, None), rms_norm(k, None, None)
        return q, self._repeat_kv(k), self._repeat_kv(v)

    def _repeat_kv(self, t):
        group = self.vision.attention.n_heads // self.vision.attention.n_kv_heads
        return t.repeat_interleave(group, dim=1) if group > 1 else t

    def _text_value_offsets(self, box_pos: torch.Tensor | None, n_t: int) -> torch.Tensor | None:
        """(Ni + Nt, H, hd): what text queries add to each value: the image tokens' box-frame
        projections, zeros on the text rows; None when the forward passes no box positions (the
        model has none, or there is no text to read them)."""
        if box_pos is None:
            return None
        proj = self.text.box_position
        att = self.text.attention
        dv = proj(box_pos.to(proj.weight.dtype)).view(-1, att.n_kv_heads, att.head_dim)
        return self._repeat_kv(F.pad(dv, (0, 0, 0, 0, 0, n_t)))

    def _text_out(self, xt: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        T = self.text
        ht = xt + T.attention.wo(attended)
        return ht + T.feed_forward(T.ffn_norm(ht))

    def forward(self, xi: torch.Tensor, xt: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: "torch.Tensor | SampleAttention", keep: list | None = None,
                box_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """xi (Ni, D) image tokens, xt (Nt, D) text tokens; cos/sin (Ni+Nt, H, hd/4) modality-sorted;
        mask: a `SampleAttention`, or the dense (Ni+Nt, Ni+Nt+2) bool mask incl. the two sink columns.
        `keep`: a list the layer's keys and values (after RoPE) are appended to (the KV cache's prefill;
        the values as text queries read them). `box_pos`: (Ni, 4 * FOURIER_BANDS) `box_frame_features`."""
        V = self.vision
        va, ta = V.attention, self.text.attention
        qi, ki, vi = self._qkv(va, V.apply_norm(V.attention_norm, xi))
        qt, kt, vt = self._text_qkv(xt)
        q, k, v = self._heads(torch.cat([qi, qt]), torch.cat([ki, kt]), torch.cat([vi, vt]))
        q = apply_golden_rope(q[None], cos, sin)[0]
        k = apply_golden_rope(k[None], cos, sin)[0]
        dv = self._text_value_offsets(box_pos, xt.shape[0])
        if keep is not None:
            keep.append((k, v if dv is None else v + dv))
        if isinstance(mask, SampleAttention):
            out = mask(q, k, v, va.sinks, ta.sinks, dv)
        else:
            out = shared_sink_attention(q, k, v, va.sinks, ta.sinks, xi.shape[0], mask, dv)
        n_i = xi.shape[0]
        hi = xi + va.wo(out[:n_i])
        zi = V.apply_norm(V.ffn_norm, hi)
        fi = V.moe(zi[None])[0] if V.kind == "moe" else V.feed_forward(zi)
        return hi + fi, self._text_out(xt, out[n_i:])

    def decode(self, xt: torch.Tensor, cache: "KVCache", layer: int) -> torch.Tensor:
        """One new text token per sample, xt (B, D), attending to its sample's cached keys (image and
        earlier text) and to itself; its keys and values join the cache. Text RoPE is the identity
        (text tokens sit at position 0 of the 2-D grid), so none is applied."""
        q, k, v = self._heads(*self._text_qkv(xt))
        keys, values, valid = cache.append(layer, k, v)
        return self._text_out(xt, cached_sink_attention(q, keys, values, valid, self.text.attention.sinks))


def shared_sink_attention(q, k, v, sinks_v, sinks_t, image_rows: "int | torch.Tensor", mask: torch.Tensor,
                          dv: torch.Tensor | None = None) -> torch.Tensor:
    """One softmax over the union of keys, with a per-modality attention sink.

    q, k, v: (S, H, hd), or (G, S, H, hd) for G sequences. `image_rows`: how many leading queries are
    image queries (every sequence alike), or a (G, S) bool tensor marking them. Each query gets one
    zero-valued extra key whose logit is its modality's sinks[h] (the student's sink). As in the
    student's SDPA path, that logit is produced by appending one-hot components to q: image queries
    carry [1, 0], text queries [0, 1]; the image sink key carries sinks_v * sqrt(hd) in the first, the
    text sink key sinks_t * sqrt(hd) in the second, and the mask ((S, S+2), or (G, S, S+2) per
    sequence) shows each query only its own modality's sink key. `dv` (shaped as v): offsets only text
    queries add to the values; they ride in the same softmax as extra value channels. Returns
    (S, H*hd) or (G, S, H*hd)."""
    batched = q.dim() == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]
        dv = None if dv is None else dv[None]
    G, S, H, hd = q.shape
    if isinstance(image_rows, int):
        image_rows = (torch.arange(S, device=q.device) < image_rows)[None].expand(G, S)
    if dv is not None:
        v = torch.cat([v, dv], dim=-1)
    is_img = torch.stack([image_rows, ~image_rows], dim=-1).to(q.dtype)                       # (G, S, 2)
    q2 = torch.cat([q, is_img[:, :, None, :].expand(G, S, H, 2)], dim=-1).transpose(1, 2)   # (G, H, S, hd+2)
    k2 = torch.cat([k, k.new_zeros(G, S, H, 2)], dim=-1).transpose(1, 2)
    root = math.sqrt(hd)
    sink_v = torch.cat([q.new_zeros(H, hd), (sinks_v.to(q.dtype) * root)[:, None], q.new_zeros(H, 1)], -1)
    sink_t = torch.cat([q.new_zeros(H, hd + 1), (sinks_t.to(q.dtype) * root)[:, None]], -1)
    sinks = torch.stack([sink_v, sink_t], dim=1)[None].expand(G, H, 2, hd + 2)
    k2 = torch.cat([k2, sinks], dim=2)                                                       # (G, H, S+2, hd+2)
    v2 = F.pad(v.transpose(1, 2), (0, 0, 0, 2))                                              # sinks' zero values
    attn_mask = mask[None, None] if mask.dim() == 2 else mask[:, None]
    out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=attn_mask, scale=1.0 / root)
    out = out.transpose(1, 2)                                                                # (G, S, H, hd or 2 hd)
    if dv is not None:   # text rows read the offsets, image rows the plain values
        out = out[..., :hd] + out[..., hd:] * (~image_rows)[:, :, None, None].to(out.dtype)
    out = out.reshape(G, S, H * hd)
    return out if batched else out[0]


def cached_sink_attention(q, keys, values, valid, sinks_t) -> torch.Tensor:
    """One text query per sample against its cached keys, with the text sink: q (B, H, hd), keys and
    values (B, C, H, hd), valid (B, C) bool. The same softmax as `shared_sink_attention` for a text
    query (scores q.k / sqrt(hd), the sink's logit sinks_t[h] with a zero value). Returns (B, H*hd)."""
    B, H, hd = q.shape
    scores = torch.einsum("bhd,bchd->bhc", q, keys) / math.sqrt(hd)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    sink = sinks_t.to(scores.dtype)[None, :, None].expand(B, H, 1)
    p = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bhc,bchd->bhd", p, values).reshape(B, H * hd)


@dataclass
class KVCache:
    """Per layer, the keys and values each sample's next text token attends to: its image tokens
    (computed once: image tokens never attend to text) and its text so far; padded to a common
    capacity, `lengths` tokens valid per sample."""
    keys: list[torch.Tensor]         # per layer (B, C, H, hd)
    values: list[torch.Tensor]
    lengths: torch.Tensor            # (B,) valid entries per sample (image + text tokens)
    image_lengths: torch.Tensor      # (B,) image tokens per sample

    @property
    def text_lengths(self) -> torch.Tensor:
        """(B,) text tokens so far: the next token's text position."""
        return self.lengths - self.image_lengths

    @classmethod
    def from_prefill(cls, kept: list[tuple[torch.Tensor, torch.Tensor]], img_lens: list[int],
                     txt_lens: list[int], room: int) -> "KVCache":
        n_i = sum(img_lens)
        B = len(img_lens)
        lengths = [a + b for a, b in zip(img_lens, txt_lens)]
        cap = max(lengths) + room
        keys, values = [], []
        for k, v in kept:
            kc = k.new_zeros(B, cap, *k.shape[1:])
            vc = v.new_zeros(B, cap, *v.shape[1:])
            si, st = 0, n_i
            for b, (a, t) in enumerate(zip(img_lens, txt_lens)):
                kc[b, :a], vc[b, :a] = k[si:si + a], v[si:si + a]
                kc[b, a:a + t], vc[b, a:a + t] = k[st:st + t], v[st:st + t]
                si, st = si + a, st + t
            keys.append(kc)
            values.append(vc)
        device = kept[0][0].device
        return cls(keys, values, torch.tensor(lengths, device=device), torch.tensor(img_lens, device=device))

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write one token per sample at its length into `layer`; (keys, values, valid) to attend to.
        The lengths move on once the last layer has written."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.keys[layer][rows, self.lengths] = k
        self.values[layer][rows, self.lengths] = v
        cap = self.keys[layer].shape[1]
        valid = torch.arange(cap, device=k.device)[None, :] <= self.lengths[:, None]
        if layer == len(self.keys) - 1:
            self.lengths = self.lengths + 1
        return self.keys[layer], self.values[layer], valid


class SampleAttention:
    """Attention one sample at a time over the modality-sorted packed sequence ("samples", the default):
    each sample's tokens [its image tokens, its text tokens] are gathered into one row of a padded
    batch, one SDPA call runs every row under its own mask, and the outputs are scattered back. The
    work is B * max(n_i + t_i)^2 instead of S^2, in one call: on CPU the model is small enough that
    the number of calls, not the arithmetic, sets the time (grouping the samples by equal lengths
    took about 5 calls a layer and trained 1.3x slower). `dense` (one mask over the whole sequence)
    is the reference it is tested against. Padding rows see only the text sink (a zero value); their
    outputs are dropped."""

    def __init__(self, img_lens: list[int], txt_lens: list[int], device):
        a = torch.tensor(img_lens)
        n = a + torch.tensor(txt_lens)
        L = int(n.max())
        pos = torch.arange(L)
        valid = pos[None, :] < n[:, None]                                      # (B, L)
        image_rows = pos[None, :] < a[:, None]
        # the rule is PackedLayout's: there, sample j's tokens [image, text] sit at start_j + pos
        at = torch.where(valid, (torch.cumsum(n, 0) - n)[:, None] + pos, 0)
        keys = valid[:, :, None] & valid[:, None, :] & \
            PackedLayout.build(img_lens, txt_lens).allowed(at[:, :, None], at[:, None, :])
        sinks = torch.stack([image_rows, ~image_rows], dim=-1)                # padding rows: the text sink alone
        starts_i = torch.cumsum(a, 0) - a
        starts_t = int(a.sum()) + torch.cumsum(n - a, 0) - (n - a)
        idx = torch.where(image_rows, starts_i[:, None] + pos, starts_t[:, None] + pos - a[:, None])
        idx = torch.where(valid, idx, 0)
        self.idx, self.valid, self.image_rows = idx.to(device), valid.to(device), image_rows.to(device)
        self.mask = torch.cat([keys, sinks], dim=-1).to(device)                # (B, L, L + 2)
        self.inverse = torch.argsort(idx[valid]).to(device)

    def __call__(self, q, k, v, sinks_v, sinks_t, dv=None) -> torch.Tensor:
        out = shared_sink_attention(q[self.idx], k[self.idx], v[self.idx], sinks_v, sinks_t, self.image_rows,
                                    self.mask, None if dv is None else dv[self.idx])
        return out[self.valid][self.inverse]


@dataclass
class VLMOutput:
    logits: list[torch.Tensor]            # per sample (T_i, vocab): next-token logits at its text tokens
    patch_features: list[torch.Tensor]    # per image (Hp*Wp, D): final vision-norm patch states
    image_states: list[torch.Tensor]      # per image (P + Hp*Wp, D): CLS, registers, patches (normed)
    grids: list[tuple[int, int]]
    cache: "KVCache | None" = None        # with forward(..., cache_room=N): for decode_step
    text_states: list[torch.Tensor] | None = None   # per sample (T_i, D): final normed text states
    masks: list[torch.Tensor] | None = None         # with forward(..., mask_at=...): (Hp, Wp) logits per sample


class GroundingVLM(nn.Module):
    def __init__(self, config: VLMConfig | Mapping):
        super().__init__()
        cfg = config if isinstance(config, VLMConfig) else VLMConfig.from_dict(config)
        self.config = cfg
        vc = cfg.vision
        self.vision_embed = VisionEmbed(vc)
        self.layers = nn.ModuleDict({str(i): MoTBlock(i, cfg) for i in range(vc.n_layers)})
        self.vision_norm = nn.RMSNorm(vc.dim, eps=vc.norm_eps)
        self.text_embed = nn.Embedding(cfg.vocab_size, vc.dim)
        self.text_pos = nn.Embedding(cfg.max_text_len, vc.dim)
        self.text_norm = nn.RMSNorm(vc.dim, eps=vc.norm_eps)
        self.lm_head = nn.Linear(vc.dim, cfg.vocab_size, bias=False)
        self.attention = "samples"   # or "dense": one mask over the whole packed sequence (the reference)
        self.reset_parameters()
        # built after the rest is initialised, so a model without it starts from the same weights
        self.mask_head = MaskHead(vc.dim) if cfg.mask_head else None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Vision side: the student's initialisation (via a throwaway Student of the same config,
        so the scheme stays defined in one place); text side: small normal weights, zero output
        projections so every block starts as the identity on the text stream."""
        init_vision_like_student(self)
        std = 0.02
        nn.init.normal_(self.text_embed.weight, std=std, generator=generator)
        nn.init.normal_(self.text_pos.weight, std=std, generator=generator)
        nn.init.normal_(self.lm_head.weight, std=std, generator=generator)
        nn.init.ones_(self.text_norm.weight)
        for i, block in self.layers.items():
            t = block.text
            layer_std = std / math.sqrt(2 * (int(i) + 1))
            for w in (t.attention.wq.weight, t.attention.wk.weight, t.attention.wv.weight, t.attention.sinks):
                nn.init.trunc_normal_(w, std=layer_std, generator=generator)
            nn.init.zeros_(t.attention.wo.weight)
            nn.init.ones_(t.attention_norm.weight)
            nn.init.ones_(t.ffn_norm.weight)
            nn.init.trunc_normal_(t.feed_forward.w1.weight, std=std, generator=generator)
            nn.init.trunc_normal_(t.feed_forward.w3.weight, std=layer_std, generator=generator)
            nn.init.zeros_(t.feed_forward.w2.weight)
            if t.box_position is not None:
                nn.init.trunc_normal_(t.box_position.weight, std=layer_std, generator=generator)

    # ------------------------------------------------------------------ parameter groups
    def vision_parameters(self) -> list[nn.Parameter]:
        return vision_parameters(self)

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The repeated blocks `train.activation_checkpointing` recomputes in the backward pass."""
        return list(self.layers.values())

    def shard_blocks(self) -> list[nn.Module]:
        """The repeated blocks FSDP2 shards one by one (`train.parallel: "fsdp"`)."""
        return list(self.layers.values())

    def parameter_parts(self) -> dict[str, str]:
        """Parameter name -> part ('vision', 'text', 'mask'): what optim.freeze and the rates act on."""
        vision = {id(p) for p in self.vision_parameters()}
        return {n: "vision" if id(p) in vision else "mask" if n.startswith("mask_head.") else "text"
                for n, p in self.named_parameters()}

    # ------------------------------------------------------------------ forward
    def forward(self, images: Sequence[torch.Tensor], text_ids: Sequence[Sequence[int]] | None = None,
                cache_room: int = 0, mask_at: Sequence[int] | None = None, image_states: bool = True) -> VLMOutput:
        """images: normalised (3, H, W) tensors (sides multiples of the patch size; ImageProcessor.to_tensor);
        text_ids: one token-id list per image (may be empty). All samples are packed into one sequence.
        `cache_room` > 0 also returns a `KVCache` (in `VLMOutput.cache`) with room for that many more
        text tokens per sample, for `decode_step`. `mask_at` (each sample's prompt length) also returns
        the mask head's logits (`VLMOutput.masks`; inside forward, so DDP syncs the head's gradients).
        `image_states=False` leaves the final-norm image states out (a loss that reads none of them: DDP
        must not find outputs that never reach the loss)."""
        vc = self.config.vision
        text_ids = check_texts(images, text_ids, self.config.max_text_len)
        emb = self.vision_embed
        device = emb.img_projector.weight.device
        P = vc.n_prefix_tokens
        xi, img_lens, grids, y_img, x_img = embed_images(emb, images)
        txt_lens = [len(t) for t in text_ids]
        flat_ids = check_token_ids(text_ids, self.config.vocab_size, device)
        pos = torch.tensor([j for n in txt_lens for j in range(n)], dtype=torch.long, device=device)
        xt = self.text_embed(flat_ids) + self.text_pos(pos)

        # positions: image tokens' 2-D coordinates (prefix tokens at 0), text tokens 0 (identity RoPE)
        n_t = xt.shape[0]
        y = torch.cat([y_img, torch.zeros(n_t)])
        xc = torch.cat([x_img, torch.zeros(n_t)])
        theta = rotation_angles(y.to(device), xc.to(device), emb.freqs_cis_golden)[None]   # (1, S, H, F)
        cos, sin = theta.cos(), theta.sin()
        mask = (SampleAttention(img_lens, txt_lens, device) if self.attention == "samples"
                else _sorted_mask(img_lens, txt_lens, device))

        kept = [] if cache_room else None
        box_pos = box_frame_features(grids, P, device) if self.config.box_positions and n_t else None
        for block in self.layers.values():
            xi, xt = block(xi, xt, cos, sin, mask, kept, box_pos)
        zt = self.text_norm(xt)
        logits = self.lm_head(zt) if n_t else xt.new_zeros(0, self.config.vocab_size)
        states = list(self.vision_norm(xi).split(img_lens)) if image_states or mask_at is not None else []
        cache = KVCache.from_prefill(kept, img_lens, txt_lens, cache_room) if cache_room else None
        out = VLMOutput(logits=list(logits.split(txt_lens)), patch_features=[s[P:] for s in states],
                        image_states=states, grids=grids, cache=cache, text_states=list(zt.split(txt_lens)))
        if mask_at is not None:
            out.masks = self.mask_logits(out, mask_at)
        return out

    def mask_logits(self, out: VLMOutput, prompt_lens: Sequence[int]) -> list[torch.Tensor]:
        """Referring-segmentation logits (Hp, Wp) per sample, from its patch states and the state of
        its last prompt token (<sep>: causal, so it has not seen the box tokens)."""
        if self.mask_head is None:
            raise ValueError("this grounding model has no mask head; train it with mask.weight > 0")
        return [self.mask_head(pf, g, ts[n - 1].to(pf.dtype))
                for pf, g, ts, n in zip(out.patch_features, out.grids, out.text_states, prompt_lens)]

    @torch.no_grad()
    def decode_step(self, cache: KVCache, token_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, vocab) after appending one token per sample (token_ids (B,)) to the
        samples `cache` holds: the text experts only, over the cached keys (the image prefix is not
        recomputed). Equals the last-position logits of `forward` on the extended texts."""
        too_long = int(cache.text_lengths.max()) + 1 > self.config.max_text_len
        if too_long:
            raise ValueError(f"decoding past max_text_len={self.config.max_text_len} text tokens")
        xt = self.text_embed(token_ids) + self.text_pos(cache.text_lengths)
        for i, block in enumerate(self.layers.values()):
            xt = block.decode(xt, cache, i)
        return self.lm_head(self.text_norm(xt))

    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor]) -> VLMOutput:
        """The vision-only path (no text): patch features comparable with the student's."""
        return self.forward(images, None)


FOURIER_BANDS = 8     # box-frame position features: sin and cos of 2^k * pi * (x, y), k < 8 -> 32 numbers


def fourier_features(t: torch.Tensor) -> torch.Tensor:
    """(..., n) values in [0, 1] -> (..., 2 * n * FOURIER_BANDS): sin and cos of 2^k * pi * t."""
    angles = (t[..., None].float() * (2.0 ** torch.arange(FOURIER_BANDS)) * math.pi).flatten(-2)
    return torch.cat([angles.sin(), angles.cos()], -1)


def box_frame_features(grids: Sequence[tuple[int, int]], n_prefix: int, device) -> torch.Tensor:
    """(Ni, 4 * FOURIER_BANDS) position features of the packed image tokens: each patch centre's
    (x / W, y / H) in [0, 1], the frame the location tokens quantise, in Fourier features; zeros for
    the CLS and register tokens."""
    parts = []
    for hp, wp in grids:
        y = (torch.arange(hp, dtype=torch.float32) + 0.5) / hp
        x = (torch.arange(wp, dtype=torch.float32) + 0.5) / wp
        coords = torch.stack([x[None, :].expand(hp, wp).reshape(-1), y[:, None].expand(hp, wp).reshape(-1)], -1)
        parts += [torch.zeros(n_prefix, 4 * FOURIER_BANDS), fourier_features(coords)]
    return torch.cat(parts).to(device)


def _sorted_mask(img_lens: list[int], txt_lens: list[int], device) -> torch.Tensor:
    """The PackedLayout rule permuted into modality-sorted order, plus the two sink columns."""
    layout = PackedLayout.build(img_lens, txt_lens)
    order = torch.cat([torch.nonzero(~layout.is_text).flatten(), torch.nonzero(layout.is_text).flatten()])
    allowed = layout.allowed(order[:, None], order[None, :])
    n_i = sum(img_lens)
    S = allowed.shape[0]
    sinks = torch.zeros(S, 2, dtype=torch.bool)
    sinks[:n_i, 0] = True
    sinks[n_i:, 1] = True
    return torch.cat([allowed, sinks], dim=1).to(device)


def vision_parameters(model) -> list[nn.Parameter]:
    """The vision experts of either text side: embedding, the student blocks, the final norm."""
    out = list(model.vision_embed.parameters()) + list(model.vision_norm.parameters())
    for block in model.layers.values():
        out += list(block.vision.parameters())
    return out


@torch.no_grad()
def init_vision_like_student(model) -> None:
    """The student's initialisation for the vision experts, via a throwaway Student of the same config,
    so the scheme stays defined in one place."""
    from distill.student import Student

    from .init import student_to_vlm_keys

    ref = Student(model.config.vision)
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    for s_key, v_key in student_to_vlm_keys(model.config.vision).items():
        own[v_key].copy_(ref.state_dict()[s_key])


def check_texts(images, text_ids, max_text_len: int) -> list[list[int]]:
    """One token-id list per image (None: no text), none longer than `max_text_len`."""
    if not images:
        raise ValueError("the grounding VLM's forward needs at least one image")
    text_ids = [[] for _ in images] if text_ids is None else [list(t) for t in text_ids]
    if len(text_ids) != len(images):
        raise ValueError(f"one text per image: got {len(images)} images and {len(text_ids)} texts")
    too_long = [len(t) for t in text_ids if len(t) > max_text_len]
    if too_long:
        raise ValueError(f"text of {max(too_long)} tokens exceeds max_text_len={max_text_len}; "
                         "shorten the expression or raise max_text_len in the VLM config")
    return text_ids


def check_token_ids(text_ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """The texts' ids, flat, after checking they lie in the vocabulary."""
    flat = torch.tensor([t for ids in text_ids for t in ids], dtype=torch.long, device=device)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got "
                         f"[{int(flat.min())}, {int(flat.max())}] (tokenizer/model vocab mismatch?)")
    return flat


def embed_images(emb: VisionEmbed, images: Sequence[torch.Tensor]):
    """The student's input side over a list of images, packed: (tokens (Ni, D) as [CLS, registers,
    patches] per image, tokens per image, patch grids, and each token's 2-D RoPE coordinates (Ni,) y
    and x, prefix tokens at 0)."""
    vc = emb.cfg
    device = emb.img_projector.weight.device
    P, p = vc.n_prefix_tokens, vc.spatial_patch_size
    patch_lists, grids = [], []
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != vc.channel_size:
            raise ValueError(f"image {i}: expected a ({vc.channel_size}, H, W) tensor "
                             "(use ImageProcessor.to_tensor)")
        if img.shape[1] % p or img.shape[2] % p or min(img.shape[1:]) < p:
            raise ValueError(f"image {i}: {tuple(img.shape[1:])} is not a positive multiple of the patch "
                             f"size {p}; resize with ImageProcessor.to_tensor first")
        vecs, grid = chw_to_patches(img.to(device), p)
        patch_lists.append(vecs)
        grids.append(grid)
    img_lens = [P + v.shape[0] for v in patch_lists]
    dtype = emb.img_projector.weight.dtype
    projected = emb.img_projector(torch.cat(patch_lists).to(dtype)).split([n - P for n in img_lens])
    prefix = emb.prefix().to(dtype)
    xi = torch.cat([torch.cat([prefix, pr]) for pr in projected])
    n_i = xi.shape[0]
    y, xc = torch.zeros(n_i), torch.zeros(n_i)
    cursor = 0
    for n, g in zip(img_lens, grids):
        gy, gx = grid_coordinates(*g)
        y[cursor + P: cursor + n], xc[cursor + P: cursor + n] = gy, gx
        cursor += n
    return xi, img_lens, grids, y, xc
