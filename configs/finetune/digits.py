"""Fine-tuning weights imported from timm on the embedded digits (10 classes, 32x32):
the recipe for starting from a trained checkpoint on another dataset at another
resolution. The imported checkpoint decides the model (its name and recorded fields) and
the input normalisation (the mean/std its weights were trained with); the classifier is
newly initialised for the 10 classes (the log says so) and position tables are resized
from the weights' resolution to 32x32.

Recipe: AdamW, peak lr 5e-4 after a 0.2-epoch warmup, cosine decay to 1e-6, weight decay
0.05, clipping 1.0, label smoothing 0.1, mild random-resized crops, batch 64, 5 epochs.

Command:   python -m hybrid_attn.convert --timm resnet50.a1_in1k \
               --checkpoint model.safetensors --workdir runs/resnet50_a1
           python -m hybrid_attn.main \
               --config=configs/finetune/digits.py:init=runs/resnet50_a1/checkpoints/0 \
               --workdir=runs/resnet50_a1_digits
Hardware:  CPU; minutes for the smaller models (the whole model is trained).
Arguments: init=PATH (required: a checkpoint written by hybrid_attn.convert) | res=N |
           batch=N | epochs=X | steps=N | bf16  (see config_lib.apply_args).
"""

import ml_collections

from hybrid_attn import config_lib, finetune


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    spec = {k: v for k, v in config_lib.STANDARD_ARGS.items() if k != "digits"}
    a = config_lib.parse_arg(arg, init=str, **spec)
    if not a.init:
        raise config_lib.ConfigError(
            "configs/finetune/digits.py needs init=<workdir>/checkpoints/<step>, a checkpoint "
            "written by python -m hybrid_attn.convert")
    c = finetune.pretrained_config(a.init)
    mean, std = c.data.mean, c.data.std
    config_lib.digits(c, epochs=5.0)
    c.data.update(mean=mean, std=std)
    c.optim.update(learning_rate=5e-4, end_learning_rate=1e-6, warmup_epochs=0.2)
    return config_lib.apply_args(c, a)
