"""params.npz: the weights, numpy arrays p0, p1, ... in the order the module takes them.

An uncompressed .npz (a zip of .npy files; np.load reads it, no pickle) whose arrays each start at
a 64-byte-aligned file offset: write_params pads each zip entry's extra field (the way Android's
zipalign does). The device then maps the weights in place (TVM tensors over a private mapping of
the file, no copy): TVM takes outside memory only 64-byte aligned. An array that is not aligned
(artifacts written by np.savez) or not stored (a compressed .npz) is copied into a TVM tensor, one
array at a time, so loading never holds the weights twice."""

from __future__ import annotations

import io
import mmap
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from edge.errors import ArtifactError

ALIGN = 64  # TVM's alignment for tensor data (tvm.runtime.from_dlpack checks it)
_PAD_ID = 0xD935  # the zip extra-field id zipalign uses for alignment padding
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header, before its name and extra field
_ZIP64_EXTRA = 20  # what zipfile appends to the local extra field of an entry that needs zip64


def write_params(path: str | Path, arrays) -> Path:
    """Write `arrays` as p0.npy, p1.npy, ... of an uncompressed .npz, each array's data aligned."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, a in enumerate(arrays):
            a = np.asarray(a)
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)  # (which would make a 0-d array 1-d)
            if a.dtype.hasobject:
                raise ValueError(f"weight p{i} has dtype {a.dtype}: not storable without pickle")
            head = io.BytesIO()
            np.lib.format.write_array_header_2_0(head, np.lib.format.header_data_from_array_1_0(a))
            head = head.getvalue()  # numpy pads it to a multiple of 64 bytes
            info = zipfile.ZipInfo(f"p{i}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = len(head) + a.nbytes
            zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for the local header
            start = zf.fp.tell() + _LOCAL_HEADER.size + len(info.filename.encode()) + (_ZIP64_EXTRA if zip64 else 0)
            pad = -(start + 4 + len(head)) % ALIGN
            info.extra = struct.pack("<HH", _PAD_ID, pad) + bytes(pad)
            with zf.open(info, "w", force_zip64=zip64) as f:
                f.write(head)
                f.write(a.reshape(-1).view(np.uint8).data)
    return path


def _broken(path: Path, why: str) -> ArtifactError:
    return ArtifactError(f"{path}: not a readable weights file ({why})")


def _zip_entries(path: Path, f) -> list[zipfile.ZipInfo]:
    """The zip entries p0.npy, p1.npy, ... in order."""
    try:
        with zipfile.ZipFile(f) as zf:  # does not close f
            infos = {i.filename: i for i in zf.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _broken(path, f"not a zip file: {e}") from None
    missing = next((f"p{k}.npy" for k in range(len(infos)) if f"p{k}.npy" not in infos), None)
    if missing:
        raise _broken(path, f"no {missing} among {len(infos)} entries")
    return [infos[f"p{k}.npy"] for k in range(len(infos))]


def _array_header(path: Path, f, info: zipfile.ZipInfo) -> tuple[tuple, np.dtype, bool, int]:
    """(shape, dtype, fortran order, offset of the data in the file) of a stored entry."""
    name = info.filename
    try:
        f.seek(info.header_offset)
        sig, *_, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if sig != b"PK\x03\x04":
            raise ValueError("bad local header")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        data = f.tell()
    except (ValueError, struct.error, OSError) as e:
        raise _broken(path, f"{name}: {e}") from None
    if dtype.hasobject:
        raise _broken(path, f"{name} holds Python objects")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data - start + nbytes != info.file_size:
        raise _broken(path, f"{name}: {info.file_size} bytes stored, its header says {data - start + nbytes}")
    return shape, dtype, fortran, data


def device_tensors(path: str | Path, *, expect_stat: os.stat_result | None = None) -> list:
    """The weights as TVM tensors: mapped in place where aligned, else copied one array at a time.
    `expect_stat`: the stat of the file when its checksum was verified; a different file at
    `path` now (replaced since) is refused."""
    import tvm

    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the weights: {e}") from None
    with f:
        st = os.fstat(f.fileno())
        if expect_stat is not None and _identity(st) != _identity(expect_stat):
            raise ArtifactError(f"{path}: changed since its checksum was verified")
        infos = _zip_entries(path, f)
        if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
            return _copied_tensors(path, f, len(infos))
        headers = [_array_header(path, f, info) for info in infos]
        # Private: the file's pages are shared with the page cache (and with every process that
        # maps the same artifact) until written to, which nothing does; writable, because numpy
        # does not hand read-only memory to DLPack.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = []
    for info, (shape, dtype, fortran, data) in zip(infos, headers):
        if data + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > len(mm):
            raise _broken(path, f"{info.filename} runs past the end of the file")
        view = np.ndarray(shape, dtype, buffer=mm, offset=data, order="F" if fortran else "C")
        if view.size and not fortran and view.ctypes.data % ALIGN == 0:
            tensors.append(tvm.runtime.from_dlpack(view))  # holds the view, and so the mapping
        else:
            tensors.append(tvm.runtime.tensor(view if view.flags.c_contiguous else view.copy(order="C")))
            _drop_pages(mm, data, view.nbytes)
    return tensors


def _copied_tensors(path: Path, f, count: int) -> list:
    import tvm

    f.seek(0)
    try:
        with np.load(f, allow_pickle=False) as z:
            return [tvm.runtime.tensor(z[f"p{i}"]) for i in range(count)]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise _broken(path, str(e)) from None


def _drop_pages(mm: mmap.mmap, start: int, length: int) -> None:
    """Give back the pages a copied array was read from. The mapping is private and never
    written, so a page dropped here that a mapped neighbour shares is simply read again."""
    page = mmap.PAGESIZE
    lo = start - start % page
    hi = min(len(mm), start + length + (-(start + length) % page))
    if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
