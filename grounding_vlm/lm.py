"""Text experts from a pretrained Hugging Face causal LM (`lm.path` in the training config).

The LM's embeddings, attention, MLPs, norms and head become the text experts; the SigLino student's
blocks stay the vision experts, unchanged. Attention stays one softmax over both modalities: at
every LM layer a text query scores its sample's image keys and its causal text keys together.

The bridge (why this one): student and LM differ in width, head layout and depth, and image tokens
never attend to text, so the student's image states are exact at initialisation whatever the text
side does. What the text side needs is the image tokens as keys and values in the LM's head space.
The smallest learned piece that gives them is, per LM layer j, an RMSNorm and two linear maps
(student width -> the LM's key/value heads) over the student's residual stream after vision layer
v(j) = ceil((j + 1) * L_vision / L_lm) - 1, so the LM's depth walks up the student's depth and its
last layer reads the student's last. Values start at zero and keys small, so at initialisation the
text stream is the LM's own, up to the attention mass the (near-zero-logit) image keys take. Image
keys carry no rotary position (the LM's RoPE rotates only text queries and keys, positions from 0 as
in the LM's pretraining). What they carry instead is where each patch sits in the box frame: the
bridge adds a learned projection of Fourier features of the patch centre (x / W, y / H in [0, 1], the
frame the location tokens quantise) to the state it maps. The student encodes position only through
RoPE, which acts on attention scores, not on the values a text token reads, so without this the text
side could find *which* patch matters but not read *where* it is.

New tokens (the grounding specials the LM's tokenizer lacks and the location tokens) live in their
own embedding table beside the LM's, so they train at their own rate and the LM's matrices keep
their shape: ids below `lm_vocab` are the LM's, ids from it on are new. A location token's embedding
starts as the mean of the LM's embeddings of its bin centre written in the 0-1000 convention
("0".."1000", as Qwen-VL writes box coordinates); one whose number the tokenizer cannot spell starts
at the mean embedding plus an ordinal code of its bin, the other specials at the mean embedding (plus
small noise, so tokens differ).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from distill.errors import AmoeError
from distill.student.attention import AttentionMask, resolve_backend
from distill.student.model import TransformerBlock
from distill.student.rope import rotation_angles

from .mask import MaskHead
from .model import (FOURIER_BANDS, GroundingVLM, KVCache, VisionEmbed, VLMConfig, VLMOutput, box_frame_features,
                    check_texts, check_token_ids, embed_images, fourier_features, init_vision_like_student,
                    vision_parameters)

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}       # model_type -> class: the decoders whose layers this reads
SUPPORTED_LMS = tuple(FAMILIES.values())


class LMRouteError(AmoeError, ValueError):
    """An LM that cannot serve as the text experts (family, vocabulary, length)."""


def check_supported(hf_config) -> str:
    """The LM's family class name, or an error listing the supported ones."""
    arch = (getattr(hf_config, "architectures", None) or [None])[0] or type(hf_config).__name__
    family = FAMILIES.get(getattr(hf_config, "model_type", None))
    if family is None:
        raise LMRouteError(f"the LM's class {arch} (model_type {getattr(hf_config, 'model_type', None)!r}) is not "
                           f"supported as text experts; supported families: {', '.join(SUPPORTED_LMS)}")
    return family


def load_lm(path: str, dtype: str | None = None):
    """The causal LM by hub id or local path (transformers' `from_pretrained`, `dtype=` as transformers 5
    spells it), after checking its family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_supported(AutoConfig.from_pretrained(path))
    kw = {"dtype": getattr(torch, dtype)} if dtype else {}
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def lm_from_config(config: dict[str, Any]):
    """The LM's architecture (random weights) from its saved config dict: a run loads its checkpoint into it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    check_supported(cfg)
    return AutoModelForCausalLM.from_config(cfg)


