"""The in-context network: a 2D U-Net of pairwise-conv-avg blocks (Neuralizer).

Czolbe & Dalca, "Neuralizer: General Neuroimage Analysis without Re-Training", CVPR 2023.
At every block the target stream ``r_x`` and each context pair's stream ``r_i`` (shared weights
across pairs) pass a 3x3 convolution; then ``p_i = concat(r_x, r_i)`` and

    r_x <- r_x + mean_i conv1x1_x(p_i)        r_i <- r_i + conv1x1_c(p_i)

so the output is invariant to the order of the context pairs and the cost is linear in their
number. UniverSeg's CrossBlock (Butoi et al., ICCV 2023) is the close cousin.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["PairwiseBlock", "InContextNet", "conv3x3_of_upsampled"]


class PairwiseBlock(nn.Module):
    """One pairwise-conv-avg block.

    ``forward(t, c)``: ``t`` target features ``(B, Ct, H, W)``, ``c`` context features
    ``(B, L, Cc, H, W)``; returns ``(B, F, H, W)`` and ``(B, L, F, H, W)``.
    """

    def __init__(self, cin_target: int, cin_context: int, features: int) -> None:
        super().__init__()
        self.conv_target = nn.Conv2d(cin_target, features, 3, padding=1)
        self.conv_context = nn.Conv2d(cin_context, features, 3, padding=1)
        self.mix_target = nn.Conv2d(2 * features, features, 1)
        self.mix_context = nn.Conv2d(2 * features, features, 1)

    def forward(self, t: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = c.shape[:2]
        rt = F.gelu(self.conv_target(t))
        rc = F.gelu(self.conv_context(c.flatten(0, 1)))
        return self._mix(rt, rc, b, n)

    def forward_up(self, t: torch.Tensor, st: torch.Tensor, c: torch.Tensor,
                   sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(cat([up2(t), st]), cat([up2(c), sc]))`` with ``up2`` the 2x nearest upsampling.

        The same sums without the upsampled copies: the 3x3 convolution of the concatenation is the
        convolution of each part, and that of an upsampled part is taken at its own resolution
        (:func:`conv3x3_of_upsampled`), which costs 4 taps per output pixel instead of 9.
        """
        b, n = c.shape[:2]
        cu = t.shape[1]
        wt, wc = self.conv_target.weight, self.conv_context.weight
        rt = F.gelu(conv3x3_of_upsampled(t, wt[:, :cu]) + F.conv2d(st, wt[:, cu:], self.conv_target.bias, padding=1))
        rc = F.gelu(conv3x3_of_upsampled(c.flatten(0, 1), wc[:, :cu])
                    + F.conv2d(sc.flatten(0, 1), wc[:, cu:], self.conv_context.bias, padding=1))
        return self._mix(rt, rc, b, n)

    def _mix(self, rt: torch.Tensor, rc: torch.Tensor, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        f, h, w = rt.shape[1:]
        # The 1x1 mixes of p_i = concat(r_x, r_i) are linear before the GELU: W p_i = W_x r_x + W_c r_i.
        # The target's part is computed once, not once per pair, and both mixes share one pass over
        # each stream; the same sums as convolving the concatenated pairs (no (B L, 2F, H, W) copy).
        wx = torch.cat([self.mix_target.weight[:, :f], self.mix_context.weight[:, :f]])
        wc = torch.cat([self.mix_target.weight[:, f:], self.mix_context.weight[:, f:]])
        bias = torch.cat([self.mix_target.bias, self.mix_context.bias])
        mixed = F.gelu(F.conv2d(rc, wc).view(b, n, 2 * f, h, w) + F.conv2d(rt, wx, bias).unsqueeze(1))
        rt = rt + mixed[:, :, :f].mean(dim=1)
        rc = rc.view(b, n, f, h, w) + mixed[:, :, f:]
        return rt, rc


# Which 3x3 taps (rows or columns: -1, 0, +1) of a convolution after 2x nearest upsampling land on
# each of the 2 low-resolution neighbours, for an output pixel of phase 0 (even) or 1 (odd):
# phase 0 reads low-res offsets (-1, 0) with taps (-1) and (0, +1); phase 1 reads (0, +1) with (-1, 0) and (+1).
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def conv3x3_of_upsampled(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)`` without the upsampling.

    Each of the 4 output phases (even/odd row, even/odd column) is a 2x2 convolution of ``x``
    with the 3x3 taps that fall on the same low-resolution pixel summed; the zero padding of the
    upsampled image is the zero padding of ``x``. ``x``: ``(N, Cin, h, w)``; ``weight``:
    ``(Cout, Cin, 3, 3)``; returns ``(N, Cout, 2h, 2w)``.
    """
    n, _, h, w = x.shape
    co = weight.shape[0]
    taps = _PHASE_TAPS.to(weight)
    k = torch.einsum("ark,bsl,oikl->aboirs", taps, taps, weight).reshape(4 * co, -1, 2, 2)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), k)  # (N, 4 Cout, h + 1, w + 1); phase (a, b) sits at offset (a, b)
    out = x.new_empty(n, co, h, 2, w, 2)
    for a in range(2):
        for b in range(2):
            p = 2 * a + b
            out[:, :, :, a, :, b] = y[:, p * co:(p + 1) * co, a:a + h, b:b + w]
    return out.view(n, co, 2 * h, 2 * w)


class InContextNet(nn.Module):
    """U-Net of :class:`PairwiseBlock` s mapping (target, context set) to the target's output.

    ``forward(target, context_in, context_out)``:

    - ``target``: ``(B, in_channels, H, W)``
    - ``context_in``: ``(B, L, in_channels, H, W)``, ``context_out``: ``(B, L, out_channels, H, W)``
      with any ``L >= 1`` (trained with 1-16, used with up to 32)
    - returns raw outputs ``(B, out_channels, H, W)``: logits for masks (apply a sigmoid), values
      for image tasks.

    H and W must be divisible by ``2 ** (len(features) - 1)``. Inputs with fewer channels are
    zero-padded by the caller (:func:`pad_channels`).
    """

    def __init__(self, in_channels: int = 2, out_channels: int = 1,
                 features: tuple[int, ...] | list[int] = (16, 32, 48, 64, 64)) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < 2:
            raise ValueError(f"InContextNet: expected at least 2 levels, got features {features}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.down = nn.ModuleList()
        ct, cc = in_channels, in_channels + out_channels
        for f in features:
            self.down.append(PairwiseBlock(ct, cc, f))
            ct = cc = f
        self.up = nn.ModuleList()
        for i in reversed(range(len(features) - 1)):
            cin = features[i + 1] + features[i]
            self.up.append(PairwiseBlock(cin, cin, features[i]))
        self.head = nn.Conv2d(features[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** (len(self.features) - 1)

    def forward(self, target: torch.Tensor, context_in: torch.Tensor, context_out: torch.Tensor) -> torch.Tensor:
        if target.ndim != 4 or context_in.ndim != 5 or context_out.ndim != 5:
            raise ValueError(
                "InContextNet: expected target (B, C, H, W) and context (B, L, C, H, W), got "
                f"{tuple(target.shape)}, {tuple(context_in.shape)}, {tuple(context_out.shape)}"
            )
        if any(s % self.multiple for s in target.shape[2:]):
            raise ValueError(f"InContextNet: spatial size {tuple(target.shape[2:])} must be divisible by {self.multiple}")
        t = target
        c = torch.cat([context_in, context_out], dim=2)
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                t = F.avg_pool2d(t, 2)
                b, n = c.shape[:2]
                c = F.avg_pool2d(c.flatten(0, 1), 2).view(b, n, *c.shape[2:3], *t.shape[2:])
            t, c = block(t, c)
            skips.append((t, c))
        for block, (st, sc) in zip(self.up, reversed(skips[:-1]), strict=False):
            # the skip is twice the size (H and W are multiples of 2 ** levels): the block folds the
            # 2x nearest upsampling and the concatenation with the skip into its convolutions
            t, c = block.forward_up(t, st, c, sc)
        return self.head(t)


def pad_channels(x: torch.Tensor, channels: int, dim: int) -> torch.Tensor:
    """Zero-pad dimension ``dim`` of ``x`` up to ``channels`` (Neuralizer pads inputs the same way)."""
    missing = channels - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)
