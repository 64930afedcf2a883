"""Only the optional compiled accelerator lives here; all metadata is in pyproject.toml.

`optional=True`: when the C extension cannot be built (no compiler, no Python headers),
the install still succeeds and kmsd.protocol.crypto falls back to pure Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kmsd.protocol._rijndael",
            sources=["kmsd/protocol/_rijndael.c"],
            optional=True,
        )
    ]
)
