"""Ahead-of-time build of fastbn._C. Sources and flags come from fastbn/_build.py,
which the JIT loader uses too."""
import importlib.util
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

_spec = importlib.util.spec_from_file_location(
    "fastbn_build", Path(__file__).parent / "fastbn" / "_build.py"
)
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

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
    cmdclass={"build_ext": BuildExtension},
)
