"""A teacher ensemble read from several caches of one stream and mixed at read time
(`--config.teacher.cache=A,B --config.teacher.cache_weights=...`, deit_jax/teacher/cache/mix.py).

Two random `cnn_small` teachers (other init seeds) each write a float32 cache of all 10 classes
over the tiny config's stream (tests/_train_config.py: 8 steps of 32 digits at 16x16), once.
References are NumPy's, from the arrays each cache stores. Tolerances: mixed probabilities to
1e-6 absolute (float64 on the host, float32 out); a run whose weights single out one member
follows that member's own cached run, losses to a relative 1e-5 and parameters to 1e-4 absolute
(the same loss, its target rounded differently), as tests/test_teacher_cache.py's tolerances.
"""

import os

import jax
import numpy as np
import pytest
from _train_config import save_random_teacher, tiny_config

from deit_jax import data, sharding, train
from deit_jax.config import rules
from deit_jax.errors import ConfigError
from deit_jax.teacher import cache, forward
from deit_jax.teacher.cache import mix
from deit_jax.train.metrics import read_jsonl
from deit_jax.weights.directory import load_variables, save_variables

TAU = 2.0


def ensemble_config(data_dir, teacher="", **changes):
    base = {
        "distillation.kind": "soft",
        "distillation.tau": TAU,
        "teacher.name": "cnn_small",
        "teacher.checkpoint": teacher,
        "teacher.cache_topk": 10,
        "teacher.cache_dtype": "float32",
        "teacher.cache_chunk_steps": 3,
    }
    return tiny_config(data_dir, **{**base, **changes})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def peaked_teacher(root, seed):
    """A random `cnn_small` whose classifier is scaled by 30: a random network's outputs are
    near-uniform, and a distillation term of near-uniform teachers tells members apart poorly."""
    random = save_random_teacher(str(root / "random"), seed=seed)
    variables, metadata = load_variables(random)
    fc = variables["params"]["fc"]
    fc["kernel"], fc["bias"] = 30 * fc["kernel"], 30 * fc["bias"]
    path = str(root / "weights")
    save_variables(
        path, variables, model_name="cnn_small", model_overrides=metadata["model_overrides"]
    )
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return [peaked_teacher(root / name, seed) for name, seed in (("a", 7), ("b", 11))]


def members(teachers, weights=(1.0, 1.0)):
    """`teacher.members` of the two teachers, "a" and "b"."""
    return {
        name: {"checkpoint": path, "weight": w}
        for name, path, w in zip("ab", teachers, weights, strict=True)
    }


@pytest.fixture(scope="module")
def caches(data_dir, teachers, tmp_path_factory):
    """Each member's cache, written once: the writer given the ensemble writes DIR/a and DIR/b,
    each by the ordinary writer, as that member's alone."""
    root = str(tmp_path_factory.mktemp("ensemble"))
    config = ensemble_config(data_dir, **{"teacher.members": members(teachers)})
    summaries = cache.write_cache(config, root, devices=jax.devices()[:1])
    assert sorted(summaries) == ["a", "b"]
    return [os.path.join(root, "a"), os.path.join(root, "b")]


def reader_for(config):
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    train_data = data.build_train(config, mesh, data_axes=sharding.DATA_AXES)
    return mix.open_reader(config, train_data)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def member_log_probs(path, epoch, step):
    """(B, 10) log-probabilities a member's cache stores for one batch (all 10 classes)."""
    stored = cache.CacheStore(path).read_all()
    values, indices = stored["values"][epoch, step], stored["indices"][epoch, step]
    full = np.zeros(values.shape)
    np.put_along_axis(full, indices.astype(np.int64), values.astype(np.float64), -1)
    return full


def dense(target):
    full = np.zeros(target["teacher_logp"].shape)
    np.put_along_axis(full, target["teacher_index"].astype(np.int64), target["teacher_logp"], -1)
    return full


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_the_mixed_target_is_the_weighted_mean_of_the_members_probabilities(data_dir, caches, kind):
    config = ensemble_config(
        data_dir,
        **{"distillation.kind": kind, "teacher.cache": ",".join(caches)},
        **{"teacher.cache_weights": "0.7,0.3"},
    )
    reader = reader_for(config)
    assert isinstance(reader, mix.MixedCacheReader)
    for epoch, step in ((0, 0), (0, 4), (0, 7)):
        target = reader(epoch, step)
        a, b = (member_log_probs(p, epoch, step) for p in caches)
        if kind == "soft":  # the loss takes softmax(target / T): the mixture at T
            expected = 0.7 * softmax(a / TAU) + 0.3 * softmax(b / TAU)
            np.testing.assert_allclose(softmax(dense(target) / TAU), expected, atol=1e-6)
        else:  # the step's hard label is the first index: the mixture's argmax at T = 1
            expected = 0.7 * softmax(a) + 0.3 * softmax(b)
            np.testing.assert_array_equal(target["teacher_index"][:, 0], expected.argmax(-1))
            # The members disagree on some rows, so the mix is neither member's label alone.
            assert (a.argmax(-1) != b.argmax(-1)).any()