def bridge_layer_map(n_vision: int, n_lm: int) -> list[int]:
    """v(j): the vision layer whose output LM layer j reads."""
    return [math.ceil((j + 1) * n_vision / n_lm) - 1 for j in range(n_lm)]


class Bridge(nn.Module):
    """Image keys and values for one LM layer from the student's residual stream and the patches'
    box-frame positions."""

    def __init__(self, vision_dim: int, kv_dim: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(vision_dim, eps=eps)
        self.pos = nn.Linear(4 * FOURIER_BANDS, vision_dim, bias=False)
        self.k = nn.Linear(vision_dim, kv_dim, bias=False)
        self.v = nn.Linear(vision_dim, kv_dim, bias=False)
        nn.init.normal_(self.pos.weight, std=0.02)
        nn.init.normal_(self.k.weight, std=0.02)
        nn.init.zeros_(self.v.weight)

    def forward(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.norm(h) + self.pos(pos.to(h.dtype))
        return self.k(z), self.v(z)


class _VisionLayer(nn.Module):
    """Holds one student block under `.vision`, so student checkpoints map onto `layers.<i>.vision.*`
    exactly as for the scratch text side (grounding_vlm.init)."""

    def __init__(self, layer_id: int, cfg):
        super().__init__()
        self.vision = TransformerBlock(layer_id, cfg)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The LM's rotary embedding (the rotate-half convention of the Llama / Qwen / Mistral families);
    x (..., T, H, hd), cos/sin (..., T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class LMLayer(nn.Module):
    """One of the LM's decoder layers as a text expert: its own submodules (same names, so the keys read
    like the LM's), run over [image keys, causal text keys]. A module of its own, so FSDP2 shards it
    and gradient checkpointing recomputes it as a unit."""

    def __init__(self, hf_layer, n_heads: int, n_kv: int):
        super().__init__()
        self.self_attn = hf_layer.self_attn
        self.mlp = hf_layer.mlp
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        self.n_heads, self.n_kv = n_heads, n_kv
        self.head_dim, self.scaling = self.self_attn.head_dim, self.self_attn.scaling

    def qkv(self, x: torch.Tensor, cos, sin):
        """x (..., T, H) -> q (..., T, nh, hd), k/v (..., T, nkv, hd), rotated."""
        a = self.self_attn
        h = self.input_layernorm(x)
        shape = x.shape[:-1]
        q = a.q_proj(h).view(*shape, self.n_heads, self.head_dim)
        k = a.k_proj(h).view(*shape, self.n_kv, self.head_dim)
        v = a.v_proj(h).view(*shape, self.n_kv, self.head_dim)
        if hasattr(a, "q_norm"):       # Qwen3: per-head RMSNorm before RoPE
            q, k = a.q_norm(q), a.k_norm(k)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def repeat(self, t: torch.Tensor) -> torch.Tensor:     # GQA: kv head h // groups serves query head h
        g = self.n_heads // self.n_kv
        return t.repeat_interleave(g, dim=-2) if g > 1 else t

    def attend(self, x: torch.Tensor, q, keys, values, mask) -> torch.Tensor:
        """The layer's output from queries (B, T, nh, hd) over keys / values (B, C, nkv, hd) under mask."""
        o = F.scaled_dot_product_attention(q.transpose(1, 2), self.repeat(keys).transpose(1, 2).to(q.dtype),
                                           self.repeat(values).transpose(1, 2).to(q.dtype), attn_mask=mask,
                                           scale=self.scaling)
        h = x + self.self_attn.o_proj(o.transpose(1, 2).reshape(*x.shape[:-1], -1))
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, x, cos, sin, img_k, img_v, mask, keep: list | None = None) -> torch.Tensor:
        """x (B, T, H) text states; img_k / img_v (B, N, nkv, hd) the sample's bridged image keys;
        mask (B, 1, T, N + T). `keep` collects the text keys and values (the KV cache's prefill)."""
        q, k, v = self.qkv(x, cos, sin)
        if keep is not None:
            keep.append((k, v))
        return self.attend(x, q, torch.cat([img_k, k], dim=1), torch.cat([img_v, v], dim=1), mask)


class LMTextExperts(nn.Module):
    """The LM's decoder as text experts over bridged image keys (see the module docstring)."""

    def __init__(self, lm, vision_cfg, lm_vocab: int, n_new: int, max_text_len: int):
        super().__init__()
        hf = lm.config
        check_supported(hf)
        base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        rows = base.embed_tokens.weight.shape[0]
        if lm_vocab > rows:
            raise LMRouteError(f"the tokenizer holds {lm_vocab} tokens but the LM's embedding has {rows} rows: "
                               "tokenizer and LM do not belong together (give lm.path a folder with both)")
        limit = getattr(hf, "max_position_embeddings", None)
        if limit is not None and max_text_len > limit:
            raise LMRouteError(f"model.max_text_len={max_text_len} exceeds the LM's max_position_embeddings={limit}; "
                               f"lower it to {limit} or fewer")
        self.hf_config = hf
        self.lm_vocab = lm_vocab
        self.embed_tokens = base.embed_tokens
        self.layers = nn.ModuleList([LMLayer(layer, hf.num_attention_heads, hf.num_key_value_heads)
                                     for layer in base.layers])
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.tied = bool(getattr(hf, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else lm.lm_head
        self.n_kv, self.head_dim = hf.num_key_value_heads, self.layers[0].head_dim
        H = hf.hidden_size
        self.new_embed = nn.Embedding(n_new, H)
        self.new_head = None if self.tied else nn.Linear(H, n_new, bias=False)
        self.bridges = nn.ModuleList([Bridge(vision_cfg.dim, self.n_kv * self.head_dim, vision_cfg.norm_eps)
                                      for _ in self.layers])
        self.reads = bridge_layer_map(vision_cfg.n_layers, len(self.layers))
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ tokens in and out
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        base = ids < self.lm_vocab
        out = self.embed_tokens(ids.clamp(max=self.lm_vocab - 1))
        new = self.new_embed((ids - self.lm_vocab).clamp(min=0))
        return torch.where(base[..., None], out, new.to(out.dtype))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        z = self.norm(z)
        head = self.embed_tokens.weight if self.tied else self.lm_head.weight
        new = self.new_embed.weight if self.tied else self.new_head.weight
        return torch.cat([F.linear(z, head[: self.lm_vocab]), F.linear(z, new.to(z.dtype))], dim=-1)

    @torch.no_grad()
    def init_new_tokens(self, spellings: list[list[int] | None], bins_of: list[float | None] | None = None,
                        generator: torch.Generator | None = None) -> None:
        """Row r of the new tokens starts at the mean LM embedding of `spellings[r]` (LM token ids), or
        at the mean of all LM embeddings where None; plus noise of 2 % of the embeddings' spread. A
        location token the LM cannot spell (`bins_of[r]`, its bin centre in [0, 1]) adds instead an
        ordinal code: a fixed random projection of its Fourier features, at the embeddings' spread, so
        neighbouring bins start alike and far ones apart."""
        bins_of = bins_of or [None] * len(spellings)
        tables = [(self.embed_tokens.weight[: self.lm_vocab], self.new_embed.weight)]
        if not self.tied:
            tables.append((self.lm_head.weight[: self.lm_vocab], self.new_head.weight))
        for src, dst in tables:
            mean, spread = src.float().mean(0), src.float().std()
            proj = torch.randn(2 * FOURIER_BANDS, dst.shape[1], generator=generator) / FOURIER_BANDS ** 0.5
            for r, ids in enumerate(spellings):
                dst[r] = src[ids].float().mean(0) if ids else mean
                if not ids and bins_of[r] is not None:
                    dst[r] += spread * (fourier_features(torch.tensor([bins_of[r]])) @ proj)
            dst.add_(torch.randn(dst.shape, generator=generator) * 0.02 * spread)

    # ------------------------------------------------------------------ whole text side
    def image_kv(self, j: int, vision_states: list[torch.Tensor], pos: torch.Tensor):
        """LM layer j's image keys and values, (Ni, nkv, hd) each, packed."""
        k, v = self.bridges[j](vision_states[self.reads[j]], pos)
        shape = (-1, self.n_kv, self.head_dim)
        return k.view(shape), v.view(shape)

    def forward(self, ids: torch.Tensor, text_lens: Sequence[int], vision_states: list[torch.Tensor] | None,
                img_lens: Sequence[int], image_pos: torch.Tensor | None = None, keep: list | None = None) -> torch.Tensor:
        """ids (B, T) padded; vision_states: per vision layer (Ni, Dv) packed image states (None: no
        image), image_pos their `box_frame_features`. Returns the final (un-normed) text states (B, T, H).
        `keep` collects, per layer, the keys and values in `KVCache.from_prefill`'s layout: the image
        tokens' (bridged) then the text tokens', each packed over the samples."""
        B, T = ids.shape
        device = ids.device
        x = self.embed(ids)
        pos = torch.arange(T, device=device)[None].expand(B, T)
        cos, sin = self.rotary(x, pos)
        N = max(img_lens) if vision_states is not None else 0
        tl = torch.tensor(list(text_lens), device=device)
        il = torch.tensor(list(img_lens) if vision_states is not None else [0] * B, device=device)
        q_pos = torch.arange(T, device=device)
        img_ok = torch.arange(N, device=device)[None, :] < il[:, None]                         # (B, N)
        txt_ok = (q_pos[None, None, :] <= q_pos[None, :, None]) & (q_pos[None, None, :] < tl[:, None, None])
        mask = torch.cat([img_ok[:, None, :].expand(B, T, N), txt_ok], dim=-1)[:, None]       # (B, 1, T, N+T)
        for j in range(len(self.layers)):
            if vision_states is not None:
                k_img, v_img = self.image_kv(j, vision_states, image_pos)
                img_k, img_v = _pad_per_sample(k_img, img_lens, N), _pad_per_sample(v_img, img_lens, N)
            else:
                k_img = v_img = x.new_zeros(0, self.n_kv, self.head_dim)
                img_k = img_v = x.new_zeros(B, 0, self.n_kv, self.head_dim)
            if self.gradient_checkpointing and self.training and keep is None:
                x = checkpoint(self.layers[j], x, cos, sin, img_k, img_v, mask, use_reentrant=False)
                continue
            text_kv = [] if keep is not None else None
            x = self.layers[j](x, cos, sin, img_k, img_v, mask, text_kv)
            if keep is not None:
                (k, v), = text_kv
                keep.append(tuple(torch.cat([im.to(t.dtype)] + [t[b, :n] for b, n in enumerate(text_lens)])
                                  for im, t in ((k_img, k), (v_img, v))))
        return x

    def decode(self, token_ids: torch.Tensor, cache) -> torch.Tensor:
        """One token per sample over the cache (grounding_vlm.model.KVCache) -> logits (B, vocab)."""
        x = self.embed(token_ids)[:, None]                                      # (B, 1, H)
        cos, sin = self.rotary(x, cache.text_lengths[:, None])
        for j, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin)
            keys, values, valid = cache.append(j, k[:, 0], v[:, 0])              # (B, C, nkv, hd)
            x = layer.attend(x, q, keys, values, valid[:, None, None, :])
        return self.logits(x[:, 0])


def _pad_per_sample(flat: torch.Tensor, lens: Sequence[int], width: int) -> torch.Tensor:
    """(sum lens, ...) -> (B, width, ...), zero padded."""
    return torch.stack([F.pad(p, (0, 0) * (p.dim() - 1) + (0, width - p.shape[0])) for p in flat.split(list(lens))])


def run_vision(layers: nn.ModuleDict, xi: torch.Tensor, img_lens: Sequence[int], y: torch.Tensor,
               xc: torch.Tensor, freqs: torch.Tensor) -> list[torch.Tensor]:
    """The student's own blocks over the packed image tokens (attention within each image, the
    student's packed path), returning the residual stream after every layer."""
    device = xi.device
    segment_ids = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(img_lens)])[None].to(device)
    theta = rotation_angles(y[None].to(device), xc[None].to(device), freqs)
    cos, sin = theta.cos(), theta.sin()
    mask = AttentionMask(segment_ids, resolve_backend("auto", device))
    states, x = [], xi[None]
    for layer in layers.values():
        x = layer.vision(x, cos, sin, mask)
        states.append(x[0])
    return states


class LMGroundingVLM(nn.Module):
    """The grounding VLM with a pretrained LM's text experts: the interface of `GroundingVLM` (forward,
    decode_step, mask_logits, encode_images, parameter_parts), the vision side in the same keys."""

    def __init__(self, config, lm=None):
        super().__init__()
        cfg = config if isinstance(config, VLMConfig) else VLMConfig.from_dict(config)
        if cfg.text != "lm":
            raise ValueError("LMGroundingVLM needs a config with text 'lm'")
        self.config = cfg
        vc = cfg.vision
        self.vision_embed = VisionEmbed(vc)
        self.layers = nn.ModuleDict({str(i): _VisionLayer(i, vc) for i in range(vc.n_layers)})
        self.vision_norm = nn.RMSNorm(vc.dim, eps=vc.norm_eps)
        init_vision_like_student(self)
        lm = lm if lm is not None else lm_from_config(cfg.lm)
        self.text = LMTextExperts(lm, vc, cfg.lm_vocab, cfg.vocab_size - cfg.lm_vocab, cfg.max_text_len)
        self.mask_head = MaskHead(vc.dim, lm.config.hidden_size) if cfg.mask_head else None

    # ------------------------------------------------------------------ parameter groups
    def vision_parameters(self) -> list[nn.Parameter]:
        return vision_parameters(self)

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The student blocks `train.activation_checkpointing` recomputes in the backward pass (the LM's
        layers have their own switch, lm.gradient_checkpointing)."""
        return [layer.vision for layer in self.layers.values()]

    def shard_blocks(self) -> list[nn.Module]:
        """The repeated blocks FSDP2 shards one by one: the student blocks and the LM's layers."""
        return self.checkpoint_blocks() + list(self.text.layers)

    def parameter_parts(self) -> dict[str, str]:
        """Parameter name -> part: 'vision', 'text' (the LM's own weights), 'bridge', 'new_tokens', 'mask'."""
        vision = {id(p) for p in self.vision_parameters()}

        def part(name, p):
            if id(p) in vision:
                return "vision"
            for prefix, which in (("text.bridges.", "bridge"), ("text.new_", "new_tokens"), ("mask_head.", "mask")):
                if name.startswith(prefix):
                    return which
            return "text"
        return {n: part(n, p) for n, p in self.named_parameters()}

    # ------------------------------------------------------------------ forward
    def forward(self, images: Sequence[torch.Tensor], text_ids: Sequence[Sequence[int]] | None = None,
                cache_room: int = 0, mask_at: Sequence[int] | None = None, image_states: bool = True) -> VLMOutput:
        cfg = self.config
        text_ids = check_texts(images, text_ids, cfg.max_text_len)
        P = cfg.vision.n_prefix_tokens
        xi, img_lens, grids, y, xc = embed_images(self.vision_embed, images)
        states = run_vision(self.layers, xi, img_lens, y, xc, self.vision_embed.freqs_cis_golden)
        device = xi.device
        check_token_ids(text_ids, cfg.vocab_size, device)
        txt_lens = [len(t) for t in text_ids]
        T = max(txt_lens)
        ids = torch.tensor([t + [0] * (T - len(t)) for t in text_ids], dtype=torch.long, device=device)
        kept = [] if cache_room else None
        pos = box_frame_features(grids, P, device)
        if T:
            xt = self.text(ids, txt_lens, states, img_lens, pos, kept)
            logits, zt = self.text.logits(xt), self.text.norm(xt)
        else:            # images only (encode_images)
            logits = xi.new_zeros(len(txt_lens), 0, cfg.vocab_size)
            zt = xi.new_zeros(len(txt_lens), 0, self.text.hf_config.hidden_size)
        per_logits = [logits[b, :n] for b, n in enumerate(txt_lens)]
        per_states = [zt[b, :n] for b, n in enumerate(txt_lens)]
        cache = None
        if cache_room:
            cache = KVCache.from_prefill(kept, img_lens, txt_lens, cache_room)
        split = list(self.vision_norm(states[-1]).split(img_lens)) if image_states or mask_at is not None else []
        out = VLMOutput(logits=per_logits, patch_features=[s[P:] for s in split], image_states=split, grids=grids,
                        cache=cache, text_states=per_states)
        if mask_at is not None:
            out.masks = self.mask_logits(out, mask_at)
        return out

    mask_logits = GroundingVLM.mask_logits      # the same head call on the same output fields

    @torch.no_grad()
    def decode_step(self, cache, token_ids: torch.Tensor) -> torch.Tensor:
        if int(cache.text_lengths.max()) + 1 > self.config.max_text_len:
            raise ValueError(f"decoding past max_text_len={self.config.max_text_len} text tokens")
        return self.text.decode(token_ids, cache)

    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor]):
        return self.forward(images, None)

    @torch.no_grad()
    def text_only_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids of the LM's own tokens, no image -> (B, T, vocab): the LM converted to text experts
        on text alone, which equals the source LM's logits (the conversion's check)."""
        T = ids.shape[1]
        return self.text.logits(self.text(ids, [T] * ids.shape[0], None, [0] * ids.shape[0]))


def lm_tokenizer(path: str):
    """The LM's own tokenizer (a fast one: the location tokens are added to it)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(path)
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise LMRouteError(f"the tokenizer of {path} is a slow {type(tok).__name__}; the grounding VLM needs a fast "
                           "tokenizer (tokenizer.json) to add the location tokens to")
    return tok


