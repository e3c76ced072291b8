"""Shared by the paper configs (ig940m_1k5_*.py, ig3b5_17k_*.py): the recipe plus a device layout.

Not a config itself. Each paper config calls :func:`paper_config` with its model and dataset and passes on
the ``arg`` of ``--config NAME:ARG``: the number of accelerators the run will use.

The recipe (Mahajan et al. 2018, Sec. 2.3; [V] verified in a public source, [R] recalled from the paper,
not re-read: see docs/paper_fidelity.md):

* batch 8,064 = 336 GPUs x 24 images [V]; batch-norm statistics per GPU, i.e. per 24 images [R];
* SGD, momentum 0.9 [R], weight decay 1e-4 [R]. Whether the momentum was Nesterov is not recalled with
  confidence [R, uncertain]: tagjax uses plain (heavy-ball) momentum, PyTorch's ``nesterov=False``;
* rate 0.1 per 256 images, linear warm-up *from 0.1* to 0.1/256 x 8,064 = 3.15 [R], then halved at
  equally spaced points, 20 halvings in all (13 for the ImageNet-only runs, batch 3,072) [R];
* run length in images processed: linear interpolation between 120 epochs of 1.2M images and 2 epochs of
  3.5B images at the dataset's size [R] (``tagjax.optim.paper_schedule_images``): 1,983,605,808 images
  (~2.1 passes) for IG-940M, 7,000,000,000 (2 passes) for IG-3.5B;
* tagjax computes in bfloat16 with float32 parameters, where the paper trained in float32 [R]: bf16 halves
  activation memory and runs at the accelerators' fast matmul rate (on H100 ~2x fp32-via-TF32 and ~15x
  strict fp32); batch-norm statistics, the loss and the update stay in float32. Set
  ``--config.model.dtype=float32`` for the paper's arithmetic.

The device layout: from ``ARG`` the batch of 8,064 images is laid out so that it fits and keeps the
paper's batch-norm semantics (:func:`layout`):

* per device: 8,064 / devices images per step (the device count must divide 8,064 = 2^7 x 3^2 x 7);
* ``grad_accum_steps`` micro-batches per step, each at most the model's memory estimate
  (``MAX_MICRO_BATCH``: 224 px, bf16, an 80 GB GPU; estimates, not measurements: if a run runs out of
  memory, raise ``--config.train.grad_accum_steps``);
* ``bn_group_size``: 24, the paper's per-GPU batch [R]. The fewest micro-batches whose size is a multiple
  of 24 are chosen (8 GPUs x 32x8d: 14 micro-batches of 72 images, groups of 24). That is possible exactly
  when 24 divides the per-device batch, i.e. when the device count divides 336 (1, 2, 3, 4, 6, 7, 8, 12,
  14, 16, 21, 24, 28, 42, 48, 56, 84, 112, 168, 336). On other counts (32, 64, 128, ...) no layout keeps
  24 without groups spanning devices; the layout with the largest group below 24 is used (the fewest
  micro-batches among equals: 64 devices x 32x8d, 1 micro-batch of 126 images in groups of 21; 32
  devices x 32x48d, 12 micro-batches of 21), and a warning says so.

Without ``ARG`` the layout is the paper's own: 336 devices of 24 images, no accumulation.
"""

from __future__ import annotations

import dataclasses
import warnings

from tagjax import optim
from tagjax.configs import default

PAPER_BATCH = 8064  # 336 GPUs x 24 images [V]
PAPER_BN_GROUP = 24  # [R] the per-GPU batch; BN statistics per GPU
PAPER_BASE_LR = 0.1  # [R] per 256 images, scaled linearly with the batch
PAPER_WARMUP_START_LR = 0.1  # [R] warm-up runs from 0.1 (the rate for 256 images) up to the peak
PAPER_HALVINGS = 20  # [R] rate halvings after warm-up, equally spaced
PAPER_HALVINGS_IMAGENET = (
    13  # [R] the ImageNet-only runs (128 GPUs, batch 3,072, rate 0.1/256 x 3,072)
)
PAPER_MOMENTUM = 0.9  # [R]
PAPER_NESTEROV = False  # [R, uncertain] the paper's text is not re-read here; plain momentum
# The schedule-length heuristic's extremes [R]: (dataset images, passes over it).
LENGTH_SHORT = (1_200_000, 120)  # 144M images processed
LENGTH_LONG = (3_500_000_000, 2)  # 7B images processed

