"""Build configuration for the optional native fast path (everything else is in pyproject.toml).

``async_logging._speedups`` is a C extension with no dependency beyond the Python headers.
It is optional: where it cannot be compiled the package installs without it and the
engine takes its pure-Python path for every frame (same output, slower). ``.ci/run``
checks that it was built.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "async_logging._speedups",
            ["src/async_logging/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"],
        )
    ]
)