def new_token_spellings(tok, base) -> tuple[list[list[int] | None], list[float | None]]:
    """For each token the grounding tokenizer added to the LM's (`base`, its length the LM's vocabulary):
    the LM ids that spell its value, or None; and for location tokens their bin centre in [0, 1] (None
    for the specials). A location token's value is its bin centre on the 0-1000 scale; the LM must
    spell it without unknown tokens."""
    n_base = len(base)
    spellings: list[list[int] | None] = []
    centres: list[float | None] = []
    for i in range(n_base, tok.vocab_size):
        ids, centre = None, None
        if tok.loc_start <= i < tok.loc_start + tok.bins:
            centre = (i - tok.loc_start + 0.5) / tok.bins
            ids = base(str(round(centre * 1000)), add_special_tokens=False)["input_ids"]
            if not ids or base.unk_token_id in ids or max(ids) >= n_base:
                ids = None
        spellings.append(ids)
        centres.append(centre)
    return spellings, centres


def build_lm_vlm(lm_path: str, tok, dtype: str | None = None, **vlm_config) -> LMGroundingVLM:
    """The LM route's model: the LM by id or path as text experts, the new tokens of `tok` (the LM's
    tokenizer extended by GroundingTokenizer) initialised from the LM; `vlm_config`: VLMConfig's other
    fields (vision, max_text_len, mask_head, ...)."""
    lm, base = load_lm(lm_path, dtype), lm_tokenizer(lm_path)
    model = LMGroundingVLM(VLMConfig(**vlm_config, vocab_size=tok.vocab_size, text="lm", lm=lm.config.to_dict(),
                                     lm_vocab=len(base)), lm)
    model.text.init_new_tokens(*new_token_spellings(tok, base))
    return model
