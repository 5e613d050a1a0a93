"""Model registry in the style of timm's ``create_model``.

Each model declares its default :class:`InputSpec` (size, channels, normalisation);
``create_model(name, num_classes, img_size=..., in_chans=..., **kwargs)`` builds it, passing
model options through as timm does, and :func:`resolve_input_spec` gives the spec that goes with
those options (stored in ``model.json`` so labelling feeds the model what it was trained on).

Registered models and their input specs:

=================  =============================  ==================================================
name               input spec                     what
=================  =============================  ==================================================
cnn                48x48 gray, mean/std 0.5       the classic Keras Sequential CNN (valid padding)
efficientnet_b2    96x96 RGB (gray replicated),   timm EfficientNet-B2 from scratch; 3 channels and
                   ImageNet mean/std              ImageNet normalisation so an ImageNet weights file
                                                  can initialise it; 96 px keeps it tractable on CPU
emonet             48x48 gray, mean/std 0.5       our CNN (BN, global pooling, dropout), see emonet.py
emonet_lite        48x48 gray, mean/std 0.5       emonet with one conv in each 48/24-px stage: 1.9x
                                                  faster on fp32 CPUs
emonet_s           48x48 gray, mean/std 0.5       emonet_lite at half the width (283k params): 3.6x
                                                  emonet_lite's training images/s (model alone,
                                                  one paired measurement)
=================  =============================  ==================================================

Decisions:
- Nothing is ever downloaded: timm models are built with ``pretrained=False``; the only way to
  start from trained weights is ``init_weights``, a local path or s3:// URI read through
  :mod:`emotion_core.storage`.
- Weights files are safetensors, or torch files loaded with ``weights_only=True`` (no arbitrary
  unpickling). A leading ``module.`` (DDP) or ``model.`` prefix on every key is stripped, and a
  ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped.
- Initialisation is strict except for the classifier head (the model's last ``nn.Linear``, or
  timm's ``get_classifier()``): when only its shape differs (another class count) it keeps its
  fresh initialisation. Anything else that differs is a one-line ``ValueError``.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from emotion_core.preprocess import InputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownModelError(ValueError):
    """A model name that is not registered; the message lists the registered names."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[..., nn.Module]  # fn(num_classes, *, img_size, in_chans, **kwargs)
    input_spec: InputSpec  # the default; img_size / in_chans override it
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def registrar(registry: dict, kind: str, name: str, make_entry: Callable):
    """A decorator that stores ``make_entry(fn)`` under ``name`` in ``registry`` (a name can be
    registered once); the shared shape of the model and face-detector registries."""

    def decorator(fn: Callable) -> Callable:
        if name in registry:
            raise ValueError(f"{kind} {name!r} is already registered")
        registry[name] = make_entry(fn)
        return fn

    return decorator


def register_model(name: str, input_spec: InputSpec, description: str):
    """Decorator registering ``fn(num_classes, *, img_size, in_chans, **kwargs) -> nn.Module``."""
    return registrar(_REGISTRY, "model", name, lambda fn: ModelEntry(name, fn, input_spec, description))


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())}"
        ) from None


def get_input_spec(name: str) -> InputSpec:
    """The model's default input spec."""
    return get_model_entry(name).input_spec


def resolve_input_spec(name: str, img_size: int | None = None, in_chans: int | None = None) -> InputSpec:
    """The model's input spec with ``img_size`` / ``in_chans`` overrides (timm's names). A
    channel change keeps the normalisation: one value replicated to 3 channels, or the mean of
    3 values for 1 channel."""
    spec = get_model_entry(name).input_spec
    size = spec.size if img_size is None else int(img_size)
    chans = spec.channels if in_chans is None else int(in_chans)
    if not 8 <= size <= 1024:
        raise ValueError(f"img_size must be between 8 and 1024, got {size}")
    if chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {chans}")
    mean, std = spec.mean, spec.std
    if chans != spec.channels:
        mean, std = ((mean[0],) * 3, (std[0],) * 3) if chans == 3 else ((sum(mean) / 3,), (sum(std) / 3,))
    return InputSpec(size=size, channels=chans, mean=mean, std=std)


