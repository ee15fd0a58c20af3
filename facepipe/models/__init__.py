"""Model architectures, one file each, and their registry."""

from facepipe.models.checkpoint import CheckpointError, load_weights, read_state_dict
from facepipe.models.registry import ModelConfig, create_model, get_config, list_models, register_model

__all__ = [
    "CheckpointError",
    "ModelConfig",
    "create_model",
    "get_config",
    "list_models",
    "load_weights",
    "read_state_dict",
    "register_model",
]
