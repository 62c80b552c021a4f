"""`python -m deit_jax.export --format open_clip | transformers`: a deit_jax CLIP loads where CLIP
users work, strictly, with the same embeddings, activation and tokenizer ids.

One small deit_jax CLIP (QuickGELU; heads of 32, not open_clip's default 64, and a 16-token
context: sizes a wrong config would get wrong), its random weights perturbed so that every array
matters (biases and LayerNorms included), saved as a weights directory and exported by two real
`python -m deit_jax.export` processes. Each target is also checked to tell the activations apart
at this tolerance, so the comparisons can fail.
"""

import functools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _optional import require
from flax import traverse_util

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = require("torch")
open_clip = require("open_clip")
transformers = require("transformers")

from deit_jax import export  # noqa: E402
from deit_jax.config.defaults import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from deit_jax.models import create_model  # noqa: E402
from deit_jax.weights import load  # noqa: E402
from deit_jax.weights.directory import save_variables  # noqa: E402
from deit_jax.weights.tokenizer import load_tokenizer  # noqa: E402

NAME = "clip_vit_ti16"
SIZE = dict(
    embed_dim=48, img_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=4,
    text_width=64, text_layers=2, text_heads=2, context_length=16, quick_gelu=True,
)  # fmt: skip
CAPTIONS = [
    "a photo of a dog.",
    "itap of the Golden Retriever, 3 years old!",
    "A café's crème brûlée: naïve über-long caption that the sixteen token context truncates.",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def random_weights(model, rng: np.random.Generator) -> dict:
    """Variables in the model's shapes (no init: its op-by-op compiles are slow on 2 cores),
    drawn so that activations are of order one and every array matters: LayerNorm scales near 1,
    non-zero biases, kernels with std 1 / sqrt(fan_in)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    flat = traverse_util.flatten_dict(nn.meta.unbox(shapes))
    out = {}
    for path, shape in flat.items():
        noise = rng.standard_normal(shape.shape)
        if path[-1] == "scale":
            noise = 1 + 0.1 * noise
        elif noise.ndim >= 2 and "embedding" not in path[-1]:
            noise = noise / np.sqrt(np.prod(noise.shape[:-1]))
        else:  # biases, embeddings
            noise = 0.1 * noise
        out[path] = noise.astype(np.float32)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """(weights dir, model, variables): a deit_jax CLIP's weights directory, as a run writes it
    (its eval preprocessing recorded: ImageNet's mean and std, crop_pct 0.875)."""
    model = create_model(NAME, **SIZE)
    variables = random_weights(model, np.random.default_rng(0))
    variables["params"]["logit_scale"] = np.float32(3.3)
    weights = str(tmp_path_factory.mktemp("run") / "weights")
    data = dict(img_size=32, crop_pct=0.875, interpolation="bicubic")
    data |= dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    save_variables(
        weights, variables, model_name=NAME, model_overrides=SIZE, extra_metadata={"data": data}
    )
    return weights, model, variables


@pytest.fixture(scope="module")
def reference(student):
    """deit_jax's side: random NHWC images, the captions' ids by the student's own tokenizer
    (open_clip's BPE at its 16-token context), and the embeddings of both."""
    weights, model, variables = student
    images = np.random.default_rng(1).standard_normal((4, 32, 32, 3)).astype(np.float32)
    ids = load_tokenizer(weights)(CAPTIONS)
    image = jax.jit(functools.partial(model.apply, method="encode_image"))(variables, images)
    text = jax.jit(functools.partial(model.apply, method="encode_text"))(variables, ids)
    return images, ids, np.asarray(image), np.asarray(text)


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    """The two exports, run as processes side by side: (open_clip file, transformers dir)."""
    weights = student[0]
    out = tmp_path_factory.mktemp("exported")
    targets = {
        "open_clip": str(out / "oc" / "deit_jax_export_student.safetensors"),
        "transformers": str(out / "hf"),
    }
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    procs = {
        fmt: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deit_jax.export",
                "--weights",
                weights,
                "--format",
                fmt,
                "--output",
                path,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=out,
        )  # fmt: skip
        for fmt, path in targets.items()
    }
    stderr_of = {}
    for fmt, proc in procs.items():
        stdout, stderr_of[fmt] = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr_of[fmt][-3000:]
        assert f"Wrote {targets[fmt]}" in stdout
    # open_clip's config has no preprocessing: the run's ImageNet mean is named for the user.
    assert "pass image_mean=(0.485, 0.456, 0.406)" in stderr_of["open_clip"]
    return targets["open_clip"], targets["transformers"]


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@torch.no_grad()
def test_open_clip_loads_the_file_strictly_with_the_same_embeddings(student, reference, exported):
    variables = student[2]
    images, ref_ids, ref_image, ref_text = reference
    path, _ = exported
    config_path = path.removesuffix(".safetensors") + ".json"
    assert sorted(os.listdir(os.path.dirname(path))) == sorted(
        [os.path.basename(path), os.path.basename(config_path)]
    )
    with open(config_path) as f:
        config = json.load(f)
    assert config["quick_gelu"] is True and config["text_cfg"]["context_length"] == 16

    open_clip.add_model_config(config_path)  # open_clip 3.3.0's way: the name is the stem
    name = "deit_jax_export_student"
    oc = open_clip.create_model(name, pretrained=path).eval()  # loads with strict=True
    stored = open_clip.factory.load_state_dict(path)
    assert set(stored) == set(oc.state_dict())
    result = open_clip.load_checkpoint(oc, path, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    ids = open_clip.get_tokenizer(name)(CAPTIONS)  # its context length from the config
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    image_diff = max_diff(oc.encode_image(pixels), ref_image)
    text_diff = max_diff(oc.encode_text(ids), ref_text)
    print(f"open_clip max abs diff: image {image_diff:.2e}, text {text_diff:.2e}")
    assert image_diff < TOL and text_diff < TOL
    assert oc.logit_scale.item() == float(variables["params"]["logit_scale"])

    # The comparison tells the activations apart: the same file under exact GELU is far off.
    gelu = open_clip.model.CLIP(**{**config, "quick_gelu": False}).eval()
    gelu.load_state_dict(stored, strict=True)
    assert max_diff(gelu.encode_text(ids), ref_text) > 100 * TOL


@torch.no_grad()
def test_transformers_loads_the_directory_strictly_with_the_same_embeddings(
    student, reference, exported
):
    variables = student[2]
    images, oc_ids, ref_image, ref_text = reference  # open_clip's BPE: the student's tokenizer
    _, directory = exported
    hf, info = transformers.CLIPModel.from_pretrained(directory, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    assert hf.config.text_config.hidden_act == hf.config.vision_config.hidden_act == "quick_gelu"

    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
    assert tokenizer.model_max_length == 16
    hf_ids = tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="np")
    hf_ids = hf_ids["input_ids"]
    assert hf_ids.shape == oc_ids.shape == (3, 16)
    for hf_row, oc_row in zip(hf_ids, oc_ids, strict=True):
        end = int(np.argmax(oc_row)) + 1  # up to the end-of-text token (the paddings differ)
        np.testing.assert_array_equal(hf_row[:end], oc_row[:end])
    assert oc_ids[2, -1] == 49407  # the long caption was truncated, as both tokenizers do

    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    image = hf.get_image_features(pixel_values=pixels).pooler_output
    text = hf.get_text_features(input_ids=torch.from_numpy(hf_ids)).pooler_output
    image_diff, text_diff = max_diff(image, ref_image), max_diff(text, ref_text)
    print(f"transformers max abs diff: image {image_diff:.2e}, text {text_diff:.2e}")
    assert image_diff < TOL and text_diff < TOL
    assert hf.logit_scale.item() == float(variables["params"]["logit_scale"])

    processor = transformers.CLIPProcessor.from_pretrained(directory)  # the brief's loader
    assert list(processor.image_processor.image_mean) == list(IMAGENET_MEAN)
    assert processor.image_processor.size == {"shortest_edge": 36}  # floor(32 / 0.875)
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}

    config = hf.config.to_dict()
    for tower in ("text_config", "vision_config"):
        config[tower]["hidden_act"] = "gelu"
    gelu = transformers.CLIPModel(transformers.CLIPConfig(**config)).eval()
    gelu.load_state_dict(hf.state_dict(), strict=True)
    other = gelu.get_text_features(input_ids=torch.from_numpy(hf_ids)).pooler_output
    assert max_diff(other, ref_text) > 100 * TOL


def test_both_exports_convert_back_to_the_same_student(student, exported):
    """deit_jax reads its own exports back, with the activation and the heads, which the shapes
    do not give (from the model config beside the open_clip file; from config.json)."""
    _, _, variables = student
    for path in exported:
        back, overrides = load.load_with_overrides(path, NAME)
        assert overrides == {**SIZE, "vocab_size": 49408, "mlp_ratio": 4.0}, path
        jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_a_student_with_a_transformers_tokenizer_exports_that_tokenizer(
    student, exported, tmp_path
):
    """Weights converted from a transformers directory keep its tokenizer files in `tokenizer/`:
    the export copies them (here marked by another model_max_length) instead of open_clip's."""
    weights = tmp_path / "weights"
    shutil.copytree(student[0], weights)
    (weights / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(exported[1], name), weights / "tokenizer")
    config = json.loads((weights / "tokenizer" / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (weights / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    export.main(
        ["--weights", str(weights), "--format", "transformers", "--output", str(tmp_path / "hf")]
    )
    for name in os.listdir(weights / "tokenizer"):
        assert (tmp_path / "hf" / name).read_bytes() == (weights / "tokenizer" / name).read_bytes()
    assert transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf").model_max_length == 77


@pytest.fixture(scope="module")
def deit_weights(tmp_path_factory):
    size = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    variables = random_weights(
        create_model("deit_tiny_patch16_224", **size), np.random.default_rng(2)
    )
    path = str(tmp_path_factory.mktemp("deit") / "weights")
    save_variables(path, variables, model_name="deit_tiny_patch16_224", model_overrides=size)
    return path


@pytest.mark.parametrize(
    "model, args, expected",
    [
        ("deit", ["--format", "open_clip"], "--format open_clip: 'deit_tiny_patch16_224' is not"),
        ("deit", ["--format", "transformers"], "export it with --format timm"),
        ("clip", [], "--format timm (the default): 'clip_vit_ti16' is a CLIP"),
        ("clip", ["--format", "timm"], "use --format open_clip"),
        ("clip", ["--format", "open_clip", "--pth"], "--pth is for --format timm only"),
        ("clip", ["--format", "open_clip", "--suffix", ".npz"], "end its name with .safetensors"),
    ],
)  # fmt: skip
def test_a_format_that_does_not_fit_is_refused_in_one_line(
    student, deit_weights, tmp_path, capsys, model, args, expected
):
    weights = student[0] if model == "clip" else deit_weights
    suffix = ".safetensors"
    if "--suffix" in args:
        suffix, args = args[-1], args[:-2]
    output = tmp_path / f"out{suffix}"
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--weights", weights, "--output", str(output), *args])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--format" in lines[0], lines
    assert expected in lines[0]
    assert os.listdir(tmp_path) == []


def test_timm_stays_the_default_for_the_other_models(deit_weights, tmp_path, capsys):
    timm = require("timm")
    export.main(["--weights", deit_weights, "--output", str(tmp_path / "hub")])
    assert f"timm.create_model('local-dir:{tmp_path / 'hub'}'" in capsys.readouterr().out
    assert timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).num_classes == 3
