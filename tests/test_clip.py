"""The Flax CLIP (deit_jax.models.clip): its interface, and parity with open_clip and transformers.

Parity is fp32 with random weights: `open_clip.create_model(name, pretrained=None)` and a
`transformers.CLIPModel` built from a `CLIPConfig` and saved with `save_pretrained`, each converted
by `deit_jax.convert`; tolerance 1e-5 relative L2 on `encode_image`, `encode_text` and
`logits_per_image`.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _optional import require

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = require("torch")
open_clip = require("open_clip")
transformers = require("transformers")

from deit_jax import convert  # noqa: E402
from deit_jax.models import (  # noqa: E402
    create_model,
    feature_width,
    list_models,
    pooled_features,
)
from deit_jax.teacher.clip.head import zero_shot_head  # noqa: E402
from deit_jax.weights import clip as clip_weights  # noqa: E402
from deit_jax.weights import load  # noqa: E402
from deit_jax.weights.tokenizer import load_tokenizer  # noqa: E402

# --------------------------------------------------------------------------- parity

TOL = 1e-5  # relative L2, fp32 (the bound)
PROMPTS = [
    "a photo of a cat.",
    "A BAD photo of the Golden Retriever!",
    "a sketch of a 10-speed bicycle, in the style of Hokusai; it's (very) nice",
    "itap of a café crème",
]


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def perturb(module: "torch.nn.Module", seed: int) -> None:
    """Non-trivial LayerNorms, biases and logit_scale: random init leaves them at 1, 0, ln(1/0.07),
    which would hide a swapped weight/bias or a missing scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 or "logit_scale" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def write_tokenizer_files(directory) -> None:
    """vocab.json and merges.txt from the BPE file open_clip's wheel ships: OpenAI's vocabulary
    is open_clip's `SimpleTokenizer.encoder` (whose two special tokens open_clip renames; OpenAI
    and the hub's openai/clip-* vocab.json call them <|startoftext|>, <|endoftext|>) and its
    merges in rank order, saved through transformers' own CLIPTokenizer."""
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    openai_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {openai_names.get(k, k): v for k, v in reference.encoder.items()}
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = transformers.CLIPTokenizer(
        os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    )
    tokenizer.save_pretrained(directory)


def hf_config(size: dict | None, act: str) -> "transformers.CLIPConfig":
    if size is None:  # transformers' defaults: ViT-B/32
        return transformers.CLIPConfig(
            text_config=dict(hidden_act=act), vision_config=dict(hidden_act=act)
        )
    return transformers.CLIPConfig(
        projection_dim=size["embed_dim"],
        text_config=dict(
            hidden_size=size["text_width"], intermediate_size=4 * size["text_width"],
            num_hidden_layers=size["text_layers"], num_attention_heads=size["text_width"] // 64,
            hidden_act=act,
        ),
        vision_config=dict(
            hidden_size=size["vision_width"], intermediate_size=4 * size["vision_width"],
            num_hidden_layers=size["vision_layers"],
            num_attention_heads=size["vision_width"] // 64, image_size=size["img_size"],
            patch_size=size["patch_size"], hidden_act=act,
        ),
    )  # fmt: skip


class Case:
    """One size: an open_clip model and a transformers directory, both random, and the deit_jax
    CLIP they convert to, with its jitted towers (compiled once for both weight sets)."""

    def __init__(self, tmp_path, size: dict | None, quick_gelu: bool):
        self.full_size = size is None
        torch.manual_seed(0)
        if size is None:
            name = "ViT-B-32-quickgelu" if quick_gelu else "ViT-B-32"
            self.oc = open_clip.create_model(name, pretrained=None).eval()
        else:
            self.oc = open_clip.model.CLIP(
                embed_dim=size["embed_dim"],
                vision_cfg=dict(
                    layers=size["vision_layers"], width=size["vision_width"],
                    patch_size=size["patch_size"], image_size=size["img_size"],
                ),
                text_cfg=dict(
                    layers=size["text_layers"], width=size["text_width"],
                    heads=size["text_width"] // 64,
                ),
                quick_gelu=quick_gelu,
            ).eval()  # fmt: skip
        perturb(self.oc, 1)
        self.hf_dir = str(tmp_path / "hf")
        hf = transformers.CLIPModel(hf_config(size, "quick_gelu" if quick_gelu else "gelu"))
        perturb(hf, 2)
        hf.save_pretrained(self.hf_dir)
        write_tokenizer_files(self.hf_dir)
        self.hf = hf.eval()
        self.overrides = {**(size or {}), "quick_gelu": quick_gelu}
        self.model = create_model("clip_vit_b32", **self.overrides)
        self.image = jax.jit(lambda v, x: self.model.apply(v, x, method="encode_image"))
        self.text = jax.jit(lambda v, t: self.model.apply(v, t, method="encode_text"))

        @jax.jit
        def forward(v, x, t):
            # logits_per_image, and the two embeddings it computes on the way (one compilation).
            logits, state = self.model.apply(
                v, x, t, method="logits_per_image",
                capture_intermediates=lambda _, method: method in ("encode_image", "encode_text"),
            )  # fmt: skip
            captured = state["intermediates"]
            return captured["encode_image"][0], captured["encode_text"][0], logits

        self.forward = forward
        img = (size or {}).get("img_size", 224)
        self.images = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(3))
        self.nhwc = jnp.asarray(self.images.permute(0, 2, 3, 1).numpy())
        self.oc_vars = convert.torch_to_flax(self.oc.state_dict(), "clip_vit_b32", **self.overrides)


