"""Image models: the torchvision ResNet / ResNeXt family in Flax Linen (see tagjax.models.resnext).

Usage::

    model = models.create(config.model, num_classes)
    variables = model.init(rng, images, train=False)            # {"params", "batch_stats"}
    logits = model.apply(variables, images, train=False)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    feats = model.apply(variables, images, method=model.features)  # pooled float32 [B, feature_dim]
"""

from tagjax.models.resnext import (
    ARCHS,
    GROUPED_CONV_MODES,
    ArchSpec,
    BatchNorm,
    Bottleneck,
    Conv,
    ResNet,
    create,
    flops_per_image,
    get_spec,
    macs_per_image,
)

__all__ = [
    "ARCHS",
    "GROUPED_CONV_MODES",
    "ArchSpec",
    "BatchNorm",
    "Bottleneck",
    "Conv",
    "ResNet",
    "create",
    "flops_per_image",
    "get_spec",
    "macs_per_image",
]
