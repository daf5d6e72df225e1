"""Optical flow for the flow modality kind: TV-L1 computed here, quantised and stored as
grayscale JPEGs the way the field's released flow is.

Balanced-multimodal work on UCF-101 (BalanceBenchmark, DI-MML, OPM) reads Feichtenhofer's
twostreamfusion release: TV-L1 flow (Zach, Pock & Bischof, DAGM 2007) computed with
OpenCV's DualTVL1 at its defaults, each of u and v clipped to +-20 px and mapped linearly to
0..255 (yjxiong/dense_flow ``convertFlowToImage``: ``round(255 (v - lo) / (hi - lo))``),
stored as JPEG ``frame%06d.jpg``. None of those repositories computes flow, and OpenCV's
DualTVL1 needs ``opencv-contrib``; so ccat computes TV-L1 itself, in torch, with the
numerical scheme of Sanchez, Meinhardt-Perez & Facciolo, "TV-L1 Optical Flow Estimation",
IPOL 2013 (their Algorithm 1 and equations (17)-(20)), at OpenCV's default parameters. It is
the same model and solver as OpenCV's, not OpenCV's bytes: the pyramid (bilinear, no
pre-smoothing, as OpenCV) and the warp (bilinear here, bicubic there) differ in rounding.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FLOW_BOUND = 20.0  # px; dense_flow's and the twostreamfusion release's clip
JPEG_QUALITY = 95  # dense_flow writes with OpenCV's default imencode quality, 95


@dataclass(frozen=True)
class TVL1Params:
    """OpenCV DualTVL1's defaults (and IPOL 2013's recommended values)."""

    tau: float = 0.25  # time step of the dual update
    lam: float = 0.15  # data-term weight (lambda), for intensities in 0..255
    theta: float = 0.3  # coupling of u and v
    scales: int = 5
    warps: int = 5
    epsilon: float = 0.01  # stop the inner loop when the mean squared update is below eps^2
    iterations: int = 300  # inner iterations at most, per warp
    zoom: float = 0.5  # scale step of the pyramid

    def manifest_entry(self) -> dict[str, Any]:
        return {"algorithm": "tvl1", **asdict(self),
                "scheme": "Sanchez et al. IPOL 2013, Zach et al. 2007"}


def _gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences, 0 on the last column / row (IPOL 2013, eq. (19))."""
    gx, gy = torch.zeros_like(x), torch.zeros_like(x)
    gx[:, :-1] = x[:, 1:] - x[:, :-1]
    gy[:-1, :] = x[1:, :] - x[:-1, :]
    return gx, gy