# Images per device per micro-batch that fit in 80 GB at 224 px in bf16 (estimates; see module docstring).
MAX_MICRO_BATCH = {
    "resnext101_32x8d": 128,
    "resnext101_32x16d": 64,
    "resnext101_32x32d": 64,  # with remat
    "resnext101_32x48d": 32,  # with remat
}
REMAT = {"resnext101_32x32d", "resnext101_32x48d"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one step's batch is laid out: ``grad_accum_steps`` micro-batches of ``micro`` images per
    device, batch-norm statistics over groups of ``bn_group`` images; ``warning`` says why the group is
    not the paper's (empty when it is)."""

    devices: int
    grad_accum_steps: int
    micro: int
    bn_group: int
    warning: str = ""


def layout(
    devices: int, max_micro: int, batch: int = PAPER_BATCH, group: int = PAPER_BN_GROUP
) -> Layout:
    """The :class:`Layout` for ``devices`` accelerators; see the module docstring for the rule."""
    if devices <= 0 or batch % devices:
        raise ValueError(
            f"{devices} devices do not divide the batch of {batch} images: use a divisor of {batch} "
            "(e.g. 8, 16, 32, 48, 56, 64, 112, 128, 336)"
        )
    per_device = batch // devices
    fits = [
        a for a in range(1, per_device + 1) if per_device % a == 0 and per_device // a <= max_micro
    ]
    keeps_group = [a for a in fits if (per_device // a) % group == 0]
    if keeps_group:
        accum = keeps_group[0]  # the fewest: small micro-batches leave an accelerator idle
        return Layout(devices, accum, per_device // accum, group)

    # No layout keeps `group`: the largest group any fitting micro-batch allows, then the fewest steps.
    def best_group(a):
        return max(g for g in range(1, group + 1) if (per_device // a) % g == 0)

    accum = min(fits, key=lambda a: (-best_group(a), a))
    micro, bn_group = per_device // accum, best_group(accum)
    why = (
        f"{per_device} images per device are not a multiple of {group}"
        if per_device % group
        else f"no micro-batch of at most {max_micro} images is a multiple of {group}"
    )
    return Layout(
        devices,
        accum,
        micro,
        bn_group,
        f"batch-norm groups of {bn_group} images, not the paper's {group}, on {devices} devices: "
        f"{why}, so no micro-batch layout keeps groups of {group} within a device. Use a device count "
        f"that divides {batch // group} to keep {group}.",
    )


def paper_config(model: str, arg, *, vocabulary: str, dataset_images: int, eval_every_images: int):
    """The paper's recipe for ``model`` on a dataset of ``dataset_images`` built with ``vocabulary``
    ("in1k" or "nouns_paper"); the run length follows the paper's heuristic."""
    c = default.get_config()
    c.model.name = model
    c.model.dtype = "bfloat16"
    c.model.remat = model in REMAT
    c.optim.base_lr = PAPER_BASE_LR
    c.optim.lr_reference_batch = 256
    c.optim.warmup_start_lr = PAPER_WARMUP_START_LR
    c.optim.num_halvings = PAPER_HALVINGS
    c.optim.momentum = PAPER_MOMENTUM
    c.optim.nesterov = PAPER_NESTEROV
    c.train.batch_size = PAPER_BATCH
    c.train.total_images = optim.paper_schedule_images(dataset_images, LENGTH_SHORT, LENGTH_LONG)
    c.train.eval_every_images = eval_every_images
    c.train.log_every_images = PAPER_BATCH * 20
    c.train.checkpoint_every_images = 10_000_000
    c.data.sampling = "sqrt"  # [S] square-root resampling of hashtags
    c.data.max_labels = 8 if vocabulary == "in1k" else 16
    if arg:
        devices = int(str(arg).removeprefix("devices="))
        lay = layout(devices, MAX_MICRO_BATCH.get(model, 64))
        if lay.warning:
            warnings.warn(lay.warning, stacklevel=2)
        c.train.grad_accum_steps, c.model.bn_group_size = lay.grad_accum_steps, lay.bn_group
    else:
        c.train.grad_accum_steps, c.model.bn_group_size = 1, PAPER_BN_GROUP
    return c
