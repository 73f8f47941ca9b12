"""Importers of other frameworks' weights onto our parameter trees.

``model, variables = from_timm("resnet50.a1_in1k", state_dict)`` converts a timm state
dict (numpy arrays) of any architecture in :mod:`hybrid_attn.convert.names`;
``python -m hybrid_attn.convert`` does the same from a file into a checkpoint.
"""

from hybrid_attn.convert.pretrained import from_timm

__all__ = ["from_timm"]
