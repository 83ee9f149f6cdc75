"""Checkpoints: safetensors files (F32/F16/BF16, sharded with an index), HF model folders and
PEFT adapter folders. Nothing here unpickles or executes anything from a folder.

Reading parses the safetensors header ourselves (8-byte little-endian length + JSON) because
numpy has no bfloat16 and the `safetensors` numpy API refuses BF16 files; every offset, dtype
and shape is checked against the file so a corrupt file gets a message that names it.
Writing uses the `safetensors` library. All writes are atomic: temp file/folder + rename.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import stat
import struct
import tempfile
from pathlib import Path

import numpy as np

from .errors import ModelFormatError

_DTYPES = {
    "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (None, 2), "F64": (np.float64, 8),
    "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1),
    "U8": (np.uint8, 1), "BOOL": (np.bool_, 1),
}
MAX_HEADER = 100 * 1024 * 1024
RUN_MODEL_SUBDIR = "model"   # a run folder keeps its tuned model (an HF folder) here


def model_folder(path) -> Path:
    """The HF folder a path stands for: the path itself, or, for a run folder (a folder with
    model/config.json and no config.json of its own), its model/ subfolder. The one place that
    knows this rule; loading weights, tokenizers and opening models by name all go through it."""
    p = Path(path)
    if not (p / "config.json").exists() and (p / RUN_MODEL_SUBDIR / "config.json").exists():
        return p / RUN_MODEL_SUBDIR
    return p


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    u = raw.view(np.uint16).astype(np.uint32) << 16
    return u.view(np.float32)


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors(path, as_float32: bool = True) -> dict[str, np.ndarray]:
    """Read every tensor of one .safetensors file. Floats are converted to float32 (BF16/F16 too)."""
    path = check_file(path, "weights file")
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot be read ({e.strerror})") from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ModelFormatError(f"{path}: corrupt safetensors header (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
        if not isinstance(header, dict):
            raise ModelFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
        data_start = 8 + n
        data_len = size - data_start
        # plain reads, no memory map: a file replaced or truncated by another thread or process
        # while mapped would kill the process with SIGBUS instead of raising an error
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dt, shape, (a, b) = info["dtype"], list(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ModelFormatError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
            if not all(_is_index(v) for v in (*shape, a, b)):
                raise ModelFormatError(
                    f"{path}: corrupt safetensors header entry for tensor {name!r} (shape {shape} and offsets "
                    f"{[a, b]} must be non-negative integers)")
            if dt not in _DTYPES:
                raise ModelFormatError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
            np_dt, item = _DTYPES[dt]
            count = math.prod(shape) if shape else 1
            if b - a != count * item:
                raise ModelFormatError(
                    f"{path}: tensor {name!r} data offsets {a}..{b} do not match its shape {shape} and dtype {dt}")
            if not 0 <= a <= b <= data_len:
                raise ModelFormatError(
                    f"{path}: the file is truncated: tensor {name!r} needs bytes up to {data_start + b:,} but the "
                    f"file has {size:,} (an interrupted download or copy?)")
            f.seek(data_start + a)
            buf = f.read(b - a)
            if len(buf) != b - a:
                raise ModelFormatError(f"{path}: file ended inside tensor {name!r} (truncated while reading?)")
            raw = np.frombuffer(buf, dtype=np.uint8).copy()
            if dt == "BF16":
                arr = _bf16_to_f32(raw)
            else:
                arr = raw.view(np_dt)
            arr = arr.reshape(shape)
            if as_float32 and arr.dtype.kind == "f" and arr.dtype != np.float32:
                arr = arr.astype(np.float32)
            out[name] = arr
    return out


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _atomic_write_bytes(path: Path, write_fn) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path, text: str) -> None:
    path = Path(path)

    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_write_bytes(path, w)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_safetensors(path, tensors: dict[str, np.ndarray], dtype: str = "F32", metadata: dict | None = None) -> None:
    """Write tensors atomically. dtype F32 (default), F16 or BF16 (rounded to nearest even)."""
    from safetensors.numpy import save_file

    conv = {}
    for k, v in tensors.items():
        v = np.ascontiguousarray(v)
        if v.dtype.kind == "f":
            if dtype == "F16":
                v = v.astype(np.float16)
            elif dtype == "F32":
                v = v.astype(np.float32)
            elif dtype == "BF16":
                raise ValueError("use write_safetensors_bf16 for BF16")
        conv[k] = v
    meta = {"format": "pt"}
    if metadata:
        meta.update({str(a): str(b) for a, b in metadata.items()})

    def save(tmp):
        try:
            save_file(conv, tmp, metadata=meta)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - the library reports I/O errors as its own type
            m = re.search(r"os error (\d+)", str(e))
            if m:  # "No space left on device (os error 28)": an OSError like any other write's
                code = int(m.group(1))
                raise OSError(code, os.strerror(code), str(path)) from None
            raise

    _atomic_write_bytes(Path(path), save)


def write_safetensors_bf16(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """BF16 writer (numpy has no bfloat16, so the file is assembled by hand)."""
    header, blobs, off = {}, [], 0
    for k in sorted(tensors):
        v = np.ascontiguousarray(tensors[k], dtype=np.float32)
        u = v.view(np.uint32)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        b = rounded.tobytes()
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt", **({str(a): str(b) for a, b in (metadata or {}).items()})}
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)

    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hj)))
            f.write(hj)
            for b in blobs:
                f.write(b)
    _atomic_write_bytes(Path(path), w)


# ----------------------------------------------------------------------------- HF folders
def load_weights(folder) -> dict[str, np.ndarray]:
    """All tensors of an HF model folder: model.safetensors or a sharded index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: not a folder")
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        try:
            idx = json.loads(index.read_text(encoding="utf-8"))
            wm = idx["weight_map"]
            assert isinstance(wm, dict)
        except Exception:
            raise ModelFormatError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
        out = {}
        for shard in sorted(set(wm.values())):
            if "/" in shard or "\\" in shard or shard.startswith("."):
                raise ModelFormatError(f"{index}: shard name {shard!r} is not a plain file name")
            out.update(read_safetensors(folder / shard))
        missing = [k for k in wm if k not in out]
        if missing:
            raise ModelFormatError(f"{index}: tensor {missing[0]!r} is listed but not found in its shard")
        return out
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(others) == 1:
        return read_safetensors(folder / others[0])
    pickles = sorted(p.name for p in (*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")))
    if pickles:
        raise ModelFormatError(
            f"{folder / pickles[0]}: only PyTorch pickle weights found ({', '.join(pickles)}). For safety we never "
            "unpickle files; convert the model to safetensors (model.safetensors) first")
    raise ModelFormatError(f"{folder}: no model.safetensors (or model.safetensors.index.json) in this folder")


def replace_dir_atomically(tmp_dir: Path, target: Path) -> None:
    """Swap a fully written temp folder into place; the old folder survives until the swap."""
    target = Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp_dir, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_temp_dir_beside(target) -> Path:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the final folder gets normal permissions
    return tmp


MAX_JSON_BYTES = 50 * 2**20   # config and tokenizer-config files are small; a huge one is refused


def check_file(path, what: str = "file") -> Path:
    """A readable regular file, or ModelFormatError saying exactly what is wrong with the path:
    missing, a broken or looping symbolic link, a folder, or not readable."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if os.path.islink(path):
            raise ModelFormatError(f"{path}: {what} is a symbolic link to nothing") from None
        raise ModelFormatError(f"{path}: {what} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ModelFormatError(f"{path}: {what} is a symbolic link that loops back on itself") from None
        raise ModelFormatError(f"{path}: {what} cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFormatError(f"{path}: {what} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise ModelFormatError(f"{path}: {what} cannot be read (permission denied)")
    return path


def read_json(path, what: str = "file") -> dict:
    """A JSON object from a file of a model folder, with errors that name the file."""
    path = check_file(path, what)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelFormatError(f"{path}: {what} is larger than {MAX_JSON_BYTES // 2**20} MB")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ModelFormatError(f"{path}: JSON nested too deeply") from None
    if not isinstance(d, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


PEFT_PREFIX = "base_model.model."


def save_peft_adapter(folder, lora: dict[str, np.ndarray], lora_config, base_model_name_or_path=None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT names) atomically."""
    folder = Path(folder)
    tmp = make_temp_dir_beside(folder)
    try:
        tensors = {PEFT_PREFIX + k: v for k, v in lora.items()}
        write_safetensors(tmp / "adapter_model.safetensors", tensors)
        atomic_write_json(tmp / "adapter_config.json", lora_config.to_peft_dict(base_model_name_or_path))
        replace_dir_atomically(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_peft_adapter(folder):
    """-> (LoraConfig, lora tensors keyed like 'model.layers.0.self_attn.q_proj.lora_A.weight')."""
    from .lora import LoraConfig

    folder = Path(folder)
    cfgd = read_json(folder / "adapter_config.json", "adapter_config.json")
    try:
        cfg = LoraConfig.from_peft_dict(cfgd, source=str(folder / "adapter_config.json"))
    except (KeyError, ValueError) as e:
        raise ModelFormatError(str(e)) from None
    st = folder / "adapter_model.safetensors"
    if not st.exists():
        if (folder / "adapter_model.bin").exists():
            raise ModelFormatError(f"{folder}: only adapter_model.bin (a pickle) found; we load safetensors only")
        raise ModelFormatError(f"{st}: file is missing")
    raw = read_safetensors(st)
    lora = {}
    for k, v in raw.items():
        name = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        name = name.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight")
        lora[name] = v
    return cfg, lora
