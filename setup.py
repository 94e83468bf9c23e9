"""The C data-plane accelerator; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "punchline.relay._fastpath",
            sources=["src/punchline/relay/_fastpath.c"],
            extra_compile_args=["-Wall", "-Wextra"],
        )
    ]
)
