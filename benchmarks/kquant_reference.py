"""Regenerate tests/data/kquant_reference.json: llama.cpp's reference K-quant output on the tests' inputs.

llama.cpp's C source comes from a package that ships it (the llama-cpp-python sdist vendors it):

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/src && tar xzf /tmp/src/*.tar.gz -C /tmp/src
    python benchmarks/kquant_reference.py /tmp/src/llama_cpp_python-*/vendor/llama.cpp

Only ggml-quants.c is compiled (with gcc, into a temporary folder, with -ffp-contract=off: the C
semantics of each float operation, no fused multiply-adds) and its `quantize_row_qN_K_ref` called
through ctypes on tests/gguf_models.kquant_inputs blocks. The JSON records, per type, the SHA-256 of
all blocks' bytes and the first blocks in hex (to see where a mismatch starts), so the tests run
offline without compiling anything.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.gguf_models import kquant_inputs  # noqa: E402

OUT = ROOT / "tests" / "data" / "kquant_reference.json"
TYPES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
SEED, BLOCKS, SHOWN = 20261207, 4096, 2
# ggml-quants.c calls these only on paths the reference quantisers do not take
STUBS = """
#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { abort(); }
size_t ggml_row_size(int type, long ne) { abort(); }
const char * ggml_type_name(int type) { abort(); }
size_t ggml_type_size(int type) { abort(); }
"""


def build(llama_cpp: Path, tmp: Path, flags: tuple[str, ...] = ("-O2", "-ffp-contract=off")) -> ctypes.CDLL:
    src = llama_cpp / "ggml" / "src"
    (tmp / "stubs.c").write_text(STUBS)
    lib = tmp / f"libquants{len(list(tmp.glob('*.so')))}.so"
    include = llama_cpp / "ggml" / "include"
    subprocess.run(["gcc", *flags, "-fPIC", "-shared", f"-I{src}", f"-I{include}",
                    str(src / "ggml-quants.c"), str(tmp / "stubs.c"), "-lm", "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def reference(lib: ctypes.CDLL, type_name: str, x: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0], TYPES[type_name]), np.uint8)
    fn = getattr(lib, f"quantize_row_{type_name[:2].lower()}_K_ref")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("llama_cpp", type=Path, help="a llama.cpp source tree (the folder holding ggml/)")
    parser.add_argument("--native", action="store_true", help="also build with -O3 -march=native (fused "
                        "multiply-adds where the CPU has them) and print how many blocks that build writes differently")
    args = parser.parse_args()
    x = np.ascontiguousarray(kquant_inputs(SEED, BLOCKS))
    record: dict[str, object] = {"seed": SEED, "blocks": BLOCKS, "source": str(args.llama_cpp.name), "types": {}}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(args.llama_cpp, Path(tmp))
        for type_name in TYPES:
            raw = reference(lib, type_name, x)
            record["types"][type_name] = {"sha256": hashlib.sha256(raw.tobytes()).hexdigest(),
                                          "first": [bytes(b).hex() for b in raw[:SHOWN]]}
            print(type_name, record["types"][type_name]["sha256"])
            if args.native:
                native = reference(build(args.llama_cpp, Path(tmp), ("-O3", "-march=native")), type_name, x)
                print(f"  -march=native build: {int((native != raw).any(axis=1).sum())} of {BLOCKS} blocks differ")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
