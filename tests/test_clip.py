"""The Flax CLIP (deit_jax.models.clip): its interface, and parity with open_clip and transformers.

Parity is fp32 with random weights: `open_clip.create_model(name, pretrained=None)` and a
`transformers.CLIPModel` built from a `CLIPConfig` and saved with `save_pretrained`, each converted
by `deit_jax.convert`; tolerance 1e-5 relative L2 on `encode_image`, `encode_text` and
`logits_per_image`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deit_jax.models import create_model, feature_width, list_models, pooled_features

SMALL = dict(
    embed_dim=32,
    img_size=32,
    patch_size=8,
    vision_width=64,
    vision_layers=2,
    text_width=64,
    text_layers=2,
)


def test_registered_and_interface():
    assert {"clip_vit_b32", "clip_vit_b16", "clip_vit_l14", "clip_vit_l14_336"} <= set(
        list_models("clip_*")
    )
    model = create_model("clip_vit_b32", **SMALL)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    params = nn.meta.unbox(variables["params"])
    # init also built the text tower; logit_scale is a float32 scalar at ln(1/0.07).
    assert set(params) == {"visual", "text", "logit_scale"}
    assert params["logit_scale"].shape == () and params["logit_scale"].dtype == jnp.float32
    np.testing.assert_allclose(params["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
    image = model.apply(variables, images, method="encode_image")
    assert image.shape == (2, 32)
    out, features, _ = pooled_features(model, variables, images)
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(features, image)
    assert feature_width(model) == 32

    ids = np.zeros((2, 77), np.int32)
    ids[:, 0], ids[0, 1:4], ids[0, 4], ids[1, 1], ids[1, 2] = 49406, (5, 6, 7), 49407, 9, 49407
    text = model.apply(variables, jnp.asarray(ids), method="encode_text")
    assert text.shape == (2, 32)
    # Causal mask and EOT pooling: tokens after the end-of-text token change nothing.
    later = ids.copy()
    later[:, 10] = 123
    np.testing.assert_array_equal(model.apply(variables, later, method="encode_text"), text)
    # ... while a token before it does.
    earlier = ids.copy()
    earlier[1, 1] = 10
    changed = model.apply(variables, earlier, method="encode_text")
    np.testing.assert_array_equal(changed[0], text[0])
    assert not np.allclose(changed[1], text[1])
