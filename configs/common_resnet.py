"""The 90-epoch ResNet ImageNet-1k recipe (SASA, Ramachandran et al. 2019, Sec. 4.1), the
baseline recipe the BoTNet and SASA papers compare against; shared by configs/resnet50.py,
botnet50.py and sasa_resnet{26,38,50}.py.

Not an experiment itself: it has no ``get_config``.
"""

import ml_collections

from hybrid_attn import config_lib


def imagenet(model_name: str, *, ema_decay: float = 0.0) -> ml_collections.ConfigDict:
    """The 224x224 ImageNet-1k training of ``model_name``; ``ema_decay`` > 0 evaluates
    an exponential moving average of the weights (SASA's Polyak averaging)."""
    c = config_lib.defaults(model_name)
    # Data: Inception crop (8-100% of the area) + flip, label smoothing 0.1, no
    # RandAugment or mixup; evaluation resizes to 224 / 0.875 and center-crops 224.
    c.data.update(name="imagenet2012", train_split="train", eval_split="validation",
                  num_classes=1000, image_size=224, crop_pct=0.875, inception_crop=True,
                  inception_min_area=0.08, flip=True, randaugment_layers=0,
                  randaugment_magnitude=0, mixup_alpha=0.0, cutmix_alpha=0.0,
                  label_smoothing=0.1)
    # Schedule: 90 epochs at batch 4096; 5 linear warmup epochs, then cosine to 0.
    c.batch_size, c.num_epochs = 4096, 90.0
    # Optimiser: Nesterov SGD, momentum 0.9, peak lr 1.6 (0.1 x batch/256), weight decay
    # 1e-4 on the matrices (optim.decay_mask), no gradient clipping.
    c.optim.update(name="sgd", learning_rate=1.6, end_learning_rate=0.0, schedule="cosine",
                   warmup_epochs=5.0, weight_decay=1e-4, momentum=0.9, nesterov=True,
                   grad_clip_norm=0.0, ema_decay=ema_decay)
    return c
