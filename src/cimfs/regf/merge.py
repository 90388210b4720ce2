"""Flattening differencing hives (placeholder until the merge lands)."""


def merge(base, deltas):
    raise NotImplementedError


def merge_files(base_path, delta_paths, out_path):
    raise NotImplementedError
