"""The SigLino student: weight-compatible with the official release, plus true sequence packing.

Token layout per image: [CLS, reg_1..reg_R, patch_0..patch_{L-1}] (patches in raster order).
Two entry points share one backbone:
- `forward(pixel_values, padding_mask, spatial_shapes)`: the release's padded batch, one image per
  row (golden-vector compatible).
- `forward_packed(images)`: several native-resolution images per sequence, attention restricted to
  each image, per-image RoPE positions and per-image MAP pooling; results equal to running each
  image alone.
Positions and masks are recomputed on every call (the release caches them under keys that ignore
the spatial shapes / padding pattern and silently reuses stale ones).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, AttentionMask, resolve_backend, rms_norm
from .config import StudentConfig, get_config
from .heads import Adapter, MAPHead
from .moe import EXPERT_BACKENDS, FeedForward, MoE
from .packing import PackingPlan, plan_packing
from .processor import chw_to_patches, patchify_channel_major
from .rope import golden_freqs, grid_coordinates, rotation_angles


@dataclass
class StudentOutput:
    """Per-head outputs for N images (N = 1 for each element of `forward_packed`'s result).

    patch_features[head]:    (N, L, C) at patch positions (padding rows included in the padded batch).
    summary_features[head]:  (N, C): CLS for "siglino"/"dinov3", MAP pooling for "siglip2".
    register_features[head]: (N, R, C): normed backbone registers ("siglino") and the dinov3
                             adapter applied to them ("dinov3"). Absent heads when R = 0 -> (N, 0, C).
    spatial_shapes: (N, 2) int64 patch grids; padding_mask: (N, L) bool, True = real patch.
    """

    patch_features: dict[str, torch.Tensor]
    summary_features: dict[str, torch.Tensor]
    register_features: dict[str, torch.Tensor]
    spatial_shapes: torch.Tensor
    padding_mask: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str):  # release-style access: out["patch_features"]["siglino"]
        return getattr(self, key)

    def to_features(self):
        """As the project-wide `distill.features.Features` (patches trimmed to each image's grid)."""
        from distill.features import Features

        grids = [tuple(int(v) for v in s) for s in self.spatial_shapes.tolist()]
        patches = {h: [t[i, : gh * gw] for i, (gh, gw) in enumerate(grids)] for h, t in self.patch_features.items()}
        return Features(summary=dict(self.summary_features), patches=patches, grids=grids,
                        cls=self.summary_features["siglino"], registers=self.register_features["siglino"])


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, cfg: StudentConfig):
        super().__init__()
        self.layer_id = layer_id
        # parameter-free norms use eps=None (float32 machine epsilon), as the release does
        self.norm_eps = cfg.norm_eps if cfg.parameterized_norm else None
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.use_qk_norm,
                                   qk_norm_eps=None)
        if cfg.parameterized_norm:
            self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
            self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        else:
            self.attention_norm = self.ffn_norm = None
        kind = cfg.layer_kind(layer_id)
        self.kind = kind
        if kind == "dense":
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, cfg.activation)
        elif kind == "plain":
            self.feed_forward = FeedForward(cfg.dim, cfg.moe_dim, "silu")
        else:
            self.moe = MoE(cfg.dim, cfg.moe_dim, cfg.moe_args)

    def apply_norm(self, module, x):
        """`module(x)`, or the parameter-free RMS norm where the config has no norm weights (public:
        the grounding VLM runs these blocks step by step)."""
        return module(x) if module is not None else rms_norm(x, None, None)

    def forward(self, x, cos, sin, mask: AttentionMask):
        h = x + self.attention(self.apply_norm(self.attention_norm, x), cos, sin, mask)
        z = self.apply_norm(self.ffn_norm, h)
        ffn = self.moe(z, mask.valid) if self.kind == "moe" else self.feed_forward(z)
        return h + ffn


