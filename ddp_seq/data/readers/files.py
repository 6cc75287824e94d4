"""Ragged sequences from ``.npz`` files, checked so that bad input fails with one line, not a traceback.

Layout of a file (``np.savez``): ``data`` ``[total_steps, features]`` (1-D = one feature), either
``offsets`` ``[n + 1]`` or ``lengths`` ``[n]``, and the task's targets: ``labels`` ``[n]`` (classify),
``targets`` ``[n]`` (regress) or ``tags`` ``[total_steps]`` (tag). Files are never unpickled.

Arrays stored uncompressed (``np.savez``, not ``savez_compressed``) are memory-mapped straight from
the archive, read-only: every rank on a machine then shares one copy through the page cache
instead of holding its own. Store ``data`` as float32 to keep it mapped (other dtypes are converted,
which copies).
"""

from __future__ import annotations

import mmap
import zipfile
from pathlib import Path

import numpy as np

from ddp_seq.data.readers.encoding import Parsed
from ddp_seq.data.readers.sequences import SequenceData
from ddp_seq.errors import UserError, first_line

#: The target array each task reads, and whether it is per step and integer.
TARGETS = {"classify": ("labels", False, True), "regress": ("targets", False, False), "tag": ("tags", True, True)}

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # what np.load takes for an npz archive (the second: empty zip)
_NPY_MAGIC = b"\x93NUMPY"


