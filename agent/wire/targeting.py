"""Which devices a fleet's desired manifest is for: device tags and the signed ``rollout``.

A device carries tags (``device.tags`` in its config: ``site = "north"``); a fleet
manifest's signed block ``rollout: {"percent", "salt", "where"?}`` names the devices
it is for. A device takes the manifest when every ``where`` key equals its tag (AND),
and then when its bucket ``int(sha256(salt + device_id)) mod 100`` is below
``percent``. Otherwise it is outside the rollout and keeps what it serves. The device
decides with ``outside()``; the fleet side (publish ``--where``, rollout progress) uses
the same parsing and the same reasons, so both say the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.wire.errors import ManifestInvalid
from agent.wire.names import NAME_RULE, is_name
from agent.wire.topics import rollout_bucket


@dataclass(frozen=True)
class Rollout:
    percent: float = 100.0
    salt: str = ""
    where: Mapping[str, str] = field(default_factory=dict)


def tags_problem(kind: str, tags: Any) -> str | None:
    """Why ``tags`` is not a table of plain names to plain names (naming the entry), or None."""
    if not isinstance(tags, dict):
        return f"{kind}: expected a table of name = value, got {tags!r:.60}"
    for key, value in tags.items():
        if not is_name(key):
            return f"{kind}: key {key!r} is not a plain name ({NAME_RULE})"
        if not is_name(value):
            return f"{kind}.{key}: {value!r:.60} is not a plain name ({NAME_RULE})"
    return None


def parse_tags(text: str, kind: str = "tags") -> dict[str, str]:
    """``"site=north,ring=canary"`` (or ``k=v`` items of a repeated option) -> a dict.

    ValueError naming ``kind`` and the bad item; keys and values follow the name rule.
    """
    tags: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{kind}: {item!r} is not key=value")
        key, value = key.strip(), value.strip()
        if key in tags and tags[key] != value:
            raise ValueError(f"{kind}: {key} is given twice ({tags[key]!r} and {value!r})")
        tags[key] = value
    problem = tags_problem(kind, tags)
    if problem is not None:
        raise ValueError(problem)
    return tags


def parse_rollout(raw: Any) -> Rollout | None:
    """The manifest's ``rollout`` block; None (no block) means every device of the fleet."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ManifestInvalid(f"rollout: expected an object, got {raw!r:.60}")
    percent, salt = raw.get("percent", 100), raw.get("salt", "")
    if not isinstance(percent, int | float) or isinstance(percent, bool) or not 0 <= percent <= 100:
        raise ManifestInvalid(f"rollout.percent: expected 0..100, got {percent!r}")
    if not isinstance(salt, str):
        raise ManifestInvalid(f"rollout.salt: expected a string, got {salt!r}")
    where = raw.get("where") or {}
    problem = tags_problem("rollout.where", where)
    if problem is not None:
        raise ManifestInvalid(problem)
    return Rollout(float(percent), salt, dict(where))


def outside(rollout: Rollout, device: str, tags: Mapping[str, str]) -> str | None:
    """Why ``device`` (with ``tags``) is outside ``rollout``, or None when it is in it.

    The reason is what the device reports: ``not in rollout (tag ring=canary wanted,
    device has ring=stable)`` or ``not in rollout (bucket 52 >= 50%)``.
    """
    for key, want in sorted(rollout.where.items()):
        have = tags.get(key)
        if have != want:
            has = f"device has {key}={have}" if have is not None else f"device has no {key} tag"
            return f"not in rollout (tag {key}={want} wanted, {has})"
    bucket = rollout_bucket(rollout.salt, device)
    if not bucket < rollout.percent:
        return f"not in rollout (bucket {bucket} >= {rollout.percent:g}%)"
    return None
