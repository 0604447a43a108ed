"""UniFormer for video (Li et al., "UniFormer: Unified Transformer for Efficient Spatiotemporal Representation
Learning", ICLR 2022).

Four stages of blocks that share one shape, ``x + DPE(x)``, ``x + MHRA(norm(x))``, ``x + FFN(norm(x))``, and
differ in the relation aggregator (MHRA): local (a 5x5x5 channel-wise conv between two 1x1x1 convs, BN) in the
two shallow, high-resolution stages, global (self-attention over all T*H*W tokens, LN) in the two deep ones.

    stem     3x4x4 conv, stride (2, 4, 4), LN                      [N, 64, T/2, H/4, W/4]
    stage 1  local blocks  (3 S / 5 B)     64 ch
    down     1x2x2 conv, stride (1, 2, 2), LN
    stage 2  local blocks  (4 S / 8 B)    128 ch
    down
    stage 3  global blocks (8 S / 20 B)   320 ch, 5 heads of 64
    down
    stage 4  global blocks (3 S / 7 B)    512 ch, 8 heads of 64    [N, 512, T/2, H/32, W/32]
    head     BN, global average pool, linear classifier

``model(clip)`` takes ``[N, T, 3, H, W]`` (frames first, like TSM's 5D input) and returns ``[N, num_classes]``.

Parameter names follow the official release (Sense-X/UniFormer, video_classification), so its checkpoints load
without renaming: ``patch_embed{1..4}.{proj,norm}``, ``blocks{1..4}.i.*``, ``norm``, ``head``.
"""

from __future__ import annotations

from typing import NoReturn

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .registry import register

ATTENTION_KINDS = ("joint", "split")


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """A strided conv, then LayerNorm over channels: ``[N, C, T, H, W] -> [N, D, T', H/p, W/p]``."""

    def __init__(self, inp: int, dim: int, kernel: tuple[int, int, int], stride: tuple[int, int, int],
                 padding: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(inp, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).permute(0, 2, 3, 4, 1)  # [N, T, H, W, D]
        return self.norm(x).permute(0, 4, 1, 2, 3)  # [N, D, T, H, W]


class CMlp(nn.Module):
    """The FFN of local blocks: 1x1x1 conv, GELU, 1x1x1 conv on ``[N, C, T, H, W]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden, 1)
        self.fc2 = nn.Conv3d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Mlp(nn.Module):
    """The FFN of global blocks: linear, GELU, linear on tokens ``[..., C]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``[B, L, C]`` (heads of ``C // num_heads``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]
        attn = (q @ k.transpose(-2, -1)) * self.scale  # [B, heads, L, L]
        x = attn.softmax(dim=-1) @ v  # [B, heads, L, head_dim]
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class CBlock(nn.Module):
    """Local UniFormer block, on ``[N, C, T, H, W]``::

        x = x + pos_embed(x)                                   3x3x3 channel-wise conv (DPE)
        x = x + conv2(attn(conv1(norm1(x))))                   BN, 1x1x1, 5x5x5 channel-wise, 1x1x1 (local MHRA)
        x = x + mlp(norm2(x))                                  BN, 1x1x1, GELU, 1x1x1
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = nn.Conv3d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.BatchNorm3d(dim)
        self.conv1 = nn.Conv3d(dim, dim, 1)
        self.attn = nn.Conv3d(dim, dim, 5, 1, 2, groups=dim)
        self.conv2 = nn.Conv3d(dim, dim, 1)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm3d(dim)
        self.mlp = CMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SABlock(nn.Module):
    """Global UniFormer block: DPE, then joint space-time self-attention over all T*H*W tokens and an MLP::

        x = x + pos_embed(x)                                   [N, C, T, H, W]
        tokens = x as [N, T*H*W, C]
        tokens = tokens + attn(norm1(tokens))                  LN, MHSA (global MHRA)
        tokens = tokens + mlp(norm2(tokens))                   LN, linear, GELU, linear
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = nn.Conv3d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed(x)
        n, c, t, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [N, T*H*W, C]
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens)))
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return tokens.transpose(1, 2).reshape(n, c, t, h, w)


