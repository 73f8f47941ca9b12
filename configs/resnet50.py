"""ResNet-50 (He et al. 2016) on ImageNet-1k, the baseline of the hybrid papers: SASA's
Table 1 reports 76.9% top-1 at 224 (25.6M parameters, 8.2 GFLOPs counting a multiply-add
as two); ours has 25,557,032 parameters.

Recipe (SASA, Sec. 4.1): 90 epochs, batch 4096, Nesterov SGD with momentum 0.9, peak lr
1.6 (0.1 x batch/256) after 5 warmup epochs, cosine decay, weight decay 1e-4, label
smoothing 0.1, Inception crop + flip, no RandAugment or mixup, no gradient clipping.

Command:   python -m hybrid_attn.main --config=configs/resnet50.py --workdir=WORKDIR
Hardware:  a TPU v3-32 slice or 8 A100s; roughly 8 hours for 90 epochs.
Quick start (CPU, no download): --config=configs/resnet50.py:digits trains the same
           full-size model on the embedded digits for 14 epochs, like botnet50.
Arguments: digits | res=N | batch=N | epochs=X | steps=N | bf16  (see config_lib.apply_args).
"""

import ml_collections

from hybrid_attn import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(arg, **config_lib.STANDARD_ARGS)
    family = config_lib.load_family(__file__, "common_resnet")
    c = family.imagenet("resnet50")
    if a.digits:
        config_lib.digits(c, epochs=14.0)
    return config_lib.apply_args(c, a)
