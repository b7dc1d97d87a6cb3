"""The `safetensors` Python library as the oracle of Rhine's safetensors reader and writer
(tests/oracle/test_safetensors.cpp).

    python st_files.py make OUT.safetensors VALUES.safetensors
    python st_files.py read IN.safetensors VALUES.safetensors
    python st_files.py --version

`make` writes OUT with safetensors.torch.save_file: one tensor per dtype (F64 F32 F16 BF16
F8_E4M3 F8_E5M2 I64 I32 I16 I8 U8 U16 U32 BOOL), a scalar, an empty tensor, and metadata
{"origin": "python"}. `read` loads IN (a file Rhine wrote) with safetensors.torch.load_file,
and prints one JSON object: each tensor's dtype (safetensors' spelling) and shape, and the
file's metadata. Both write VALUES with every tensor widened exactly (floats to F64, integers
and BOOL to I64) under the same name, for Rhine to compare with.
"""
import json
import sys

import torch

NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
         torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.uint16: "U16", torch.uint32: "U32",
         torch.bool: "BOOL"}


def widened(tensors):
    out = {}
    for name, t in tensors.items():
        if t.dtype.is_floating_point:
            out[name] = t.to(torch.float64).contiguous()
        elif t.dtype in (torch.uint16, torch.uint32):
            out[name] = t.to(torch.int64).contiguous()
        else:
            out[name] = t.to(torch.int64).contiguous()
    return out


def make(path, values_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) * 4
    tensors = {}
    for dtype, name in NAMES.items():
        if dtype.is_floating_point:
            tensors[name.lower()] = x.to(dtype)
        elif dtype == torch.bool:
            tensors["bool"] = x > 0
        else:
            lo = 0 if name.startswith("U") else -100
            tensors[name.lower()] = torch.randint(lo, 100, (3, 5), generator=g).to(dtype)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.float32)
    tensors["empty"] = torch.zeros(0, 3, dtype=torch.bfloat16)
    save_file(tensors, path, metadata={"origin": "python"})
    save_file(widened(tensors), values_path)


def read(path, values_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    save_file(widened(tensors), values_path)
    print(json.dumps({"tensors": {n: {"dtype": NAMES[t.dtype], "shape": list(t.shape)} for n, t in tensors.items()},
                      "metadata": metadata}))


def main(argv):
    if argv[1:] == ["--version"]:
        import safetensors
        print(f"safetensors {safetensors.__version__}, torch {torch.__version__}")
        return 0
    if len(argv) == 4 and argv[1] in ("make", "read"):
        (make if argv[1] == "make" else read)(argv[2], argv[3])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
