"""DeiT: the vision transformer of Touvron et al. (2021), with the optional distillation token.

Module and parameter names mirror timm's `VisionTransformer` / `VisionTransformerDistilled`
(`patch_embed/proj`, `blocks_3/attn/qkv`, `head_dist`, ...), so `deit_jax.weights.timm_keys` maps
PyTorch state dicts onto them by rule. Every parameter and the main activations carry logical
axis names ('batch', 'length', 'embed', 'heads', 'mlp', 'classes'); `deit_jax.sharding` maps
them to a mesh. The DeiT and DeiT III names are registered at the end.

Attention maps, final token features and the pooled pre-logit features are sown into the
'intermediates' collection; use `deit_jax.models.forward_with_intermediates` or
`deit_jax.models.pooled_features` to read them.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from deit_jax.models.layers import (
    DenseParams,
    Dtype,
    gelu,
    layer_norm,
    partitioned,
    torch_default_conv_init,
    trunc_normal,
)
from deit_jax.models.registry import register_model


def _dense(features: int, axes: tuple[str, str], name: str, dtype, param_dtype) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(trunc_normal(0.02), axes),
        bias_init=partitioned(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def _layer_norm(name: str, dtype, param_dtype) -> nn.LayerNorm:
    return layer_norm(name, 1e-6, dtype, param_dtype)


class PatchProjection(nn.Module):
    """A stride-p, p x p convolution, computed as one matmul over flattened patches.

    The kernel keeps the convolution layout (p, p, C, D), the transpose of PyTorch's (D, C, p, p).
    """

    embed_dim: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {p}.")
        kernel_init, bias_init = torch_default_conv_init(p * p * c)
        kernel = self.param(
            "kernel",
            partitioned(kernel_init, (None, None, None, "embed")),
            (p, p, c, self.embed_dim),
            self.param_dtype,
        )
        bias = self.param(
            "bias", partitioned(bias_init, ("embed",)), (self.embed_dim,), self.param_dtype
        )
        patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        kernel = kernel.reshape(p * p * c, self.embed_dim).astype(self.dtype)
        return patches @ kernel + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
    embed_dim: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        return PatchProjection(
            self.embed_dim, self.patch_size, self.dtype, self.param_dtype, name="proj"
        )(images)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example (timm's `DropPath`)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


ATTENTION_KERNELS = ("xla", "cudnn")


class Attention(nn.Module):
    """Multi-head self-attention with timm's fused `qkv` and `proj` parameters.

    The fused q|k|v kernel (D, 3D) is read as (D, 3, heads, head_dim), PyTorch's row order, and
    one einsum projects the tokens straight into the layout the attention products want. With
    `kernel=None` (the default) attention is written out: the softmax is normalised after the
    product with v (dividing B*H*N*head_dim numbers instead of B*H*N*N), and `proj` contracts
    (heads, head_dim) directly; the attention maps themselves are only formed when
    'intermediates' is mutable. Measurements behind these choices: benchmarks/NOTES.md.

    `kernel="xla" | "cudnn"` runs `jax.nn.dot_product_attention` with that implementation
    (cuDNN's fused flash attention needs a GPU and bf16/fp16), except when the attention maps are
    requested ('intermediates' mutable): they are sown by the written-out path, which gives the
    same outputs. Neither kernel applies attention dropout.
    """

    num_heads: int
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    kernel: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        d = x.shape[-1]
        h = self.num_heads
        if d % h:
            raise ValueError(f"Width {d} is not divisible by the number of heads {h}.")
        if self.kernel not in (None, *ATTENTION_KERNELS):
            raise ValueError(
                f"Unknown attention kernel {self.kernel!r}; use None (written out), 'xla' or "
                "'cudnn' (jax.nn.dot_product_attention)."
            )
        hd = d // h
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_kernel, qkv_bias = DenseParams(d, 3 * d, ("embed", "heads"), **kw, name="qkv")()
        # Scaling the (small) kernel instead of q: exact, as head_dim**-0.5 is 1/8 in DeiT.
        scale = jnp.asarray([hd**-0.5, 1.0, 1.0], self.dtype)
        qkv_kernel = qkv_kernel.reshape(d, 3, h, hd) * scale[:, None, None]
        x = x.astype(self.dtype)
        fused = self.kernel is not None and not self.is_mutable_collection("intermediates")
        if fused:
            if self.attn_drop_rate and not deterministic:
                raise ValueError(
                    f"attention kernel {self.kernel!r} has no attention dropout; use "
                    "attn_drop_rate=0 or the written-out attention (kernel None)."
                )
            qkv_bias = qkv_bias.reshape(3, 1, 1, h, hd) * scale[:, None, None, None, None]
            qkv = jnp.einsum("bnc,cthd->tbnhd", x, qkv_kernel) + qkv_bias
            out = jax.nn.dot_product_attention(
                qkv[0], qkv[1], qkv[2], scale=1.0, implementation=self.kernel
            )  # (batch, length, heads, head_dim)
            out_spec = "bnhd,hde->bne"
        else:
            qkv_bias = qkv_bias.reshape(3, 1, h, 1, hd) * scale[:, None, None, None, None]
            qkv = jnp.einsum("bnc,cthd->tbhnd", x, qkv_kernel) + qkv_bias
            out = self._written_out(qkv[0], qkv[1], qkv[2], deterministic)
            out_spec = "bhnd,hde->bne"
        proj_kernel, proj_bias = DenseParams(d, d, ("heads", "embed"), **kw, name="proj")()
        out = jnp.einsum(out_spec, out, proj_kernel.reshape(h, hd, d)) + proj_bias
        return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic)

    def _written_out(self, q, k, v, deterministic: bool) -> jax.Array:
        """softmax(q k^T) v on (batch, heads, length, head_dim), normalised after the product."""
        # Softmax statistics in float32 keep bf16 training stable; a no-op in float32. The row
        # maximum only shifts the exponent (softmax is invariant to it), so it needs no gradient.
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
        weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        total = weights.sum(-1, keepdims=True)
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "attention", (weights / total).astype(self.dtype))
        weights = nn.Dropout(self.attn_drop_rate)(weights, deterministic=deterministic)
        out = jnp.einsum(
            "bhqk,bhkd->bhqd", weights.astype(self.dtype), v, preferred_element_type=jnp.float32
        )
        return (out / total).astype(self.dtype)


class Mlp(nn.Module):
    hidden_dim: int
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        d = x.shape[-1]
        x = _dense(self.hidden_dim, ("embed", "mlp"), "fc1", self.dtype, self.param_dtype)(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
        x = gelu(x)
        x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)
        x = _dense(d, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(x)
        return nn.Dropout(self.drop_rate)(x, deterministic=deterministic)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (timm's `LayerScale`, parameter `gamma`)."""

    init_values: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param(
            "gamma",
            partitioned(nn.initializers.constant(self.init_values), ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return x * gamma.astype(self.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

    With `init_values` (DeiT III), each branch is scaled by a LayerScale (`ls1`, `ls2`) before
    the drop path, as in timm.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    init_values: float | None = None
    attention: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = _layer_norm("norm1", **kw)(x)
        y = Attention(
            self.num_heads,
            self.attn_drop_rate,
            self.drop_rate,
            self.attention,
            **kw,
            name="attn",
        )(y, deterministic=deterministic)
        if self.init_values is not None:
            y = LayerScale(self.init_values, **kw, name="ls1")(y)
        x = x + DropPath(self.drop_path_rate)(y, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        y = _layer_norm("norm2", **kw)(x)
        y = Mlp(int(d * self.mlp_ratio), self.drop_rate, **kw, name="mlp")(
            y, deterministic=deterministic
        )
        if self.init_values is not None:
            y = LayerScale(self.init_values, **kw, name="ls2")(y)
        x = x + DropPath(self.drop_path_rate)(y, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        self.sow("intermediates", "tokens", x)
        return x


def remat_policy(name: str) -> Callable[..., bool]:
    """`jax.checkpoint_policies.<name>`: what a rematerialised block keeps from its forward."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat policy {name!r}; use one of {', '.join(REMAT_POLICIES)}.")
    return getattr(jax.checkpoint_policies, name)


# The argument-free policies of `jax.checkpoint_policies` (the `save_*` ones take names).
REMAT_POLICIES = (
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)


class DeiT(nn.Module):
    """Vision transformer with a class token and, when `distilled`, a distillation token.

    Call with NHWC float images. A plain model returns logits (B, num_classes). A distilled model
    returns `(cls_logits, dist_logits)` when `train=True` and their average otherwise, as the
    reference does. `train=True` also enables dropout and stochastic depth (rng 'dropout').

    DeiT III (Touvron et al., 2022; timm's `deit3_*`) is this model with `init_values=1e-6`
    (LayerScale on both residual branches of every block) and `no_embed_class=True` (`pos_embed`
    covers the patch tokens only; the class and distillation tokens are concatenated after it
    is added).
    """

    num_classes: int = 1000
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    distilled: bool = False
    init_values: float | None = None
    no_embed_class: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # Kernels for big models (None: the defaults above). `attention`: "xla" | "cudnn", through
    # `jax.nn.dot_product_attention` (see `Attention`). `remat`: the name of a
    # `jax.checkpoint_policies` policy (e.g. "nothing_saveable", "dots_saveable"); each block is
    # then rematerialised under it in the backward pass, trading compute for activation memory.
    attention: str | None = None
    remat: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        return h // self.patch_size, w // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def num_pos_prefix_tokens(self) -> int:
        """Rows of `pos_embed` before the patch grid: the prefix tokens, none for DeiT III."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False):
        gh, gw = self.grid_size
        expected = (gh * self.patch_size, gw * self.patch_size, self.in_chans)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"Expected NHWC images of shape (batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}), got {tuple(images.shape)}. Pass img_size=... to create_model "
                "for another resolution (deit_jax.weights.surgery adapts pretrained weights)."
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        deterministic = not train
        b = images.shape[0]
        d = self.embed_dim

        x = PatchEmbed(d, self.patch_size, **kw, name="patch_embed")(images)
        token_init = partitioned(trunc_normal(0.02), (None, None, "embed"))
        tokens = [self.param("cls_token", token_init, (1, 1, d), self.param_dtype)]
        if self.distilled:
            tokens.append(self.param("dist_token", token_init, (1, 1, d), self.param_dtype))
        tokens = [jnp.broadcast_to(t.astype(self.dtype), (b, 1, d)) for t in tokens]
        pos_embed = self.param(
            "pos_embed", token_init, (1, gh * gw + self.num_pos_prefix_tokens, d), self.param_dtype
        )
        if self.no_embed_class:
            x = jnp.concatenate([*tokens, x + pos_embed.astype(self.dtype)], axis=1)
        else:
            x = jnp.concatenate([*tokens, x], axis=1) + pos_embed.astype(self.dtype)
        x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        # Stochastic depth grows linearly with depth, from 0 to drop_path_rate (reference).
        rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        block = Block
        if self.remat is not None:
            # `deterministic` (argument 2, counting self) is a Python bool: static.
            block = nn.remat(Block, policy=remat_policy(self.remat), static_argnums=(2,))
        for i, rate in enumerate(rates):
            x = block(
                self.num_heads,
                self.mlp_ratio,
                self.drop_rate,
                self.attn_drop_rate,
                rate,
                self.init_values,
                self.attention,
                **kw,
                name=f"blocks_{i}",
            )(x, deterministic)
        x = _layer_norm("norm", **kw)(x)
        self.sow("intermediates", "tokens", x)

        def head(name: str, features: jax.Array) -> jax.Array:
            features = nn.Dropout(self.drop_rate)(features, deterministic=deterministic)
            return _dense(self.num_classes, ("embed", "classes"), name, **kw)(features)

        # timm's forward_head(pre_logits=True): the class token, or for a distilled model the
        # average of the class and distillation tokens.
        self.sow(
            "intermediates", "pre_logits", (x[:, 0] + x[:, 1]) / 2 if self.distilled else x[:, 0]
        )
        cls_logits = head("head", x[:, 0])
        if not self.distilled:
            return cls_logits
        dist_logits = head("head_dist", x[:, 1])
        if train:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2


def _register() -> None:
    """timm's DeiT (`deit_*`) and DeiT III (`deit3_*`: LayerScale with init 1e-6, position
    embeddings for the patches only) names and sizes."""
    widths = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
    for size, (dim, heads) in widths.items():
        for distilled in (False, True):
            for img in (224, 384) if size == "base" else (224,):
                name = f"deit_{size}{'_distilled' if distilled else ''}_patch16_{img}"
                register_model(
                    name, DeiT, embed_dim=dim, num_heads=heads, distilled=distilled, img_size=img
                )
    deit3 = {  # size: (patch, width, depth, heads, image sizes)
        "small": (16, 384, 12, 6, (224, 384)),
        "medium": (16, 512, 12, 8, (224,)),
        "base": (16, 768, 12, 12, (224, 384)),
        "large": (16, 1024, 24, 16, (224, 384)),
        "huge": (14, 1280, 32, 16, (224,)),
    }
    for size, (patch, dim, depth, heads, img_sizes) in deit3.items():
        for img in img_sizes:
            register_model(
                f"deit3_{size}_patch{patch}_{img}",
                DeiT,
                patch_size=patch,
                embed_dim=dim,
                depth=depth,
                num_heads=heads,
                img_size=img,
                init_values=1e-6,
                no_embed_class=True,
            )


_register()
