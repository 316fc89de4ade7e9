"""Wiring the stage factories share."""

import logging
from collections.abc import Callable
from typing import Any, TypeAlias

import dagster as dg
# What dg.define_asset_job returns; Dagster does not export the class itself.
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition as AssetJob

from assets import naming
from assets.naming import asset_key
from assets.spec import PipelineSpec
from core.lazy import pd

# What a stage logs to: an asset's or sensor's `context.log`, or a plain logger outside Dagster.
Log = logging.Logger | dg.DagsterLogManager

__all__ = ["AssetJob", "DataFrameType", "FeatureBody", "Log", "feature_asset", "png_markdown"]


def _is_data_frame(_context: Any, value: Any) -> bool:
    return isinstance(value, pd.DataFrame)


# An asset's DataFrame input or output, checked when the step runs. Annotating with pd.DataFrame itself would make
# Dagster import pandas while the code location loads (core/lazy.py says why not).
DataFrameType = dg.DagsterType(name="DataFrame", type_check_fn=_is_data_frame, description="A pandas DataFrame.")

FeatureBody: TypeAlias = "Callable[[dg.AssetExecutionContext, pd.DataFrame, pd.DataFrame, pd.DataFrame | None], Any]"


def feature_asset(spec: PipelineSpec, body: FeatureBody, **asset_kwargs: Any) -> dg.AssetsDefinition:
    """An asset over validated_dataset and training_splits, and text_embeddings when the spec has text.

    Dagster reads an asset's inputs from its function's parameters, so the text variant names one more; `body`
    gets None for the embeddings of a spec without text.
    """
    ins = {"validated": dg.AssetIn(key=asset_key(spec.name, naming.VALIDATED_DATASET)),
           "splits": dg.AssetIn(key=asset_key(spec.name, naming.TRAINING_SPLITS))}
    if spec.has_text:
        ins["embeddings"] = dg.AssetIn(key=asset_key(spec.name, naming.TEXT_EMBEDDINGS))

        @dg.asset(ins=ins, **asset_kwargs)
        def with_text(context: dg.AssetExecutionContext, validated: DataFrameType, splits: DataFrameType,
                      embeddings: DataFrameType):
            return body(context, validated, splits, embeddings)

        return with_text

    @dg.asset(ins=ins, **asset_kwargs)
    def tabular(context: dg.AssetExecutionContext, validated: DataFrameType, splits: DataFrameType):
        return body(context, validated, splits, None)

    return tabular


def png_markdown(path: str, title: str) -> dg.MetadataValue:
    """A PNG the UI shows inline (Markdown with the image as a data URI), not a path to go and find."""
    import base64
    from pathlib import Path

    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{data})")
