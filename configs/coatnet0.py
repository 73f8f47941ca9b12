"""CoAtNet-0 (Dai et al. 2021) on ImageNet-1k: the paper's Table 4 reports 81.6% top-1 at
224 (25M parameters, 4.2 GFLOPs) and 83.9% after fine-tuning at 384.

Recipe (paper, Appendix A.2): 300 epochs, batch 4096, AdamW peak lr 1e-3, weight decay
0.05, 10k warmup steps then cosine decay, label smoothing 0.1, RandAugment(2, 15),
mixup 0.8, stochastic depth 0.2, gradient clipping 1.0.

Command:   python -m hybrid_attn.main --config=configs/coatnet0.py --workdir=WORKDIR
Hardware:  a TPU v3-128 / v4-64 slice or 32 A100s; roughly 1 day for 300 epochs.
Quick start (CPU, no download): --config=configs/coatnet0.py:digits trains the same
           full-size model on the embedded digits and reaches >=97% test accuracy in
           under 15 minutes on 2 cores.
Arguments: digits | res=N | batch=N | epochs=X | steps=N | bf16  (see config_lib.apply_args).
"""

import ml_collections

from hybrid_attn import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(arg, **config_lib.STANDARD_ARGS)
    family = config_lib.load_family(__file__, "common_coatnet")
    c = family.imagenet("coatnet_0", drop_path_rate=0.2)
    if a.digits:
        config_lib.digits(c, epochs=8.0)
        c.model.drop_path_rate = 0.1
    return config_lib.apply_args(c, a)
