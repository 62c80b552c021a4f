"""Checkpoint files, position-embedding resizing and bad input for `deit_jax.convert`."""

import argparse
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import deit_jax
from deit_jax import convert
from deit_jax.errors import CheckpointMismatchError
from deit_jax.weights.directory import load_variables
from deit_jax.weights.state_dict import read_state_dict
from deit_jax.weights.surgery import resize_pos_embed

TINY = "deit_tiny_patch16_224"
TINY_DISTILLED = "deit_tiny_distilled_patch16_224"


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny_state_dict():
    torch.manual_seed(0)
    model = timm.create_model(TINY_DISTILLED, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.state_dict()


def reference_resize(pos_embed: torch.Tensor, prefix: int, new_grid) -> torch.Tensor:
    """The official DeiT fine-tuning code's procedure (main.py), for any target grid."""
    tokens, grid = pos_embed[:, :prefix], pos_embed[:, prefix:]
    side = int(grid.shape[1] ** 0.5)
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    return torch.cat([tokens, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("new_grid", [(24, 24), (12, 20), (7, 7)])
def test_resize_pos_embed_matches_reference(new_grid):
    pos = torch.randn(1, 2 + 14 * 14, 192)
    expected = reference_resize(pos, 2, new_grid).numpy()
    got = resize_pos_embed(pos.numpy(), new_grid, num_prefix_tokens=2)
    assert got.shape == expected.shape
    assert rel_l2(got, expected) <= 1e-5
    np.testing.assert_array_equal(got[:, :2], pos.numpy()[:, :2])


def test_resize_differs_from_jax_image_resize():
    """Guards the a=-0.75 kernel: jax.image.resize (a=-0.5) would not pass the test above."""
    import jax

    grid = np.random.default_rng(0).normal(size=(14, 14, 8)).astype(np.float32)
    ours = resize_pos_embed(
        np.concatenate([np.zeros((1, 8)), grid.reshape(-1, 8)])[None], (24, 24), 1
    )
    theirs = jax.image.resize(grid, (24, 24, 8), "bicubic").reshape(1, -1, 8)
    assert rel_l2(ours[:, 1:], theirs) > 1e-3


def test_convert_to_384_resizes_pos_embed(tiny_state_dict):
    variables = convert.torch_to_flax(tiny_state_dict, TINY_DISTILLED, img_size=384)
    expected = reference_resize(tiny_state_dict["pos_embed"], 2, (24, 24)).numpy()
    assert rel_l2(variables["params"]["pos_embed"], expected) <= 1e-5
    model = deit_jax.create_model(TINY_DISTILLED, img_size=384)
    assert model.apply(variables, np.zeros((1, 384, 384, 3), np.float32)).shape == (1, 1000)


def test_new_num_classes_reinitialises_heads_with_a_warning(tiny_state_dict, caplog):
    with caplog.at_level(logging.WARNING):
        variables = convert.torch_to_flax(tiny_state_dict, TINY_DISTILLED, num_classes=10)
    assert "re-initialising head, head_dist" in caplog.text
    params = variables["params"]
    assert params["head"]["kernel"].shape == (192, 10)
    assert params["head_dist"]["kernel"].shape == (192, 10)
    np.testing.assert_array_equal(params["cls_token"], tiny_state_dict["cls_token"].numpy())


def test_official_wrapping_and_file_formats(tiny_state_dict, tmp_path):
    expected = convert.torch_to_flax(tiny_state_dict, TINY_DISTILLED)
    torch.save({"model": tiny_state_dict, "epoch": 299}, tmp_path / "official.pth")
    save_file(dict(tiny_state_dict), str(tmp_path / "weights.safetensors"))
    for path in (tmp_path / "official.pth", tmp_path / "weights.safetensors"):
        got = convert.load_torch_checkpoint(path, TINY_DISTILLED)
        np.testing.assert_array_equal(
            got["params"]["blocks_5"]["mlp"]["fc1"]["kernel"],
            expected["params"]["blocks_5"]["mlp"]["fc1"]["kernel"],
        )


def test_wrong_model_lists_all_mismatched_shapes(tiny_state_dict):
    with pytest.raises(CheckpointMismatchError) as err:
        convert.torch_to_flax(tiny_state_dict, "deit_small_distilled_patch16_224")
    message = str(err.value)
    assert "wrong shapes" in message and "blocks.11.mlp.fc2.weight" in message
    assert "Check that --model names the architecture" in message


def test_distilled_checkpoint_into_plain_model_lists_unexpected_keys(tiny_state_dict):
    with pytest.raises(CheckpointMismatchError, match=r"unexpected .*dist_token.*head_dist"):
        convert.torch_to_flax(tiny_state_dict, TINY)


def test_extra_and_missing_keys_are_listed_together(tiny_state_dict):
    state = dict(tiny_state_dict)
    state["blocks.12.attn.qkv.weight"] = torch.zeros(3)
    del state["norm.bias"]
    with pytest.raises(CheckpointMismatchError) as err:
        convert.torch_to_flax(state, TINY_DISTILLED)
    assert "missing from the checkpoint (1): norm.bias" in str(err.value)
    assert "unexpected in the checkpoint (1): blocks.12.attn.qkv.weight" in str(err.value)


def test_unknown_model_name_suggests_close_names(tiny_state_dict):
    with pytest.raises(ValueError, match="Did you mean 'deit_tiny_distilled_patch16_224'"):
        convert.torch_to_flax(tiny_state_dict, "deit_tiny_distiled_patch16_224")


class RunsCode:
    """Unpickling this runs a command: what weights_only=True exists to refuse."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_missing_truncated_and_pickled_files_are_refused(tiny_state_dict, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")

    torch.save(tiny_state_dict, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_state_dict(tmp_path / "cut.pth")

    save_file(dict(tiny_state_dict), str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_state_dict(tmp_path / "cut.safetensors")

    marker = tmp_path / "executed"
    torch.save({"model": tiny_state_dict, "x": RunsCode(str(marker))}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(tmp_path / "pickle.pth")
    assert not marker.exists()


def test_official_training_checkpoint_with_args_namespace_loads(tiny_state_dict, tmp_path):
    args = argparse.Namespace(model=TINY_DISTILLED, lr=5e-4)
    torch.save({"model": tiny_state_dict, "epoch": 3, "args": args}, tmp_path / "ckpt.pth")
    state = read_state_dict(tmp_path / "ckpt.pth")
    assert set(state) == set(tiny_state_dict)


def test_cli_writes_an_orbax_checkpoint(tiny_state_dict, tmp_path):
    torch.save({"model": tiny_state_dict}, tmp_path / "ckpt.pth")
    out = tmp_path / "converted"
    cmd = [
        sys.executable,
        "-m",
        "deit_jax.convert",
        "--checkpoint",
        str(tmp_path / "ckpt.pth"),
        "--model",
        TINY_DISTILLED,
        "--output",
        str(out),
        "--num-classes",
        "10",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "re-initialising" in result.stderr
    variables, metadata = load_variables(out)
    assert metadata == {"model_name": TINY_DISTILLED, "model_overrides": {"num_classes": 10}}
    np.testing.assert_array_equal(
        variables["params"]["pos_embed"], tiny_state_dict["pos_embed"].numpy()
    )
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_tensorflow_first_then_timm_does_not_crash():
    """REFERENCE pitfall: TF imported before torchvision segfaults; _compat orders them."""
    code = (
        "from deit_jax import _compat\n"
        "tf = _compat.import_tensorflow()\n"
        "import timm\n"
        "print(tf.constant(2).numpy() + timm.create_model('deit_tiny_patch16_224').num_classes)\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "1002"
