"""Model registry and the family-independent position-table resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_attn.models import get_model, list_models, resize_position_tables


def test_every_family_is_registered():
    names = list_models()
    for expected in ["coatnet_0", "coatnet_4", "resnet50", "botnet50", "botnet_s1_t7",
                     "sasa_resnet26", "sasa_resnet50_convstem", "twins_pcpvt_s", "twins_svt_l"]:
        assert expected in names


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown model 'coatnet0'.*coatnet_0.*twins_svt_s"):
        get_model("coatnet0")


def test_resize_refuses_a_mismatched_leaf_that_is_not_a_position_table():
    model = get_model("coatnet_0", num_classes=3, depths=(1, 1, 1, 1), widths=(8, 8, 16, 16),
                      stem_width=8, head_dim=8)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )["params"]
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    params["head"]["kernel"] = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"params/head/kernel has shape \(5, 3\).*not a position"):
        resize_position_tables(params, model, (1, 96, 64, 3))
