"""Experiments built from the library's runs: each runs several training jobs and reports on
them (`quickstart`: the DeiT paper's distillation ablation on the offline digits)."""
