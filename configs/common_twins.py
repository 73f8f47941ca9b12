"""The Twins ImageNet-1k recipe (Chu et al. 2021, Sec. 4.1 and the authors' DeiT-style
main.py), shared by configs/twins_{pcpvt,svt}_{s,b,l}.py, which add their model and
stochastic-depth rate.

Not an experiment itself: it has no ``get_config``.
"""

import ml_collections

from hybrid_attn import config_lib


def imagenet(model_name: str, *, drop_path_rate: float) -> ml_collections.ConfigDict:
    """The paper's 224x224 ImageNet-1k training of ``model_name``."""
    c = config_lib.defaults(model_name)
    c.model.drop_path_rate = drop_path_rate
    # Data: Inception crop (8-100% of the area) + flip, RandAugment(2, 9), mixup 0.8 /
    # cutmix 1.0 (one picked per batch), label smoothing 0.1; evaluation resizes to
    # 224 / 0.875 and center-crops 224. The authors' random erasing (p=0.25) has no
    # counterpart in our input pipeline.
    c.data.update(name="imagenet2012", train_split="train", eval_split="validation",
                  num_classes=1000, image_size=224, crop_pct=0.875, inception_crop=True,
                  inception_min_area=0.08, flip=True, randaugment_layers=2,
                  randaugment_magnitude=9, mixup_alpha=0.8, cutmix_alpha=1.0,
                  label_smoothing=0.1)
    # Schedule: 300 epochs at batch 1024 (8 GPUs x 128); 5 linear warmup epochs, then
    # cosine to 1e-5.
    c.batch_size, c.num_epochs = 1024, 300.0
    # Optimiser: AdamW (0.9, 0.999), peak lr 5e-4 x batch/512 = 1e-3, decoupled weight
    # decay 0.05 on the matrices (optim.decay_mask), gradient clipping at global norm
    # 5.0, no EMA.
    c.optim.update(name="adamw", learning_rate=5e-4 * 1024 / 512, end_learning_rate=1e-5,
                   schedule="cosine", warmup_epochs=5.0, weight_decay=0.05, b1=0.9,
                   b2=0.999, grad_clip_norm=5.0, ema_decay=0.0)
    return c
