"""cffi builder for ``migrate._native`` (API mode).

Layout, pynacl-style:

* ``native/*.h``   cdef declarations, read here in name order and handed to ``ffi.cdef``.
                   Constants are declared ``#define NAME ...`` so the compiler supplies the value.
* ``native/*.c``   the implementation: tiny static wrappers around ioctls, syscalls and unions,
                   plus the GIL-free C kernels. All of them are ``#include``d into the one
                   translation unit that cffi generates, so ``static`` helpers are visible to it.
* ``native/include/`` real C headers shared by the .c files (e.g. uapi values newer than the
                   system's kernel headers).

Run ``python native/build.py`` to rebuild ``migrate/_native*.so`` in place during development.
"""

from __future__ import annotations

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _cdef_text() -> str:
    return "\n".join(p.read_text() for p in sorted(HERE.glob("*.h")))


def _source_text() -> str:
    includes = [f'#include "{p.name}"' for p in sorted(HERE.glob("*.c"))]
    return "#define _GNU_SOURCE 1\n" + "\n".join(includes) + "\n"


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "migrate._native",
    _source_text(),
    include_dirs=[str(HERE), str(HERE / "include")],
    depends=[str(p) for p in sorted(HERE.glob("*.[ch]")) + sorted((HERE / "include").glob("*.h"))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    libraries=[],
)


if __name__ == "__main__":
    # In-place development build: writes migrate/_native.*.so next to the package.
    import os
    import shutil

    os.chdir(HERE.parent)
    built = pathlib.Path(ffibuilder.compile(tmpdir=str(HERE.parent / "build" / "cffi"),
                                            verbose=False))
    # Copy then rename: processes that already mapped the old library keep a valid inode
    # (overwriting it in place makes them crash).
    target = HERE.parent / "migrate" / built.name
    staging = target.with_name(target.name + ".new")
    shutil.copy2(built, staging)
    os.replace(staging, target)
    print("built", built.name)
