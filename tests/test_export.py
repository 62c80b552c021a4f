"""deit_jax.export: a finished run's weights as a timm / Hub folder that timm loads alone, and back.

One tiny distilled run (tests/_train_config.py's 2-block, 32-wide DeiT on digits at 16x16, soft
distillation from a random cnn_small teacher, 4 steps, an extra eval set) serves every test. Its
eval preprocessing is none of the export's fallbacks (DeiT's bicubic, crop_pct 0.875, ImageNet
mean and std), so an export that ignored the run's data config fails.
"""

import json
import os
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Nothing here may touch the network.

import jax  # noqa: E402
from _train_config import save_random_teacher, tiny_config  # noqa: E402
from flax import traverse_util  # noqa: E402

from deit_jax import convert, sharding, train  # noqa: E402
from deit_jax import data as data_lib  # noqa: E402
from deit_jax.train.metrics import read_jsonl  # noqa: E402
from deit_jax.train.state import build_student  # noqa: E402
from deit_jax.weights import timm_export  # noqa: E402
from deit_jax.weights.directory import METADATA_FILE, load_variables  # noqa: E402

EXTRA = "digits:train[:100]"
# The run's eval preprocessing: crop_pct, interpolation, mean and std, none of them a default.
PREPROCESSING = {
    "data.crop_pct": 0.9,
    "data.eval_interpolation": "bilinear",
    "augment.mean": (0.5, 0.4, 0.3),
    "augment.std": (0.2, 0.25, 0.3),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    teacher = save_random_teacher(str(root / "teacher"))
    config = tiny_config(
        str(root / "data"),
        **{
            # Four steps: the weights stay near their random init, so predictions vary from image
            # to image (this tiny student needs minutes to learn digits), which is what the
            # transform comparison below needs; its accuracy is near chance by design.
            "distillation.kind": "soft",
            "teacher.name": "cnn_small",
            "teacher.checkpoint": teacher,
            "data.extra_eval": EXTRA,
            **PREPROCESSING,
            "num_epochs": 4 / 44,
            "checkpoint_every_steps": 100,
            "log_every_steps": 100,
        },
    )
    workdir = root / "work"
    metrics = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    out = timm_export.export(workdir / "weights", root / "hub", pth=True)
    # deit_jax's eval outputs (the heads' average) on the preprocessed test split, by image id.
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    variables, _ = load_variables(workdir / "weights")
    predict = jax.jit(lambda x: build_student(config, 10).apply(variables, x, train=False))
    images, logits = np.zeros((360, 16, 16, 3), np.float32), np.zeros((360, 10), np.float32)
    for b in data_lib.build_eval(config, mesh, with_ids=True):
        keep = np.asarray(b["mask"])
        ids = np.asarray(b["id"])[keep]
        images[ids], logits[ids] = (
            np.asarray(b["image"])[keep],
            np.asarray(predict(b["image"]))[keep],
        )
    return {
        "config": config,
        "workdir": workdir,
        "metrics": metrics,
        "out": out,
        "root": root,
        "images": images,
        "logits": logits,
    }


def _flat(variables):
    return traverse_util.flatten_dict(dict(variables))


def test_timm_loads_the_folder_alone_and_matches_deit_jax_eval_logits(run):
    out = run["out"]
    with open(os.path.join(out, "config.json")) as f:
        hub = json.load(f)
    assert hub["architecture"] == "deit_tiny_distilled_patch16_224"
    assert hub["num_classes"] == 10 and hub["label_names"] == [str(i) for i in range(10)]
    args = hub["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"]) == (
        32,
        2,
        2,
        4,
    )
    pretrained = hub["pretrained_cfg"]
    assert list(pretrained["input_size"]) == [3, 16, 16]
    assert (pretrained["crop_pct"], pretrained["interpolation"]) == (0.9, "bilinear")
    np.testing.assert_allclose(pretrained["mean"], PREPROCESSING["augment.mean"])
    np.testing.assert_allclose(pretrained["std"], PREPROCESSING["augment.std"])

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(model).__name__ == "VisionTransformerDistilled"
    assert model.head_dist.weight.shape == (10, 32)

    images, ours = run["images"][:128], run["logits"][:128]
    with torch.no_grad():
        nchw = torch.from_numpy(images.copy()).permute(0, 3, 1, 2)
        theirs = model(nchw).numpy()
        cls_only = model.head(model.forward_features(nchw)[:, 0])
    assert np.abs(ours - theirs).max() <= 1e-5
    assert np.abs(cls_only.numpy() - theirs).max() > 1e-3  # the average, not one head


