"""Which model version an MLflow registry alias points to, telling an alias that is not there from a registry that
cannot be reached.

Both used to read as "no champion alias ... materialize champion_model", which sends a person to retrain when the
registry's server or database is down. An alias or model that does not exist is `None`; anything else (a
connection refused, a URI of an unknown scheme, a database that is not there) is `RegistryUnreachable`, which
names the registry's URI with any password hidden. Dagster-free: the inference server asks the same question.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit


class RegistryUnreachable(RuntimeError):
    """The registry at `uri` could not be asked; the message names it (password hidden) and the cause."""

    def __init__(self, uri: str, cause: BaseException,
                 names_it: str = "MLFLOW_TRACKING_URI (or the resource's registry_uri)"):
        self.uri = shown_uri(uri)
        detail = _hide_password(f"{type(cause).__name__}: {cause}", uri).strip().splitlines()
        super().__init__(f"the MLflow registry at {self.uri} is unreachable ({(detail or [''])[0][:300]}); check that "
                         f"its server or database is up and that {names_it} names it")


def shown_uri(uri: str) -> str:
    """`uri` with its password, if it has one, replaced by ***."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri
    if not password:
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _hide_password(text: str, uri: str) -> str:
    try:
        password = urlsplit(uri).password
    except ValueError:
        return text
    return text.replace(uri, shown_uri(uri)).replace(password, "***") if password else text


def alias_missing(exc: BaseException) -> bool:
    """Whether an error from `get_model_version_by_alias` says the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    if not isinstance(exc, MlflowException) or isinstance(exc, UnsupportedModelRegistryStoreURIException):
        return False
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # no registered model of that name
        return True
    # The SQL and file stores (and a server relaying them) say a missing alias this way.
    return exc.error_code == "INVALID_PARAMETER_VALUE" and "alias" in exc.message and "not found" in exc.message


def connect(tracking_uri: str, registry_uri: str | None = None, names_it: str | None = None) -> Any:
    """An MlflowClient for these URIs; one MLflow cannot build (a URI of an unknown scheme) is RegistryUnreachable."""
    from mlflow import MlflowClient

    try:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    except Exception as exc:
        raise RegistryUnreachable(registry_uri or tracking_uri, exc, *([names_it] if names_it else [])) from exc


def version_by_alias(client: Any, name: str, alias: str, uri: str, names_it: str | None = None) -> Any | None:
    """The ModelVersion `alias` of model `name` points to, None when the alias or the model does not exist;
    `RegistryUnreachable` when the registry at `uri` (the client's) cannot be asked."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception as exc:
        if alias_missing(exc):
            return None
        raise RegistryUnreachable(uri, exc, *([names_it] if names_it else [])) from exc
