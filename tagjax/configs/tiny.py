"""A tiny model on a synthetic tagged task: tests, laptops, and a smoke test of the whole trainer.

A 2-stage ResNeXt at 32px with global batch 32 on 8 simulated CPU devices (or on one); a few hundred
steps take about a minute on 2 CPU cores. Run it with::

    tagjax train --config tiny --workdir /tmp/tagjax-tiny

Use ``--config.data.synthetic=False --config.data.dataset=DIR`` to train it on a built dataset.
"""

from tagjax.configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.data.synthetic = True
    c.data.synthetic_num_images = 2048
    c.data.image_size = 32
    c.data.eval_resize = 36
    c.data.eval_image_size = 32
    c.data.crop_area_range = (0.35, 1.0)
    c.data.max_labels = 4

    c.model.name = "tiny_resnext"
    c.model.dtype = "float32"
    c.model.bn_group_size = 0

    c.optim.warmup_images = 32 * 20
    c.optim.num_halvings = 2
    c.optim.warmup_start_lr = 0.0  # warm up from zero (small batches; not the paper's 0.1 start)
    c.optim.base_lr = 0.8  # per 256 images: 0.1 at batch 32

    c.train.batch_size = 32
    c.train.total_images = 32 * 300
    c.train.log_every_images = 32 * 25
    c.train.eval_every_images = 32 * 150
    c.train.eval_max_images = 256
    c.train.checkpoint_every_images = 32 * 100
    return c
