"""IG-940M-1.5k, ResNeXt-101 32x32d: one of the paper's pretraining settings (Mahajan et al., 2018).

Model ``resnext101_32x32d`` (~467M parameters with a 1.5k head), trained with the paper's recipe
(configs/_paper.py; [R] = recalled from the paper, not re-read): softmax cross-entropy against 1/k
on the k hashtags of each image, square-root hashtag resampling, SGD momentum 0.9 [R] (plain;
Nesterov not recalled [R, uncertain]), weight decay 1e-4 (not on BN / biases), batch 8,064, rate 0.1
per 256 images: a linear warm-up from 0.1 to 3.15 [R], then 20 halvings at equally spaced points
[R]; batch-norm statistics per group of 24 images; rematerialized blocks; bf16 compute (the paper:
fp32), float32 parameters; 1,983,605,808 images processed, ~2.1 passes over IG-940M: the paper's
length heuristic [R] (tagjax.optim.paper_schedule_images).

Data: a dataset built with ``tagjax build`` over the vocabulary of
``tagjax vocab build --mode in1k`` (every hashtag that is a synonym of an ImageNet-1k synset, ~1.5k
labels). Run on N accelerators (``:N`` lays out the 8,064 batch in micro-batches and BN groups; N
must divide 8,064; see configs/_paper.py)::

    # one 8-GPU machine
    tagjax train --config ig940m_1k5_32x32d:8 --workdir /runs/ig940m_1k5_32x32d \
        --config.data.dataset=/data/ig940m_1k5
    # SLURM, 21 nodes x 8 GPUs
    sbatch --nodes=21 launch/slurm_gpu.sbatch --config ig940m_1k5_32x32d:168 \
        --workdir /shared/runs/ig940m_1k5_32x32d --config.data.dataset=/shared/data/ig940m_1k5
    # Cloud TPU v5p-128 (64 chips)
    TPU_NAME=wsl ZONE=us-east5-a ACCELERATOR=v5p-128 bash launch/tpu_pod.sh run \
        --config ig940m_1k5_32x32d:64 --workdir gs://BUCKET/runs/ig940m_1k5_32x32d \
        --config.data.dataset=/data/ig940m_1k5

On 168 devices the layout is 1 micro-batch of 48 images per device, BN groups of 24.

Compute: 523 GFLOP per training image at 224 px (3 x the analytic forward FLOPs), 1.0e+21 FLOP in
all. At 10% MFU on H100 (989 TFLOP/s bf16 dense; measured on one H200: ResNeXt-101 32x8d 16.9% at
120 images per device, ResNet-50 6.9% at the paper's 24; benchmarks/README.md) that is ~2,914
H100-hours: ~0.7 days on 168 H100s. Measure the real rate with benchmarks/train_throughput.py before
booking. For scale, the paper trained on 336 GPUs, and 32x16d on IG-3.5B took ~22 days. Released
(after ImageNet fine-tuning) top-1 / top-5 of this trunk: 85.1 / 97.5.
"""

from tagjax.configs import _paper


def get_config(arg=None):
    return _paper.paper_config(
        "resnext101_32x32d",
        arg,
        vocabulary="in1k",
        dataset_images=940_000_000,
        eval_every_images=50_000_000,
    )