_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _mapped(npz, path: str, name: str) -> np.ndarray | None:
    """Member ``name`` memory-mapped from the archive, or None where it cannot be (compressed,
    encrypted, empty, object dtype, an .npy version without a public header reader)."""
    try:
        info = npz.zip.getinfo(f"{name}.npy")
    except (KeyError, AttributeError):
        return None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(_LOCAL_HEADER)
        if len(local) < _LOCAL_HEADER or local[:4] != b"PK\x03\x04":
            return None
        start = info.header_offset + _LOCAL_HEADER + int.from_bytes(local[26:28], "little") \
            + int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version not in _HEADER_READERS:
            return None
        shape, fortran, dtype = _HEADER_READERS[version](f)
        offset = f.tell()
    # The array must end where the member does; otherwise the archive is damaged: the ordinary read says so.
    if dtype.hasobject or int(np.prod(shape)) == 0 or offset + int(np.prod(shape)) * dtype.itemsize != \
            start + info.file_size:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def is_memory_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` (or what it is a view of) is memory-mapped from a file."""
    while array is not None:
        # np.memmap results of astype/arithmetic are np.memmap instances too, but hold no map (_mmap None).
        if isinstance(array, mmap.mmap) or getattr(array, "_mmap", None) is not None:
            return True
        array = getattr(array, "base", None)
    return False


def _read(npz, path: str, name: str) -> np.ndarray:
    """One array of the archive (memory-mapped where possible); pickled (object) arrays and corrupt
    members become UserErrors."""
    if name == "data":  # the big one; the others are per-sample and small
        try:
            mapped = _mapped(npz, path, name)
        except (OSError, ValueError):
            mapped = None  # not mappable after all: the ordinary read below reports what is wrong
        if mapped is not None:
            return mapped
    try:
        return npz[name]
    except ValueError as e:
        # allow_pickle=False makes numpy refuse object arrays with a ValueError that names allow_pickle.
        if "allow_pickle" in str(e):
            raise UserError(f"{path}: array '{name}' holds Python objects (object dtype); ddp_seq never unpickles "
                            "files: save plain numeric arrays") from None
        raise UserError(f"{path}: array '{name}' is unreadable ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 -- a truncated or corrupt member: zipfile, zlib, EOF, OS errors
        raise UserError(f"{path}: array '{name}' is unreadable ({first_line(e)})") from None


def _integers(path: str, name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` as int64; whole-valued floats are accepted (savers often write labels as float)."""
    if arr.dtype.kind in "iub":
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise UserError(f"{path}: array '{name}' has values beyond int64 ({arr.max()})")
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.floor(arr)) | (np.abs(arr) >= 2.0**63)
        if bad.any():
            i = int(np.argmax(bad))
            raise UserError(f"{path}: array '{name}' must hold integers; {name}[{i}] is {arr[i]} ({arr.dtype})")
        return arr.astype(np.int64)
    raise UserError(f"{path}: array '{name}' must hold integers; got dtype {arr.dtype}")


def _vector(path: str, name: str, arr: np.ndarray, size: int | None, what: str) -> None:
    """Require a 1-D array (of ``size`` entries when given; ``what`` says where that number comes from)."""
    if arr.ndim != 1:
        raise UserError(f"{path}: array '{name}' must be 1-D; got shape {arr.shape}")
    if size is not None and arr.shape[0] != size:
        raise UserError(f"{path}: array '{name}' has {arr.shape[0]} entries but there are {size} {what}")


def _offsets(path: str, npz, total: int) -> np.ndarray:
    """Validated int64 offsets from ``offsets`` or ``lengths`` (both: they must agree)."""
    offsets = None
    if "offsets" in npz.files:
        offsets = _integers(path, "offsets", _read(npz, path, "offsets"))
        _vector(path, "offsets", offsets, None, "")
        if offsets.size == 0 or offsets[0] != 0:
            raise UserError(f"{path}: array 'offsets' must start with 0 (it has n + 1 entries for n samples)")
        drops = np.diff(offsets) < 0
        if drops.any():
            i = int(np.argmax(drops))
            raise UserError(f"{path}: array 'offsets' decreases at offsets[{i + 1}] ({offsets[i + 1]} < "
                            f"{offsets[i]}): sample {i} would have a negative length")
        if offsets[-1] != total:
            raise UserError(f"{path}: array 'offsets' ends at {offsets[-1]} but 'data' has {total} steps")
    if "lengths" in npz.files:
        lengths = _integers(path, "lengths", _read(npz, path, "lengths"))
        _vector(path, "lengths", lengths, None, "")
        if (lengths < 0).any():
            i = int(np.argmax(lengths < 0))
            raise UserError(f"{path}: array 'lengths' has a negative length for sample {i} ({lengths[i]})")
        if lengths.sum() != total:
            raise UserError(f"{path}: array 'lengths' sums to {lengths.sum()} but 'data' has {total} steps")
        from_lengths = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if offsets is not None and not np.array_equal(offsets, from_lengths):
            raise UserError(f"{path}: arrays 'offsets' and 'lengths' disagree; keep one of them")
        offsets = from_lengths
    return offsets


def load_npz(path: str | Path, task: str, labelled: bool = True) -> SequenceData:
    """Load and check one ``.npz`` file of ragged sequences for ``task`` (classify, regress or tag).

    ``labelled=False`` (``predict`` input): the target array is optional and not read; targets are 0.
    Raises :class:`UserError` (one line, starting with ``path``) for anything wrong with the file.
    """
    path = str(path)
    target_name, per_step, integer = TARGETS[task]
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file" if not p.exists() else f"{path}: not a regular file")
    try:
        with p.open("rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    # np.load would try to unpickle anything that is neither zip nor .npy: say what the file is instead.
    if magic.startswith(_NPY_MAGIC):
        raise UserError(f"{path}: a single .npy array, not an .npz archive (write it with np.savez)")
    if not magic.startswith(_ZIP_MAGIC):
        raise UserError(f"{path}: not an .npz file (no zip header; write it with np.savez)")
    try:
        npz = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 -- truncated or corrupt zip: BadZipFile, EOFError, OSError, ...
        raise UserError(f"{path}: not a readable .npz file ({first_line(e)})") from None
    with npz:
        needed = ["data", "offsets or lengths", target_name] if labelled else ["data", "offsets or lengths"]
        framed = "offsets" in npz.files or "lengths" in npz.files
        present = {"data": "data" in npz.files, "offsets or lengths": framed, target_name: target_name in npz.files}
        missing = [name for name in needed if not present[name]]
        if missing:
            has = ", ".join(sorted(npz.files)) or "no arrays"
            raise UserError(f"{path}: missing array {' and '.join(repr(m) for m in missing)} (task {task} needs "
                            f"{', '.join(needed)}; the file has {has})")
        data = _read(npz, path, "data")
        if data.ndim == 1:
            data = data.reshape(-1, 1)  # one feature per step
        if data.ndim != 2 or data.shape[1] == 0:
            raise UserError(f"{path}: array 'data' must be [total_steps, features] (or 1-D for one feature); "
                            f"got shape {data.shape}")
        if data.dtype.kind not in "fiub":
            raise UserError(f"{path}: array 'data' must be numeric; got dtype {data.dtype}")
        values = data.astype(np.float32, copy=False)
        total = values.shape[0]
        offsets = _offsets(path, npz, total)
        n = len(offsets) - 1
        if not labelled:
            result = SequenceData(values, offsets, np.zeros(total if per_step else n, np.int64 if integer else
                                                            np.float32), per_step, source=path)
            check_sequences(result, path)
            return result
        raw = _read(npz, path, target_name)
        if per_step:
            _vector(path, target_name, raw, total, "steps in 'data'")
        else:
            _vector(path, target_name, raw, n, "samples (from offsets/lengths)")
        if integer:
            targets = _integers(path, target_name, raw)
        elif raw.dtype.kind in "fiub":
            targets = raw.astype(np.float32, copy=False)
        else:
            raise UserError(f"{path}: array '{target_name}' must be numeric; got dtype {raw.dtype}")
    result = SequenceData(values, offsets, targets, per_step, source=path)
    check_sequences(result, path)
    return result


def read_npz(path: str, task: str, labelled: bool = True) -> Parsed:
    """:func:`load_npz` as :class:`Parsed` data: integer labels are class indices (``0..max``)."""
    data = load_npz(path, task, labelled)
    symbols = None
    if labelled and task != "regress":
        symbols = list(range(int(data.targets.max(initial=0)) + 1))
    return Parsed(data, None, symbols, labelled)


def _locate(offsets: np.ndarray, step: int) -> tuple[int, int]:
    """(sample, step within the sample) of a global step index; right side skips empty samples."""
    sample = int(np.searchsorted(offsets, step, side="right")) - 1
    return sample, step - int(offsets[sample])


def _nonfinite(x: float) -> str:
    return "nan" if np.isnan(x) else ("+inf" if x > 0 else "-inf")


def check_sequences(data: SequenceData, source: str) -> None:
    """Refuse an empty dataset, non-finite inputs or regress targets, and negative labels/tags.

    Samples of length 0 pass: ``data.empty`` decides about them (``sources.apply_length_policies``).

    Vectorised over the whole dataset (it runs on millions of steps); only the error path locates the
    first offending sample. ``source`` (a path) starts every message.
    """
    n, offsets = len(data), data.offsets
    if n <= 0:
        raise UserError(f"{source}: the dataset is empty (0 samples)")
    if offsets[0] != 0 or offsets[-1] != len(data.values):
        raise UserError(f"{source}: offsets span {offsets[0]}..{offsets[-1]} but there are {len(data.values)} steps")
    lengths = np.diff(offsets)
    if (lengths < 0).any():
        i = int(np.argmax(lengths < 0))
        raise UserError(f"{source}: sample {i} has a negative length ({lengths[i]}): offsets decrease")
    expected = len(data.values) if data.per_step else n
    if len(data.targets) != expected:
        raise UserError(f"{source}: {len(data.targets)} targets for {expected} "
                        f"{'steps' if data.per_step else 'samples'}")
    if data.values.dtype.kind == "f":
        finite = np.isfinite(data.values)
        if not finite.all():
            flat = int(np.argmax(~finite.reshape(-1)))
            row, feature = divmod(flat, data.num_features or 1)
            sample, step = _locate(offsets, row)
            value = data.values.reshape(-1)[flat]
            count = int((~finite).sum())
            raise UserError(f"{source}: sample {sample} step {step} feature {feature} is {_nonfinite(value)} "
                            f"(input values must be finite; {count} non-finite in all)")
    targets = data.targets
    if targets.dtype.kind == "f":
        bad = ~np.isfinite(targets)
        kind = "target"
    else:
        bad = targets < 0
        kind = "tag" if data.per_step else "class label"
    if bad.any():
        i = int(np.argmax(bad))
        where = "sample {} step {}".format(*_locate(offsets, i)) if data.per_step else f"sample {i}"
        value = _nonfinite(targets[i]) if targets.dtype.kind == "f" else str(targets[i])
        rule = "must be finite" if targets.dtype.kind == "f" else "must be >= 0"
        raise UserError(f"{source}: {where} has {kind} {value} ({kind}s {rule}; {int(bad.sum())} bad in all)")
