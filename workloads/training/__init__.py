"""The training workload: `python -m workloads.training --config <run>/config.json` (see `__main__` for launchers).

Nothing in the code location imports this package; it is launched (resources/launchers.py, resources/k8s.py).
It imports `core` and `workloads.tabular_mlp`, so it runs with the repository root (or the training image's
/app) as the working directory.
"""
