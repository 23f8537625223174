"""Checkpoint input and output: read HF model folders, check compatibility, write merged ones."""

from evomerge.io.checkpoint import Checkpoint, TensorMeta
from evomerge.io.compat import check_compatible
from evomerge.io.save import parse_size, prepare_output_dir, save_checkpoint

__all__ = ["Checkpoint", "TensorMeta", "check_compatible", "parse_size", "prepare_output_dir", "save_checkpoint"]
