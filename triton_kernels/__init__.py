"""Triton GPU kernels of merge_engine, installed as ``merge_engine.triton_kernels`` (package_dir in
pyproject.toml) so that no top-level ``triton_kernels`` package of ours can clash with others."""
