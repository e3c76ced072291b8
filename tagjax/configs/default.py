"""The shared default every tagjax config starts from: the paper's recipe (Mahajan et al., 2018).

Other configs call ``default.get_config()`` and override a few fields. Every size lives here or in a config
that derives from it; code carries none. Lengths are counted in *images seen*, never in epochs, because
hashtag resampling makes "an epoch" meaningless at billions of images.

Values marked [R] are recalled from the paper rather than re-read (docs/paper_fidelity.md lists what is
verified and what is recalled): the warm-up start, the number of learning-rate halvings and the run length
are config values precisely so they can be corrected.

Run any config with::

    tagjax train --config NAME --workdir /path/to/workdir [--config.key=value ...]

where NAME is a config of this package (``tiny``, ``ig940m_1k5_32x8d:64``, ...; ``NAME:ARG`` passes ARG
to ``get_config``) or the path to a config file of one's own, which starts from these defaults::

    from tagjax.configs import default

    def get_config(arg=None):
        c = default.get_config(arg)
        c.train.batch_size = 512
        return c
"""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- data: a directory written by `tagjax build` (tagjax.records) -----------------------------
    c.data = ml_collections.ConfigDict()
    c.data.dataset = ""  # path to a built dataset (dataset.json inside); "" with synthetic=True
    c.data.synthetic = False  # an in-memory learnable tagged task (tests, benchmarks)
    c.data.synthetic_num_images = 4096
    c.data.train_split = "train"
    c.data.eval_split = "heldout"
    # Hashtag resampling: p(h) ~ n_h^alpha, then an image carrying h uniformly.
    # "natural" (alpha=1: weights each image by its number of hashtags), "sqrt" (0.5, the paper's
    # choice [S]), "uniform" (0), or "images" (every image equally, once per pass: the paper's
    # no-resampling baseline). See tagjax/sampling.py.
    c.data.sampling = "sqrt"
    c.data.image_size = 224  # training crop (random-resized-crop), pixels
    c.data.eval_resize = 256  # evaluation: resize shorter side, then center crop eval_image_size
    c.data.eval_image_size = 224
    c.data.crop_area_range = (0.08, 1.0)
    c.data.crop_aspect_range = (3 / 4, 4 / 3)
    c.data.flip = True
    c.data.color_jitter = 0.0  # brightness/contrast/saturation strength; 0 = off
    c.data.mean = (0.485, 0.456, 0.406)  # ImageNet statistics, as the released models used
    c.data.std = (0.229, 0.224, 0.225)
    c.data.max_labels = (
        16  # padded label ids per image (images with more keep a deterministic subset)
    )
    # The paper's label noise: each training label replaced with probability p by another tag drawn from
    # the label marginal, a fixed function of (seed, record id): one corrupted dataset, not a re-draw per view.
    c.data.label_noise = 0.0
    # Train on this share of the training split (nested subsets keyed on record ids, the same for every
    # seed); the vocabulary and the held-out split stay the whole dataset's (tagjax.study's data-size arms).
    c.data.train_fraction = 1.0
    # The shuffled-hashtag control: each image shown with another image's hashtags (a fixed permutation of
    # the training records keyed on the seed); the same label stream, images, steps and schedule.
    c.data.shuffle_labels = False
    c.data.drop_ancestors = False  # drop a label when a WordNet descendant is on the same image
    # Record shards each reading process keeps open. An open shard holds its chunk index, 8 bytes per
    # record (80 kB per 10^4-record shard), and a file: 0 keeps every shard read from open (28 GB and
    # 350,000 files per process that reads all of 3.5B images); N > 0 closes the least recently used
    # beyond N, and a read from a closed shard reopens it (~0.3 ms of one core at 10^4 records per
    # shard). docs/scaling.md, "The record reader's chunk index".
    c.data.max_open_shards = 0
    c.data.num_workers = 0  # grain worker processes per host (0 = in the main process)
    c.data.prefetch_buffer = 2  # batches
    c.data.max_bad_record_fraction = 0.001  # skip and count bad records; fail loudly above this
    # The fraction is enforced once this many records were read (one early bad record is not a rate).
    c.data.bad_record_min_reads = 10_000
    c.data.max_redraws = (
        16  # a bad training record is redrawn; this many bad draws in a row = broken data
    )
    c.data.fast_jpeg = (
        True  # libjpeg-turbo fast DCT + fast chroma upsampling (a few % faster decoding)
    )
    # Where derived files (the hashtag -> images index, ~4 bytes per image-hashtag pair) are cached;
    # "" = inside the dataset directory when writable, else ~/.cache/tagjax/index.
    c.data.cache_dir = ""
    c.data.synthetic_num_labels = 16  # synthetic task: labels (colored shapes), at most 80
    c.data.synthetic_labels_per_image = (
        3  # synthetic task: each image carries 1..this many labels (<= 4)
    )
    c.data.synthetic_eval_images = 512  # synthetic task: held-out images

    # --- model (tagjax.models) -------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.name = "resnext101_32x8d"
    c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32
    c.model.zero_init_last_bn = True  # [R] last BN gamma of each residual block starts at 0
    c.model.grouped_conv = "xla"  # "xla" (feature_group_count) or "block_diagonal" (dense kernel)
    c.model.remat = False  # rematerialize each block (memory for compute; the wide models)
    # Batch-norm statistics: 0 = over the global batch (cross-device); N = over groups of N images
    # (the paper: 24, its per-GPU batch; no cross-device traffic when groups align with devices).
    c.model.bn_group_size = 24
    c.model.bn_momentum = 0.9
    c.model.bn_epsilon = 1e-5
    # The fc bias at initialization: "zero", or "prior" (-log(num_labels): the sigmoid loss's fair start).
    c.model.head_bias = "zero"

    # --- loss (tagjax.losses) ---------------------------------------------------------------------
    c.loss = (
        "softmax"  # softmax CE against 1/k on each of k labels; "sigmoid" = per-label BCE baseline
    )

    # --- optimizer and schedule (tagjax.optim) ----------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 0.1  # per `lr_reference_batch` images, scaled linearly with the batch size
    c.optim.lr_reference_batch = 256
    c.optim.momentum = 0.9  # [R]
    c.optim.nesterov = False  # [R, uncertain] not recalled with confidence; plain momentum
    c.optim.weight_decay = 1e-4  # [R] not applied to batch-norm parameters or biases
    c.optim.schedule = "step_halving"  # or "cosine"
    c.optim.warmup_images = (
        5 * 1_281_167
    )  # linear warm-up length, images seen (length not recalled)
    c.optim.warmup_start_lr = 0.1  # [R] the rate at step 0: the paper warms up from 0.1 to the peak
    c.optim.num_halvings = (
        20  # [R] halvings at equally spaced points after warm-up (13 on ImageNet)
    )
    c.optim.grad_clip_norm = 0.0  # 0 = off

    # --- training loop (tagjax.train) -------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8064  # global, images per optimizer step (the paper: 336 GPUs x 24)
    c.train.grad_accum_steps = 1  # micro-batches per step (the paper's batch on fewer devices)
    # Schedule length in images seen: the paper's heuristic for IG-940M (tagjax.optim.paper_schedule_images,
    # ~2.1 passes; configs/_paper.py computes it from the dataset size) [R].
    c.train.total_images = 1_983_605_808
    c.train.log_every_images = 8064 * 20
    c.train.eval_every_images = 50_000_000
    c.train.eval_max_images = 50_000  # held-out images per evaluation (0 = all)
    # Hashtag metrics (tagjax.metrics): "exact" keeps every score (N x L floats on the host), "streamed"
    # keeps per-label score histograms (bounded memory; mAP within 1e-3 of exact, docs/evaluation.md);
    # "auto" is exact while images x labels <= eval_exact_max_scores.
    c.train.eval_metrics = "auto"
    c.train.eval_exact_max_scores = 100_000_000  # 400 MB of float32 scores
    c.train.eval_histogram_bins = 1024  # streamed: logit bins per label (uint32 each)
    c.train.checkpoint_every_images = 10_000_000
    c.train.nan_policy = "stop"  # "stop" with a clear message, or "skip" the update and count it
    c.train.max_consecutive_nonfinite = (
        20  # with nan_policy=skip: stop after this many skips in a row
    )
    c.train.profile_steps = ()  # e.g. (10, 15): trace steps [10, 15) to <workdir>/profile
    c.train.compilation_cache_dir = "~/.cache/tagjax/jax_cache"  # "" = off

    # --- device mesh (tagjax.sharding) ------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1  # parameter and optimizer-state sharding
    c.mesh.fsdp_min_size = 2**18  # parameters with fewer elements stay replicated over fsdp

    # --- checkpoints (tagjax.checkpoint) ----------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep_last = 3
    c.checkpoint.keep_every_images = 0  # also keep one checkpoint per this many images (0 = off)
    c.checkpoint.async_save = True
    c.checkpoint.save_on_preemption = True
    # On resume, ignore the saved data-iterator positions (needed when the number of hosts changed:
    # per-host positions cannot be remapped). The model resumes exactly; the data order restarts.
    c.checkpoint.reset_data_state = False
    # Resume from this step instead of the newest intact checkpoint (0 = newest); newer checkpoints are
    # set aside. A one-time choice: drop it from the command after that restart.
    c.checkpoint.restore_step = 0

    return c
