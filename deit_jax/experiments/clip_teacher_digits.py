"""An offline CLIP teacher: scikit-learn's digits with captions, and a small open_clip CLIP
trained on them with open_clip's own model and loss.

`write_digit_pairs(root)` writes the 1,797 digits as an img2dataset-style caption folder
(`deit_jax.data.captions`): `root/0_train/<n>.png` (the 1,437 images of the digits' train split)
and `root/1_test/<n>.png` (its 360 test images), each with `<n>.txt` holding three captions, one a
line, that say which digit it is and how thick its strokes are ("a photo of the digit 7.",
"a handwritten seven.", "a thick 7, written by hand."). Sorted by path, the first 1,437 pairs
are the train split: `data.train_split="train[:1437]"`, `data.eval_split="train[1437:]"`.

`train_open_clip_teacher(root, path)` trains `open_clip.CLIP` (two 64-wide 2-block towers with
one head, the head width 64 the converter assumes; 16 px images in 4 px patches; a 16-token
context) with `open_clip.loss.ClipLoss` on the train pairs, one caption drawn per image and
epoch, and saves its state dict as `.safetensors`: the file a user would bring, which
`python -m deit_jax.convert` turns into a deit_jax teacher.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from deit_jax.errors import DependencyError

log = logging.getLogger(__name__)

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {word}.",
    "a {thickness} {}, written by hand.",
)
PROMPTS = ("a photo of the digit {}.",)  # the zero-shot template (teacher.prompts)
NUM_TRAIN = 1437
IMAGE_SIZE, PATCH, CONTEXT = 16, 4, 16
WIDTH = 128  # both towers' and the embedding's; heads of width 64


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8), labels, train indices, test indices): deit_jax's digits split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from deit_jax.data.digits import NUM_TEST, SPLIT_SEED

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED
    )
    return images, labels, train, test


def captions_of(image: np.ndarray, label: int, median_ink: float) -> list[str]:
    """An image's three captions: its digit, as numeral and word, and its stroke thickness."""
    thickness = "thick" if image.astype(np.float64).sum() > median_ink else "thin"
    return [t.format(str(label), word=WORDS[label], thickness=thickness) for t in TEMPLATES]


def write_digit_pairs(root: str) -> str:
    """The caption folder (module docstring) in `root`, written once; returns `root`."""
    from PIL import Image

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    images, labels, train, test = _digits()
    ink = np.array([im.astype(np.float64).sum() for im in images])
    median = {c: float(np.median(ink[labels == c])) for c in range(10)}
    for folder, indices in (("0_train", train), ("1_test", test)):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for n, i in enumerate(indices):
            stem = os.path.join(root, folder, f"{n:04d}")
            Image.fromarray(images[i]).save(stem + ".png")
            with open(stem + ".txt", "w", encoding="utf-8") as f:
                f.write("\n".join(captions_of(images[i], int(labels[i]), median[labels[i]])) + "\n")
    with open(os.path.join(root, "prompts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(PROMPTS) + "\n")
    open(done, "w").close()
    return root


def prompts_file(root: str) -> str:
    return os.path.join(root, "prompts.txt")


def train_open_clip_teacher(
    root: str,
    path: str,
    *,
    seed: int = 0,
    epochs: int = 60,
    batch_size: int = 64,
    width: int = WIDTH,
) -> dict[str, float]:
    """Trains the module docstring's open_clip CLIP on the train pairs of `root` and saves it
    to `path` (.safetensors); returns its final training loss and seconds. Skipped (returns {})
    when `path` exists."""
    if os.path.exists(path):
        return {}
    import time

    try:
        import open_clip
        import torch
        from open_clip.loss import ClipLoss
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    except ImportError as e:
        raise DependencyError(
            "The CLIP quickstart trains its teacher with open_clip (PyTorch): pip install -e "
            "'.[torch]'."
        ) from e
    from PIL import Image
    from safetensors.torch import save_file

    from deit_jax.data.captions import read_caption_pairs
    from deit_jax.models.clip import CLIP_MEAN, CLIP_STD

    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = read_caption_pairs(root)[:NUM_TRAIN]
    pixels = np.stack(
        [
            np.asarray(
                Image.open(p.image).convert("RGB").resize((IMAGE_SIZE,) * 2, Image.BICUBIC),
                np.float32,
            )
            / 255.0
            for p in pairs
        ]
    )
    pixels = (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)
    tokens = [tokenizer(list(p.captions)) for p in pairs]

    model = open_clip.CLIP(
        embed_dim=width,
        vision_cfg=CLIPVisionCfg(
            layers=2, width=width, patch_size=PATCH, image_size=IMAGE_SIZE, head_width=64
        ),
        text_cfg=CLIPTextCfg(
            context_length=CONTEXT, vocab_size=49408, width=width, heads=width // 64, layers=2
        ),
    )
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    steps = epochs * (len(pairs) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        order = rng.permutation(len(pairs))
        for b in range(len(pairs) // batch_size):
            idx = order[b * batch_size : (b + 1) * batch_size]
            text = torch.stack([tokens[i][rng.integers(len(tokens[i]))] for i in idx])
            image_features, text_features, scale = model(images[idx], text)
            loss = loss_fn(image_features, text_features, scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path)
    seconds = time.perf_counter() - start
    log.info(
        "open_clip teacher: loss %.4f after %d steps (%.0f s) -> %s", loss, steps, seconds, path
    )
    return {"loss": float(loss), "seconds": seconds}
