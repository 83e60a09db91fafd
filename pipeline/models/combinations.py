"""Architecture x modern-encoder combinations that a test builds, and the table of docs/training.md made from them.

Each row names the architecture and the encoder a user writes (``model=``, ``encoder=``) and
the same encoder family shrunk for a CPU test (``test_encoder`` + ``test_options``);
``tests/test_combinations.py`` builds every row at test scale (forward and backward on a
non-square input, layer-wise lr decay over its blocks), checks that the user's encoder name
resolves in the installed libraries, and that the table of ``docs/training.md`` is :func:`render_table`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Combination:
    model: str
    encoder: str  # what a user writes
    backbone: str  # the encoder family, in words
    test_encoder: str
    test_options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


_TINY_SWIN = {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}
_TINY_VIT = {"embed_dim": 32, "num_heads": 2}  # smp keeps "depth" for its own use

COMBINATIONS: tuple[Combination, ...] = (
    Combination("upernet", "tu-convnext_tiny", "ConvNeXt (timm)", "tu-test_convnext"),
    Combination("upernet", "tu-convnextv2_tiny", "ConvNeXt V2 (timm)", "tu-convnextv2_atto"),
    Combination(
        "upernet",
        "tu-swin_tiny_patch4_window7_224",
        "Swin (timm)",
        "tu-swin_tiny_patch4_window7_224",
        _TINY_SWIN,
        "any size, not only 224 (strict_img_size off)",
    ),
    Combination(
        "dpt",
        "tu-vit_small_patch16_dinov3",
        "DINOv3 ViT (timm)",
        "tu-vit_small_patch16_dinov3",
        _TINY_VIT,
        "16-pixel patches",
    ),
    Combination("dpt", "tu-vit_base_patch16_224.augreg_in21k", "ViT (timm)", "tu-test_vit", {}, "16-pixel patches"),
    Combination("hf_upernet", "beit-base", "BEiT (transformers, 4-scale FPN)", "test-beit"),
    Combination("hf_upernet", "dinov2-small", "DINOv2 (transformers)", "test-dinov2", {}, "14-pixel patches"),
    Combination("hf_upernet", "swin-tiny", "Swin (transformers)", "test-swin"),
    Combination("hf_upernet", "convnext-tiny", "ConvNeXt (transformers)", "test-convnext"),
    Combination("mask2former", "swin-tiny", "Swin (transformers)", "test-swin"),
    Combination("maskformer", "swin-tiny", "Swin (transformers)", "test-swin"),
    Combination("segformer", "mit_b2", "Mix Transformer (smp)", "mit_b0"),
    Combination("hf_segformer", "mit-b2", "Mix Transformer (transformers)", "mit-test"),
)


def render_table() -> str:
    """The table of supported combinations in ``docs/training.md`` (markdown)."""
    lines = [
        "| model | encoder | backbone | input size | note |",
        "|---|---|---|---|---|",
    ]
    from pipeline.models.registry import input_divisor

    for c in COMBINATIONS:
        divisor = input_divisor(c.model, c.test_encoder)
        lines.append(f"| `{c.model}` | `{c.encoder}` | {c.backbone} | multiple of {divisor} | {c.note} |")
    return "\n".join(lines)
