"""Reads a PyTorch checkpoint (torch.save zip format) without importing torch and writes every
tensor of its state dict to a safetensors file.

    python torch_to_safetensors.py CHECKPOINT.pt OUT.safetensors

Only tensors, containers and a few harmless classes are unpickled: any other class in the pickle
is refused, so a checkpoint cannot run code. The state dict is taken from checkpoint["model"],
["module"], ["state_dict"] (Tar nests it one level deeper under "sd"), or the top level.
Prints one JSON line with what was written and skipped. Needs only numpy.
"""
import collections
import json
import pickle
import struct
import sys
import zipfile

import numpy as np

# torch storage class -> (safetensors dtype, numpy dtype of the same item size)
STORAGES = {
    "FloatStorage": ("F32", np.float32),
    "DoubleStorage": ("F64", np.float64),
    "HalfStorage": ("F16", np.uint16),
    "BFloat16Storage": ("BF16", np.uint16),
    "LongStorage": ("I64", np.int64),
    "IntStorage": ("I32", np.int32),
    "ShortStorage": ("I16", np.int16),
    "CharStorage": ("I8", np.int8),
    "ByteStorage": ("U8", np.uint8),
    "BoolStorage": ("BOOL", np.bool_),
}


class StorageType:
    def __init__(self, name):
        self.name = name


class Storage:
    def __init__(self, stype, key):
        self.stype = stype
        self.key = key


class TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)


class Opaque:
    """Stands in for harmless non-tensor objects (argparse.Namespace in training checkpoints)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def rebuild_tensor_v2(storage, offset, size, stride, *rest):
    return TensorRef(storage, offset, size, stride)


def rebuild_parameter(data, *rest):
    return data


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): Opaque,
}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch" and name in STORAGES:
            return StorageType(name)
        fn = ALLOWED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return fn

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        stype = pid[1]
        if not isinstance(stype, StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {stype!r}")
        return Storage(stype.name, str(pid[2]))


def state_dict(obj):
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if isinstance(obj, dict) and "sd" in obj and isinstance(obj["sd"], dict):
        obj = obj["sd"]
    if not isinstance(obj, dict):
        raise SystemExit("error: the checkpoint holds no state dict")
    return obj


def tensor_bytes(zf, prefix, ref, cache):
    st, npdt = STORAGES[ref.storage.stype]
    data = cache.get(ref.storage.key)
    if data is None:
        data = np.frombuffer(zf.read(f"{prefix}data/{ref.storage.key}"), dtype=npdt)
        cache[ref.storage.key] = data
    item = data.itemsize
    if len(ref.size) == 0:
        arr = data[ref.offset : ref.offset + 1]
    else:
        base = data[ref.offset :]
        arr = np.lib.stride_tricks.as_strided(
            base, shape=ref.size, strides=[s * item for s in ref.stride], writeable=False
        )
    return st, np.ascontiguousarray(arr).tobytes()


def main(argv):
    if len(argv) != 3:
        raise SystemExit("usage: torch_to_safetensors.py CHECKPOINT.pt OUT.safetensors")
    src, dst = argv[1], argv[2]
    if not zipfile.is_zipfile(src):
        raise SystemExit(f"error: {src} is not a torch.save zip checkpoint (legacy formats are not supported)")
    with zipfile.ZipFile(src) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise SystemExit(f"error: {src} has no data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        obj = SafeUnpickler(zf.open(pkl[0])).load()
        sd = state_dict(obj)
        header, chunks, skipped, offset, cache = {}, [], [], 0, {}
        for name, value in sd.items():
            if not isinstance(value, TensorRef):
                skipped.append(name)
                continue
            for pre in ("module.", "_orig_mod."):
                if name.startswith(pre):
                    name = name[len(pre) :]
            st, raw = tensor_bytes(zf, prefix, value, cache)
            header[name] = {"dtype": st, "shape": list(value.size), "data_offsets": [offset, offset + len(raw)]}
            chunks.append(raw)
            offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for c in chunks:
            f.write(c)
    print(json.dumps({"tensors": len(header), "skipped": skipped}))


if __name__ == "__main__":
    main(sys.argv)
