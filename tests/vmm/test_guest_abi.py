"""guest/abi.h against pkfuse/vmm/abi.py: a host C program prints every constant and field, and each must agree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

from pkfuse.vmm import abi, guest

STRUCTS = {"config": abi.CONFIG, "vcpu_state": abi.VCPU_STATE, "ring_header": abi.RING_HEADER,
           "descriptor": abi.DESCRIPTOR, "records_header": abi.RECORDS_HEADER, "record": abi.RECORD}
NOT_IN_HEADER = {"MiB"}  #: abi.py's integer constants the guest has no use for


def header_defines() -> list[str]:
    text = (guest.SOURCE_DIR / "abi.h").read_text()
    return [m.group(1) for m in re.finditer(r"^#define[ \t]+([A-Z_][A-Z0-9_]*)[ \t]+\S", text, re.M)]


def compile_and_run(tmp_path: Path) -> dict[str, int]:
    lines = ['#include <stdio.h>', '#include "abi.h"', "int main(void) {"]
    for name in header_defines():
        lines.append(f'    printf("const {name} %llu\\n", (unsigned long long)({name}));')
    for struct, dtype in STRUCTS.items():
        lines.append(f'    printf("size {struct} %zu\\n", sizeof(struct {struct}));')
        for field in dtype.names:
            lines.append(f'    printf("offset {struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
            lines.append(f'    printf("bytes {struct}.{field} %zu\\n", sizeof(((struct {struct} *)0)->{field}));')
    lines += ["    return 0;", "}"]
    src = tmp_path / "abi_dump.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "abi_dump"
    subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-I", str(guest.SOURCE_DIR), "-o", str(exe), str(src)],
                   check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {" ".join(line.split()[:2]): int(line.split()[2]) for line in out.splitlines()}


def test_abi_h_matches_abi_py(tmp_path: Path) -> None:
    got = compile_and_run(tmp_path)
    wrong = []
    for key, value in got.items():
        kind, name = key.split()
        if kind == "const":
            if not hasattr(abi, name):
                wrong.append(f"{name}: in abi.h, not in abi.py")
            elif int(getattr(abi, name)) != value:
                wrong.append(f"{name}: abi.h {value:#x}, abi.py {int(getattr(abi, name)):#x}")
    py_constants = {n for n, v in vars(abi).items()
                    if n.upper() == n and isinstance(v, int) and not isinstance(v, bool)} | {"MiB"}
    missing = py_constants - NOT_IN_HEADER - {k.split()[1] for k in got if k.startswith("const ")}
    wrong += [f"{name}: in abi.py, not in abi.h" for name in sorted(missing)]
    for struct, dtype in STRUCTS.items():
        if got[f"size {struct}"] != dtype.itemsize:
            wrong.append(f"struct {struct}: {got[f'size {struct}']} bytes, dtype {dtype.itemsize}")
        for field in dtype.names:
            ftype, offset = dtype.fields[field][:2]
            if got[f"offset {struct}.{field}"] != offset or got[f"bytes {struct}.{field}"] != ftype.itemsize:
                wrong.append(f"{struct}.{field}: abi.h at {got[f'offset {struct}.{field}']} "
                             f"({got[f'bytes {struct}.{field}']} bytes), abi.py at {offset} ({ftype.itemsize})")
    assert not wrong, wrong


def test_the_header_names_every_struct_field_of_the_dtypes() -> None:
    text = (guest.SOURCE_DIR / "abi.h").read_text()
    for struct, dtype in STRUCTS.items():
        body = re.search(r"struct " + struct + r" \{(.*?)\};", text, re.S)
        assert body is not None, struct
        fields = re.findall(r"(\w+)(?:\[\d+\])?;", body.group(1))
        assert fields == list(dtype.names), struct
        assert np.dtype(dtype).itemsize > 0
