"""Any timm / PyTorch model as the teacher of a cache (`--config.teacher.framework=torch`).

The cache writer feeds it the student's batches (already augmented and mixed, normalised with
`config.augment.mean/std`): it undoes that normalisation, applies the model's own (its
`pretrained_cfg` mean and std), resizes to its input size (`config.teacher.img_size`, else the
`pretrained_cfg` input size) with its interpolation, and runs the model in eval mode without
gradients, on the host's GPU if PyTorch sees one, else on its CPU. This is how a ConvNeXt, an
EfficientNet or a CLIP image tower without a Flax port teaches a DeiT here.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from deit_jax import _compat
from deit_jax.errors import CheckpointError, ConfigError
from deit_jax.teacher.forward import renormalization
from deit_jax.weights.state_dict import read_state_dict


class TorchTeacher:
    """A timm model built by name, with the weights of a local checkpoint file (strict)."""

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        t = config.teacher  # a local checkpoint file, torch and timm installed: config.rules
        torch = _compat.import_torch()
        import timm

        self.torch = torch
        try:
            model = timm.create_model(t.name, pretrained=False, num_classes=num_classes)
        except RuntimeError as e:  # timm's "Unknown model"
            raise ConfigError(f"config.teacher.name={t.name!r} with framework 'torch': {e}") from e
        state_dict = {
            k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
            for k, v in read_state_dict(t.checkpoint).items()
        }
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"{t.checkpoint!r} does not fit timm's {t.name!r} with {num_classes} classes: {e}"
            ) from e
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.autocast = config.dtype == "bfloat16"
        cfg = model.pretrained_cfg
        size = t.img_size or cfg.get("input_size", (3, 224, 224))[-1]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation = cfg.get("interpolation", "bicubic")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            self.interpolation = "bicubic"
        stream_mean, stream_std = config.augment.mean, config.augment.std
        scale, shift = renormalization(
            stream_mean, stream_std, cfg.get("mean", stream_mean), cfg.get("std", stream_std)
        )
        # One affine map from the stream's normalisation to the teacher's, per channel.
        self.scale = torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1)
        self.shift = torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def embedding_dim(self) -> int:
        """The width of timm's pre-logit features (`forward_head(..., pre_logits=True)`)."""
        return int(getattr(self.model, "head_hidden_size", self.model.num_features))

    def outputs(self, images: np.ndarray, embeddings: bool) -> tuple[np.ndarray, ...]:
        """(B, C) float32 log-probabilities for (B, H, W, 3) stream-normalised images, and with
        `embeddings` the (B, D) pre-logit features timm's `forward_head(x, pre_logits=True)`
        returns, from the same forward pass."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).permute(0, 3, 1, 2)
            x = (x * self.scale + self.shift).to(self.device)
            if tuple(x.shape[-2:]) != self.size:
                x = torch.nn.functional.interpolate(
                    x,
                    size=self.size,
                    mode=self.interpolation,
                    align_corners=False if self.interpolation != "nearest" else None,
                    antialias=self.interpolation != "nearest",
                )
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                if embeddings:
                    features = self.model.forward_features(x)
                    pre_logits = self.model.forward_head(features, pre_logits=True)
                    logits = self.model.forward_head(features)
                else:
                    logits = self.model(x)
            logp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
            return (logp, pre_logits.float().cpu().numpy()) if embeddings else (logp,)

    def topk_outputs(self, images: np.ndarray, k: int, embeddings: bool) -> tuple[np.ndarray, ...]:
        """The k largest log-probabilities per image (descending), their class indices and with
        `embeddings` the pre-logit features (`outputs`)."""
        logp, *features = self.outputs(images, embeddings)
        values, indices = self.torch.topk(self.torch.from_numpy(logp), k, dim=-1, sorted=True)
        return (values.numpy(), indices.numpy(), *features)
