"""Feature transfer (the paper's linear evaluation): a frozen trunk, a multinomial logistic regression on
its pooled features, the L2 strength chosen on a held-out part of the training split.

Run it on the emoji dataset (prepared offline on first use) with any checkpoint::

    tagjax transfer --mode linear --checkpoint /tmp/tagjax-tiny --dataset emoji_subgroups \\
        --workdir /tmp/probe-emoji

Features are computed once and cached under ``WORKDIR/features`` (resumable); a rerun with another L2
sweep only refits the classifier. The model and preprocessing statistics come from the checkpoint.
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
    t.image_size = 0  # center-crop side, pixels (0 = the checkpoint's data.eval_image_size)
    t.resize = (
        0  # shorter side before the crop, pixels (0 = keep the checkpoint's resize/crop ratio)
    )
    t.dtype = ""  # compute dtype of the trunk ("" = the checkpoint's model.dtype)
    t.batch_size = 64  # images per forward pass during feature extraction
    t.num_threads = 4  # image decoding threads
    t.feature_chunk = 2048  # examples per cached feature file (the unit of resumption)

    lin = c.linear = ml_collections.ConfigDict()
    lin.val_fraction = (
        0.2  # share of each class's training examples (by variant group) held out for the sweep
    )
    # L2 strengths to try, on the mean cross-entropy: loss = CE + lambda / 2 * ||W||^2 (bias not penalized).
    lin.l2_sweep = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    lin.max_iterations = 300  # L-BFGS iterations per fit
    lin.tolerance = 1e-5  # stop when the gradient norm falls below this
    lin.standardize = True  # features to zero mean, unit variance (statistics of the fitting set)
    lin.refit = True  # refit on the whole training split with the chosen lambda before testing
    return c
