"""Twins-SVT-B (Chu et al. 2021) on ImageNet-1k: the paper's ImageNet table reports 83.2%
top-1 at 224 (56.1M parameters, 8.3 GFLOPs).

Recipe (paper Sec. 4.1 and the authors' main.py, DeiT-style): 300 epochs, batch 1024,
AdamW with peak lr 5e-4 x batch/512 = 1e-3, weight decay 0.05, 5 warmup epochs then
cosine decay to 1e-5, gradient clipping 5.0, label smoothing 0.1, RandAugment(2, 9),
mixup 0.8 / cutmix 1.0, stochastic depth 0.3 (0.2 / 0.3 / 0.5 for S / B / L). The
authors' random erasing (p=0.25) has no counterpart in our input pipeline.

Command:   python -m hybrid_attn.main --config=configs/twins_svt_b.py --workdir=WORKDIR
Hardware:  the authors used 8 GPUs x 128 images; on 8 V100/A100-class GPUs or a TPU v3-32
           slice expect about 3 days for 300 epochs. With batch=N, scale the learning rate
           to 5e-4 x N/512 (optim.learning_rate is not rescaled automatically).
Quick start (CPU, no download): --config=configs/twins_svt_b.py:digits trains the same
           full-size model on the embedded digits at 32x32 (the smallest input Twins
           takes) for 50 epochs. Measured for twins_svt_s on 2 CPU cores: 98.3% test
           accuracy in 7.7 minutes (30 epochs gave 96.9%).
Arguments: digits | res=N | batch=N | epochs=X | steps=N | bf16  (see config_lib.apply_args).
           Any resolution works without resizing anything (no position tables).
"""

import ml_collections

from hybrid_attn import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(arg, **config_lib.STANDARD_ARGS)
    family = config_lib.load_family(__file__, "common_twins")
    c = family.imagenet("twins_svt_b", drop_path_rate=0.3)
    if a.digits:
        config_lib.digits(c, epochs=50.0)
        c.model.drop_path_rate = 0.1
    return config_lib.apply_args(c, a)
