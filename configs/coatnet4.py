"""CoAtNet-4 (Dai et al. 2021; 275M parameters). The paper trains it only with ImageNet-21K
pre-training: 87.9% top-1 at 384 after fine-tuning on ImageNet-1k (Table 4). It reports no
ImageNet-1k-only number, so this config reproduces none: it trains CoAtNet-4 on
ImageNet-1k at 224 with the ImageNet-1k recipe of the smaller sizes (300 epochs, batch
4096, AdamW peak lr 1e-3, weight decay 0.05, 10k warmup steps then cosine decay, label
smoothing 0.1, RandAugment(2, 15), mixup 0.8, gradient clipping 1.0) and CoAtNet-3's
stochastic depth 0.7, the largest ImageNet-1k rate in the paper's Table 7.

Command:   python -m hybrid_attn.main --config=configs/coatnet4.py --workdir=WORKDIR
Hardware:  a TPU v3-128 / v4-64 slice or 32 A100s; roughly 2 weeks for 300 epochs
           (CoAtNet-3's time scaled by depth, not measured).
Fine-tune: --config=configs/coatnet4.py:res=384
           --config.init_checkpoint=<224 workdir>/checkpoints/<step>; the trainer resizes
           the checkpoint's relative bias tables to the 384 feature maps when it loads
           them (hybrid_attn.models.resize_position_tables), nothing to do by hand.
Quick start (CPU, no download): --config=configs/coatnet4.py:digits trains the same
           full-size model on the embedded digits; over 10x slower than CoAtNet-0's.
Arguments: digits | res=N | batch=N | epochs=X | steps=N | bf16  (see config_lib.apply_args).
"""

import ml_collections

from hybrid_attn import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(arg, **config_lib.STANDARD_ARGS)
    family = config_lib.load_family(__file__, "common_coatnet")
    c = family.imagenet("coatnet_4", drop_path_rate=0.7)
    if a.digits:
        config_lib.digits(c, epochs=8.0)
        c.model.drop_path_rate = 0.1
    return config_lib.apply_args(c, a)
