"""Input pipeline (tensorflow-datasets + tf.data on the host) and the embedded digits dataset.

Importing this package hides GPUs from TensorFlow: TF only feeds the host, and must leave
accelerator memory to JAX.
"""

import tensorflow as tf
from absl import logging

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices before this import.
    logging.warning("TensorFlow was initialised before hybrid_attn.data; it may hold GPU memory.")

from hybrid_attn.data.input_pipeline import (  # noqa: E402
    DatasetNotPreparedError,
    InputConfig,
    eval_iterator,
    get_builder,
    num_examples,
    train_dataset,
    train_iterator,
)

__all__ = [
    "DatasetNotPreparedError",
    "InputConfig",
    "eval_iterator",
    "get_builder",
    "num_examples",
    "train_dataset",
    "train_iterator",
]
