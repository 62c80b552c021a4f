"""CLIP weights from disk (deit_jax.weights: clip, hf_clip, torchscript): every file format,
the overrides a file implies, the command line, and refusals (a pickle that runs code).

All on one small random open_clip model (QuickGELU, 2 x 128 towers), converted in memory as the
reference: every file must give bit-identical variables.
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from _optional import require

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = require("torch")
open_clip = require("open_clip")
transformers = require("transformers")
from safetensors.torch import save_file  # noqa: E402

from deit_jax import convert  # noqa: E402
from deit_jax.errors import CheckpointError  # noqa: E402
from deit_jax.weights import clip as clip_weights  # noqa: E402
from deit_jax.weights import hf_clip, load  # noqa: E402
from deit_jax.weights.directory import load_variables  # noqa: E402
from deit_jax.weights.load import load_weights  # noqa: E402
from deit_jax.weights.tokenizer import load_tokenizer  # noqa: E402

NAME = "clip_vit_b32"
SIZE = dict(
    embed_dim=48, img_size=32, patch_size=8, vision_width=128, vision_layers=2,
    vision_heads=2, text_width=128, text_layers=2, text_heads=2, context_length=77,
    vocab_size=49408, mlp_ratio=4.0,
)  # fmt: skip
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def same(a, b) -> None:
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=48,
        vision_cfg=dict(layers=2, width=128, patch_size=8, image_size=32),
        text_cfg=dict(layers=2, width=128, heads=2),
        quick_gelu=True,
    ).eval()
    state = model.state_dict()
    return model, state, convert.torch_to_flax(state, NAME, quick_gelu=True)


def test_hf_defaults_are_transformers_defaults():
    """config.json from save_pretrained leaves out default values: weights.hf_clip fills them in."""
    config = transformers.CLIPConfig().to_dict()
    assert config["projection_dim"] == hf_clip.HF_DEFAULTS["projection_dim"]
    for tower in ("text_config", "vision_config"):
        for key, value in hf_clip.HF_DEFAULTS[tower].items():
            assert config[tower][key] == value, (tower, key)


def test_every_open_clip_file_format(reference, tmp_path, caplog):
    model, state, expected = reference
    # .safetensors and .bin: sizes from the shapes; the activation is not in the file.
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.bin")
    # An open_clip training checkpoint: {"state_dict": {"module.<key>": ...}, "epoch": ...}.
    wrapped = {f"module.{k}": v for k, v in state.items()}
    torch.save({"epoch": 3, "state_dict": wrapped}, tmp_path / "epoch_3.pth")
    for name in ("w.safetensors", "w.bin", "epoch_3.pth"):
        caplog.clear()
        overrides = load.inferred_overrides(tmp_path / name, NAME)
        assert overrides == {**SIZE, "quick_gelu": False}
        assert "does not say which activation" in caplog.text
        variables = convert.load_torch_checkpoint(tmp_path / name, NAME, quick_gelu=True)
        same(variables, expected)
    # The hub's open_clip layout: open_clip_config.json beside the weights says QuickGELU.
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(state, str(hub / "open_clip_model.safetensors"))
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    variables, overrides = load.load_with_overrides(hub / "open_clip_model.safetensors", NAME)
    assert overrides == {**SIZE, "quick_gelu": True}
    same(variables, expected)


def test_openai_torchscript_archive_is_read_as_data(reference, tmp_path):
    """A real TorchScript archive (torch.jit.script of the open_clip model, as OpenAI's .pt
    files are) gives the same variables, QuickGELU inferred, without torch.jit.load."""
    model, state, expected = reference
    torch.jit.save(torch.jit.script(model), str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(Exception, match="TorchScript"):  # what torch.load itself says
        torch.load(tmp_path / "ViT-B-32.pt", weights_only=True)
    variables, overrides = load.load_with_overrides(tmp_path / "ViT-B-32.pt", NAME)
    assert overrides == {**SIZE, "quick_gelu": True}
    same(variables, expected)
    assert hf_clip.is_hf_dir(tmp_path) is False

    # The same archive with a data.pkl that would run a command: refused by name, nothing runs.
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(tmp_path / "ViT-B-32.pt") as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps({"x": RunsCode(str(marker))}, protocol=2)
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match=r"asks for posix\.system.*never runs code"):
        convert.load_torch_checkpoint(evil, NAME)
    assert not marker.exists()


class RunsCode:
    """Unpickling this runs `touch path`: what a weights reader must never do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def hf_model(tmp_path, reference) -> tuple[str, dict]:
    """A transformers directory of the same weights (exported by deit_jax, loaded strictly)."""
    _, _, expected = reference
    config = transformers.CLIPConfig(
        projection_dim=48,
        text_config=dict(
            hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2
        ),
        vision_config=dict(
            hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
    )  # fmt: skip
    model = transformers.CLIPModel(config)
    model.load_state_dict(clip_weights.flax_to_hf(expected), strict=True)
    directory = str(tmp_path / "hf")
    model.save_pretrained(directory)
    from test_clip import write_tokenizer_files

    write_tokenizer_files(directory)
    return directory, expected


def test_transformers_dir_cli_records_overrides_and_tokenizer(reference, tmp_path):
    directory, expected = hf_model(tmp_path, reference)
    variables, overrides = load_weights(directory, NAME)  # straight from the directory
    assert overrides == {**SIZE, "quick_gelu": True}
    same(variables, expected)
    # pytorch_model.bin instead of model.safetensors.
    bin_dir = tmp_path / "hf_bin"
    bin_dir.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        (bin_dir / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    torch.save(
        transformers.CLIPModel.from_pretrained(directory).state_dict(),
        bin_dir / "pytorch_model.bin",
    )
    same(convert.load_torch_checkpoint(bin_dir, NAME), expected)

    out = tmp_path / "converted"
    convert.main(["--checkpoint", directory, "--model", NAME, "--output", str(out)])
    variables, metadata = load_variables(out)
    assert metadata == {"model_name": NAME, "model_overrides": {**SIZE, "quick_gelu": True}}
    same(variables, expected)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(
        os.listdir(out / "tokenizer")
    )
    texts = ["a photo of a dog.", "itap of the Golden Retriever"]
    np.testing.assert_array_equal(
        load_tokenizer(str(out))(texts),
        load_tokenizer(directory)(texts),
    )
    assert (load_tokenizer(str(out))(texts)[:, -1] == 49407).all()  # its padding


def test_cli_on_a_torchscript_file_and_an_explicit_activation(reference, tmp_path):
    model, _, expected = reference
    torch.jit.save(torch.jit.script(model), str(tmp_path / "ViT-B-32.pt"))
    out = tmp_path / "converted"
    convert.main(
        ["--checkpoint", str(tmp_path / "ViT-B-32.pt"), "--model", NAME, "--output", str(out)]
    )
    variables, overrides = load_weights(str(out), NAME)
    assert overrides == {**SIZE, "quick_gelu": True}
    same(variables, expected)
    assert not (out / "tokenizer").exists()
    texts = ["a photo of a dog."]
    np.testing.assert_array_equal(
        load_tokenizer(str(out))(texts), open_clip.tokenize(texts).numpy()
    )
    # --no-quick-gelu wins over what the format implies.
    convert.main(
        ["--checkpoint", str(tmp_path / "ViT-B-32.pt"), "--model", NAME,
         "--output", str(tmp_path / "exact"), "--no-quick-gelu"]
    )  # fmt: skip
    assert load_weights(str(tmp_path / "exact"), NAME)[1]["quick_gelu"] is False


def test_mismatches_are_listed(reference, tmp_path):
    _, state, _ = reference
    with pytest.raises(CheckpointError, match=r"wrong shapes \(\d+\).*visual\.conv1\.weight"):
        convert.torch_to_flax(state, NAME, patch_size=16, img_size=64)
    partial = {k: v for k, v in state.items() if k != "ln_final.bias"}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing.*ln_final\.bias(.|\n)*unexpected.*extra"):
        convert.torch_to_flax(partial, NAME)
    deit = {"patch_embed.proj.weight": torch.zeros(192, 3, 16, 16)}
    with pytest.raises(CheckpointError, match="Not an open_clip / OpenAI ViT CLIP state dict"):
        convert.torch_to_flax(deit, NAME)


def test_a_pickle_that_runs_code_is_refused_in_one_line(tmp_path, capsys):
    """convert (in-process main) and deit_jax.main (a real process, with the file as a teacher):
    exit 1, one `error:` line naming posix.system, no traceback, no torch advice, nothing run."""
    marker = tmp_path / "MARKER"
    torch.save({"weight": torch.zeros(2), "x": RunsCode(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(SystemExit) as exit_info:
        convert.main(
            ["--checkpoint", str(tmp_path / "evil.pth"), "--model", "deit_tiny_patch16_224",
             "--output", str(tmp_path / "out")]
        )  # fmt: skip
    assert exit_info.value.code == 1
    convert_err = capsys.readouterr().err

    cmd = [
        sys.executable, "-m", "deit_jax.main", f"--config={ROOT}/tests/_train_config.py",
        f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.distillation.kind=hard", f"--config.teacher.checkpoint={tmp_path / 'evil.pth'}",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    main = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert main.returncode == 1, main.stderr[-3000:]
    for stderr in (convert_err, main.stderr):
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, stderr
        assert "posix.system" in errors[0] and "never runs code from a weights file" in errors[0]
        assert "Traceback" not in stderr and "will likely succeed" not in stderr, stderr
        assert "weights_only=False" not in stderr and "weights_only` set to `False" not in stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
