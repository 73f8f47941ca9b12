"""The CoAtNet ImageNet-1k recipe (Dai et al. 2021, Appendix A.2 / Table 7), shared by
configs/coatnet0.py .. coatnet4.py, which add their model and stochastic-depth rate.

Not an experiment itself: it has no ``get_config``.
"""

import ml_collections

from hybrid_attn import config_lib


def imagenet(model_name: str, *, drop_path_rate: float) -> ml_collections.ConfigDict:
    """The paper's 224x224 ImageNet-1k training of ``model_name``."""
    c = config_lib.defaults(model_name)
    c.model.drop_path_rate = drop_path_rate  # stochastic depth, the one per-size knob
    # Data: Inception crop (8-100% of the area) + flip, RandAugment(2, 15), mixup 0.8,
    # label smoothing 0.1; evaluation resizes to 224 / 0.875 and center-crops 224.
    c.data.update(name="imagenet2012", train_split="train", eval_split="validation",
                  num_classes=1000, image_size=224, crop_pct=0.875, inception_crop=True,
                  inception_min_area=0.08, flip=True, randaugment_layers=2,
                  randaugment_magnitude=15, mixup_alpha=0.8, cutmix_alpha=0.0,
                  label_smoothing=0.1)
    # Schedule: 300 epochs at batch 4096; 10k linear warmup steps, then cosine to 1e-5.
    c.batch_size, c.num_epochs = 4096, 300.0
    # Optimiser: AdamW (0.9, 0.999), peak lr 1e-3, decoupled weight decay 0.05 on the
    # matrices (optim.decay_mask), gradient clipping at global norm 1.0, no EMA.
    c.optim.update(name="adamw", learning_rate=1e-3, end_learning_rate=1e-5,
                   schedule="cosine", warmup_steps=10_000, weight_decay=0.05, b1=0.9,
                   b2=0.999, grad_clip_norm=1.0, ema_decay=0.0)
    return c
