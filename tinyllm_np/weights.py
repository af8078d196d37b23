"""Checked loading of weight files: every problem becomes one clear WeightsError line.

A weights file is an .npz archive holding one float array per parameter (the
original state_dict's names), ``__config__`` (the Config as a JSON string) and
optionally ``__chars__`` (the vocabulary as a JSON list).  It is read with
``allow_pickle=False``: an archive that smuggles in a pickle is refused, so
loading a file can never run code.
"""

import dataclasses
import json
import math
import os
import zipfile

import numpy as np

from .model import Config, TinyLLM



class WeightsError(ValueError):
    """A weights file that cannot be loaded; the message names the file and the problem."""


META_KEYS = ("__config__", "__chars__")
CHECKPOINT_KEYS = ("__opt_m__", "__opt_v__", "__train__")  # training state: a checkpoint loads as weights too


def _read_json(path, data, key):
    try:
        arr = data[key]
    except ValueError as e:  # object array under allow_pickle=False
        raise WeightsError(f"{path}: '{key}' is a pickled object; refused (weights never unpickle)") from e
    if arr.dtype.kind != "U" or arr.shape != ():
        raise WeightsError(f"{path}: '{key}' must be a JSON string, got {arr.dtype} {arr.shape}")
    try:
        return json.loads(str(arr))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: '{key}' is not valid JSON ({e.msg})") from e


def _config_from(path, raw):
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: '__config__' must be a JSON object")
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise WeightsError(f"{path}: unknown config field(s) {', '.join(unknown)}")
    try:
        return Config(**raw)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: bad config: {e}") from e


def load_npz_checked(path, extra=()):
    """Open and validate a weights file; returns (config, params, chars or None, extras).

    ``extra`` names training-state entries (CHECKPOINT_KEYS) the file must hold;
    they come back in the ``extras`` dict.  A checkpoint's training state is
    otherwise ignored, so a checkpoint also loads as weights; any other entry
    is refused.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file")
    if os.path.isdir(path):
        raise WeightsError(f"{path}: is a directory, not a weights file")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"{path}: file is empty")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as e:
        # np.load falls back to unpickling for files that are neither .npy nor .npz
        raise WeightsError(f"{path}: not an .npz weights file (pickle or unknown format refused)") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: cannot read ({e})") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise WeightsError(f"{path}: is a single .npy array, not an .npz weights archive")
    with data:
        try:
            names = list(data.files)
        except Exception as e:  # pragma: no cover - zipfile already opened
            raise WeightsError(f"{path}: corrupt archive ({e})") from e
        if "__config__" not in names:
            raise WeightsError(f"{path}: no '__config__' entry; not a tinyllm_np weights file")
        config = _config_from(path, _read_json(path, data, "__config__"))
        chars = _read_json(path, data, "__chars__") if "__chars__" in names else None
        expected = config.param_shapes()
        present = [n for n in names if n not in META_KEYS and n not in CHECKPOINT_KEYS]
        absent = [n for n in extra if n not in names]
        if absent:
            raise WeightsError(f"{path}: missing {', '.join(absent)}; not a training checkpoint")
        extras = {}
        for n in extra:
            try:
                extras[n] = data[n]
            except ValueError as e:
                raise WeightsError(f"{path}: '{n}' is a pickled object; refused") from e
        missing = [n for n in expected if n not in present]
        extra = [n for n in present if n not in expected]
        if missing:
            raise WeightsError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                               + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if extra:
            raise WeightsError(f"{path}: unexpected tensor(s) {', '.join(extra[:5])}"
                               + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
        params, dtypes = {}, set()
        for name, shape in expected.items():
            try:
                arr = data[name]
            except ValueError as e:
                raise WeightsError(f"{path}: tensor '{name}' is a pickled object; refused") from e
            except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
                raise WeightsError(f"{path}: tensor '{name}' is damaged ({e})") from e
            except Exception as e:  # zlib.error, CRC mismatch (BadZipFile subclasses vary)
                raise WeightsError(f"{path}: tensor '{name}' is damaged ({type(e).__name__}: {e})") from e
            if arr.dtype not in (np.float32, np.float64):
                raise WeightsError(f"{path}: tensor '{name}' has dtype {arr.dtype}, expected float32 or float64")
            if arr.shape != tuple(shape):
                raise WeightsError(f"{path}: tensor '{name}' has shape {arr.shape}, config says {tuple(shape)}")
            if not np.all(np.isfinite(arr)):
                raise WeightsError(f"{path}: tensor '{name}' holds NaN or infinite values")
            dtypes.add(arr.dtype)
            params[name] = arr
        if len(dtypes) > 1:
            raise WeightsError(f"{path}: tensors mix dtypes {sorted(str(d) for d in dtypes)}")
    if chars is not None:
        if (not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars)
                or len(set(chars)) != len(chars)):
            raise WeightsError(f"{path}: '__chars__' must be a list of distinct single characters")
        if len(chars) != config.vocab_size:
            raise WeightsError(f"{path}: vocabulary has {len(chars)} characters but the embedding has "
                               f"{config.vocab_size} rows")
    return config, params, chars, extras


def load_model(path):
    """The TinyLLM saved in ``path`` (by TinyLLM.save, or a checkpoint); never unpickles."""
    config, params, chars, _ = load_npz_checked(path)
    dtype = next(iter(params.values())).dtype
    n = sum(math.prod(s) for s in config.param_shapes().values())
    # on a buffer of its own, not initialised: load_state_dict checks the names and shapes and
    # writes every number (4.5 ms saved at nanoGPT's recipe)
    model = TinyLLM(config, dtype=dtype, chars=chars, flat=np.empty(n, dtype=dtype))
    model.load_state_dict(params)
    return model
