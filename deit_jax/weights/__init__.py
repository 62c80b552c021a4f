"""Weights in and out of deit_jax, one module per format or concern:

- `directory`: deit_jax weights directories (Orbax checkpoint + `deit_jax.json`);
- `state_dict`: PyTorch state dicts read safely and matched to a model (one mismatch report);
- `surgery`: position embeddings resized and heads made afresh when a model's shape differs;
- `timm_keys`, `clip`, `hf_clip`, `torchscript`: the formats (timm / official DeiT keys, open_clip /
  OpenAI keys, transformers' CLIP, OpenAI's TorchScript archives read as data);
- `load`: one way in for the student (`init_from`) and the teacher (`teacher.checkpoint`);
- `timm_export`: a timm / Hub folder out, and back;
- `cli`: `python -m deit_jax.convert` and `python -m deit_jax.export`.
"""
