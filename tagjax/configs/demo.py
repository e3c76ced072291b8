"""The demo: hashtag pretraining on Debian's openclipart cliparts, transferred to color emoji, on a CPU.

Run it (the README's first command; launch/demo.sh installs everything first)::

    tagjax demo                      # workdir runs/demo; one seed
    tagjax demo --seeds 3            # the acceptance measurement: mean ± std over seeds 0, 1, 2

Time on the 2-core development VM (AMD EPYC) beside other jobs, measured: 11m12s of compute for
``--seeds 3`` with a warm raster cache (per seed: ~1.1 minutes of pretraining, ~0.7 of training the
downstream-only trunk, ~0.7 of linear probes, ~1 of the two controls of ``demo.controls``: a
shuffled-hashtag pretraining and a batch-norm re-estimation; the corpus build ~15 s once the ~3k labelled
SVGs are cached in ~/.cache/tagjax/raster, ~4 minutes before; the emoji ~10 s). Everything is
reproducible from this file: the corpus depends only on the Debian packages (not on thread counts or the
cache; its content hash is in summary.json), the split is keyed on post ids (``corpus.split_seed``), the
training stream, crops and initializations on ``seed``; a rerun gives the same numbers to the last digit.

Sections: the top level (data / model / loss / optim / train / ...) is the pretraining config, exactly as
``tagjax train`` reads it; ``corpus`` the build of the dataset (``tagjax build`` flags of the same names);
``probe`` the linear probe (configs/transfer_linear.py); ``scratch`` the baseline trunk trained on the
downstream set alone (configs/transfer_finetune.py); ``demo`` what ties them together.
"""

import ml_collections

from tagjax.configs import default, transfer_finetune, transfer_linear

# Pretraining / probing resolution: crops of IMAGE px from images resized to RESIZE px (shorter side).
IMAGE = 56
RESIZE = 64


