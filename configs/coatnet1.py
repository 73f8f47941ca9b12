"""CoAtNet-1 (Dai et al. 2021) on ImageNet-1k: the paper's Table 4 reports 83.3% top-1 at
224 (42M parameters, 8.4 GFLOPs) and 85.1% after fine-tuning at 384.

Recipe (paper, Appendix A.2 / Table 7): as CoAtNet-0 (300 epochs, batch 4096, AdamW peak
lr 1e-3, weight decay 0.05, 10k warmup steps then cosine decay, label smoothing 0.1,
RandAugment(2, 15), mixup 0.8, gradient clipping 1.0) with stochastic depth 0.3.

Command:   python -m hybrid_attn.main --config=configs/coatnet1.py --workdir=WORKDIR
Hardware:  a TPU v3-128 / v4-64 slice or 32 A100s; roughly 2 days for 300 epochs
           (CoAtNet-0's time scaled by FLOPs, about 2x; not measured).
Fine-tune: --config=configs/coatnet1.py:res=384
           --config.init_checkpoint=<224 workdir>/checkpoints/<step>; the trainer resizes
           the checkpoint's relative bias tables to the 384 feature maps when it loads
           them (hybrid_attn.models.resize_position_tables), nothing to do by hand.
Quick start (CPU, no download): --config=configs/coatnet1.py:digits trains the same
           full-size model on the embedded digits; about 2x slower than CoAtNet-0's.
Arguments: digits | res=N | batch=N | epochs=X | steps=N | bf16  (see config_lib.apply_args).
"""

import ml_collections

from hybrid_attn import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(arg, **config_lib.STANDARD_ARGS)
    family = config_lib.load_family(__file__, "common_coatnet")
    c = family.imagenet("coatnet_1", drop_path_rate=0.3)
    if a.digits:
        config_lib.digits(c, epochs=8.0)
        c.model.drop_path_rate = 0.1
    return config_lib.apply_args(c, a)
