"""A model's configuration: what a runtime needs besides the weights. Torch-free, so the ONNX path can use it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_KINDS = ("online", "clip")


def window_span(clip_len: int, frame_interval: int) -> int:
    """Consecutive frames a window of ``clip_len`` frames taken ``frame_interval`` apart covers."""
    return (clip_len - 1) * frame_interval + 1


@dataclass
class ModelConfig:
    """What a runtime needs besides the weights: how to feed the model and how to read its output.

    Attributes:
        name: registry name.
        kind: ``"online"`` (one frame per step, explicit state) or ``"clip"`` (a window of frames per prediction).
        num_classes: size of the classifier.
        input_size: side of the square crop fed to the network.
        resize_size: short side the frame is resized to before the centre crop.
        mean, std: per-channel normalization of RGB values in [0, 1].
        num_segments: frames per clip in the offline (clip) form.
        clip_len, frame_interval: dense sampling of clip models (a window of ``clip_len`` frames taken every
            ``frame_interval`` frames).
        labels: class names, when known.
    """

    name: str
    kind: str
    num_classes: int
    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_segments: int = 8
    clip_len: int = 8
    frame_interval: int = 1
    labels: list[str] | None = None
    arch: dict = field(default_factory=dict)

    @property
    def window_span(self) -> int:
        """Consecutive frames one dense clip covers (see :func:`window_span`)."""
        return window_span(self.clip_len, self.frame_interval)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)
