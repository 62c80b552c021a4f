"""A teacher ensemble's members as configs: `config.teacher.members`, name -> the teacher keys in
which that member differs from `config.teacher`, and its `weight`.

Each member is read as a whole config (`member_config`): `config` with its teacher keys replaced
by the member's and no members, which is exactly the config of a run taught by that member
alone. So a member is checked by the same rules, built by the same code and cached by the same
writer as a single teacher; a one-member ensemble *is* that single teacher.
"""

from __future__ import annotations

import copy
import dataclasses

import ml_collections

from deit_jax.config.defaults import TEACHER_TORCH

# The teacher keys a member may set; the cache keys stay the run's (a member's cache is written
# by the ordinary writer, `deit_jax.teacher.cache.write`).
MEMBER_KEYS = ("name", "framework", "checkpoint", "img_size", "class_names", "prompts")
WEIGHT = "weight"


def member_names(config: ml_collections.ConfigDict) -> list[str]:
    """The members' names in config order; [] for a single teacher."""
    members = config.teacher.get("members")
    return list(members.keys()) if members else []


def member_weights(config: ml_collections.ConfigDict) -> list[float]:
    """The members' weights normalised to sum 1 (a member without `weight` weighs 1); the config
    rules have checked they are non-negative numbers, not all 0."""
    weights = [float(config.teacher.members[n].get(WEIGHT, 1.0)) for n in member_names(config)]
    return [w / sum(weights) for w in weights]


@dataclasses.dataclass(frozen=True)
class Member:
    """One teacher of an ensemble: its name, the config of a run it teaches alone, its weight
    (normalised: the weights sum to 1)."""

    name: str
    config: ml_collections.ConfigDict
    weight: float


def members_of(config: ml_collections.ConfigDict) -> list[Member]:
    """The ensemble's members in config order, each worked out once; [] for a single teacher."""
    names = member_names(config)
    return [
        Member(n, member_config(config, n), w)
        for n, w in zip(names, member_weights(config), strict=True)
    ]


def member_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The config of a run taught by member `name` alone."""
    member = copy.deepcopy(config)
    overrides = {k: v for k, v in config.teacher.members[name].items() if k != WEIGHT}
    with member.unlocked():
        member.teacher.members = ml_collections.ConfigDict()
    for key, value in overrides.items():
        member.teacher[key] = value
    return member


def members_problem(members: object, config: ml_collections.ConfigDict) -> str | None:
    """What is wrong with `teacher.members` as a whole (its members' own keys are checked as the
    single teacher's are, by `deit_jax.config.rules`); None if nothing."""
    if not isinstance(members, ml_collections.ConfigDict):
        return "must map member names to their teacher keys and weight, e.g. {'a': {...}}"
    if not members:
        return None
    for name, member in members.items():
        if not isinstance(member, ml_collections.ConfigDict):
            return f"member {name!r} must be a dict of teacher keys and a weight"
        unknown = sorted(set(member) - {*MEMBER_KEYS, WEIGHT})
        if unknown:
            return (
                f"member {name!r} sets {', '.join(unknown)}: a member may set "
                f"{', '.join(MEMBER_KEYS)} and {WEIGHT}"
            )
    configs = {}
    for name in members:
        try:  # a value of the wrong type for its key (ConfigDict's type safety)
            configs[name] = member_config(config, name)
        except (TypeError, ValueError) as e:
            return f"member {name!r}: {e}"
    weights = [member.get(WEIGHT, 1.0) for member in members.values()]
    numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
    if not numbers or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        return "the members' weights must be non-negative numbers, not all 0"
    kind, mode = config.distillation.kind, config.get("mode")
    if kind == "feature" and len(members) > 1:
        return "feature distillation takes one teacher: give one member, or kind='soft'/'hard'"
    live = mode != "teacher_cache" and not config.teacher.cache and kind != "none"
    torch = [n for n, member in configs.items() if member.teacher.framework == TEACHER_TORCH]
    if live and torch:
        return (
            f"member {torch[0]!r} is a PyTorch model, which teaches through its cache: write the "
            "members' caches with --config.mode=teacher_cache, then train with "
            "--config.teacher.cache=DIR/a,DIR/b and --config.teacher.cache_weights"
        )
    return None