def check_parity(case: Case, variables, ids: np.ndarray, reference: str) -> dict[str, float]:
    t = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        if reference == "open_clip":
            ref_image = case.oc.encode_image(case.images)
            ref_text = case.oc.encode_text(t)
            img, txt = (x / x.norm(dim=-1, keepdim=True) for x in (ref_image, ref_text))
            ref_logits = case.oc.logit_scale.exp() * img @ txt.T
        else:
            ref_image = case.hf.get_image_features(pixel_values=case.images).pooler_output
            ref_text = case.hf.get_text_features(input_ids=t).pooler_output
            ref_logits = case.hf(input_ids=t, pixel_values=case.images).logits_per_image
    image, text, logits = case.forward(variables, case.nhwc, jnp.asarray(ids))
    errors = {
        "encode_image": rel_l2(image, ref_image.numpy()),
        "encode_text": rel_l2(text, ref_text.numpy()),
        "logits_per_image": rel_l2(logits, ref_logits.numpy()),
    }
    assert all(e <= TOL for e in errors.values()), (reference, errors)
    return errors


SMALL_PARITY = dict(
    embed_dim=48, img_size=32, patch_size=8, vision_width=128, vision_layers=2,
    text_width=128, text_layers=2,
)  # fmt: skip


# Exact GELU at the small size, QuickGELU (OpenAI's) at ViT-B/32: both activations, both sizes.
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return Case(tmp_path_factory.mktemp("small"), SMALL_PARITY, quick_gelu=False)


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    return Case(tmp_path_factory.mktemp("vit_b32"), None, quick_gelu=True)


@pytest.fixture(params=["small", "vit_b32"])
def case(request):
    return request.getfixturevalue(request.param)


def test_registered_and_interface(small):
    """init creates every parameter (the text tower's too: the same tree as a whole open_clip
    model converts to); encode_image/encode_text shapes; the causal mask and EOT pooling."""
    assert {"clip_vit_b32", "clip_vit_b16", "clip_vit_l14", "clip_vit_l14_336"} <= set(
        list_models("clip_*")
    )
    model, variables = small.model, small.oc_vars
    images = small.nhwc
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    shapes = nn.meta.unbox(shapes)
    assert set(shapes) == {"params"} and set(shapes["params"]) == {"visual", "text", "logit_scale"}
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
        lambda v: (v.shape, v.dtype), variables
    )
    scale = model.init(jax.random.key(0), method=lambda m: m.logit_scale)["params"]
    assert set(scale) == {"logit_scale"}  # (setup's submodules are built lazily)
    np.testing.assert_allclose(nn.meta.unbox(scale["logit_scale"]), np.log(1 / 0.07), rtol=1e-6)
    assert shapes["params"]["logit_scale"].shape == ()
    assert shapes["params"]["logit_scale"].dtype == jnp.float32

    image = small.image(variables, images)
    assert image.shape == (2, SMALL_PARITY["embed_dim"])
    out, features, _ = jax.jit(lambda v, x: pooled_features(model, v, x))(variables, images)
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(features, image)
    assert feature_width(model) == SMALL_PARITY["embed_dim"]

    ids = np.zeros((2, 77), np.int32)
    ids[:, 0], ids[0, 1:4], ids[0, 4], ids[1, 1], ids[1, 2] = 49406, (5, 6, 7), 49407, 9, 49407
    text = small.text(variables, ids)
    # Causal mask and EOT pooling: tokens after the end-of-text token change nothing.
    later = ids.copy()
    later[:, 10] = 123
    np.testing.assert_array_equal(small.text(variables, later), text)
    # ... while a token before it does.
    earlier = ids.copy()
    earlier[1, 1] = 10
    changed = small.text(variables, earlier)
    np.testing.assert_array_equal(changed[0], text[0])
    assert not np.allclose(changed[1], text[1])


