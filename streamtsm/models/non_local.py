"""Non-local blocks (Wang, Girshick, Gupta and He, "Non-local Neural Networks", CVPR 2018) and NL-TSM, a TSM
ResNet with 3D non-local blocks after some of its residual blocks (the NL-TSM of the TSM paper and of mmaction2).

A non-local block lets every position attend to every other position of the feature map (over time and space
in 3D), then adds the result back through a projection W that starts at zero, so a fresh block is the identity::

    x ─┬──────────────────────────────────────────────────────────────────────┐
       ├─► theta (1x1) ──────────────────────┐                                │
       ├─► phi (1x1) ─► [max-pool] ─► f(theta_i, phi_j) / C(x) ─┐             │
       └─► g (1x1) ───► [max-pool] ─────────────────────────── Σ_j ─► W ─► BN ─(+)─► z

    y_i = Σ_j f(x_i, x_j) g(x_j) / C(x),   z = x + BN(W y)

The pairwise function f and its normalization C(x), over M key positions (after sub-sampling):

    mode                 f(x_i, x_j) / C(x)
    embedded_gaussian    softmax_j(theta_i . phi_j)            (. / sqrt(d) with use_scale)
    gaussian             softmax_j(x_i . x_j)                  (no theta / phi; sub-sampling pools x for phi)
    dot_product          theta_i . phi_j / M
    concatenation        ReLU(w . [theta_i, phi_j]) / M

Sub-sampling max-pools phi and g by 2 in every spatial dimension (never in time), which cuts the pairwise
matrix by 4, as in the paper.

NL-TSM reshapes the ``[N*T, C, H, W]`` activations of a residual block to ``[N, C, T, H, W]`` so a 3D non-local
block attends across the whole clip. It therefore has no online form.

The module is named ``non_local`` because ``nonlocal`` is a Python keyword.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register
from .resnet import ResNet, mmaction2_key
from .shift import ShiftableBlock
from .tsm import TSM, convert_mit_han_lab, make_mmaction2_converter

NON_LOCAL_MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# Spatial sub-sampling only: 3D blocks keep every frame.
_POOL = {1: lambda: nn.MaxPool1d(2), 2: lambda: nn.MaxPool2d(2), 3: lambda: nn.MaxPool3d((1, 2, 2))}


class NonLocal(nn.Module):
    """A non-local block over a ``[N, C, *S]`` feature map, S of 1, 2 or 3 dimensions; output has the input's shape.

    Args:
        in_channels: C.
        dim: number of dimensions of S (1, 2 or 3; 3 is ``T, H, W``).
        mode: the pairwise function, one of :data:`NON_LOCAL_MODES`.
        reduction: theta, phi and g embed to ``in_channels // reduction`` channels.
        sub_sample: max-pool phi and g by 2 spatially.
        use_bn: follow W with a batch norm (then W has no bias, and the BN starts at zero); without it W starts at
            zero.
        use_scale: divide the embedded Gaussian's logits by sqrt(embedding channels) (embedded Gaussian only, as in
            mmcv; off in the paper and in the published NL-TSM checkpoints).
    """

    def __init__(self, in_channels: int, *, dim: int = 3, mode: str = "embedded_gaussian", reduction: int = 2,
                 sub_sample: bool = False, use_bn: bool = True, use_scale: bool = False) -> None:
        super().__init__()
        if mode not in NON_LOCAL_MODES:
            raise ValueError(f"non-local mode must be one of {NON_LOCAL_MODES}, got {mode!r}")
        if dim not in _CONV:
            raise ValueError(f"non-local dim must be 1, 2 or 3, got {dim}")
        inter = max(in_channels // reduction, 1)
        conv = _CONV[dim]
        self.in_channels, self.inter_channels, self.dim = in_channels, inter, dim
        self.mode, self.sub_sample, self.use_scale = mode, sub_sample, use_scale
        self.g = conv(in_channels, inter, 1)
        if mode != "gaussian":
            self.theta = conv(in_channels, inter, 1)
            self.phi = conv(in_channels, inter, 1)
        if mode == "concatenation":
            # w of f = ReLU(w . [theta_i, phi_j]), kept as mmcv's 1x1 Conv2d over the concatenated pair.
            self.concat_project = nn.Conv2d(2 * inter, 1, 1, bias=False)
        self.pool = _POOL[dim]() if sub_sample else None
        self.conv_out = conv(inter, in_channels, 1, bias=not use_bn)
        self.bn_out = _BN[dim](in_channels) if use_bn else None
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode}, sub_sample={self.sub_sample}, use_scale={self.use_scale}"

    def reset_parameters(self) -> None:
        """Embeddings ~ N(0, 0.01) as in mmcv; W (or its BN) zero, so a fresh block is the identity."""
        for m in (self.g, getattr(self, "theta", None), getattr(self, "phi", None)):
            if m is not None:
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        if self.mode == "concatenation":
            nn.init.kaiming_normal_(self.concat_project.weight, nonlinearity="relu")
        last = self.bn_out if self.bn_out is not None else self.conv_out
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def _sub(self, x: Tensor) -> Tensor:
        return x if self.pool is None else self.pool(x)

    def attention(self, x: Tensor) -> Tensor:
        """The normalized pairwise weights ``f(x_i, x_j) / C(x)``: ``[N, P, M]`` for P positions, M key positions."""
        if self.mode == "gaussian":
            theta = x.flatten(2).transpose(1, 2)  # [N, P, C]
            phi = self._sub(x).flatten(2)  # [N, C, M]
        else:
            theta = self.theta(x).flatten(2).transpose(1, 2)  # [N, P, C']
            phi = self._sub(self.phi(x)).flatten(2)  # [N, C', M]
        if self.mode == "concatenation":
            w = self.concat_project.weight.view(2, self.inter_channels)  # the theta half, then the phi half
            a = theta @ w[0].view(-1, 1)  # [N, P, 1]
            b = w[1].view(1, -1) @ phi  # [N, 1, M]
            # w . [theta_i, phi_j] = a_i + b_j, without materializing the P x M x 2C' pairs.
            return F.relu(a + b) / phi.shape[-1]
        logits = theta @ phi  # [N, P, M]
        if self.mode == "dot_product":
            return logits / phi.shape[-1]
        if self.mode == "embedded_gaussian" and self.use_scale:
            logits = logits / self.inter_channels**0.5
        return logits.softmax(-1)

    def forward(self, x: Tensor) -> Tensor:
        g = self._sub(self.g(x)).flatten(2).transpose(1, 2)  # [N, M, C']
        y = self.attention(x) @ g  # [N, P, C']
        y = y.transpose(1, 2).reshape(x.shape[0], self.inter_channels, *x.shape[2:])  # [N, C', *S]
        z = self.conv_out(y)
        if self.bn_out is not None:
            z = self.bn_out(z)
        return x + z


class NonLocalWrapper(nn.Module):
    """A residual block of a 2D backbone followed by a 3D non-local block over each clip.

    Args:
        block: the residual block (kept as ``.block``, so its parameter names only gain that prefix).
        num_segments: frames per clip T at this stage.
        **non_local: arguments of :class:`NonLocal`.
    """

    def __init__(self, block: ShiftableBlock, num_segments: int, **non_local) -> None:
        super().__init__()
        self.block = block
        self.num_segments = num_segments
        self.non_local = NonLocal(_out_channels(block), dim=3, **non_local)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(x)  # [N*T, C, H, W]
        nt, c, h, w = x.shape
        t = self.num_segments
        if nt % t:
            raise ValueError(f"clip input must have N*T rows with T={t}, got {nt} rows")
        # Time becomes a dimension of the 3D block: [N, C, T, H, W].
        x = x.view(nt // t, t, c, h, w).transpose(1, 2)
        x = self.non_local(x)
        return x.transpose(1, 2).reshape(nt, c, h, w)  # back to [N*T, C, H, W]


def _out_channels(block: nn.Module) -> int:
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2  # Bottleneck, BasicBlock
    return last_bn.num_features


NonLocalPattern = tuple[tuple[int, ...], ...]

# mmaction2's and the TSM paper's NL-TSM R50: after blocks 0 and 2 of layer2 and 0, 2 and 4 of layer3.
NL_TSM_R50 = ((0, 0, 0), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 0, 0))


def _normalize_pattern(pattern: Sequence[Sequence[int]], backbone: ResNet) -> NonLocalPattern:
    layers = (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
    pattern = tuple(tuple(int(bool(v)) for v in stage) for stage in pattern)  # a config read from JSON has lists
    if len(pattern) != 4 or any(len(p) != len(layer) for p, layer in zip(pattern, layers)):
        raise ValueError(f"non_local must give one flag per residual block of each stage, "
                         f"{[len(layer) for layer in layers]} blocks, got {pattern}")
    return pattern


def insert_non_local(backbone: ResNet, num_segments: int, pattern: Sequence[Sequence[int]] = NL_TSM_R50,
                     **non_local) -> list[NonLocalWrapper]:
    """Wrap the residual blocks flagged in ``pattern`` (one tuple of 0/1 per stage) with a 3D non-local block.

    Call it after the shifts are inserted (the wrapper keeps the shifted block). Under temporal pooling the
    stages after layer1 see T/2 frames.

    Returns:
        The wrappers, in network order.
    """
    pattern = _normalize_pattern(pattern, backbone)
    wrappers = []
    for stage, flags in enumerate(pattern):
        layer = getattr(backbone, f"layer{stage + 1}")
        segments = num_segments // 2 if backbone.temporal_pool_segments and stage > 0 else num_segments
        for i, flag in enumerate(flags):
            if flag:
                layer[i] = NonLocalWrapper(layer[i], segments, **non_local)
                wrappers.append(layer[i])
    return wrappers


class NonLocalTSM(TSM):
    """TSM on a ResNet with 3D non-local blocks after the residual blocks flagged in ``non_local``.

    Args:
        backbone: a :class:`ResNet`.
        num_classes: classifier size.
        non_local: one tuple of 0/1 flags per stage, one flag per residual block.
        non_local_mode: pairwise function of the blocks (:data:`NON_LOCAL_MODES`).
        sub_sample: max-pool phi and g spatially.
        use_scale: scale embedded Gaussian logits.
        **tsm: arguments of :class:`TSM` (num_segments, shift_div, shift_mode, shift_place, temporal_pool, dropout).
    """

    # The blocks attend over the whole clip, future frames included.
    online = False

    def __init__(self, backbone: ResNet, num_classes: int, *, non_local: Sequence[Sequence[int]] = NL_TSM_R50,
                 non_local_mode: str = "embedded_gaussian", sub_sample: bool = True, use_scale: bool = False,
                 **tsm) -> None:
        if not isinstance(backbone, ResNet):
            raise ValueError(f"non-local blocks are inserted into ResNet backbones, got {type(backbone).__name__}")
        super().__init__(backbone, num_classes, **tsm)
        self.non_local_blocks = insert_non_local(backbone, self.num_segments, non_local, mode=non_local_mode,
                                                 sub_sample=sub_sample, use_scale=use_scale)

    def step(self, frame: Tensor, state=None):
        raise RuntimeError(f"{type(self).__name__} attends over whole clips (non-local blocks) and has no online "
                           "form; run it on a window of num_segments frames")

    def checkpoint_converters(self) -> dict:
        return {"mit-han-lab": convert_mit_han_lab_nl, "mmaction2": convert_mmaction2_nl}


# -- checkpoint conversion ----------------------------------------------------------------------------------
#
#   format        source key (under backbone.layerK.i.)                  this package (backbone.layerK.i.)
#   mmaction2     block.<ResNet ConvModule names, .net shifts>            block.<resnet rule>
#   (NL3DWrapper) non_local_block.{g,phi}[.0].conv.*  ([.0] = sub-sampled) non_local.{g,phi}.*
#                 non_local_block.theta.conv.*                            non_local.theta.*
#                 non_local_block.conv_out.conv.* / conv_out.bn.*         non_local.conv_out.* / non_local.bn_out.*
#                 non_local_block.concat_project.conv.*                   non_local.concat_project.*
#                 (cls_head.fc_cls.* -> fc.*, as for TSM)
#   mit-han-lab   block.* (.net shifts)                                   block.*
#   (NL3DWrapper, nl.{g,phi}[.0].*, nl.theta.*                            non_local.{g,phi,theta}.*
#    base_model.) nl.W.0.weight / nl.W.1.*  (W = conv, BN)                non_local.conv_out.weight / non_local.bn_out.*
#                 nl.W.0.bias: folded into bn_out.running_mean (BN(z + b) == BN'(z) with mean - b)
#                 nl.W.* (no BN)                                          non_local.conv_out.*
#                 (module.base_model. -> backbone., new_fc.* -> fc.*, as for TSM)

_MMA_NL = re.compile(r"^(.*\.)non_local_block\.(?:(g|phi)(?:\.0)?|(theta)|conv_out|concat_project)\.(conv|bn)\.(.+)$")
_MIT_NL = re.compile(r"^(.*\.)nl\.(?:(g|phi)(?:\.0)?|(theta)|(W)(?:\.([01]))?)\.(.+)$")


def _mmaction2_nl_key(key: str) -> str:
    m = _MMA_NL.match(key)
    if not m:
        return mmaction2_key(key)
    prefix, g_phi, theta, kind, rest = m.groups()
    if g_phi or theta:
        return f"{prefix}non_local.{g_phi or theta}.{rest}"
    if ".concat_project." in key:
        return f"{prefix}non_local.concat_project.{rest}"
    return f"{prefix}non_local.{'conv_out' if kind == 'conv' else 'bn_out'}.{rest}"


# mmaction2 NL-TSM (ResNetTSM with ``non_local``, Recognizer2D) checkpoints to this package's layout.
convert_mmaction2_nl = make_mmaction2_converter(_mmaction2_nl_key)


def convert_mit_han_lab_nl(state_dict: dict) -> dict:
    """Official NL-TSM checkpoints (mit-han-lab TSN wrapper, ``ops/non_local.py``) to this package's layout."""
    out, w_bias = {}, {}
    for key, value in convert_mit_han_lab(state_dict).items():
        m = _MIT_NL.match(key)
        if not m:
            out[key] = value
            continue
        prefix, g_phi, theta, w, w_index, rest = m.groups()
        nl = f"{prefix}non_local."
        if g_phi or theta:
            out[f"{nl}{g_phi or theta}.{rest}"] = value
        elif w_index == "1":
            out[f"{nl}bn_out.{rest}"] = value
        elif w_index == "0" and rest == "bias":
            w_bias[nl] = value  # this package's W has no bias when a BN follows it
        else:
            out[f"{nl}conv_out.{rest}"] = value
    for nl, bias in w_bias.items():
        mean = out.get(f"{nl}bn_out.running_mean")
        if mean is None:
            out[f"{nl}conv_out.bias"] = bias  # no BN after W in the checkpoint: strict loading names it
        else:
            out[f"{nl}bn_out.running_mean"] = mean - bias
    return out


