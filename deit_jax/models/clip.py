"""CLIP (Radford et al., 2021): an image tower and a text tower that embed into one space.

The architecture and parameter names follow open_clip's `CLIP` (3.3.0), which builds OpenAI's
models: so `deit_jax.weights.clip` maps open_clip / OpenAI state dicts onto it by rule, and
transformers' `CLIPModel` through a fixed table.

  image: bias-free patch conv `conv1`, `class_embedding` prepended, `positional_embedding`,
         `ln_pre`, pre-LN `resblocks_N` (`ln_1`, `attn/in_proj` fused q|k|v, `attn/out_proj`,
         `ln_2`, `mlp/c_fc`, activation, `mlp/c_proj`), `ln_post` on the class token, `@ proj`.
  text:  `token_embedding`, `positional_embedding`, the same blocks under a causal mask,
         `ln_final`, the token at argmax(ids) (the end-of-text token: its id, 49407, is the
         largest), `@ text_projection`.

LayerNorm eps is 1e-5 (PyTorch's default). `quick_gelu=True` (x * sigmoid(1.702 x)) is what
OpenAI's weights were trained with; open_clip's own configs and most other weights use exact
GELU: a mismatch is silent and costs accuracy, so the converter sets it from the weights' origin.

`model.apply(v, images, method="encode_image")` takes NHWC images in CLIP's normalisation
(`CLIP_MEAN`, `CLIP_STD`) at `img_size` and returns the projected (B, embed_dim) embedding, not
normalised; `method="encode_text"` takes (B, context_length) int32 ids. `model.apply(v, images,
train=False)` is `encode_image` and sows it as `intermediates/pre_logits`, so CLIP fits the
helpers every registry model supports (`pooled_features`, feature distillation). `model.init(rng,
images)` also runs the text tower on dummy ids, so that it creates every parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deit_jax.models.layers import DenseParams, Dtype, gelu, l2_normalize, layer_norm
from deit_jax.models.registry import register_model

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_SCALE = 100.0  # open_clip clamps logit_scale at ln(100) in training


def clip_scale(logit_scale: jax.Array) -> jax.Array:
    """A CLIP's logit multiplier from its (log) `logit_scale`, clamped at 100."""
    return jnp.minimum(jnp.exp(logit_scale.astype(jnp.float32)), MAX_SCALE)


def _normal(std: float, axes: tuple[str | None, ...]) -> Callable[..., jax.Array]:
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's activation, `x * sigmoid(1.702 * x)` (open_clip's `QuickGELU`)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return layer_norm(name, 1e-5, dtype, param_dtype)


def _linear(
    in_features: int, out_features: int, axes: tuple[str, str], std: float, name: str, **kw: Any
) -> DenseParams:
    """open_clip's linear layers: normal(0, std) kernels (`CLIP.initialize_parameters`)."""
    return DenseParams(
        in_features, out_features, axes, nn.initializers.normal(std), **kw, name=name
    )


