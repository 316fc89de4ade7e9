"""The learned profile of validated data, where it is kept and how it is read back.

validated_dataset writes it; the data checks read it for their learned expectations and the deployment for the
ranges its server accepts. It sits below the stages so neither has to import the other.

An unpartitioned spec keeps one profile, of its last validated snapshot. A partitioned spec keeps one per month
(`validation/profiles/<month>.json`): a month is validated against the months before it, merged
(data_quality.Profile.merge), and the deployment reads every month's, merged.
"""

from __future__ import annotations

import json

from upath import UPath

from assets.checks.data_quality import Profile
from assets.spec import PipelineSpec
from resources.storage import StorageResource, atomic_write_json


def profile_path(storage: StorageResource, spec: PipelineSpec, partition: str | None = None) -> UPath:
    if partition is not None:
        return storage.spec_dir(spec.name, "validation") / "profiles" / f"{partition}.json"
    return storage.spec_dir(spec.name, "validation") / "profile.json"


def _read(path: UPath) -> Profile | None:
    return Profile.from_json(json.loads(path.read_text())) if path.exists() else None


def month_profiles(storage: StorageResource, spec: PipelineSpec) -> dict[str, Profile]:
    """The profile of each validated month of a partitioned spec, by month."""
    folder = storage.spec_dir(spec.name, "validation") / "profiles"
    found = {p.stem: _read(p) for p in sorted(folder.glob("*.json"))} if folder.exists() else {}
    return {m: p for m, p in found.items() if p is not None}


# A month is judged by what the months before it learned only once they hold this many validated rows. Fewer are
# noise, not a reference: a first month of 90 loans has seen half the states and a null rate within +-5 points of
# the truth, so the next month would be refused for being a month. Until then a month meets its declared rules.
MIN_REFERENCE_ROWS = 1000


def reference_before(profiles: dict[str, Profile], month: str) -> Profile | None:
    """The profile a month is checked against: the validated months before it, merged, when they hold at least
    MIN_REFERENCE_ROWS rows; None (declared rules only) before that."""
    merged = Profile.merge([p for m, p in sorted(profiles.items()) if m < month])
    return merged if merged is not None and merged.row_count >= MIN_REFERENCE_ROWS else None


def load_profile(storage: StorageResource, spec: PipelineSpec, before: str | None = None) -> Profile | None:
    """The learned reference, or None before the first validated data: the last validated snapshot of an
    unpartitioned spec; for a partitioned one, the validated months before `before` (reference_before), or every
    month merged without it (what the deployment accepts)."""
    if not spec.partitioned:
        return _read(profile_path(storage, spec))
    profiles = month_profiles(storage, spec)
    if before is not None:
        return reference_before(profiles, before)
    return Profile.merge([p for _, p in sorted(profiles.items())])


def write_profile(storage: StorageResource, spec: PipelineSpec, profile: Profile,
                  partition: str | None = None) -> None:
    atomic_write_json(profile_path(storage, spec, partition), profile.to_json())
