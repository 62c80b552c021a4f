"""Extra eval sets: ImageNet-ReaL and ImageNet-V2 in one evaluation, and the config check.

Both data sets are prepared by their real tfds builders (`imagenet2012_real`,
`imagenet_v2/matched-frequency`) from tiny archives in their published layouts; only the network
download (ReaL's real.json, V2's tarball) is replaced by local files. The files on disk are the
TFRecords and dataset_info.json those builders write.
"""

import io
import json
import tarfile

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np
import pytest
import tensorflow_datasets as tfds  # noqa: E402  (after torch, see deit_jax/_compat.py)
import torch
from _train_config import tiny_config  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import RealLabelsImagenet

from deit_jax import data as data_lib  # noqa: E402
from deit_jax import sharding, train  # noqa: E402
from deit_jax.config import rules  # noqa: E402
from deit_jax.errors import ConfigError  # noqa: E402
from deit_jax.models import create_model  # noqa: E402
from deit_jax.weights.directory import save_variables  # noqa: E402

REAL_URL = "https://raw.githubusercontent.com/google-research/reassessed-imagenet/master/real.json"
N_REAL = 12
V2 = "imagenet_v2/matched-frequency"
OVERRIDES = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, num_classes=1000)


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _prepare(data_dir, root, real_labels, monkeypatch):
    """Prepares both sets in `data_dir` with their tfds builders (downloads served locally)."""
    rng = np.random.default_rng(0)
    manual = root / "manual"
    manual.mkdir(exist_ok=True)
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in range(N_REAL):
            blob = _jpeg(rng)
            info = tarfile.TarInfo(f"ILSVRC2012_val_{i + 1:08d}.JPEG")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (root / "real.json").write_text(json.dumps(real_labels))
    v2 = root / "v2" / "imagenetv2-matched-frequency-format-val"
    for label in (0, 1, 2):
        (v2 / str(label)).mkdir(parents=True, exist_ok=True)
        for j in range(2):
            (v2 / str(label) / f"{j}.jpeg").write_bytes(_jpeg(rng))

    def download(self, url):
        assert url == REAL_URL, url
        return root / "real.json"

    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
    monkeypatch.setattr(
        tfds.download.DownloadManager, "download_and_extract", lambda self, url: root / "v2"
    )
    config = tfds.download.DownloadConfig(manual_dir=str(manual))
    for name in ("imagenet2012_real", V2):
        tfds.builder(name, data_dir=str(data_dir)).download_and_prepare(download_config=config)


def _config(data_dir, weights, **changes):
    c = tiny_config(str(data_dir))
    c.data.name, c.data.train_split, c.data.eval_split = V2, "test", "test"
    c.data.extra_eval = "imagenet2012_real"
    c.eval_batch_size = 8
    c.init_from = str(weights)
    c.distillation.kind = "none"
    c.model_name = "deit_tiny_patch16_224"
    for key, value in changes.items():
        node, *path = [c, *key.split(".")]
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("eval_sets")
    model = create_model("deit_tiny_patch16_224", **OVERRIDES)
    variables = nn.meta.unbox(model.init(jax.random.key(3), np.zeros((1, 16, 16, 3), np.float32)))
    weights = root / "weights"
    save_variables(
        weights, dict(variables), model_name="deit_tiny_patch16_224", model_overrides=OVERRIDES
    )
    # Pass 1: the model's predictions on the ReaL images (with placeholder labels) ...
    _prepare(root / "first", root, [[] for _ in range(N_REAL)], monkeypatch)
    config = _config(root / "first", weights, **{"data.name": "imagenet2012_real"})
    config.data.train_split = config.data.eval_split = "validation"
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    predict = jax.jit(lambda x: model.apply(variables, x))
    logits = np.zeros((N_REAL, 1000), np.float32)
    for batch in data_lib.build_eval(config, mesh, with_ids=True):
        keep = np.asarray(batch["mask"])
        logits[np.asarray(batch["id"])[keep]] = np.asarray(predict(batch["image"]))[keep]
    # ... pass 2: real labels that hit, miss, hit in the top 5 only, or are empty (left out).
    top5 = np.argsort(-logits, axis=1)[:, :5]
    real = []
    for i, ranked in enumerate(top5):
        other = int(np.argmin(logits[i]))
        real.append(
            [[int(ranked[0])], [other, int(ranked[0])], [], [other], [int(ranked[1])]][i % 5]
        )
    data_dir = root / "data"
    _prepare(data_dir, root, real, monkeypatch)
    monkeypatch.undo()
    return {"root": root, "data_dir": data_dir, "weights": weights, "real": real, "logits": logits}


def test_real_top1_follows_timms_rule_and_v2_is_the_main_split(prepared):
    config = _config(prepared["data_dir"], prepared["weights"])
    metrics = train.evaluate(config, str(prepared["root"] / "work"), devices=jax.devices()[:1])
    assert metrics["count"] == 6  # ImageNet-V2, the main eval split
    prefix = "eval_imagenet2012_real"
    assert metrics[f"{prefix}/count"] == N_REAL
    with_labels = sum(bool(r) for r in prepared["real"])
    assert metrics[f"{prefix}/real_count"] == with_labels < N_REAL

    # timm's RealLabelsImagenet on the same model's logits (computed in the fixture on the same
    # images), in the data set's file order.
    builder = tfds.builder("imagenet2012_real", data_dir=str(prepared["data_dir"]))
    files = [
        ex["file_name"].decode()
        for ex in tfds.as_numpy(builder.as_dataset(split="validation", shuffle_files=False))
    ]
    (prepared["root"] / "real_eval.json").write_text(json.dumps(prepared["real"]))
    reference = RealLabelsImagenet(files, real_json=str(prepared["root"] / "real_eval.json"))
    reference.add_result(torch.from_numpy(prepared["logits"]))
    assert metrics[f"{prefix}/real_top1"] == pytest.approx(reference.get_accuracy(1) / 100)
    assert metrics[f"{prefix}/real_top5"] == pytest.approx(reference.get_accuracy(5) / 100)
    # The designed labels: hits at i % 5 in (0, 1), a top-5-only hit at 4, misses at 3.
    hits1 = sum(i % 5 in (0, 1) for i in range(N_REAL))
    hits5 = hits1 + sum(i % 5 == 4 for i in range(N_REAL))
    assert metrics[f"{prefix}/real_top1"] == pytest.approx(hits1 / with_labels)
    assert metrics[f"{prefix}/real_top5"] == pytest.approx(hits5 / with_labels)


def test_missing_or_empty_extra_eval_sets_are_refused_naming_them(prepared, tmp_path):
    def check(extra):
        config = _config(prepared["data_dir"], prepared["weights"], **{"data.extra_eval": extra})
        rules.check_config(config, num_devices=1)

    check("imagenet2012_real, imagenet_v2/matched-frequency:test")  # both prepared: accepted
    for name in ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2/topimages"):
        with pytest.raises(ConfigError) as e:
            check(f"imagenet2012_real,{name}")
        (line,) = e.value.problems
        assert f"extra eval set {name!r} does not exist" in line
        assert f"`tfds build {name} --data_dir={prepared['data_dir']}`" in line
    with pytest.raises(ConfigError, match=r"'imagenet2012_real:train' has no split 'train'"):
        check("imagenet2012_real:train")
    empty = tmp_path / "empty"
    (empty / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ConfigError, match=rf"extra eval set 'folder:{empty}:val' is empty"):
        check(f"folder:{empty}:val")
    with pytest.raises(ConfigError, match="lists a set twice"):
        check("digits:test, digits:test")