def train_losses(workdir, key="train/loss"):
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return np.array([r[key] for r in records if key in r])


def test_weights_that_single_out_one_member_train_as_that_members_cache(data_dir, caches, tmp_path):
    runs = {}
    for name, changes in {
        "alone": {"teacher.cache": caches[0]},
        "weighted": {"teacher.cache": ",".join(caches), "teacher.cache_weights": "1,0"},
        "mixed": {"teacher.cache": ",".join(caches), "teacher.cache_weights": "1,1"},
    }.items():
        workdir = str(tmp_path / name)
        train.train_and_evaluate(
            ensemble_config(data_dir, **changes), workdir, devices=jax.devices()[:1]
        )
        runs[name] = (train_losses(workdir), load_variables(os.path.join(workdir, "weights"))[0])
        runs[name] += (train_losses(workdir, "train/loss_distillation"),)
    (alone, alone_params, alone_kd), (weighted, weighted_params, _), (_, _, mixed_kd) = (
        runs.values()
    )
    assert len(alone) == 8
    np.testing.assert_allclose(weighted, alone, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(weighted_params), jax.tree.leaves(alone_params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=0)
    print("distillation term, member a alone:", alone_kd, "equal mix:", mixed_kd)
    assert (np.abs(mixed_kd - alone_kd) > 1e-2 * alone_kd).all()  # the mix is another target


@pytest.mark.parametrize(
    "weights, message",
    [
        ("0.5,-0.5", "must be non-negative and not all 0"),
        ("0,0", "must be non-negative and not all 0"),
        ("0.5,0.3,0.2", "gives 3 weights for the 2 caches of teacher.cache"),
        ("a,b", "must be comma-separated numbers"),
    ],
)
def test_bad_weights_are_refused_in_one_line(data_dir, caches, weights, message, tmp_path):
    config = ensemble_config(
        data_dir, **{"teacher.cache": ",".join(caches), "teacher.cache_weights": weights}
    )
    with pytest.raises(ConfigError) as e:
        train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    (line,) = e.value.problems
    assert line.startswith(f"config.teacher.cache_weights={weights!r}: ") and message in line
    assert not os.path.exists(tmp_path / "checkpoints")


def test_weights_without_an_ensemble_are_refused(data_dir, caches):
    config = ensemble_config(data_dir, **{"teacher.cache": caches[0], "teacher.cache_weights": "1"})
    with pytest.raises(ConfigError, match="give teacher.cache several caches"):
        train.train_and_evaluate(config, "/nonexistent", devices=jax.devices()[:1])


def test_a_member_of_another_stream_is_refused_naming_it_and_the_key(data_dir, caches, tmp_path):
    teacher = peaked_teacher(tmp_path, seed=5)
    other = str(tmp_path / "other_seed")
    cache.write_cache(ensemble_config(data_dir, teacher, seed=1), other, devices=jax.devices()[:1])
    config = ensemble_config(data_dir, **{"teacher.cache": f"{caches[0]},{other}"})
    with pytest.raises(cache.CacheError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    message = str(e.value)
    assert message.startswith(f"Member {other!r} of teacher.cache=")
    assert "config.seed: cache 1, this run 0" in message


# --------------------------------------------------------------------------- live ensembles


def test_the_live_mix_is_the_weighted_mean_of_the_members_probabilities():
    rng = np.random.default_rng(0)
    a, b = 5 * rng.normal(size=(2, 64, 10)).astype(np.float32)
    for tau in (1.0, TAU):
        logits = np.asarray(forward.mixed_logits([a, b], [0.7, 0.3], tau), np.float64)
        expected = 0.7 * softmax(a / tau) + 0.3 * softmax(b / tau)
        np.testing.assert_allclose(softmax(logits / tau), expected, atol=1e-6)
        np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))
    # A zero weight drops its member: the mix is the other member's log-probabilities.
    only_a = np.asarray(forward.mixed_logits([a, b], [1.0, 0.0], 1.0))
    np.testing.assert_allclose(softmax(only_a), softmax(a), atol=1e-7)


def run(config, workdir):
    train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    return train_losses(str(workdir)), load_variables(os.path.join(workdir, "weights"))[0]