def _divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Backward differences, the adjoint of :func:`_gradient` (IPOL 2013, eq. (20))."""
    div = torch.zeros_like(px)
    div[:, 0] = px[:, 0]
    div[:, 1:-1] = px[:, 1:-1] - px[:, :-2]
    div[:, -1] = -px[:, -2]
    div[0, :] += py[0, :]
    div[1:-1, :] += py[1:-1, :] - py[:-2, :]
    div[-1, :] += -py[-2, :]
    return div


def _centered(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred differences with replicated borders: the image gradient of the data term."""
    padded = F.pad(x[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    return (padded[1:-1, 2:] - padded[1:-1, :-2]) / 2, (padded[2:, 1:-1] - padded[:-2, 1:-1]) / 2


def _warp(x: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """``x`` sampled at (col + u1, row + u2), bilinear, borders replicated."""
    h, w = x.shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype),
                                indexing="ij")
    gx = 2 * (cols + u1) / max(w - 1, 1) - 1
    gy = 2 * (rows + u2) / max(h - 1, 1) - 1
    grid = torch.stack([gx, gy], -1)[None]
    return F.grid_sample(x[None, None], grid, mode="bilinear", padding_mode="border",
                         align_corners=True)[0, 0]


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(x[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def tvl1(i0: np.ndarray, i1: np.ndarray, params: TVL1Params = TVL1Params()) -> np.ndarray:
    """The TV-L1 flow (u, v) in px from grayscale ``i0`` to ``i1`` (equal shapes, values in
    0..255): float32 [2, H, W], ``i0(x) ~ i1(x + flow(x))``."""
    if i0.shape != i1.shape or i0.ndim != 2:
        raise ValueError(f"tvl1 needs two equal 2-d images, got {i0.shape} and {i1.shape}")
    pyramid = [(torch.from_numpy(np.asarray(i0, np.float32)),
                torch.from_numpy(np.asarray(i1, np.float32)))]
    for _ in range(1, params.scales):
        h, w = pyramid[-1][0].shape
        nh, nw = round(h * params.zoom), round(w * params.zoom)
        if min(nh, nw) < 16:  # coarser than this carries no motion worth warping
            break
        pyramid.append(tuple(_resize(x, nh, nw) for x in pyramid[-1]))
    h, w = pyramid[-1][0].shape
    u1, u2 = torch.zeros(h, w), torch.zeros(h, w)
    for level in reversed(range(len(pyramid))):
        a, b = pyramid[level]
        if u1.shape != a.shape:  # zoom the coarser flow up to this scale
            sy, sx = a.shape[0] / u1.shape[0], a.shape[1] / u1.shape[1]
            u1, u2 = _resize(u1, *a.shape) * sx, _resize(u2, *a.shape) * sy
        u1, u2 = _solve(a, b, u1, u2, params)
    return torch.stack([u1, u2]).numpy()


def _solve(i0: torch.Tensor, i1: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor,
           params: TVL1Params) -> tuple[torch.Tensor, torch.Tensor]:
    """The warps and primal-dual iterations at one scale (IPOL 2013, Algorithm 1)."""
    l_t, taut = params.lam * params.theta, params.tau / params.theta
    p11, p12, p21, p22 = (torch.zeros_like(u1) for _ in range(4))
    i1x, i1y = _centered(i1)
    stop = params.epsilon ** 2 * u1.numel()
    for _ in range(params.warps):
        i1w, i1wx, i1wy = _warp(i1, u1, u2), _warp(i1x, u1, u2), _warp(i1y, u1, u2)
        grad = (i1wx ** 2 + i1wy ** 2).clamp_min(1e-12)
        rho_c = i1w - i1wx * u1 - i1wy * u2 - i0
        for _ in range(params.iterations):
            rho = rho_c + i1wx * u1 + i1wy * u2
            # thresholding step, eq. (17): the three cases of rho against lambda theta |grad I1|
            step = torch.where(rho < -l_t * grad, l_t, torch.where(rho > l_t * grad, -l_t,
                                                                   -rho / grad))
            v1, v2 = u1 + step * i1wx, u2 + step * i1wy
            new1 = v1 + params.theta * _divergence(p11, p12)
            new2 = v2 + params.theta * _divergence(p21, p22)
            error = float(((new1 - u1) ** 2 + (new2 - u2) ** 2).sum())
            u1, u2 = new1, new2
            # dual update, eq. (18)
            for (px, py), u in (((p11, p12), u1), ((p21, p22), u2)):
                gx, gy = _gradient(u)
                norm = 1 + taut * torch.sqrt(gx ** 2 + gy ** 2)
                px.add_(taut * gx).div_(norm)
                py.add_(taut * gy).div_(norm)
            if error < stop:
                break
    return u1, u2


def quantise(flow: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """float flow in px -> uint8, +-bound mapped linearly onto 0..255 and clipped (dense_flow's
    ``CAST``: ``round(255 (v + bound) / (2 bound))``)."""
    scaled = np.rint(255.0 * (np.asarray(flow, np.float64) + bound) / (2 * bound))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def encode_plane(plane: np.ndarray, size: int) -> bytes:
    """A uint8 flow plane as a size x size grayscale JPEG (bilinear resize of the quantised
    plane, as a loader resizes the released JPEGs)."""
    img = Image.fromarray(plane, mode="L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
