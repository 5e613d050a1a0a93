"""Image bytes -> model input. ONE code path, used by training and by labelling.

Contract (helpers implement; signatures are fixed):

    @dataclass(frozen=True)
    class InputSpec:
        size: int = 48                 # square side in pixels
        channels: int = 1              # 1 = grayscale, 3 = RGB
        mean: tuple[float, ...] = (0.5,)
        std: tuple[float, ...] = (0.5,)
        def to_dict(self) -> dict; @classmethod from_dict(cls, d) -> InputSpec

    class ImageDecodeError(ValueError):
        reason: str    # short machine-friendly reason, e.g. "empty", "not_an_image", "truncated",
                       # "decompression_bomb", "unsupported_mode", "too_small"
        str(e) is a one-line human message.

    decode_image(data: bytes, spec: InputSpec) -> tuple[np.ndarray, int, int]
        -> (pixels uint8 array shaped (C, size, size), original_width, original_height)
    normalize(batch: np.ndarray | torch.Tensor, spec) -> torch.Tensor
        uint8 (N, C, H, W) or (C, H, W) -> float32 normalised tensor (same leading shape)
    preprocess(data: bytes, spec) -> torch.Tensor   # normalize(decode_image(...)[0])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: a square ``size`` x ``size`` image with ``channels`` channels
    (1 = grayscale, 3 = RGB), normalised per channel as ``(x / 255 - mean) / std``."""

    size: int = 48
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(
            size=int(d["size"]),
            channels=int(d["channels"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )


class ImageDecodeError(ValueError):
    """An image that cannot be turned into model input. ``reason`` is a short code for error rows
    (e.g. "empty", "not_an_image", "truncated", "decompression_bomb", "unsupported_mode")."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