def test_a_one_member_ensemble_is_the_single_teacher_bit_for_bit(data_dir, teachers, tmp_path):
    single = run(ensemble_config(data_dir, teachers[0]), tmp_path / "single")
    one = {"a": {"checkpoint": teachers[0], "weight": 0.4}}
    member = run(ensemble_config(data_dir, **{"teacher.members": one}), tmp_path / "member")
    np.testing.assert_array_equal(member[0], single[0])
    for x, y in zip(jax.tree.leaves(member[1]), jax.tree.leaves(single[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_one_member_ensembles_cache_is_the_single_teachers_cache(
    data_dir, teachers, caches, tmp_path
):
    """The ensemble writer wrote member a's cache (the fixture) as the single teacher's writer."""
    single = str(tmp_path / "single_a")
    cache.write_cache(ensemble_config(data_dir, teachers[0]), single, devices=jax.devices()[:1])
    manifests = [cache.CacheStore(p).read_manifest() for p in (single, caches[0])]
    for m in manifests:
        del m["deit_jax_version"]
    assert manifests[0] == manifests[1]
    for name, array in cache.CacheStore(single).read_all().items():
        np.testing.assert_array_equal(cache.CacheStore(caches[0]).read_all()[name], array)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_a_mixed_read_from_caches_equals_the_live_ensembles_losses(
    data_dir, teachers, caches, kind, tmp_path
):
    """Float32 caches of all 10 classes: the mixed read is the live mix, losses to 1e-5. (That
    either mix is the weighted mean, not one member's, the NumPy tests above show.)"""
    weights = (0.7, 0.3)
    kind_and = {"distillation.kind": kind}
    live = ensemble_config(data_dir, **kind_and, **{"teacher.members": members(teachers, weights)})
    cached = ensemble_config(
        data_dir,
        **kind_and,
        **{"teacher.cache": ",".join(caches), "teacher.cache_weights": "0.7,0.3"},
    )
    (live_losses, live_params), (cached_losses, cached_params) = (
        run(live, tmp_path / "live"),
        run(cached, tmp_path / "cached"),
    )
    assert len(live_losses) == 8 and np.isfinite(live_losses).all()
    np.testing.assert_allclose(cached_losses, live_losses, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(cached_params), jax.tree.leaves(live_params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "members_value, message",
    [
        ({"a": {"checkpoint": "A", "tau": 2.0}}, "member 'a' sets tau: a member may set"),
        ({"a": {"checkpoint": 5}}, "member 'a': Could not override field 'checkpoint'"),
        ({"a": {"weight": -1.0}, "b": {"weight": 2.0}}, "must be non-negative numbers"),
        ({"a": {"weight": 0.0}, "b": {"weight": 0.0}}, "must be non-negative numbers, not all 0"),
        ({"a": {}, "b": {}}, "feature distillation takes one teacher"),
        (
            {"a": {}, "b": {"framework": "torch", "name": "resnet18"}},
            "member 'b' is a PyTorch model, which teaches through its cache",
        ),
    ],
    ids=["unknown_key", "wrong_type", "negative", "all_zero", "feature", "torch_live"],
)
def test_bad_members_are_refused_in_one_line(data_dir, teachers, members_value, message):
    kind = "feature" if "feature" in message else "soft"
    config = ensemble_config(
        data_dir, teachers[0], **{"distillation.kind": kind, "teacher.members": members_value}
    )
    found = rules.problems(config, num_devices=1)
    assert len(found) == 1 and found[0].startswith("config.teacher.members=")
    assert message in found[0]


def test_a_members_own_problems_are_named_after_it(data_dir, teachers):
    ensemble = {"a": {"checkpoint": teachers[0]}, "b": {"checkpoint": "/no/such/teacher"}}
    config = ensemble_config(data_dir, **{"teacher.members": ensemble})
    found = rules.problems(config, num_devices=1)
    assert found == [
        "config.teacher.members.b.checkpoint='/no/such/teacher': does not exist; give "
        + found[0].split("does not exist; give ", 1)[1]
    ]


def test_a_member_of_another_class_count_is_refused_naming_it(data_dir, teachers, tmp_path):
    import flax.linen as nn

    from deit_jax.errors import CheckpointError
    from deit_jax.models import create_model

    model = create_model("cnn_small", num_classes=7, img_size=16)
    variables = nn.meta.unbox(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3))))
    seven = str(tmp_path / "seven")
    overrides = {"num_classes": 7, "img_size": 16}
    save_variables(seven, variables, model_name="cnn_small", model_overrides=overrides)
    ensemble = {"a": {"checkpoint": teachers[0]}, "b": {"checkpoint": seven}}
    config = ensemble_config(data_dir, **{"teacher.members": ensemble})
    with pytest.raises(CheckpointError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert str(e.value).startswith("Member 'b' of config.teacher.members: ")
    assert "predicts 7 classes" in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
