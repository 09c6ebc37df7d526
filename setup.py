"""Ahead-of-time build of fastbn._C. Sources and flags come from fastbn/_build.py,
which the JIT loader uses too."""
import importlib.util
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent

_spec = importlib.util.spec_from_file_location("fastbn_build", ROOT / "fastbn" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


class PersistentBuildExtension(BuildExtension):
    """torch's BuildExtension with its object files in one folder kept between
    builds (build/temp, or FASTBN_BUILD_TEMP).

    pip runs every build in a fresh temporary folder, so ninja would recompile
    every source each time; with the objects and ninja's log kept, a rebuild
    compiles only the sources whose text, headers or flags changed.
    """

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.environ.get("FASTBN_BUILD_TEMP") or str(_build.BUILD_TEMP)


with_cuda = _build.use_cuda()
Extension = CUDAExtension if with_cuda else CppExtension
compile_args = {"cxx": _build.cxx_flags()}
if with_cuda:
    compile_args["nvcc"] = _build.nvcc_flags()

setup(
    ext_modules=[
        Extension(
            _build.EXTENSION_NAME,
            _build.sources(with_cuda),
            extra_compile_args=compile_args,
            extra_link_args=_build.ld_flags(),
        )
    ],
    cmdclass={"build_ext": PersistentBuildExtension},
)