def test_timm_eval_transform_gives_deit_jax_test_top1(run):
    """timm's transform, as `resolve_data_config` gives it from the exported folder (PIL
    bilinear resize to 17, centre crop 16, the run's mean and std) on the digits test split vs
    deit_jax's (the same steps in TensorFlow: tf.image.resize with antialias, rounded to uint8
    like PIL). Within 1 point, as the issue asks."""
    import tensorflow_datasets as tfds

    from deit_jax.data.digits import Digits

    model = timm.create_model(f"local-dir:{run['out']}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config({}, model=model)
    assert data_config["input_size"] == (3, 16, 16)
    assert (data_config["crop_pct"], data_config["interpolation"]) == (0.9, "bilinear")
    assert tuple(data_config["mean"]) == PREPROCESSING["augment.mean"]
    assert tuple(data_config["std"]) == PREPROCESSING["augment.std"]
    transform = timm.data.create_transform(**data_config)
    builder = Digits(data_dir=run["config"].data.data_dir)
    examples = list(tfds.as_numpy(builder.as_dataset(split="test")))
    batch = torch.stack(
        [transform(Image.fromarray(ex["image"][..., 0]).convert("RGB")) for ex in examples]
    )
    labels = np.array([ex["label"] for ex in examples])
    with torch.no_grad():
        theirs = model(batch).argmax(-1).numpy()
    top1 = float((theirs == labels).mean())

    ours = run["logits"].argmax(-1)  # deit_jax's eval pipeline on the same split
    agree = float((ours == theirs).mean())
    print(
        f"test top-1: timm transform {100 * top1:.2f}, deit_jax {100 * run['metrics']['top1']:.2f};"
        f" same prediction on {100 * agree:.2f}% of images"
    )
    # Predictions that depend on the image: two classes or more, each on 10% of the images.
    assert (np.bincount(theirs, minlength=10) >= 0.1 * len(labels)).sum() >= 2
    assert float((ours == labels).mean()) == pytest.approx(run["metrics"]["top1"], abs=1e-9)
    assert abs(top1 - run["metrics"]["top1"]) <= 0.01
    assert agree >= 0.97


def test_folder_converts_back_bit_for_bit(run, tmp_path):
    convert.main(["--checkpoint", run["out"], "--output", str(tmp_path / "back")])
    back, meta = load_variables(tmp_path / "back")
    original, original_meta = load_variables(run["workdir"] / "weights")
    assert meta["model_name"] == original_meta["model_name"]
    a, b = _flat(back), _flat(original)
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    # The official DeiT code's state dict: {"model": ...} with the same tensors.
    pth = torch.load(os.path.join(run["out"], timm_export.PTH_FILE), weights_only=True)
    np.testing.assert_array_equal(
        pth["model"]["head_dist.weight"].numpy(), np.asarray(b[("params", "head_dist", "kernel")]).T
    )


def test_model_card_and_extra_eval_metrics(run):
    rows = read_jsonl(str(run["workdir"] / "metrics.jsonl"))
    extra = [r for r in rows if "eval_digits_train/top1" in r]
    main = [r for r in rows if "eval/top1" in r]
    assert [r["step"] for r in extra] == [r["step"] for r in main] == [4]
    assert all(r["eval_digits_train/count"] == 100 for r in extra)
    assert run["metrics"]["count"] == 360  # the main split, which still picks the checkpoint
    with open(os.path.join(run["out"], "README.md")) as f:
        card = f.read()
    for text in (
        "digits",
        "| distillation | soft |",
        "| teacher | cnn_small |",
        "eval_digits_train",
    ):
        assert text in card
    assert f"{100 * main[-1]['eval/top1']:.2f}" in card


def test_bad_weights_dirs_and_outputs_are_refused(run, tmp_path, caplog):
    weights = run["workdir"] / "weights"
    with pytest.raises(timm_export.OutputExistsError, match="already exists"):
        timm_export.export(weights, run["out"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        timm_export.export(tmp_path / "nope", tmp_path / "o1")
    partial = tmp_path / "partial"
    shutil.copytree(weights, partial)
    os.remove(partial / METADATA_FILE)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        timm_export.export(partial, tmp_path / "o2")
    broken = tmp_path / "broken"
    shutil.copytree(weights, broken)
    shutil.rmtree(broken / "variables")
    with pytest.raises(ValueError, match="partial or corrupt"):
        timm_export.export(broken, tmp_path / "o3")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())
    with pytest.raises(timm_export.ExportError, match="timm has no architecture for 'cnn_small'"):
        timm_export.export(run["root"] / "teacher", tmp_path / "o4")
    with pytest.raises(timm_export.ExportError, match="no DeiT III .no_embed_class. position"):
        timm_export.timm_spec("deit3_small_patch16_224", {"distilled": True})
    spec = timm_export.timm_spec("deit3_small_patch16_224", {"depth": 2, "num_classes": 5})
    assert spec.architecture == "deit3_small_patch16_224" and spec.kwargs["init_values"] == 1e-6


def test_older_weights_dirs_export_with_defaults_and_a_warning(run, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(run["workdir"] / "weights", old)
    meta = json.loads((old / METADATA_FILE).read_text())
    meta = {k: meta[k] for k in ("model_name", "model_overrides")}  # what older runs wrote
    (old / METADATA_FILE).write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        out = timm_export.export(old, tmp_path / "hub")
    assert "records no data config" in caplog.text
    hub = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert "label_names" not in hub and hub["pretrained_cfg"]["crop_pct"] == 0.875
    assert timm.create_model(f"local-dir:{out}", pretrained=True).num_classes == 10
