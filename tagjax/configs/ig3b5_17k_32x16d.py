"""IG-3.5B-17k, ResNeXt-101 32x16d: one of the paper's pretraining settings (Mahajan et al., 2018).

Model ``resnext101_32x16d`` (~228M parameters, 34.8M of them the 17k head), trained with the paper's
recipe (configs/_paper.py; [R] = recalled from the paper, not re-read): softmax cross-entropy
against 1/k on the k hashtags of each image, square-root hashtag resampling, SGD momentum 0.9 [R]
(plain; Nesterov not recalled [R, uncertain]), weight decay 1e-4 (not on BN / biases), batch 8,064,
rate 0.1 per 256 images: a linear warm-up from 0.1 to 3.15 [R], then 20 halvings at equally spaced
points [R]; batch-norm statistics per group of 24 images; bf16 compute (the paper: fp32), float32
parameters; 7,000,000,000 images processed, ~2.0 passes over IG-3.5B: the paper's length heuristic
[R] (tagjax.optim.paper_schedule_images).

Data: a dataset built with ``tagjax build`` over the vocabulary of
``tagjax vocab build --mode nouns_paper --top-k 17000`` (hashtags that are synonyms in any WordNet noun
synset, 17k labels). Run on N accelerators (``:N`` lays out the 8,064 batch in micro-batches and BN
groups; N must divide 8,064; see configs/_paper.py)::

    # one 8-GPU machine
    tagjax train --config ig3b5_17k_32x16d:8 --workdir /runs/ig3b5_17k_32x16d \
        --config.data.dataset=/data/ig3b5_17k
    # SLURM, 42 nodes x 8 GPUs
    sbatch --nodes=42 launch/slurm_gpu.sbatch --config ig3b5_17k_32x16d:336 \
        --workdir /shared/runs/ig3b5_17k_32x16d --config.data.dataset=/shared/data/ig3b5_17k
    # Cloud TPU v5p-128 (64 chips)
    TPU_NAME=wsl ZONE=us-east5-a ACCELERATOR=v5p-128 bash launch/tpu_pod.sh run \
        --config ig3b5_17k_32x16d:64 --workdir gs://BUCKET/runs/ig3b5_17k_32x16d \
        --config.data.dataset=/data/ig3b5_17k

On 336 devices the layout is 1 micro-batch of 24 images per device, BN groups of 24.

Compute: 217 GFLOP per training image at 224 px (3 x the analytic forward FLOPs), 1.5e+21 FLOP in
all. At 10% MFU on H100 (989 TFLOP/s bf16 dense; measured on one H200: ResNeXt-101 32x8d 16.9% at
120 images per device, ResNet-50 6.9% at the paper's 24; benchmarks/README.md) that is ~4,266
H100-hours: ~0.5 days on 336 H100s. Measure the real rate with benchmarks/train_throughput.py before
booking. For scale, the paper trained on 336 GPUs, and 32x16d on IG-3.5B took ~22 days. No weights
of this setting were released.
"""

from tagjax.configs import _paper


def get_config(arg=None):
    return _paper.paper_config(
        "resnext101_32x16d",
        arg,
        vocabulary="nouns_paper",
        dataset_images=3_500_000_000,
        eval_every_images=100_000_000,
    )
