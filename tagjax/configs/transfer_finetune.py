"""Full fine-tuning: the pretrained trunk restored exactly, a new head, SGD on the downstream training split.

::

    tagjax transfer --mode finetune --checkpoint /tmp/tagjax-tiny --dataset emoji_subgroups \\
        --workdir /tmp/finetune-emoji [--config.train.total_images=200000]

Every length is in images seen (``train.total_images``; with 0, ``transfer.epochs`` passes over the
training split). Checkpoints go to ``WORKDIR/checkpoints`` like a pretraining run and a rerun resumes from
the newest one; the data order is a function of the step, so a resumed run sees the batches an
uninterrupted one would have. The trunk's architecture and normalization come from the checkpoint;
``data.*`` below set the fine-tuning resolution and augmentation. On 2 CPU cores the tiny model at 32px
runs ~10 steps/s.
"""

import ml_collections

from tagjax.configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    t = c.transfer = ml_collections.ConfigDict()
    t.dataset = (
        "emoji_subgroups"  # a tagjax.downstream name, a TFDS name, or a class-per-folder directory
    )
    t.data_dir = ""  # TFDS data directory ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
    t.folder_test_fraction = (
        0.2  # single-level class folders: share of files (by path hash) in test
    )
    t.dtype = ""  # compute dtype ("" = the checkpoint's model.dtype)
    t.bn_group_size = (
        -1
    )  # batch-norm statistics groups while fine-tuning (-1 = the checkpoint's; 0 = whole batch)
    t.epochs = 30  # used when train.total_images is 0: passes over the training split
    t.label_smoothing = 0.0  # of the one-hot target
    t.num_threads = 4  # image decoding threads
    t.eval_batch_size = 128  # images per forward pass when testing

    # Resolution and augmentation (random-resized crop + flip for training; resize + center crop to test).
    c.data.image_size = 224
    c.data.eval_resize = 256
    c.data.eval_image_size = 224
    c.data.crop_area_range = (0.08, 1.0)
    c.data.color_jitter = 0.0

    # SGD with momentum, cosine decay; base_lr per 256 images (scaled linearly with the batch).
    c.optim.base_lr = 0.01
    c.optim.weight_decay = 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_images = 0
    c.optim.warmup_start_lr = 0.0
    c.optim.num_halvings = 0

    c.train.batch_size = 256
    c.train.total_images = 0  # 0 = transfer.epochs passes over the training split
    c.train.log_every_images = 256 * 20
    c.train.eval_every_images = 0  # test-split accuracy during training (0 = only at the end)
    c.train.checkpoint_every_images = 256 * 500
    c.checkpoint.keep_last = 2

    if arg == "tiny":  # tests and laptops: 32px, small batches
        c.data.image_size = 32
        c.data.eval_resize = 36
        c.data.eval_image_size = 32
        c.data.crop_area_range = (0.35, 1.0)
        c.train.batch_size = 32
        c.train.log_every_images = 32 * 10
        c.train.checkpoint_every_images = 32 * 50
        c.optim.base_lr = 0.08
        c.transfer.epochs = 5
    return c
