"""The configuration: every key with its default (`defaults`), and the rules its values must
satisfy, checked before any work (`rules`).

`from deit_jax.config import base_config` is what config files start from; the rules are
imported on their own (`deit_jax.config.rules`), as they read the model registry.
"""

from deit_jax.config.defaults import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODES,
    base_config,
    config_beside,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MODES", "base_config", "config_beside"]