class MultiheadAttention(nn.Module):
    """PyTorch's `nn.MultiheadAttention` as open_clip uses it: fused `in_proj`, `out_proj`.

    Computed as `deit_jax.models.vit.Attention` does (benchmarks/NOTES.md): q|k|v by one einsum
    into (3, B, heads, N, head_dim) with the scale folded into the q kernel, softmax normalised
    after the product with v, `out_proj` contracting (heads, head_dim) directly. `causal` masks
    later tokens (the text tower).
    """

    num_heads: int
    causal: bool = False
    init_std: tuple[float, float] = (0.02, 0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        h = self.num_heads
        if d % h:
            raise ValueError(f"Width {d} is not divisible by the number of heads {h}.")
        hd = d // h
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        in_std, out_std = self.init_std
        qkv_kernel, qkv_bias = _linear(d, 3 * d, ("embed", "heads"), in_std, "in_proj", **kw)()
        scale = jnp.asarray([hd**-0.5, 1.0, 1.0], self.dtype)
        qkv_kernel = qkv_kernel.reshape(d, 3, h, hd) * scale[:, None, None]
        qkv_bias = qkv_bias.reshape(3, 1, h, 1, hd) * scale[:, None, None, None, None]
        qkv = jnp.einsum("bnc,cthd->tbhnd", x.astype(self.dtype), qkv_kernel) + qkv_bias
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
        if self.causal:
            keep = jnp.tril(jnp.ones((n, n), bool))
            logits = jnp.where(keep, logits, -jnp.inf)
        weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        total = weights.sum(-1, keepdims=True)
        out = jnp.einsum(
            "bhqk,bhkd->bhqd", weights.astype(self.dtype), v, preferred_element_type=jnp.float32
        )
        out = (out / total).astype(self.dtype)
        proj_kernel, proj_bias = _linear(d, d, ("heads", "embed"), out_std, "out_proj", **kw)()
        return jnp.einsum("bhnd,hde->bne", out, proj_kernel.reshape(h, hd, d)) + proj_bias


class Mlp(nn.Module):
    hidden_dim: int
    quick_gelu: bool
    init_std: tuple[float, float] = (0.02, 0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        fc_std, proj_std = self.init_std
        kernel, bias = _linear(d, self.hidden_dim, ("embed", "mlp"), fc_std, "c_fc", **kw)()
        y = x @ kernel + bias
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        y = quick_gelu(y) if self.quick_gelu else gelu(y)
        kernel, bias = _linear(self.hidden_dim, d, ("mlp", "embed"), proj_std, "c_proj", **kw)()
        return y @ kernel + bias


class ResidualAttentionBlock(nn.Module):
    """open_clip's pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    num_heads: int
    quick_gelu: bool
    causal: bool = False
    mlp_ratio: float = 4.0
    init_std: tuple[float, float, float, float] = (0.02, 0.02, 0.02, 0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_std, out_std, fc_std, proj_std = self.init_std
        y = _layer_norm("ln_1", **kw)(x)
        x = x + MultiheadAttention(
            self.num_heads, self.causal, (attn_std, out_std), **kw, name="attn"
        )(y)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        y = _layer_norm("ln_2", **kw)(x)
        x = x + Mlp(int(d * self.mlp_ratio), self.quick_gelu, (fc_std, proj_std), **kw, name="mlp")(
            y
        )
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _block_init_std(width: int, layers: int) -> tuple[float, float, float, float]:
    """open_clip's `CLIP.initialize_parameters` (text tower; the image tower reuses it here)."""
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    return width**-0.5, proj_std, (2 * width) ** -0.5, proj_std


class Transformer(nn.Module):
    """`resblocks_0` ... `resblocks_{layers-1}`."""

    layers: int
    num_heads: int
    quick_gelu: bool
    causal: bool = False
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        std = _block_init_std(x.shape[-1], self.layers)
        for i in range(self.layers):
            x = ResidualAttentionBlock(
                self.num_heads,
                self.quick_gelu,
                self.causal,
                self.mlp_ratio,
                std,
                self.dtype,
                self.param_dtype,
                name=f"resblocks_{i}",
            )(x)
        return x


class VisionTransformer(nn.Module):
    """The image tower: NHWC images (CLIP-normalised) -> (B, output_dim)."""

    img_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    quick_gelu: bool
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p, d = self.patch_size, self.width
        expected = (self.img_size, self.img_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"Expected NHWC images of shape (batch, {', '.join(map(str, expected))}) for "
                f"CLIP at img_size={self.img_size}, got {tuple(images.shape)}."
            )
        b, hh, ww, c = images.shape
        scale = d**-0.5
        # The conv kernel keeps the convolution layout (p, p, C, D); applied as one matmul over
        # flattened patches (stride p, no overlap).
        kernel = self.param(
            "conv1",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                (None, None, None, "embed"),
            ),
            (p, p, c, d),
            self.param_dtype,
        )
        patches = images.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (hh // p) * (ww // p), p * p * c).astype(self.dtype)
        x = patches @ kernel.reshape(p * p * c, d).astype(self.dtype)
        cls = self.param("class_embedding", _normal(scale, ("embed",)), (d,), self.param_dtype)
        pos = self.param(
            "positional_embedding",
            _normal(scale, (None, "embed")),
            (x.shape[1] + 1, d),
            self.param_dtype,
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _layer_norm("ln_pre", **kw)(x)
        x = Transformer(
            self.layers, self.heads, self.quick_gelu, False, self.mlp_ratio, **kw,
            name="transformer",
        )(x)  # fmt: skip
        pooled = _layer_norm("ln_post", **kw)(x[:, 0])
        proj = self.param(
            "proj", _normal(scale, ("embed", None)), (d, self.output_dim), self.param_dtype
        )
        return pooled @ proj.astype(self.dtype)


class TextTransformer(nn.Module):
    """The text tower: (B, context_length) token ids -> (B, output_dim), pooled at argmax(ids)."""

    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    quick_gelu: bool
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        if ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise ValueError(
                f"Expected token ids of shape (batch, {self.context_length}), got "
                f"{tuple(ids.shape)}; tokenize with deit_jax.weights.tokenizer.load_tokenizer."
            )
        d = self.width
        table = self.param(
            "token_embedding", _normal(0.02, ("vocab", "embed")), (self.vocab_size, d),
            self.param_dtype,
        )  # fmt: skip
        pos = self.param(
            "positional_embedding",
            _normal(0.01, (None, "embed")),
            (self.context_length, d),
            self.param_dtype,
        )
        x = jnp.take(table, ids, axis=0).astype(self.dtype) + pos.astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Transformer(
            self.layers, self.heads, self.quick_gelu, True, self.mlp_ratio, **kw,
            name="transformer",
        )(x)  # fmt: skip
        eot = jnp.argmax(ids, axis=-1)
        pooled = _layer_norm("ln_final", **kw)(x[jnp.arange(x.shape[0]), eot])
        proj = self.param(
            "text_projection", _normal(d**-0.5, ("embed", None)), (d, self.output_dim),
            self.param_dtype,
        )  # fmt: skip
        return pooled @ proj.astype(self.dtype)


class CLIP(nn.Module):
    """Image and text towers and `logit_scale` (a log scale, init ln(1/0.07)); see the module doc.

    Sizes default to open_clip's ViT-B-32; the registry names the others.
    """

    embed_dim: int = 512
    img_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int | None = None  # None: vision_width // 64 (open_clip's head_width 64)
    text_width: int = 512
    text_layers: int = 12
    text_heads: int | None = None  # None: text_width // 64
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        kw = dict(
            output_dim=self.embed_dim,
            quick_gelu=self.quick_gelu,
            mlp_ratio=self.mlp_ratio,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.visual = VisionTransformer(
            self.img_size,
            self.patch_size,
            self.vision_width,
            self.vision_layers,
            self.vision_heads or max(self.vision_width // 64, 1),
            **kw,
        )
        self.text = TextTransformer(
            self.context_length,
            self.vocab_size,
            self.text_width,
            self.text_layers,
            self.text_heads or max(self.text_width // 64, 1),
            **kw,
        )
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(math.log(1 / 0.07)), ()),
            (),
            jnp.float32,
        )

    def encode_image(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) CLIP-normalised images -> (B, embed_dim), not normalised."""
        return self.visual(images)

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """(B, context_length) int32 token ids -> (B, embed_dim), not normalised."""
        return self.text(ids)

    def logits_per_image(self, images: jax.Array, ids: jax.Array) -> jax.Array:
        """(B_images, B_texts) `exp(logit_scale) * cos(image, text)`, as open_clip and
        transformers compute it (unclamped; the zero-shot teacher clamps the scale at 100)."""
        image = l2_normalize(self.encode_image(images).astype(jnp.float32))
        text = l2_normalize(self.encode_text(ids).astype(jnp.float32))
        return jnp.exp(self.logit_scale) * image @ text.T

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """`encode_image`, sown as `intermediates/pre_logits`; `train` is accepted and ignored
        (CLIP has no dropout here: it is used frozen)."""
        del train
        if self.is_initializing():  # create the text tower's parameters too
            self.encode_text(jnp.zeros((1, self.context_length), jnp.int32))
        embedding = self.encode_image(images)
        self.sow("intermediates", "pre_logits", embedding)
        return embedding


def _register() -> None:
    """open_clip 3.3.0's ViT-B-32, ViT-B-16, ViT-L-14 and ViT-L-14-336 configs, and two student
    sizes of deit_jax's own: image towers at DeiT-Ti and DeiT-S width and depth (192 and 384
    wide, 12 blocks, patch 16) with a narrow 6-block text tower, for CLIP-to-CLIP distillation.

    Heads are width / 64 (open_clip's `head_width`)."""
    shapes: dict[str, Sequence[int]] = {
        # name: (embed_dim, img, patch, v_width, v_layers, t_width, t_layers)
        "clip_vit_b32": (512, 224, 32, 768, 12, 512, 12),
        "clip_vit_b16": (512, 224, 16, 768, 12, 512, 12),
        "clip_vit_l14": (768, 224, 14, 1024, 24, 768, 12),
        "clip_vit_l14_336": (768, 336, 14, 1024, 24, 768, 12),
        "clip_vit_ti16": (256, 224, 16, 192, 12, 256, 6),
        "clip_vit_s16": (384, 224, 16, 384, 12, 384, 6),
    }
    for name, (embed, img, patch, vw, vl, tw, tl) in shapes.items():
        register_model(
            name,
            CLIP,
            embed_dim=embed,
            img_size=img,
            patch_size=patch,
            vision_width=vw,
            vision_layers=vl,
            text_width=tw,
            text_layers=tl,
        )


_register()
