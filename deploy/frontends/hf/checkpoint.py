"""A Hugging Face checkpoint directory: config.json and the safetensors weights (model.safetensors,
or shards named by model.safetensors.index.json), read with the `safetensors` package's numpy API
(no torch). Tensors come back as fp32 in Hugging Face layout; one-line errors for bad directories."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from edge.errors import ModelError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # BF16: numpy has none, read raw
TORCH_DTYPES = ("float32", "float16", "bfloat16")


def is_checkpoint_dir(path: str | Path) -> bool:
    return Path(path).is_dir()


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({what}): {e}") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: {what} is not a JSON object")
    return d


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


class Checkpoint:
    """config.json and the weights of a Hugging Face checkpoint directory (tensors read lazily)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelError(f"{self.path} is not a directory")
        cfg = self.path / CONFIG
        if not cfg.is_file():
            raise ModelError(f"{self.path}: no {CONFIG} (a Hugging Face checkpoint directory has config.json, "
                             "*.safetensors and tokenizer.json)")
        self.config = _read_json(cfg, "the model configuration")
        dtype = self.config.get("torch_dtype", self.config.get("dtype"))
        if dtype is not None and dtype not in TORCH_DTYPES and dtype != "auto":
            raise ModelError(f"{cfg}: torch_dtype '{dtype}' is not supported (supported: {', '.join(TORCH_DTYPES)})")
        if self.config.get("quantization_config"):
            method = self.config["quantization_config"].get("quant_method", "?")
            raise ModelError(f"{cfg}: quantized checkpoints ({method}) are not supported: use a float16/bfloat16/float32 "
                             "checkpoint or a GGUF file")
        self.files = self._weight_files()
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._headers: dict[Path, tuple[int, dict]] = {}
        for f in self.files:
            for name in self._header(f)[1]:
                if name != "__metadata__":
                    self._where.setdefault(name, f)
        if self._index is not None:
            for name, shard in self._index.items():
                if name not in self._where:
                    raise ModelError(f"{self.path / INDEX}: tensor {name} is listed in {shard}, but no shard holds it")
        self.tensors = sorted(self._where)

    # -- the files ------------------------------------------------------------------------------
    def _weight_files(self) -> list[Path]:
        self._index = None
        index = self.path / INDEX
        if index.is_file():
            d = _read_json(index, "the shard index")
            wm = d.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise ModelError(f"{index}: no weight_map")
            self._index = {str(k): str(v) for k, v in wm.items()}
            shards = sorted(set(self._index.values()))
            for s in shards:
                if not (self.path / s).is_file():
                    raise ModelError(f"{index} names shard {s}, which is not in {self.path}")
            return [self.path / s for s in shards]
        if (self.path / SINGLE).is_file():
            return [self.path / SINGLE]
        found = sorted(self.path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if found:
            raise ModelError(f"{self.path}: {len(found)} *.safetensors files but no {INDEX} saying which tensors they hold")
        other = [p.name for p in sorted(self.path.glob("*.bin")) + sorted(self.path.glob("*.pt"))]
        hint = f" ({', '.join(other[:2])} are PyTorch pickles: re-save with safe_serialization=True)" if other else ""
        raise ModelError(f"{self.path}: no weights (model.safetensors or *.safetensors shards with {INDEX}){hint}")

    def _header(self, f: Path) -> tuple[int, dict]:
        """(offset of the data, header dict) of a safetensors file."""
        if f not in self._headers:
            try:
                with open(f, "rb") as fh:
                    head = fh.read(8)
                    if len(head) < 8:
                        raise ModelError(f"{f.name} is not a safetensors file (too short)")
                    n = struct.unpack("<Q", head)[0]
                    size = f.stat().st_size
                    if n > size - 8:
                        raise ModelError(f"{f.name} is not a safetensors file or is truncated (header of {n} bytes, file of {size})")
                    header = json.loads(fh.read(n))
            except OSError as e:
                raise ModelError(f"cannot read {f}: {e.strerror}") from None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ModelError(f"{f.name} is not a safetensors file (its header is not JSON)") from None
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ModelError(f"{f.name} is truncated: {size} bytes, but its tensors need {8 + n + end} "
                                 "(an incomplete download or copy?)")
            self._headers[f] = (8 + n, header)
        return self._headers[f]

    # -- tensors --------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._info(name)["shape"])

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """A one-line error naming the safetensors file that holds `name` when its shape is not the one
        config.json implies."""
        got = self.shape(name)
        if got != tuple(shape):
            raise ModelError(f"{self.path.name}/{self._where[name].name}: tensor {name} has shape {list(got)}, "
                             f"but config.json implies {list(shape)}")

    def _info(self, name: str) -> dict:
        try:
            f = self._where[name]
        except KeyError:
            raise ModelError(f"{self.path.name}: the checkpoint has no tensor {name}") from None
        return self._header(f)[1][name]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as fp32, in its checkpoint (= Hugging Face) layout."""
        from safetensors import safe_open

        info = self._info(name)
        f = self._where[name]
        dtype = info["dtype"]
        if dtype not in FLOAT_DTYPES:
            raise ModelError(f"{f.name}: tensor {name} has dtype {dtype}, which edgejit does not read "
                             f"(supported: {', '.join(FLOAT_DTYPES)})")
        shape = tuple(int(d) for d in info["shape"])
        if dtype == "BF16":  # the numpy API has no bfloat16: read the raw bytes
            start, (b, e) = self._header(f)[0], info["data_offsets"]
            raw = np.memmap(f, dtype=np.uint16, mode="r", offset=start + int(b), shape=((int(e) - int(b)) // 2,))
            return _bf16_to_f32(np.asarray(raw)).reshape(shape)
        with safe_open(str(f), framework="np") as st:
            return np.ascontiguousarray(st.get_tensor(name), dtype=np.float32)

    def tensor_types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, f in self._where.items():
            t = self._header(f)[1][name]["dtype"]
            out[t] = out.get(t, 0) + 1
        return out

    def sha256(self) -> str:
        """One digest of the checkpoint: config.json and every weight file (in name order)."""
        from edge.artifact.reader import sha256_file

        h = hashlib.sha256()
        for p in [self.path / CONFIG, *self.files]:
            h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
        return h.hexdigest()


def hf_json(path: Path, name: str) -> dict:
    """An optional JSON file of the checkpoint ({} when absent)."""
    p = path / name
    return _read_json(p, name) if p.is_file() else {}
