"""Datasets and domains: loading and splits, D_mem, the shipped tiny base, images, column checks, encoding."""