def get_config(arg=None):
    c = default.get_config(arg)
    c.seed = 0  # seed i of `--seeds N` is seed + i

    # --- what ties the stages together -----------------------------------------------------------------
    c.demo = ml_collections.ConfigDict()
    c.demo.seeds = 1  # pretraining + baselines + probes repeated with seeds seed, seed+1, ...
    # Downstream set: color emoji of Debian's fonts-noto-color-emoji by Unicode subgroup, rendered at 64px
    # (89 classes, 2,664 train / 923 test images; tagjax.downstream). Any `tagjax transfer --dataset` works.
    c.demo.downstream = "emoji_subgroups/64px"
    c.demo.data_dir = ""  # TFDS directory for it; "" = WORKDIR/tensorflow_datasets
    c.demo.target_gain = 0.05  # the acceptance bar: pretrained minus random probe top-1 (fraction)
    # Controls the headline is also measured against (each probed like the other trunks): "shuffled" =
    # the same pretraining with each image's hashtags taken from another image (what is left is the
    # hashtags' own value; +1 pretraining per seed), "random_bn" = the random trunk with batch-norm
    # statistics re-estimated on the pretraining images (a fair "no learning" trunk; ~1/4 of a pretraining).
    c.demo.controls = ("shuffled", "random_bn")

    # --- the corpus (tagjax.build; each field is the `tagjax build` flag of the same name) -----------------
    b = c.corpus = ml_collections.ConfigDict()
    b.inputs = ("openclipart",)  # Debian's openclipart-svg (/usr/share/openclipart/svg)
    b.max_side = 96  # px: SVGs are rasterized (and stored) with the shorter side at this size
    b.min_side = 16  # px: smaller images are skipped
    b.raster_cache = (
        "default"  # rasterized-SVG cache: "default" = ~/.cache/tagjax/raster, "" = off, or a path
    )
    b.vocab_mode = "nouns"  # vocabulary: every visual WordNet noun the corpus uses (its own counts)
    b.vocab_top_k = 0  # keep the k most frequent labels (0 = all)
    b.vocab_min_count = 2  # a label needs at least this many posts
    b.habit_fraction = (
        0.5  # a hashtag on more than this share of one uploader's posts is their habit...
    )
    b.habit_min_posts = (
        20  # ... for uploaders with at least this many posts (dropped from their posts)
    )
    b.near_threshold = 4  # near-duplicate removal: Hamming distance of 64-bit perceptual hashes
    b.eval_threshold = (
        6  # decontamination against the downstream test images (looser: a miss costs more)
    )
    b.heldout_fraction = 0.1  # share of posts held out for hashtag-prediction metrics (~230 posts)
    b.split_seed = "tagjax"  # salt of the post-id hash that splits train / held-out
    b.shard_size = 1000  # records per shard
    b.workers = 0  # image worker processes (0 = one per CPU core)
    b.limit = 0  # read at most this many posts (0 = all; tests use a few hundred)

    # --- pretraining (tagjax.train) --------------------------------------------------------------------
    c.data.image_size = IMAGE  # random-resized crops, px
    c.data.eval_resize = (
        RESIZE  # held-out evaluation and probes: shorter side to RESIZE, center crop IMAGE
    )
    c.data.eval_image_size = IMAGE
    c.data.crop_area_range = (0.3, 1.0)  # cliparts are centred drawings: keep most of the picture
    c.data.max_labels = 8  # a clipart keeps ~2 canonical hashtags; a handful have more
    c.data.sampling = "sqrt"  # the paper's square-root hashtag resampling
    c.loss = "softmax"  # cross-entropy against 1/k on each of the image's k hashtags

    # 4 stages of one bottleneck each, groups=8, 512-d pooled features: the full ResNeXt structure at a
    # CPU-friendly cost (~14 MFLOPs per 64px image).
    c.model.name = "small_resnext"
    c.model.dtype = "float32"  # bfloat16 is slower than float32 on CPUs
    c.model.bn_group_size = 0  # batch-norm statistics over the whole batch of 64
    c.model.grouped_conv = "block_diagonal"  # ~4x faster than feature_group_count on XLA:CPU

    c.optim.base_lr = 0.4  # per 256 images: 0.1 at batch 64
    c.optim.schedule = "cosine"
    c.optim.warmup_images = 64 * 50
    c.optim.warmup_start_lr = 0.0  # warm up from zero (small batches; not the paper's 0.1 start)
    c.optim.weight_decay = 5e-5

    c.train.batch_size = 64
    c.train.total_images = 64 * 600  # ~17 passes over ~2.2k training cliparts (with resampling)
    c.train.log_every_images = 64 * 50
    c.train.eval_every_images = 64 * 300  # held-out loss and mAP twice during training
    c.train.eval_max_images = 0  # all held-out posts
    c.train.checkpoint_every_images = 64 * 200
    c.checkpoint.keep_last = 1

    # --- linear probe (tagjax.transfer.run_linear; configs/transfer_linear.py) ---------------------------
    lin = transfer_linear.get_config()
    c.probe = ml_collections.ConfigDict()
    c.probe.transfer = lin.transfer
    c.probe.transfer.image_size = (
        0  # 0 = the trunk's own eval_image_size (IMAGE) after resizing to RESIZE
    )
    c.probe.transfer.dtype = "float32"
    c.probe.transfer.num_threads = 2
    c.probe.linear = lin.linear
    c.probe.linear.l2_sweep = (1e-4, 1e-3, 1e-2, 1e-1)

    # --- the downstream-only trunk (tagjax.transfer.run_finetune from the random initialization) ----------
    s = c.scratch = transfer_finetune.get_config()
    s.data.image_size = IMAGE
    s.data.eval_resize = RESIZE
    s.data.eval_image_size = IMAGE
    s.data.crop_area_range = (0.3, 1.0)
    s.transfer.num_threads = 2
    s.optim.base_lr = 0.4  # from scratch: the pretraining rate, not a fine-tuning one
    s.optim.schedule = "cosine"
    s.optim.warmup_images = 64 * 25
    s.optim.weight_decay = 5e-5
    s.train.batch_size = 64
    s.train.total_images = 64 * 420  # ~10 passes over the 2,664 training emoji
    s.train.log_every_images = 64 * 30
    s.train.checkpoint_every_images = 64 * 200
    s.checkpoint.keep_last = 1

    if arg == "tiny":  # tests/test_demo.py and a quick look: a few hundred posts, a few steps, 32px
        c.demo.downstream = "emoji_subgroups/32px"
        b.limit = 500
        b.max_side = 48
        b.heldout_fraction = 0.2
        for cfg in (c, s):
            cfg.data.image_size = 32
            cfg.data.eval_resize = 36
            cfg.data.eval_image_size = 32
        c.model.name = "tiny_resnext"
        c.optim.warmup_images = 16 * 2
        c.train.batch_size = 16
        c.train.total_images = 16 * 8
        c.train.log_every_images = 16 * 2
        c.train.eval_every_images = 16 * 4
        c.train.checkpoint_every_images = 16 * 4
        s.optim.warmup_images = 16
        s.train.batch_size = 16
        s.train.total_images = 16 * 6
        s.train.log_every_images = 16 * 2
        s.train.checkpoint_every_images = 16 * 3
        c.probe.transfer.batch_size = 128
        c.probe.linear.l2_sweep = (1e-3, 1e-1)
        c.probe.linear.max_iterations = 50
    return c
