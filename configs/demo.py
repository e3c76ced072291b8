"""The demo (draft for experiments)."""

import ml_collections

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.seed = 0
    c.data.image_size = 56
    c.data.eval_resize = 64
    c.data.eval_image_size = 56
    c.data.crop_area_range = (0.3, 1.0)
    c.data.max_labels = 8
    c.data.sampling = "sqrt"

    c.model.name = "small_resnext"
    c.model.dtype = "float32"
    c.model.bn_group_size = 0
    c.model.grouped_conv = "block_diagonal"

    c.optim.base_lr = 0.4
    c.optim.schedule = "cosine"
    c.optim.warmup_images = 64 * 50
    c.optim.weight_decay = 5e-5

    c.train.batch_size = 64
    c.train.total_images = 64 * 1000
    c.train.log_every_images = 64 * 100
    c.train.eval_every_images = 64 * 500
    c.train.eval_max_images = 0
    c.train.checkpoint_every_images = 64 * 500
    c.train.compilation_cache_dir = "~/.cache/tagjax/jax_cache"
    c.checkpoint.keep_last = 1
    return c
