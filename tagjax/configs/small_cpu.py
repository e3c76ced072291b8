"""A laptop-sized run of the whole recipe: a 4-stage ResNeXt (``small_resnext``) at 64 px on CPU.

Bigger than configs/tiny.py (which is sized for tests): all four stages with every downsample, grouped
3x3 convs (groups=8), batch-norm statistics per group of 16 images as in the paper's per-GPU groups, the
paper's schedule shape (linear warm-up, then 3 halvings) and hashtag resampling, on the synthetic tagged
task (32 labels: colored shapes) or on a built dataset. 1,500 steps of 64 images at 110-270 img/s:
6 to 15 minutes on 2 CPU cores::

    tagjax train --config small_cpu --workdir /tmp/tagjax-small
    # on 8 simulated devices (data x FSDP mesh) with launch/local.sh
    CPU_DEVICES=8 bash launch/local.sh --config small_cpu --workdir /tmp/tagjax-small8 \
        --config.mesh.fsdp=2
    # on a dataset built by `tagjax build`
    tagjax train --config small_cpu --workdir /tmp/tagjax-small-data \
        --config.data.synthetic=False --config.data.dataset=DIR
"""

from tagjax.configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.data.synthetic = True
    c.data.synthetic_num_images = 50_000
    c.data.synthetic_num_labels = 32
    c.data.synthetic_eval_images = 1024
    c.data.image_size = 64
    c.data.eval_resize = 72
    c.data.eval_image_size = 64
    c.data.crop_area_range = (0.35, 1.0)
    c.data.max_labels = 4

    c.model.name = "small_resnext"
    c.model.dtype = "float32"  # CPUs have no fast bf16
    c.model.grouped_conv = "block_diagonal"  # ~5x faster backward on XLA:CPU (see FACTS)
    c.model.bn_group_size = 16

    c.optim.base_lr = 0.4  # per 256 images: 0.1 at batch 64
    c.optim.warmup_images = 64 * 100
    c.optim.num_halvings = 3
    c.optim.warmup_start_lr = 0.0  # warm up from zero (small batches; not the paper's 0.1 start)

    c.train.batch_size = 64
    c.train.total_images = 64 * 1500
    c.train.log_every_images = 64 * 50
    c.train.eval_every_images = 64 * 500
    c.train.eval_max_images = 1024
    c.train.checkpoint_every_images = 64 * 500
    c.mesh.fsdp_min_size = 2**14  # small model: shard even its mid-sized kernels when fsdp > 1
    return c
