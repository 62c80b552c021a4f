"""The tiny training config of the training tests, as a `--config` file for deit_jax.main.

A 2-block, 32-wide distilled-architecture DeiT (no distillation) on the offline digits data at
16x16, batch 32, 8 steps (44 steps make an epoch of the 1,437 training images). Tests import
`tiny_config` (tests/ is on sys.path under pytest); processes started with `python -m
deit_jax.main --config tests/_train_config.py --config.data.data_dir=DIR ...` get the same config
from `get_config`.
"""

from deit_jax.config import base_config


def tiny_config(data_dir: str = "", **changes):
    c = base_config()
    c.data.name = "digits"
    c.data.data_dir = data_dir
    c.data.img_size = 16
    c.data.repeated_aug = 1
    c.data.eval_split = "test"
    c.data.shuffle_buffer = 256
    c.augment.randaugment = ""
    c.augment.color_jitter = 0.0
    c.augment.reprob = 0.0
    c.augment.scale = (0.5, 1.0)
    c.model_name = "deit_tiny_distilled_patch16_224"
    with c.unlocked():
        c.model.embed_dim = 32
        c.model.depth = 2
        c.model.num_heads = 2
        c.model.patch_size = 4
    c.model.drop_path_rate = 0.0
    c.batch_size = 32
    c.eval_batch_size = 128
    c.num_epochs = 8 / 44  # 1,437 training images: 44 steps per epoch; 8 steps
    c.eval_every_epochs = 100.0
    c.log_every_steps = 1
    c.checkpoint_every_steps = 4
    c.progress_bar = False
    c.optim.warmup_epochs = 0
    c.optim.lr = 1e-3
    c.optim.ema_decay = 0.9
    c.distillation.kind = "none"
    return set_keys(c, changes)


def set_keys(c, changes: dict):
    """`c` with each dotted key of `changes` (`"optim.lr"`) set to its value."""
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def get_config():
    return tiny_config()


def save_random_teacher(path: str, img_size: int = 16, seed: int = 7) -> str:
    """A randomly initialised `cnn_small` for digits as a deit_jax weights directory: a teacher
    for tests that need only a fixed function of the image (hard labels), not a good one."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from deit_jax.models import create_model
    from deit_jax.weights.directory import save_variables

    overrides = {"num_classes": 10, "img_size": img_size}
    model = create_model("cnn_small", **overrides)
    images = jnp.zeros((1, img_size, img_size, 3))
    variables = nn.meta.unbox(model.init(jax.random.key(seed), images))
    save_variables(path, variables, model_name="cnn_small", model_overrides=overrides)
    return path
