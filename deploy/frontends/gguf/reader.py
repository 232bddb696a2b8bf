"""Read a GGUF file with llama.cpp's own reader (the `gguf` package): metadata, tensors dequantized
to fp32 in Hugging Face layout ([out, in] for matrices), one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import ModelError

# What this release reads (dequantized on the host to fp32).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
MAGIC = b"GGUF"


class _Truncated(Exception):
    def __init__(self, need: int | None):
        self.need = need  # bytes the tensors need; None: the header itself is cut short


_READER = None


def _reader_class():
    """llama.cpp's GGUFReader, checking its reads against the end of the file: a short file fails
    as truncated (with the size the tensor list asks for) rather than as a numpy shape error."""
    global _READER
    if _READER is None:
        import gguf

        class Reader(gguf.GGUFReader):
            def _get(self, offset, dtype, count=1, override_order=None):
                if int(offset) + np.dtype(dtype).itemsize * int(count) > len(self.data):
                    raise _Truncated(None)
                return super()._get(offset, dtype, count, override_order)

            def _build_tensors(self, start_offs, fields):
                need = 0
                for field in fields:
                    dims, raw_dtype, offset_tensor = field.parts[3], field.parts[4], field.parts[5]
                    try:
                        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
                    except (ValueError, KeyError):
                        continue  # an unknown type id: the reader names it
                    n = int(np.prod(dims.astype(np.int64)))
                    need = max(need, int(start_offs) + int(offset_tensor[0]) + n * size // block)
                if need > len(self.data):
                    raise _Truncated(need)
                super()._build_tensors(start_offs, fields)

        _READER = Reader
    return _READER


class GGUFFile:
    """Metadata and tensors of one GGUF file (tensors are read lazily, memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise ModelError(f"cannot read {self.path}: {e.strerror}") from None
        if head != MAGIC:
            raise ModelError(f"{self.path.name} is not a GGUF file (no GGUF magic)")
        try:
            self._reader = _reader_class()(str(self.path))
        except _Truncated as e:
            size = self.path.stat().st_size
            if e.need is None:
                raise ModelError(f"{self.path.name} is truncated: the GGUF header (metadata and tensor list) runs past "
                                 f"the end of the file at byte {size}") from None
            raise ModelError(f"{self.path.name} is truncated: {size} bytes, but its tensors need {e.need} "
                             "(an incomplete download or copy?)") from None
        except (ValueError, IndexError, OSError, KeyError) as e:  # other damage surfaces as these
            raise ModelError(f"{self.path.name} is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.metadata = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception:  # an exotic value type we never read: leave it out
                continue
        self.tensors = {t.name: t for t in self._reader.tensors}
        for t in self._reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ModelError(
                    f"{self.path.name}: tensor {t.name} has quantization type {t.tensor_type.name}, "
                    f"which edgejit does not read (supported: {', '.join(SUPPORTED_TYPES)})"
                )

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not arch:
            raise ModelError(f"{self.path.name}: no general.architecture in the GGUF metadata")
        return str(arch)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise ModelError(f"{self.path.name}: GGUF metadata has no {key}")
        return self.metadata[key]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def matrix(self, name: str):
        """A weight matrix as stored, in Hugging Face layout: Q8_0, Q4_0 and Q4_1 blocks become a
        QWeight exactly (deploy/quantize/weight_only); the other quantized types are requantized
        from their values (Q4_K to 4 bits, Q5_*/Q6_K to 8 bits, group 32); F16 stays fp16 (numpy
        float16), F32 and BF16 -> fp32."""
        from deploy.quantize.weight_only.layout import from_gguf, quantize

        kind = self.tensor_type(name)
        if kind == "F16":
            return self.tensor(name).astype(np.float16)  # exact: the values are fp16
        if kind in ("F32", "BF16"):
            return self.tensor(name)
        t = self.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        if len(shape) == 2 and shape[1] % 32 == 0:
            exact = from_gguf(kind, np.asarray(t.data), shape)
            if exact is not None:
                return exact
            return quantize(self.tensor(name), 4 if kind == "Q4_K" else 8, f"requantized from {kind}")
        return self.tensor(name)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as fp32 in numpy (= Hugging Face) layout: [out_features, in_features]."""
        import gguf

        try:
            t = self.tensors[name]
        except KeyError:
            raise ModelError(f"{self.path.name}: missing tensor {name}") from None
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except (ValueError, IndexError) as e:
            raise ModelError(f"{self.path.name}: tensor {name} is truncated or damaged ({e})") from None
        shape = tuple(int(d) for d in reversed(t.shape))
        return np.ascontiguousarray(data.reshape(shape), dtype=np.float32)
