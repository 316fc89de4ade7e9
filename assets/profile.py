"""The learned profile of the last validated snapshot, where it is kept and how it is read back.

validated_dataset writes it; the data checks read it for their learned expectations and the deployment for the
ranges its server accepts. It sits below the stages so neither has to import the other.
"""

from __future__ import annotations

import json

from upath import UPath

from assets.checks.data_quality import Profile
from assets.spec import PipelineSpec
from resources.storage import StorageResource, atomic_write_json


def profile_path(storage: StorageResource, spec: PipelineSpec) -> UPath:
    return storage.spec_dir(spec.name, "validation") / "profile.json"


def load_profile(storage: StorageResource, spec: PipelineSpec) -> Profile | None:
    """The profile of the spec's last validated snapshot, or None before the first one."""
    path = profile_path(storage, spec)
    return Profile.from_json(json.loads(path.read_text())) if path.exists() else None


def write_profile(storage: StorageResource, spec: PipelineSpec, profile: Profile) -> None:
    atomic_write_json(profile_path(storage, spec), profile.to_json())
