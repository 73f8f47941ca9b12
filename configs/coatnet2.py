"""CoAtNet-2 (Dai et al. 2021) on ImageNet-1k: the paper's Table 4 reports 84.1% top-1 at
224 (75M parameters, 15.7 GFLOPs) and 85.7% after fine-tuning at 384.

Recipe (paper, Appendix A.2 / Table 7): as CoAtNet-0 (300 epochs, batch 4096, AdamW peak
lr 1e-3, weight decay 0.05, 10k warmup steps then cosine decay, label smoothing 0.1,
RandAugment(2, 15), mixup 0.8, gradient clipping 1.0) with stochastic depth 0.5.

Command:   python -m hybrid_attn.main --config=configs/coatnet2.py --workdir=WORKDIR
Hardware:  a TPU v3-128 / v4-64 slice or 32 A100s; roughly 4 days for 300 epochs
           (CoAtNet-0's time scaled by FLOPs, about 4x; not measured).
Fine-tune: --config=configs/coatnet2.py:res=384
           --config.init_checkpoint=<224 workdir>/checkpoints/<step>; the trainer resizes
           the checkpoint's relative bias tables to the 384 feature maps when it loads
           them (hybrid_attn.models.resize_position_tables), nothing to do by hand.
Quick start (CPU, no download): --config=configs/coatnet2.py:digits trains the same
           full-size model on the embedded digits; about 4x slower than CoAtNet-0's.
Arguments: digits | res=N | batch=N | epochs=X | steps=N | bf16  (see config_lib.apply_args).
"""

import ml_collections

from hybrid_attn import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(arg, **config_lib.STANDARD_ARGS)
    family = config_lib.load_family(__file__, "common_coatnet")
    c = family.imagenet("coatnet_2", drop_path_rate=0.5)
    if a.digits:
        config_lib.digits(c, epochs=8.0)
        c.model.drop_path_rate = 0.1
    return config_lib.apply_args(c, a)
