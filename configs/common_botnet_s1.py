"""The BoTNet-S1 ImageNet-1k recipe (Srinivas et al. 2021, the ResNet-RS-style recipe of
the T3..T7 table), shared by configs/botnet_s1_t3.py .. botnet_s1_t7.py, which add their
resolution, RandAugment magnitude and stochastic-depth rate.

Not an experiment itself: it has no ``get_config``.
"""

import ml_collections

from hybrid_attn import config_lib


def imagenet(model_name: str, *, res: int, randaugment_magnitude: int,
             drop_path_rate: float) -> ml_collections.ConfigDict:
    """The paper's ImageNet-1k training of ``model_name`` at ``res`` x ``res``."""
    c = config_lib.defaults(model_name)
    c.model.drop_path_rate = drop_path_rate
    # Data: Inception crop (8-100% of the area) + flip, RandAugment with 2 layers, label
    # smoothing 0.1, no mixup; evaluation resizes to res / 0.875 and center-crops res.
    c.data.update(name="imagenet2012", train_split="train", eval_split="validation",
                  num_classes=1000, image_size=res, crop_pct=0.875, inception_crop=True,
                  inception_min_area=0.08, flip=True, randaugment_layers=2,
                  randaugment_magnitude=randaugment_magnitude, mixup_alpha=0.0,
                  cutmix_alpha=0.0, label_smoothing=0.1)
    # Schedule: 350 epochs at batch 4096; 5 linear warmup epochs, then cosine to 0.
    c.batch_size, c.num_epochs = 4096, 350.0
    # Optimiser: Nesterov SGD, momentum 0.9, peak lr 1.6 (0.1 x batch/256), weight decay
    # 4e-5 on the matrices (optim.decay_mask), no gradient clipping; evaluation uses an
    # EMA of the weights with decay 0.9999.
    c.optim.update(name="sgd", learning_rate=1.6, end_learning_rate=0.0, schedule="cosine",
                   warmup_epochs=5.0, weight_decay=4e-5, momentum=0.9, nesterov=True,
                   grad_clip_norm=0.0, ema_decay=0.9999)
    return c
