"""Loading files users hand in — checkpoints, caches, converted weights — without unpickling code.

Every checkpoint read in the project goes through :func:`load_checkpoint_file`:
``torch.load(..., weights_only=True)`` (tensors, numbers, strings, lists and dicts only), with
one clear line naming the file and what is wrong with it when it cannot be read.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch

from unifusion.errors import CheckpointError, first_line


def load_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a one-line :class:`CheckpointError` for
    a missing path, a directory, an empty / truncated / non-PyTorch file, or a file that would
    need arbitrary Python objects (a crafted pickle is refused, never executed)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path!r} does not exist (look under runs/*/checkpoints/)")
    if os.path.isdir(path):
        raise CheckpointError(
            f"{what} {path!r} is a directory, not a checkpoint file (an exported pipeline folder goes to --model)"
        )
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{what} {path!r} is empty (0 bytes); the download or save did not finish")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()
        culprit = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{what} {path!r} holds Python objects other than tensors and plain data, so it was not loaded "
            f"(files are never unpickled){': ' + culprit if culprit else ''}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        text = first_line(e)
        if "zip archive" in text or "central directory" in text or isinstance(e, (EOFError, zipfile.BadZipFile)):
            reason = "it is truncated or not a PyTorch checkpoint"
        else:
            reason = text
        raise CheckpointError(f"{what} {path!r} cannot be read: {reason} ({size} bytes)") from None
    except Exception as e:
        # arbitrary bytes drive the (legacy-format) unpickler into IndexError, KeyError,
        # struct.error, ...: still a bad file, not a bug to show as a traceback
        raise CheckpointError(
            f"{what} {path!r} cannot be read: it is truncated or not a PyTorch checkpoint "
            f"({type(e).__name__} while parsing, {size} bytes)"
        ) from None


def load_safetensors_file(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file(path)`` with a one-line :class:`CheckpointError` naming the
    file when it is missing, truncated or not safetensors (its header is JSON; nothing is unpickled)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} does not exist or is not a file")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types (SafetensorError, ...) for corrupt files
        raise CheckpointError(f"{what} {path!r} is not a readable safetensors file ({first_line(e)})") from None
