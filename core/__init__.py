"""The Dagster-free floor that assets, resources and the workloads share.

Everything here runs inside the serving and training images as well as in the code location, so no module of
this package imports Dagster (tests/unit/test_core_imports.py loads each one in a fresh interpreter and checks).
Heavy libraries (torch, alibi_detect, sqlalchemy, ...) are imported inside the functions that use them.

- `core.files`: sha256 of files, atomic writes.
- `core.manifest`: the one manifest format (sha256 of every file of a folder) and its one strictness.
- `core.names`: the names every floor shares (aliases, version tags, variants, the smoke key id, outputs).
- `core.audit`: the decision audit log (a hash chain) and what counts as served traffic.
- `core.drift`: drift statistics, the detector bundle and its plot.
- `core.server_config`, `core.train_config`: the typed configs the assets write and the workloads read.
"""