def model_descriptions() -> dict[str, str]:
    """``{name: description}`` for help texts."""
    return {n: _REGISTRY[n].description for n in list_models()}


def create_model(
    name: str,
    num_classes: int,
    init_weights: str | None = None,
    *,
    img_size: int | None = None,
    in_chans: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model with ``num_classes`` outputs for ``img_size`` x ``img_size``
    inputs with ``in_chans`` channels (default: the model's input spec); other keyword arguments
    go to the model (e.g. ``dropout``, ``widths`` for emonet, any timm option for efficientnet_b2).
    Optionally initialised from a weights file (local path or s3:// URI). Never downloads."""
    entry = get_model_entry(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    spec = resolve_input_spec(name, img_size, in_chans)
    model = entry.fn(num_classes, img_size=spec.size, in_chans=spec.channels, **kwargs)
    if init_weights:
        _init_from_file(model, name, init_weights)
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters (trainable or not), as timm and papers count them."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Weights files


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a weights file (safetensors, or a torch file with ``weights_only=True``) from a local
    path or s3:// URI into a flat ``{name: tensor}`` dict with DDP/wrapper prefixes removed.
    Any problem -> ``ValueError`` naming the file."""
    from emotion_core import storage

    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as e:
        raise ValueError(f"cannot read weights file: {e}") from e
    try:
        if _looks_like_safetensors(data):
            from safetensors.torch import load

            sd = load(data)
        else:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # any decoder failure means a bad file
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"weights file {uri} is not a readable safetensors/torch state dict ({msg})") from e
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"weights file {uri} does not hold a state dict of tensors")
    return strip_prefixes(sd)


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a ``module.`` (DDP) or ``model.`` prefix shared by every key."""
    changed = True
    while sd and changed:
        changed = False
        for prefix in ("module.", "model."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _looks_like_safetensors(data: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with "{".
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def head_parameter_names(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head: timm's ``get_classifier()`` if present, else the
    last ``nn.Linear`` in the model."""
    head: nn.Module | None = None
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        return set()
    for prefix, module in model.named_modules():
        if module is head:
            return {f"{prefix}.{k}" if prefix else k for k in head.state_dict()}
    return set()


def state_dict_problem(
    model: nn.Module, sd: dict[str, torch.Tensor], skip: set[str] = frozenset()
) -> str | None:
    """First difference between ``model``'s state dict and ``sd`` as a short sentence, or None.
    Keys in ``skip`` are not compared."""
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    for k, v in own.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            return f"parameter {k!r} has shape {_shape(sd[k])} in the file but the model expects {_shape(v)}"
    missing = [k for k in own if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"parameter {missing[0]!r} is missing from the file{more}"
    unexpected = [k for k in sd if k not in own and k not in skip]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        return f"the file has parameter {unexpected[0]!r} that the model does not{more}"
    return None


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _init_from_file(model: nn.Module, name: str, uri: str) -> None:
    sd = read_state_dict(uri)
    own = model.state_dict()
    head = head_parameter_names(model)
    # The head keeps its fresh init when only its shape differs (another class count).
    skip = {k for k in head if k in sd and k in own and sd[k].shape != own[k].shape}
    problem = state_dict_problem(model, sd, skip)
    if problem:
        raise ValueError(
            f"init weights {uri} do not fit model {name!r}: {problem}; "
            f"pass a weights file saved from {name!r}"
        )
    merged = {k: (own[k] if k in skip else sd[k]) for k in own}
    model.load_state_dict(merged, strict=True)


# ---------------------------------------------------------------------------------------------
# Models

GRAY_48 = InputSpec(size=48, channels=1, mean=(0.5,), std=(0.5,))
RGB_96_IMAGENET = InputSpec(size=96, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_model(
    "cnn",
    GRAY_48,
    "Keras-style Sequential CNN: Conv16-Pool-Conv32-Pool-Conv16-Pool-Dense256-Dense(n), ReLU (~0.1M params)",
)
def cnn(num_classes: int, *, img_size: int = 48, in_chans: int = 1) -> nn.Module:
    """Keras defaults: 3x3 'valid' convolutions and 2x2 max pooling, so 48 -> 46 -> 23 -> 21 ->
    10 -> 8 -> 4 and the flattened feature map is 16 * 4 * 4 (at 256: 16 * 30 * 30)."""
    side = img_size
    for _ in range(3):
        side = (side - 2) // 2
    if side < 1:
        raise ValueError(f"cnn needs img_size >= 22, got {img_size}")
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_chans, 16, 3),
            relu1=nn.ReLU(inplace=True),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, 3),
            relu2=nn.ReLU(inplace=True),
            pool2=nn.MaxPool2d(2),
            conv3=nn.Conv2d(32, 16, 3),
            relu3=nn.ReLU(inplace=True),
            pool3=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(16 * side * side, 256),
            relu4=nn.ReLU(inplace=True),
            fc2=nn.Linear(256, num_classes),
        )
    )


@register_model(
    "efficientnet_b2",
    RGB_96_IMAGENET,
    "timm EfficientNet-B2 from scratch (~7.7M params), 96x96 RGB with ImageNet normalisation; "
    "--init-weights can start it from a local/S3 ImageNet weights file",
)
def efficientnet_b2(num_classes: int, *, img_size: int = 96, in_chans: int = 3, **kwargs) -> nn.Module:
    """``pretrained=False`` always: timm then makes no hub or network call. Dropout 0.3 before
    the classifier, as in the EfficientNet-B2 paper. The network is fully convolutional, so
    ``img_size`` needs no change to it."""
    import timm

    kwargs.setdefault("drop_rate", 0.3)
    return timm.create_model("efficientnet_b2", pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(
    "emonet",
    GRAY_48,
    "our CNN for 48x48 faces: 4 conv blocks with batch norm, global average pooling, dropout",
)
def emonet(num_classes: int, *, img_size: int = 48, in_chans: int = 1, **kwargs) -> nn.Module:
    """Global average pooling makes it input-size independent; ``kwargs``: widths, depths, dropout."""
    from emotion_core.emonet import EmoNet

    return EmoNet(num_classes, in_chans=in_chans, **kwargs)


@register_model(
    "emonet_lite",
    GRAY_48,
    "emonet with one conv (not two) in the 48- and 24-pixel stages: 1.13M params, 1.9x the training "
    "images/s of emonet on fp32-only CPUs",
)
def emonet_lite(num_classes: int, *, img_size: int = 48, in_chans: int = 1, **kwargs) -> nn.Module:
    """The full-resolution stages are memory-bound on CPU: each of their convs costs as many MACs
    as a deeper one but runs slower. One conv each keeps nearly all parameters (they sit in the
    12- and 6-pixel stages) and nearly doubles fp32 training throughput (169 -> 318 images/s,
    batch 128, 2 threads, channels_last; see the README's issue #13 section)."""
    kwargs.setdefault("depths", (1, 1, 2, 2))
    return emonet(num_classes, img_size=img_size, in_chans=in_chans, **kwargs)


@register_model(
    "emonet_s",
    GRAY_48,
    "emonet_lite at half the width (16/32/64/128 channels): 283k params, about 3.6x the fp32 training "
    "images/s of emonet_lite for the model alone (one paired measurement), so a CPU budget buys it "
    "several times the epochs",
)
def emonet_s(num_classes: int, *, img_size: int = 48, in_chans: int = 1, **kwargs) -> nn.Module:
    """Half of emonet_lite's channels in every stage, a quarter of its MACs. Its measured speeds
    and accuracies (model alone and inside ``jobs.train``, with their spread) are in the README's
    issue #13 section."""
    kwargs.setdefault("widths", (16, 32, 64, 128))
    return emonet_lite(num_classes, img_size=img_size, in_chans=in_chans, **kwargs)
