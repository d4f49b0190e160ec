"""Build glue: the Cython extensions and the guest images.

Everything declarative lives in pyproject.toml. This file exists because two
build steps need code: cythonizing every pyvmm/**/*.pyx, and compiling the
guests in guest/ (gcc, as, ld) into pyvmm/guests/*.elf, which ship as
package data. Guests are built by build_ext so that both a wheel build and an
editable install (`pip install -e .`) produce them.
"""

import shutil
import subprocess
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def extensions() -> list[Extension]:
    exts = []
    for pyx in sorted(ROOT.glob("pyvmm/**/*.pyx")):
        rel = pyx.relative_to(ROOT)
        name = ".".join(rel.with_suffix("").parts)
        exts.append(
            Extension(
                name,
                [str(rel)],
                include_dirs=[numpy.get_include()],
                extra_compile_args=["-O3", "-march=x86-64-v2"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )
    return cythonize(exts, language_level=3, compiler_directives={"boundscheck": False})


class BuildWithGuests(build_ext):
    """build_ext that also compiles guest/ into pyvmm/guests/."""

    def run(self) -> None:
        out = ROOT / "pyvmm" / "guests"
        subprocess.run(["make", "-C", str(ROOT / "guest"), f"OUT={out}"], check=True)
        super().run()
        if not self.inplace:
            dest = Path(self.build_lib) / "pyvmm" / "guests"
            dest.mkdir(parents=True, exist_ok=True)
            for elf in out.glob("*.elf"):
                shutil.copy2(elf, dest / elf.name)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildWithGuests})
