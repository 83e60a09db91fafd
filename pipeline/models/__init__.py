"""Models: the family registry, the contract every family fulfils, weights, parameter
groups, preprocessing and losses.

``build_model(name, num_classes, encoder=...)`` builds any registered family; see
:mod:`pipeline.models.registry` for the table of families and :mod:`pipeline.models.contract`
for what the engine and inference expect of a model.
"""

from pipeline.core.errors import UnknownNameError
from pipeline.models.params import decoder_parameters, encoder_parameters, param_groups
from pipeline.models.registry import (
    ModelSpec,
    SegmentationNet,
    build_model,
    default_encoder,
    get_spec,
    input_divisor,
    list_encoders,
    list_models,
)
from pipeline.models.weights import LoadReport, load_state_dict_into, load_weights

__all__ = [
    "ModelSpec",
    "SegmentationNet",
    "UnknownNameError",
    "LoadReport",
    "build_model",
    "list_models",
    "list_encoders",
    "get_spec",
    "default_encoder",
    "input_divisor",
    "load_weights",
    "load_state_dict_into",
    "encoder_parameters",
    "decoder_parameters",
    "param_groups",
]
