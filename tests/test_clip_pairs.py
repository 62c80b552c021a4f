"""Image-caption pairs: the in-batch losses and retrieval metric of CLIP-to-CLIP distillation
(`deit_jax.losses`), and the caption folder (`deit_jax.data.captions`).

References: torch's `F.kl_div` (the seed's formula), open_clip's `ClipLoss` and
`DistillClipLoss`, NumPy ranks. Tolerances: 1e-6 relative (float32 against float32 torch);
the sharded in-batch logits against one device's to 1e-6.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from _optional import require

from deit_jax import losses, sharding
from deit_jax.data import captions
from deit_jax.errors import DataError


def pair_logits(seed, batch=16):
    """A teacher's and a student's in-batch logits of the same pairs (student = noisy teacher)."""
    rng = np.random.default_rng(seed)
    image, text = rng.normal(size=(2, batch, 8)).astype(np.float32)
    teacher = np.array(losses.in_batch_logits(image, text, 20.0))
    student = teacher + rng.normal(scale=3.0, size=teacher.shape).astype(np.float32)
    return student, teacher


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_the_in_batch_kl_is_the_seeds_formula_in_both_directions(tau):
    torch = require("torch")
    f = torch.nn.functional
    student, teacher = pair_logits(0)
    loss, parts = losses.in_batch_distillation_loss(student, teacher, tau=tau)

    def seed_kl(s, t):  # F.kl_div(log_softmax(s / T, 1), softmax(t / T, 1), "batchmean")
        s, t = torch.from_numpy(s.copy()), torch.from_numpy(t.copy())
        return f.kl_div(f.log_softmax(s / tau, 1), f.softmax(t / tau, 1), reduction="batchmean")

    i2t, t2i = seed_kl(student, teacher).item(), seed_kl(student.T.copy(), teacher.T.copy()).item()
    np.testing.assert_allclose(float(parts["image_to_text"]), i2t, rtol=1e-6)
    np.testing.assert_allclose(float(parts["text_to_image"]), t2i, rtol=1e-6)
    np.testing.assert_allclose(float(loss), (i2t + t2i) / 2, rtol=1e-6)
    assert abs(i2t - t2i) > 1e-3 * i2t  # the two directions are different terms


def test_the_losses_agree_with_open_clips():
    torch = require("torch")
    require("open_clip")
    from open_clip.loss import ClipLoss, DistillClipLoss

    rng = np.random.default_rng(1)
    image, text = rng.normal(size=(2, 16, 8)).astype(np.float32)
    logits = losses.in_batch_logits(image, text, 30.0)
    normalise = lambda x: torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)  # noqa: E731
    theirs = ClipLoss()(normalise(image), normalise(text), torch.tensor(30.0))
    np.testing.assert_allclose(
        float(losses.clip_contrastive_loss(logits)), theirs.item(), rtol=1e-6
    )
    # open_clip's distillation term is the cross-entropy to the teacher's softmax: the KL plus
    # the teacher's entropy, a constant of the student.
    student, teacher = pair_logits(2)
    cross_entropy = DistillClipLoss().dist_loss(
        torch.from_numpy(teacher), torch.from_numpy(student)
    )
    t = torch.from_numpy(teacher).softmax(1)
    entropy = -(t * t.log()).sum(1).mean()
    _, parts = losses.in_batch_distillation_loss(student, teacher)
    np.testing.assert_allclose(
        float(parts["image_to_text"]), (cross_entropy - entropy).item(), rtol=1e-5
    )


def test_the_in_batch_logits_span_the_global_batch_on_a_2x2_mesh():
    rng = np.random.default_rng(3)
    image, text, student_image = rng.normal(size=(3, 16, 8)).astype(np.float32)

    def step(image, text, student_image):
        teacher = losses.in_batch_logits(image, text, 20.0)
        student = losses.in_batch_logits(student_image, text, 10.0)
        return teacher, losses.in_batch_distillation_loss(student, teacher)[0]

    one = jax.jit(step)(image, text, student_image)
    mesh_config = ml_collections.ConfigDict({"data": 2, "fsdp": 2})
    mesh = sharding.create_mesh(mesh_config, jax.devices()[:4])  # the train step's mesh
    rows = sharding.batch_sharding(mesh)
    sharded = [jax.device_put(x, rows) for x in (image, text, student_image)]
    assert len(sharded[1].addressable_shards) == 4 and sharded[1].addressable_shards[
        0
    ].data.shape == (4, 8)
    four = jax.jit(step)(*sharded)
    assert four[0].shape == (16, 16)  # every image against every caption of the global batch
    np.testing.assert_allclose(np.asarray(four[0]), np.asarray(one[0]), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(float(four[1]), float(one[1]), rtol=1e-6)


def test_recall_at_k_is_numpys_with_ties_against_the_pair():
    rng = np.random.default_rng(4)
    logits = rng.integers(0, 6, size=(24, 24)).astype(np.float32)  # many ties
    hits = {k: np.asarray(v) for k, v in losses.retrieval_hits(jnp.asarray(logits)).items()}

    def recall(scores, k):
        out = []
        for i, row in enumerate(scores):
            rank = sum(row[j] > row[i] or (row[j] == row[i] and j < i) for j in range(len(row)))
            out.append(float(rank < k))
        return np.array(out)

    for k in (1, 5):
        np.testing.assert_array_equal(hits[f"image_to_text_r{k}"], recall(logits, k))
        np.testing.assert_array_equal(hits[f"text_to_image_r{k}"], recall(logits.T, k))
    assert 0 < hits["image_to_text_r5"].mean() < 1


def write_pairs(root, count=4):
    from PIL import Image

    for i in range(count):
        folder = root / f"{i % 2:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i:04d}.jpg")
        (folder / f"{i:04d}.txt").write_text(f"a red square {i}\n\nanother caption of {i}\n")


def test_a_caption_folder_reads_every_image_with_its_captions(tmp_path):
    write_pairs(tmp_path)
    pairs = captions.read_caption_pairs(str(tmp_path))
    assert [os.path.basename(p.image) for p in pairs] == [
        "0000.jpg",
        "0002.jpg",
        "0001.jpg",
        "0003.jpg",
    ]
    assert pairs[1].captions == ("a red square 2", "another caption of 2")  # blank lines skipped


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_a_missing_or_empty_caption_file_is_refused_naming_it(tmp_path, damage):
    write_pairs(tmp_path)
    caption_file = tmp_path / "00001" / "0003.txt"
    if damage == "missing":
        caption_file.unlink()
    else:
        caption_file.write_text("\n  \n")
    with pytest.raises(DataError) as e:
        captions.read_caption_pairs(str(tmp_path))
    assert repr(str(caption_file)) in str(e.value)
    assert ("has no caption file" if damage == "missing" else "holds no caption") in str(e.value)
