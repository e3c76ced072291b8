"""Shared by the paper configs (ig940m_1k5_*.py, ig3b5_17k_*.py): the recipe plus a device layout.

Not a config itself. Each paper config calls :func:`paper_config` with its model and dataset and passes on
the ``arg`` of ``--config NAME:ARG``: the number of accelerators the run will use. From it the batch of
8,064 images is laid out so that it fits and keeps the paper's batch-norm semantics:

* per device: 8,064 / devices images per step (the device count must divide 8,064 = 2^7 x 3^2 x 7);
* ``grad_accum_steps``: the fewest micro-batches that bring the per-device micro-batch under the model's
  memory estimate (``MAX_MICRO_BATCH``: 224 px, bf16, an 80 GB GPU; estimates, not measurements: if a run
  runs out of memory, raise ``--config.train.grad_accum_steps``);
* ``bn_group_size``: 24, the paper's per-GPU batch [R], when it divides the per-device micro-batch; otherwise
  the largest divisor of it below 24, so no group spans two devices (e.g. 21 on 64 devices: 126 = 2 x 63).
  Statistics over 21 instead of 24 images are a small, stated departure; a device count that divides
  336 (8, 16, 48, 56, 112, 168, 336) keeps 24 exactly.

Without ``ARG`` the layout is the paper's own: 336 devices of 24 images, no accumulation.
"""

from __future__ import annotations

from tagjax.configs import default

PAPER_BATCH = 8064  # 336 GPUs x 24 images [V]
PAPER_BN_GROUP = 24  # [R] the per-GPU batch; BN statistics per GPU

# Images per device per micro-batch that fit in 80 GB at 224 px in bf16 (estimates; see module docstring).
MAX_MICRO_BATCH = {
    "resnext101_32x8d": 128,
    "resnext101_32x16d": 64,
    "resnext101_32x32d": 64,  # with remat
    "resnext101_32x48d": 32,  # with remat
}
REMAT = {"resnext101_32x32d", "resnext101_32x48d"}


def layout(devices: int, max_micro: int, batch: int = PAPER_BATCH, group: int = PAPER_BN_GROUP):
    """(grad_accum_steps, bn_group_size) for ``devices`` accelerators; see the module docstring."""
    if devices <= 0 or batch % devices:
        raise ValueError(
            f"{devices} devices do not divide the batch of {batch} images: use a divisor of {batch} "
            "(e.g. 8, 16, 32, 48, 56, 64, 112, 128, 336)"
        )
    per_device = batch // devices
    fits = [
        a for a in range(1, per_device + 1) if per_device % a == 0 and per_device // a <= max_micro
    ]
    accum = fits[0]  # the fewest: small micro-batches leave an accelerator idle
    micro = per_device // accum
    bn_group = max(g for g in range(1, group + 1) if micro % g == 0)
    return accum, bn_group


def paper_config(model: str, arg, *, vocabulary: str, total_images: int, eval_every_images: int):
    """The paper's recipe for ``model`` on a dataset built with ``vocabulary`` ("in1k" or "nouns")."""
    c = default.get_config()
    c.model.name = model
    c.model.dtype = "bfloat16"
    c.model.remat = model in REMAT
    c.train.batch_size = PAPER_BATCH
    c.train.total_images = total_images
    c.train.eval_every_images = eval_every_images
    c.train.log_every_images = PAPER_BATCH * 20
    c.train.checkpoint_every_images = 10_000_000
    c.data.sampling = "sqrt"  # [S] square-root resampling of hashtags
    c.data.max_labels = 16 if vocabulary == "nouns" else 8
    if arg:
        devices = int(str(arg).removeprefix("devices="))
        c.train.grad_accum_steps, c.model.bn_group_size = layout(
            devices, MAX_MICRO_BATCH.get(model, 64)
        )
    else:
        c.train.grad_accum_steps, c.model.bn_group_size = 1, PAPER_BN_GROUP
    return c