def test_parity_with_open_clip_and_transformers(case):
    """encode_image, encode_text and logits_per_image within 1e-5 (relative L2) of both
    libraries; open_clip's weights converted in memory, transformers' from its directory."""
    ids = load_tokenizer(case.hf_dir)(PROMPTS)
    oc_ids = open_clip.get_tokenizer("ViT-B-32")(PROMPTS).numpy().astype(np.int32)
    oc_vars = case.oc_vars
    check_parity(case, oc_vars, oc_ids, "open_clip")
    hf_vars, overrides = load.load_with_overrides(case.hf_dir, "clip_vit_b32")
    assert {k: overrides[k] for k in case.overrides} == case.overrides
    check_parity(case, hf_vars, ids, "transformers")
    if case.full_size:
        return  # the round trips below run the same code at any size: the small one does them
    # Round trips, bit-exact both ways, each loaded strictly by its library.
    oc_state = convert.flax_to_torch(oc_vars)
    case.oc.load_state_dict(oc_state, strict=True)
    for key, value in case.oc.state_dict().items():
        assert torch.equal(oc_state[key], value), key
    hf_state = clip_weights.flax_to_hf(hf_vars)
    case.hf.load_state_dict(hf_state, strict=True)
    for key, value in case.hf.state_dict().items():
        assert torch.equal(hf_state[key], value), key
    for variables, state in ((oc_vars, oc_state), (hf_vars, hf_state)):
        again = convert.torch_to_flax(state, "clip_vit_b32", **case.overrides)
        jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_token_ids_equal_the_reference_tokenizers(small):
    """load_tokenizer gives the directory's own CLIPTokenizer ids, and open_clip's for a file;
    the two agree up to the padding after the end-of-text token (49407 against 0)."""
    texts = [*PROMPTS, "a " * 100 + "dog"]  # the last is truncated to 77 ids
    hf_ids = load_tokenizer(small.hf_dir)(texts)
    reference = transformers.CLIPTokenizer.from_pretrained(small.hf_dir)(
        texts, padding="max_length", max_length=77, truncation=True
    )["input_ids"]
    assert hf_ids.dtype == np.int32 and hf_ids.shape == (5, 77)
    np.testing.assert_array_equal(hf_ids, np.asarray(reference))
    weights_file = os.path.join(small.hf_dir, "model.safetensors")
    oc_ids = load_tokenizer(weights_file)(texts)
    np.testing.assert_array_equal(oc_ids, open_clip.tokenize(texts).numpy())
    after_eot = np.arange(77) > np.argmax(oc_ids, axis=1)[:, None]
    np.testing.assert_array_equal(np.where(after_eot, 0, hf_ids), oc_ids)
    assert (hf_ids[after_eot] == 49407).all() and (oc_ids[:, -1][-1:] == 49407).all()


def test_zero_shot_head_equals_open_clips_classifier(small):
    """W (D, C) within 1e-6 of open_clip's build_zero_shot_classifier, with its own templates
    (callables) and with format strings; 35 prompts in jitted batches of 8 (the last padded)."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    names = list(IMAGENET_CLASSNAMES[:7])
    tokenize = load_tokenizer(os.path.join(small.hf_dir, "model.safetensors"))
    for templates in (OPENAI_IMAGENET_TEMPLATES[:5], ("a photo of a {}.", "itap of the {}")):
        with torch.no_grad():
            expected = build_zero_shot_classifier(
                small.oc, open_clip.get_tokenizer("ViT-B-32"), names, templates
            ).numpy()
        got = zero_shot_head(small.model, small.oc_vars, names, templates, tokenize, batch_size=8)
        assert got.dtype == np.float32 and got.shape == (SMALL_PARITY["embed_dim"], 7)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=0), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "name, embed, width, text_width",
    [("clip_vit_ti16", 256, 192, 256), ("clip_vit_s16", 384, 384, 384)],
)
def test_the_student_sizes_are_open_clip_models_of_that_shape(name, embed, width, text_width):
    """A student CLIP has exactly the parameters open_clip's CLIP of its config has (so the
    converter and the export to open_clip take it as any CLIP)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    theirs = open_clip.CLIP(
        embed_dim=embed,
        vision_cfg=CLIPVisionCfg(layers=12, width=width, patch_size=16, image_size=224),
        text_cfg=CLIPTextCfg(width=text_width, heads=text_width // 64, layers=6),
    )
    model = create_model(name)
    shapes = nn.meta.unbox(
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    )
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert ours == sum(p.numel() for p in theirs.parameters())
    assert feature_width(model) == embed
