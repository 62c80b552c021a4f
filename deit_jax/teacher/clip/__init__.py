"""A CLIP model as a zero-shot teacher (`config.teacher.framework="clip"`):

- `zero_shot`: the frozen teacher module (image tower + fixed head) and how a run builds it;
- `head`: the zero-shot head, computed once by the text tower and kept with the run;
- `tokenizer`: the reference tokenizer that belongs to the weights.
"""