class Student(nn.Module):
    def __init__(self, config: "StudentConfig | str | Mapping", attention_backend: str = "auto",
                 expert_backend: str = "auto", compile_flex: bool = True):
        super().__init__()
        cfg = get_config(config)
        self.config = cfg
        D = cfg.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        if cfg.n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.zeros(1, cfg.n_storage_tokens, D))
        else:
            self.storage_tokens = None
        self.register_buffer("freqs_cis_golden", golden_freqs(cfg.n_heads, cfg.head_dim, cfg.rope_min_freqs,
                                                              cfg.rope_max_freqs))
        self.img_projector = nn.Linear(cfg.patch_dim, D, bias=False)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(D, eps=cfg.norm_eps)
        t_sig, t_dino = cfg.teacher_dim("siglip2"), cfg.teacher_dim("dinov3")
        self.dinov3_adapter = Adapter(D, t_dino)
        self.siglip2_adapter = Adapter(D, t_sig)
        # present in every release checkpoint but never used in forward; kept for key compatibility
        self.layer_norm_dinov3 = nn.LayerNorm(t_dino, eps=1e-5)
        self.siglip2_multihead_attention_pooling_head = MAPHead(t_sig)
        self.attention_backend = attention_backend
        self.set_expert_backend(expert_backend)
        # the flex path on CUDA compiles flex_attention at its first use (eager flex is a slow reference
        # there); False keeps it eager. The SDPA / segments paths are the references it is tested against.
        self.compile_flex = bool(compile_flex)
        self._compiled_flex = None
        # the release leaves this to the caller; doing it here means no parameter is ever left
        # uninitialised (the stacked expert weights are created with torch.empty)
        self.init_weights()

    # ------------------------------------------------------------------ construction / weights
    @classmethod
    def from_config(cls, config, **kw) -> "Student":
        return cls(config, **kw)

    @classmethod
    def from_pretrained(cls, config, checkpoint_path, **kw) -> "Student":
        """Build `config` and strictly load an official `.pt` or a safetensors checkpoint."""
        model = cls(config, **kw)
        model.load_state_dict(load_official_checkpoint(checkpoint_path))
        return model

    def set_expert_backend(self, backend: str) -> None:
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"unknown expert_backend {backend!r}; choose one of {EXPERT_BACKENDS}")
        self.expert_backend = backend
        for m in self.modules():
            if isinstance(m, MoE):
                m.expert_backend = backend

    def enable_compiled_flex(self) -> None:
        """Use a torch.compile'd flex_attention (CUDA: the fused kernel; eager flex is slow)."""
        from torch.nn.attention.flex_attention import flex_attention

        self._compiled_flex = torch.compile(flex_attention)

    def expert_loads(self) -> torch.Tensor:
        """(n_moe_layers, num_experts) tokens routed per expert in the last forward (valid tokens only);
        sum/all-reduce across steps and ranks, then pass the rows to `update_expert_bias`."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0)
        return torch.stack([m.tokens_per_expert for m in layers])

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        if strict:
            own = self.state_dict()
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            if missing or unexpected:
                raise KeyError(
                    "state_dict does not match this SigLino config "
                    f"({self.config.n_layers} layers, dim {self.config.dim}).\n"
                    f"  missing keys ({len(missing)}): {missing}\n  unexpected keys ({len(unexpected)}): {unexpected}\n"
                    "Check the config name (the checkpoint's config must match), strip any 'model.'/'module.' "
                    "prefix, or pass strict=False.")
            bad = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                   for k, v in own.items() if tuple(state_dict[k].shape) != tuple(v.shape)]
            if bad:
                raise ValueError("state_dict shapes do not match this config:\n  " + "\n  ".join(bad))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, zero_residual: bool = True) -> None:
        """The release's initialisation (SIGLINO_FACTS.md §5). The MAP head and layer_norm_dinov3
        keep PyTorch's default init (probe N(0,1)).

        The release zeroes every residual branch's output projection (attention `wo`, FFN / expert
        `w2`), which is right for training but makes an untrained model the identity on its input
        embeddings: the CLS token never sees the image, so summary features are one constant vector.
        `zero_residual=False` draws those projections like their layer's other weights instead: the
        standard initialisation a random-init baseline needs to measure anything."""
        g = generator

        def residual_out(w: torch.Tensor, std: float) -> None:
            if zero_residual:
                nn.init.zeros_(w)
            else:
                nn.init.trunc_normal_(w, std=std, generator=g)
        nn.init.trunc_normal_(self.img_projector.weight, std=0.02, generator=g)
        nn.init.normal_(self.cls_token, std=0.02, generator=g)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02, generator=g)
        for i, block in self.layers.items():
            std = 0.02 / math.sqrt(2 * (int(i) + 1))
            att = block.attention
            for w in (att.wq.weight, att.wk.weight, att.wv.weight, att.sinks):
                nn.init.trunc_normal_(w, std=std, generator=g)
            residual_out(att.wo.weight, std)
            for norm in (block.attention_norm, block.ffn_norm):
                if norm is not None:
                    nn.init.ones_(norm.weight)
            ffns = [block.feed_forward] if block.kind != "moe" else []
            if block.kind == "moe":
                moe = block.moe
                nn.init.trunc_normal_(moe.experts.w1, std=0.02, generator=g)
                nn.init.trunc_normal_(moe.experts.w3, std=std, generator=g)
                residual_out(moe.experts.w2, std)
                nn.init.trunc_normal_(moe.router.gate.weight, std=std, generator=g)
                moe.expert_bias.zero_()
                if moe.shared_experts is not None:
                    ffns.append(moe.shared_experts)
            for ff in ffns:
                nn.init.trunc_normal_(ff.w1.weight, std=0.02, generator=g)
                nn.init.trunc_normal_(ff.w3.weight, std=std, generator=g)
                residual_out(ff.w2.weight, std)
        nn.init.ones_(self.norm.weight)
        for ad in (self.dinov3_adapter, self.siglip2_adapter):
            nn.init.trunc_normal_(ad.fc1.weight, std=0.01, generator=g)
            nn.init.zeros_(ad.fc1.bias)
            nn.init.trunc_normal_(ad.fc2.weight, std=0.01, generator=g)
            ad.norm.reset_parameters()

    # ------------------------------------------------------------------ shared pieces
    @property
    def n_prefix(self) -> int:
        return self.config.n_prefix_tokens

    def _prefix_tokens(self, dtype) -> torch.Tensor:
        parts = [self.cls_token]
        if self.storage_tokens is not None:
            parts.append(self.storage_tokens)
        return torch.cat(parts, dim=1)[0].to(dtype)  # (R+1, D)

    def _backbone(self, x, y, xcoord, segment_ids, backend: str) -> torch.Tensor:
        theta = rotation_angles(y, xcoord, self.freqs_cis_golden)  # (B, S, H, F) float32
        cos, sin = theta.cos(), theta.sin()
        mask = AttentionMask(segment_ids, backend, self._compiled_flex)
        for block in self.layers.values():
            x = block(x, cos, sin, mask)
        return self.norm(x)

    def _backend(self, override: str | None, device) -> str:
        device = torch.device(device)
        backend = resolve_backend(override or self.attention_backend, device)
        if backend == "flex" and self._compiles_flex_on(device) and self._compiled_flex is None:
            self.enable_compiled_flex()
        return backend

    def _compiles_flex_on(self, device: torch.device) -> bool:
        return device.type == "cuda" and self.compile_flex

    def attention_path(self, device) -> str:
        """What attention runs on `device`: 'flex-compiled', 'flex-eager', 'segments' or 'sdpa' (for logs
        and result files)."""
        device = torch.device(device)
        backend = resolve_backend(self.attention_backend, device)
        if backend != "flex":
            return backend
        compiled = self._compiled_flex is not None or self._compiles_flex_on(device)
        return "flex-compiled" if compiled else "flex-eager"

    def _param_dtype(self):
        return self.img_projector.weight.dtype

    # ------------------------------------------------------------------ padded batch (release API)
    def forward(self, pixel_values: torch.Tensor, padding_mask: torch.Tensor | None = None,
                spatial_shapes: torch.Tensor | None = None, attention_backend: str | None = None) -> StudentOutput:
        """pixel_values: (N, L, patch_dim) processor patches (channel-last vectors), or a raw (N, C, H, W) /
        (N, H, W, C) image tensor (patchified channel-major, like the release). padding_mask (N, L): 1 = real
        patch (real patches first). spatial_shapes (N, 2) int: (Hp, Wp) per image."""
        cfg = self.config
        _check_float(pixel_values, "pixel_values")
        if pixel_values.dim() == 4:
            pixel_values, spatial_shapes = self._patchify_raw(pixel_values)
            padding_mask = None
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be (N, L, {cfg.patch_dim}) patches or a 4-D image batch; got "
                             f"{tuple(pixel_values.shape)}")
        N, L, _ = pixel_values.shape
        device = pixel_values.device
        if spatial_shapes is None:
            raise ValueError("spatial_shapes (N, 2) is required with patch inputs: it gives each image's "
                             "(Hp, Wp) grid for RoPE (the image processor returns it)")
        spatial_shapes = torch.as_tensor(spatial_shapes, device=device).long()
        if spatial_shapes.shape != (N, 2):
            raise ValueError(f"spatial_shapes must be ({N}, 2); got {tuple(spatial_shapes.shape)}")
        if padding_mask is None:
            padding_mask = torch.ones(N, L, dtype=torch.bool, device=device)
        if padding_mask.shape != (N, L):
            raise ValueError(f"padding_mask must be ({N}, {L}); got {tuple(padding_mask.shape)}")
        valid_patch = padding_mask.bool()
        grids = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        counts = valid_patch.sum(1).tolist()
        for i, (h, w) in enumerate(grids):
            if h * w != counts[i] or not bool(valid_patch[i, : h * w].all()):
                raise ValueError(f"image {i}: spatial shape {h}x{w} = {h * w} patches, but padding_mask marks "
                                 f"{counts[i]} real patches (they must be the first {h * w} positions)")

        P = self.n_prefix
        x_patch = self.img_projector(pixel_values.to(self._param_dtype()))
        prefix = self._prefix_tokens(x_patch.dtype).expand(N, -1, -1)
        x = torch.cat([prefix, x_patch], dim=1)
        segment_ids = torch.cat([torch.zeros(N, P, dtype=torch.long, device=device),
                                 torch.where(valid_patch, 0, -1)], dim=1)
        y = torch.zeros(N, P + L, dtype=torch.float32)
        xc = torch.zeros_like(y)
        for i, (h, w) in enumerate(grids):
            yi, xi = grid_coordinates(h, w)
            y[i, P: P + h * w] = yi
            xc[i, P: P + h * w] = xi
        y, xc = y.to(device), xc.to(device)
        z = self._backbone(x, y, xc, segment_ids, self._backend(attention_backend, device))
        token_valid = segment_ids >= 0
        return self._heads(z, token_valid, spatial_shapes, valid_patch)

    def _heads(self, z, token_valid, spatial_shapes, valid_patch) -> StudentOutput:
        P = self.n_prefix
        patches, cls, regs = z[:, P:], z[:, 0], z[:, 1:P]
        sig_all = self.siglip2_adapter(z)
        pooled = self.siglip2_multihead_attention_pooling_head(sig_all, token_valid)
        return StudentOutput(
            patch_features={"siglino": patches, "dinov3": self.dinov3_adapter(patches), "siglip2": sig_all[:, P:]},
            summary_features={"siglino": cls, "dinov3": self.dinov3_adapter(cls), "siglip2": pooled},
            register_features={"siglino": regs, "dinov3": self.dinov3_adapter(regs)},
            spatial_shapes=spatial_shapes, padding_mask=valid_patch)

    def _patchify_raw(self, images: torch.Tensor):
        """Release `_patchify`: NCHW (or NHWC when the last dim is C) -> channel-major patch vectors."""
        C, p = self.config.channel_size, self.config.spatial_patch_size
        if images.shape[-1] == C and images.shape[1] != C:
            images = images.permute(0, 3, 1, 2)
        if images.shape[1] != C:
            raise ValueError(f"raw image batch must have {C} channels (NCHW or NHWC); got {tuple(images.shape)}")
        N, _, H, W = images.shape
        if H < p or W < p or H % p or W % p:
            raise ValueError(f"raw image size {H}x{W} must be a positive multiple of the patch size {p}; "
                             "resize first (ImageProcessor does)")
        patches, (hp, wp) = patchify_channel_major(images, p)
        shapes = torch.tensor([[hp, wp]] * N, dtype=torch.long, device=images.device)
        return patches, shapes

    # ------------------------------------------------------------------ true packing
    def forward_packed(self, images: Sequence[torch.Tensor], max_tokens: int = 4096, max_images_per_seq: int = 16,
                       attention_backend: str | None = None, plan: PackingPlan | None = None) -> list[StudentOutput]:
        """Pack native-resolution CHW images (normalised, sides multiples of the patch size) into
        sequences of at most `max_tokens` tokens; attention stays within each image. Returns one
        StudentOutput (batch of 1) per input image, in input order."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("forward_packed needs a non-empty list of (C, H, W) float tensors")
        patch_lists, grids = [], []
        for i, img in enumerate(images):
            vecs, grid = self._patchify_chw(img, i)
            patch_lists.append(vecs)
            grids.append(grid)
        P = self.n_prefix
        counts = [P + v.shape[0] for v in patch_lists]
        if plan is None:
            plan = plan_packing(counts, max_tokens, max_images_per_seq)
        elif sorted(i for s in plan.sequences for i in s) != list(range(len(images))):
            raise ValueError("the given packing plan does not cover every image exactly once")
        device = patch_lists[0].device
        backend = self._backend(attention_backend, device)
        dtype = self._param_dtype()
        projected = self.img_projector(torch.cat(patch_lists).to(dtype)).split([c - P for c in counts])
        prefix = self._prefix_tokens(projected[0].dtype)
        S = max(sum(counts[i] for i in seq) for seq in plan.sequences)
        if backend == "flex" and self._compiled_flex is not None:
            # a compiled kernel wants few distinct shapes: always use the full, block-aligned length
            S = -(-max(plan.max_tokens, S) // 128) * 128
        B = len(plan.sequences)
        # layout tensors are filled on the CPU (many small slice writes) and moved once
        segment_ids = torch.full((B, S), -1, dtype=torch.long)
        y = torch.zeros(B, S, dtype=torch.float32)
        xc = torch.zeros_like(y)
        where: dict[int, tuple[int, int]] = {}
        rows = []
        for b, seq in enumerate(plan.sequences):
            pos, parts = 0, []
            for slot, i in enumerate(seq):
                n = counts[i]
                parts.append(prefix)
                parts.append(projected[i])
                segment_ids[b, pos: pos + n] = slot
                yi, xi = grid_coordinates(*grids[i])
                y[b, pos + P: pos + n] = yi
                xc[b, pos + P: pos + n] = xi
                where[i] = (b, pos)
                pos += n
            rows.append(torch.cat(parts))
        segment_ids, y, xc = (t.to(device) for t in (segment_ids, y, xc))
        # assemble without in-place writes into a leaf-derived tensor, so autograd stays simple
        x = torch.stack([F.pad(r, (0, 0, 0, S - r.shape[0])) for r in rows])
        z = self._backbone(x, y, xc, segment_ids, backend)

        per_image = [z[where[i][0], where[i][1]: where[i][1] + counts[i]] for i in range(len(images))]
        # adapters on all tokens at once, MAP head per image (batched with a key mask)
        flat = torch.cat(per_image)
        sig_flat = self.siglip2_adapter(flat).split(counts)
        T = max(counts)
        sig_pad = torch.stack([F.pad(s, (0, 0, 0, T - s.shape[0])) for s in sig_flat])
        valid = torch.arange(T, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
        pooled = self.siglip2_multihead_attention_pooling_head(sig_pad, valid)
        dino_flat = self.dinov3_adapter(flat).split(counts)
        outs = []
        for i, zi in enumerate(per_image):
            outs.append(StudentOutput(
                patch_features={"siglino": zi[None, P:], "dinov3": dino_flat[i][None, P:],
                                "siglip2": sig_flat[i][None, P:]},
                summary_features={"siglino": zi[None, 0], "dinov3": dino_flat[i][None, 0],
                                  "siglip2": pooled[i: i + 1]},
                register_features={"siglino": zi[None, 1:P], "dinov3": dino_flat[i][None, 1:P]},
                spatial_shapes=torch.tensor([grids[i]], dtype=torch.long, device=device),
                padding_mask=torch.ones(1, counts[i] - P, dtype=torch.bool, device=device),
                extras={"plan": plan}))
        return outs

    def _patchify_chw(self, img: torch.Tensor, index: int):
        """(C, H, W) -> (Hp*Wp, patch_dim) in the processor's channel-last order (row, col, channel)."""
        C, p = self.config.channel_size, self.config.spatial_patch_size
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"image {index}: expected a torch.Tensor (C, H, W), got {type(img).__name__}; "
                            "use ImageProcessor.to_tensor(image)")
        _check_float(img, f"image {index}")
        if img.dim() != 3 or img.shape[0] != C:
            raise ValueError(f"image {index}: expected shape ({C}, H, W), got {tuple(img.shape)}")
        _, H, W = img.shape
        if H < p or W < p:
            raise ValueError(f"image {index}: {H}x{W} is smaller than one {p}x{p} patch")
        if H % p or W % p:
            raise ValueError(f"image {index}: {H}x{W} is not a multiple of the patch size {p}; "
                             "resize with ImageProcessor.to_tensor (smart_resize) first")
        return chw_to_patches(img, p)


def _check_float(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; expected normalised floating-point pixels (use the "
                        "ImageProcessor, which returns float32 in [-1, 1])")


def load_official_checkpoint(path) -> dict[str, torch.Tensor]:
    """State dict of an official release `.pt` or a `.safetensors` file (distill.io.load_state_dict_file:
    weights_only=True, so no arbitrary pickled code runs; a 'model.' / 'module.' prefix is stripped)."""
    from distill.io import load_state_dict_file
    return load_state_dict_file(path)