# -- named configurations -----------------------------------------------------------------------------------


def _tsm_r50_nl(num_classes: int, num_segments: int = 8, shift_div: int = 8, shift_mode: str = "bidirectional",
                shift_place: str = "blockres", temporal_pool: bool = False,
                non_local: Sequence[Sequence[int]] = NL_TSM_R50, non_local_mode: str = "embedded_gaussian",
                sub_sample: bool = True, use_scale: bool = False, dropout: float = 0.5,
                width: int = 64) -> NonLocalTSM:
    return NonLocalTSM(ResNet(50, width), num_classes, non_local=non_local, non_local_mode=non_local_mode,
                       sub_sample=sub_sample, use_scale=use_scale, num_segments=num_segments, shift_div=shift_div,
                       shift_mode=shift_mode, shift_place=shift_place, temporal_pool=temporal_pool, dropout=dropout)


# mmaction2's tsm_imagenet-pretrained-r50-nl-embedded-gaussian_8xb16-1x1x8-50e_kinetics400-rgb: embedded Gaussian,
# sub_sample=True, use_scale=False, BN3d after W; 8 segments. The official mit-han-lab release is the same block.
register("tsm_r50_nl", kind="clip", num_classes=400, num_segments=8, clip_len=8, frame_interval=8,
         description="offline NL-TSM, ResNet-50, bi-directional residual shift, 3D embedded-Gaussian non-local "
                     "blocks after layer2.{0,2} and layer3.{0,2,4}, 8 segments")(_tsm_r50_nl)