class SplitSABlock(nn.Module):
    """Global block with divided attention: temporal attention at each position, then spatial attention in
    each frame, as the official ``SplitSABlock``::

        x = x + pos_embed(x)                                   [N, C, T, H, W]
        xt = x as [N*H*W, T, C];  xt = xt + t_attn(t_norm(xt))           temporal MHSA
        xs = xt as [N*T, H*W, C]; y = x as [N*T, H*W, C] + attn(norm1(xs)) spatial MHSA; the residual is x,
                                                                         so the temporal branch only feeds it
        y as [N, T*H*W, C];       y = y + mlp(norm2(y))

    The temporal attention starts as a no-op (zero qkv), as in the official initialization.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = nn.Conv3d(dim, dim, 3, 1, 1, groups=dim)
        self.t_norm = nn.LayerNorm(dim, eps=1e-6)
        self.t_attn = Attention(dim, num_heads, qkv_bias)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed(x)
        n, c, t, h, w = x.shape
        xt = x.reshape(n, c, t, h * w).permute(0, 3, 2, 1).reshape(n * h * w, t, c)  # [N*H*W, T, C]
        xt = xt + self.drop_path(self.t_attn(self.t_norm(xt)))
        xs = xt.reshape(n, h * w, t, c).transpose(1, 2).reshape(n * t, h * w, c)  # [N*T, H*W, C]
        residual = x.reshape(n, c, t, h * w).permute(0, 2, 3, 1).reshape(n * t, h * w, c)  # [N*T, H*W, C]
        tokens = (residual + self.drop_path(self.attn(self.norm1(xs)))).reshape(n, t * h * w, c)  # [N, THW, C]
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return tokens.transpose(1, 2).reshape(n, c, t, h, w)


class UniFormer(nn.Module):
    """UniFormer clip recognizer: ``[N, T, 3, H, W]`` clips to ``[N, num_classes]`` logits.

    Args:
        num_classes: classifier size.
        depth: blocks per stage.
        embed_dim: channels per stage.
        head_dim: channels per attention head in the global stages.
        mlp_ratio: FFN hidden width as a multiple of the stage width.
        qkv_bias: bias in the attention's qkv projection.
        drop_path_rate: stochastic depth, rising linearly from 0 at the first block to this at the last.
        attention: ``"joint"`` space-time attention in the global stages (the published models) or ``"split"``
            (temporal then spatial attention).
        use_checkpoint: recompute each block in the backward pass instead of storing its activations
            (``torch.utils.checkpoint``; training only) to fit longer clips or larger batches in memory.
    """

    head_prefix = "head."
    online = False

    def __init__(self, num_classes: int, *, depth: tuple[int, ...] = (3, 4, 8, 3),
                 embed_dim: tuple[int, ...] = (64, 128, 320, 512), head_dim: int = 64, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, attention: str = "joint",
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if len(depth) != 4 or len(embed_dim) != 4:
            raise ValueError(f"depth and embed_dim need 4 stages, got {tuple(depth)} and {tuple(embed_dim)}")
        if any(d % head_dim for d in embed_dim[2:]):
            raise ValueError(f"the global stages' widths {tuple(embed_dim[2:])} must be multiples of "
                             f"head_dim={head_dim}")
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.patch_embed1 = PatchEmbed(3, embed_dim[0], (3, 4, 4), (2, 4, 4), (1, 0, 0))
        for i in range(1, 4):
            self.add_module(f"patch_embed{i + 1}",
                            PatchEmbed(embed_dim[i - 1], embed_dim[i], (1, 2, 2), (1, 2, 2), (0, 0, 0)))
        total = sum(depth)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        global_block = SABlock if attention == "joint" else SplitSABlock
        start = 0
        for i, (n, dim) in enumerate(zip(depth, embed_dim)):
            if i < 2:
                blocks = [CBlock(dim, mlp_ratio, rates[start + j]) for j in range(n)]
            else:
                blocks = [global_block(dim, dim // head_dim, mlp_ratio, qkv_bias, rates[start + j])
                          for j in range(n)]
            self.add_module(f"blocks{i + 1}", nn.ModuleList(blocks))
            start += n
        self.norm = nn.BatchNorm3d(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes)
        self.num_features = embed_dim[-1]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, SplitSABlock):
                # Zero qkv makes v zero, so the temporal attention adds nothing until it has learned to; the
                # official code fills proj with ones so that gradients reach v from the first step.
                nn.init.zeros_(m.t_attn.qkv.weight)
                if m.t_attn.qkv.bias is not None:
                    nn.init.zeros_(m.t_attn.qkv.bias)
                nn.init.ones_(m.t_attn.proj.weight)
                nn.init.zeros_(m.t_attn.proj.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, 3, T, H, W] -> [N, C, T/2, H/32, W/32]`` (before the final BN)."""
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"blocks{i}"):
                if self.use_checkpoint and self.training and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return x

    def forward(self, clip: Tensor) -> Tensor:
        """Classify clips ``[N, T, 3, H, W]``."""
        if not torch.jit.is_tracing() and (clip.dim() != 5 or clip.shape[2] != 3):
            raise ValueError(f"clip must be [N, T, 3, H, W], got shape {tuple(clip.shape)}")
        x = self.forward_features(clip.permute(0, 2, 1, 3, 4))  # [N, 3, T, H, W] in
        x = self.norm(x).flatten(2).mean(-1)  # [N, C]
        return self.head(x)

    def step(self, frame: Tensor, state: object = None) -> NoReturn:
        """Clip models have no one-frame step; the pipeline runs them on a rolling window of frames."""
        raise RuntimeError(f"{type(self).__name__} is a clip model and has no online form; run it on a window "
                           "of clip_len frames")

    def checkpoint_converters(self) -> dict:
        """``format -> (state_dict) -> state_dict`` for every foreign layout this model loads (table below)."""
        return {"mmaction2": convert_mmaction2, "uniformer": convert_official}


