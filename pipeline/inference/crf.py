"""A fully connected CRF approximated by mean-field inference over a local window (ConvCRF:
Teichmann & Cipolla, 2018), in torch so it runs wherever the models run.

Energy: the unary term -log p(class) of the fused probabilities plus Potts pairwise terms
between pixels i, j of one window: w_spatial * exp(-|p_i - p_j|^2 / 2 sigma_xy^2) and
w_bilateral * exp(-|p_i - p_j|^2 / 2 sigma_xy_bilateral^2 - |I_i - I_j|^2 / 2 sigma_rgb^2).
Each iteration: Q <- softmax(log p + sum_j k(i, j) Q_j).  A confident map is left as it is; an
isolated pixel that disagrees with similar-looking neighbours is smoothed away.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-6
CLASS_CHUNK = 8
ACTIVE_MIN = 1e-3  # a class below this probability at every pixel takes no part in message passing
WORK_SIDE = 256  # the CRF runs at most this many pixels on the long side (memory and time bound)


@dataclass(frozen=True)
class CRFParams:
    window: int = 7  # pixels (odd)
    iterations: int = 5
    w_spatial: float = 1.0
    sigma_xy: float = 2.0
    w_bilateral: float = 3.0
    sigma_xy_bilateral: float = 5.0
    sigma_rgb: float = 20.0  # 0..255 colour units

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def _window_kernel(image: torch.Tensor, p: CRFParams) -> torch.Tensor:
    """(s^2, H*W) pairwise weights of every pixel with each offset of its window (0 for itself)."""
    _, h, w = image.shape
    r = p.window // 2
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    dist2 = (dy**2 + dx**2).float().reshape(-1, 1)
    patches = F.unfold(image[None], p.window, padding=r)[0].reshape(3, p.window**2, h * w)
    colour2 = ((patches - image.reshape(3, 1, h * w)) ** 2).sum(0)
    kernel = p.w_spatial * torch.exp(-dist2 / (2 * p.sigma_xy**2))
    kernel = kernel + p.w_bilateral * torch.exp(-dist2 / (2 * p.sigma_xy_bilateral**2) - colour2 / (2 * p.sigma_rgb**2))
    kernel[(p.window**2) // 2] = 0.0  # no message from a pixel to itself
    valid = F.unfold(torch.ones(1, 1, h, w), p.window, padding=r)[0]  # 0 where the window leaves the image
    return kernel * valid


def dense_crf(probs: np.ndarray | torch.Tensor, image: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refined probabilities (K x H x W float32) of ``probs`` for ``image`` (H x W x 3 uint8)."""
    q = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    k, h, w = q.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and probabilities {(h, w)} differ in size")
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    kernel = _window_kernel(img, params)  # (s^2, H*W)
    unary = torch.log(q.clamp_min(EPS))
    r = params.window // 2
    # with many classes most are nowhere likely (a street photo shows a few of 58): their messages,
    # at most ACTIVE_MIN x the window's weight, are left out, which makes the CRF several times faster
    active = torch.nonzero(q.reshape(k, -1).amax(1) >= ACTIVE_MIN).flatten()
    message = torch.zeros_like(q)
    for _ in range(params.iterations):
        for c0 in range(0, len(active), CLASS_CHUNK):  # bounded memory: a few classes' windows at a time
            idx = active[c0 : c0 + CLASS_CHUNK]
            part = q[idx]
            neighbours = F.unfold(part[None], params.window, padding=r)[0].reshape(len(idx), params.window**2, h * w)
            message[idx] = (neighbours * kernel[None]).sum(1).reshape(len(idx), h, w)
        q = torch.softmax(unary + message, dim=0)
    return q.numpy()


def crf_labels(probs: np.ndarray, image: np.ndarray, params: CRFParams, work_side: int = WORK_SIDE) -> np.ndarray:
    """Class map at the probabilities' size, the CRF run at most ``work_side`` pixels on the long side
    (probabilities and image resized down, refined probabilities resized back bilinearly)."""
    import cv2

    k, h, w = probs.shape
    scale = min(1.0, work_side / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = (
        torch.nn.functional.interpolate(torch.as_tensor(probs)[None], size=size, mode="bilinear", align_corners=False)[
            0
        ].numpy()
        if scale < 1
        else probs
    )
    img = cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA) if image.shape[:2] != size else image
    refined = torch.from_numpy(dense_crf(small, img, params))
    if scale < 1:
        refined = torch.nn.functional.interpolate(refined[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return refined.argmax(0).numpy()
