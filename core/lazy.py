"""numpy, pandas and pyarrow, imported the first time they are used (Dagster-free).

Loading the code location imports every asset module, in the UI's code server, the daemon and each step's process.
Importing numpy, pandas and pyarrow there cost about as much CPU as `import dagster` itself, although only the steps
that read or write data use them. A module that needs them at run time takes them from here:

    from core.lazy import np, pd

Each name is a module object that imports the library on its first attribute read (`pd.DataFrame(...)`) and then
holds a copy of the library's namespace, so later reads are plain attribute reads; type checkers see the real
modules. A name read while a module loads imports the library at once, so those reads are strings:
- annotations: `from __future__ import annotations`, or quoted (`df: "pd.DataFrame"`) in the modules that define
  assets, where Dagster rejects a string annotation on `context`;
- an asset's DataFrame input or output: `assets.wiring.DataFrameType`, since Dagster evaluates the annotations of
  the functions it wraps;
- type aliases: `Name: TypeAlias = "..."`.
tests/unit/test_definitions.py fails if loading the code location imports any of them.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

# Checked by tests/unit/test_definitions.py next to orchestration.definitions.HEAVY_MODULES.
LAZY_MODULES = ("numpy", "pandas", "pyarrow")


class LazyModule(ModuleType):
    """A stand-in for the module `name`, imported on the first read of an attribute it does not have yet."""

    _lock = threading.Lock()

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def __getattr__(self, attr: str) -> Any:
        real = importlib.import_module(self.__dict__["_lazy_target"])
        with LazyModule._lock:
            for key, value in real.__dict__.items():
                self.__dict__.setdefault(key, value)
        return getattr(real, attr)


if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
else:
    np = LazyModule("numpy")
    pd = LazyModule("pandas")
    pa = LazyModule("pyarrow")
    pc = LazyModule("pyarrow.compute")
    pq = LazyModule("pyarrow.parquet")