# -- checkpoint conversion ----------------------------------------------------------------------------------
#
#   format      source key                                   this package
#   uniformer   patch_embed{1..4}.*, blocks{1..4}.*,          the same (these names are the official ones)
#   (official)  norm.*, head.*
#   mmaction2   backbone.X (UniFormer v1 backbone)            X
#               cls_head.fc_cls.*                            head.*


def convert_official(state_dict: dict) -> dict:
    """The official Sense-X/UniFormer video checkpoints: already this package's names."""
    return dict(state_dict)


def convert_mmaction2(state_dict: dict) -> dict:
    """mmaction2 Recognizer3D checkpoints of UniFormer (v1): ``backbone.*`` and ``cls_head.fc_cls.*``."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            key = key.removeprefix("backbone.")
        elif key.startswith("cls_head.fc_cls."):
            key = "head." + key.removeprefix("cls_head.fc_cls.")
        out[key] = value  # anything else is left as is, so strict loading names it
    return out


# -- named configurations -----------------------------------------------------------------------------------
#
# Published parameter counts (mmaction2 configs/recognition/uniformer/README.md, K400 16x4x1): UniFormer-S
# 21.4M, UniFormer-B 49.8M. Data settings follow the official K400 16x4 configs and mmaction2's port of them:
# 16 frames every 4th, 224px centre crop of a 224px short side at test time, mean 0.45 / std 0.225 (the
# SlowFast defaults the official code trains with; mmaction2: mean 114.75, std 57.375 on 0-255 values).

_UNIFORMER_DATA = {"num_classes": 400, "mean": (0.45, 0.45, 0.45), "std": (0.225, 0.225, 0.225),
                   "input_size": 224, "resize_size": 224, "clip_len": 16, "num_segments": 16,
                   "frame_interval": 4}


def _uniformer(depth: tuple[int, int, int, int], drop_path_rate: float):
    def build(num_classes: int, depth: tuple[int, ...] = depth, embed_dim: tuple[int, ...] = (64, 128, 320, 512),
              head_dim: int = 64, mlp_ratio: float = 4.0, qkv_bias: bool = True,
              drop_path_rate: float = drop_path_rate, attention: str = "joint",
              use_checkpoint: bool = False) -> UniFormer:
        return UniFormer(num_classes, depth=tuple(depth), embed_dim=tuple(embed_dim), head_dim=head_dim,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
                         attention=attention, use_checkpoint=use_checkpoint)

    return build


register("uniformer_s", kind="clip", description="UniFormer-S, 16x4 clips at 224px (Kinetics-400 recipe)",
         **_UNIFORMER_DATA)(_uniformer((3, 4, 8, 3), 0.1))
register("uniformer_b", kind="clip", description="UniFormer-B, 16x4 clips at 224px (Kinetics-400 recipe)",
         **_UNIFORMER_DATA)(_uniformer((5, 8, 20, 7), 0.3))
