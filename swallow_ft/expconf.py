"""Offline check of Determined experiment configs (expconf v0), as the 0.38 master does it.

The master validates `det experiment create` configs against the JSON Schemas vendored in
expconf_schemas/ (0.38.1, unchanged) with custom keywords stock jsonschema lacks, then applies a few
rules from its Go code. This module adds both, so a broken YAML fails in the tests, not at submission.
"""
from __future__ import annotations

import difflib
import json
import posixpath
import re
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft7Validator, ValidationError, validators
from referencing import Registry
from referencing.jsonschema import DRAFT7

SCHEMA_DIR = Path(__file__).with_name("expconf_schemas")
SCHEMA_BASE = "http://determined.ai/schemas/expconf/v0/"
TOP_LEVEL = "(top level)"

# eventuallyRequired keys the master fills in before its completeness check, so a user's config may
# leave them out: cluster defaults (checkpoint storage, images), generated values (name, seed) and
# schema defaults ({} for hyperparameters/reproducibility). Keyed by the schema file that lists them.
FILLED_BY_MASTER = {
    "experiment.json": {"checkpoint_storage", "name", "hyperparameters", "reproducibility"},
    "reproducibility.json": {"experiment_seed"},
    "environment.json": {"image"},
    "environment-image-map.json": {"cpu", "cuda", "rocm"},  # a missing flavour gets the cluster's image
    "checkpoint-storage.json": {"type"},  # storage without a type is merged into the cluster's storage
}

SEARCHERS = ("single", "random", "grid", "adaptive_asha", "async_halving")
REMOVED_IN_038 = ("custom", "adaptive", "adaptive_simple", "sync_halving")
REMOVED_BEFORE_038 = REMOVED_IN_038[1:]  # the 0.37 master already rejected all but custom
ASHA_LIKE = ("adaptive_asha", "async_halving")
NEED_MAX_TRIALS = ("random", "adaptive_asha", "async_halving")

# Errors raised by the keyword functions below already carry their final "<what>; <fix>" text.
FINAL = {"required", "eventuallyRequired", "additionalProperties", "union", "checks", "compareProperties",
         "disallowProperties"}


def validate(config: dict, version: tuple = (0, 38)) -> list[str]:
    """Every problem the Determined master of `version` (e.g. (0, 38)) would report for `config`, as
    one-line "<dotted.path>: <what is wrong>; <how to fix>" messages. An empty list means valid."""
    found = [(_dotted(e.absolute_path), _explain(e), e.validator) for e in _validator().iter_errors(config)]
    # A value of the wrong type fails every rule below it too; its type error is the useful one.
    mistyped = {path for path, _, keyword in found if keyword == "type"}
    schema_messages = [(p, m) for p, m, keyword in found if keyword == "type" or p not in mistyped]
    master_messages = list(_master_rules(config, tuple(version[:2])))
    # The master's own wording replaces the schema's for the same key (e.g. searcher.metric), and once
    # it rejects the searcher's name, the rest of that searcher's schema errors are noise.
    overridden = {path for path, _ in master_messages}
    noise = ("searcher.",) if "searcher.name" in overridden else ()
    messages = [(p, m) for p, m in schema_messages if p not in overridden and not p.startswith(noise)]
    return list(dict.fromkeys(f"{path}: {message}" for path, message in messages + master_messages))


def _master_rules(config, version):
    """(path, message) for the rules the master enforces in Go, outside the schemas."""
    searcher = config.get("searcher") if isinstance(config, dict) else None
    if not isinstance(searcher, dict):
        return  # a missing or mistyped searcher is already reported by the schema
    name, new = searcher.get("name"), version >= (0, 38)
    current = SEARCHERS if new else SEARCHERS + ("custom",)
    if isinstance(name, str) and name not in current:
        if name in (REMOVED_IN_038 if new else REMOVED_BEFORE_038):
            what = f"the {name!r} searcher was removed {'in' if new else 'before'} Determined 0.38"
        else:
            what = f"unknown searcher {name!r}{_did_you_mean(name, current)}"
        yield "searcher.name", f"{what}; use one of {', '.join(current)}"
    if searcher.get("metric") is None:
        yield "searcher.metric", ("is required, the searcher ranks trials and checkpoints by it; set it to a "
                                  "validation metric your trial reports, e.g. eval_loss")
    trials = searcher.get("max_trials")
    if name in NEED_MAX_TRIALS and _is_number(trials) and trials < 1:
        yield "searcher.max_trials", f"must be >= 1 for the {name} searcher, got {trials}; set how many trials to run"
    # Reported here only: the master refuses the experiment without them, so swallow_ft/searcher.py, which checks
    # their values against the Trainer's flags, leaves a missing one to this.
    if name in ASHA_LIKE and new:
        for key, fix in (("max_time", "the trial's length in time_metric units: --max_steps for batches, "
                                      "--num_train_epochs for epochs"),
                         ("time_metric", "batches (with max_time equal to --max_steps) or epochs (with "
                                         "--num_train_epochs), the progress counters the trial reports")):
            if searcher.get(key) is None:
                yield f"searcher.{key}", f"is required for {name} in Determined 0.38 and later; set it to {fix}"
    elif name in ASHA_LIKE and searcher.get("max_length") is None:
        yield "searcher.max_length", (f"is required for {name} before Determined 0.38 (max_time/time_metric "
                                      "replace it only from 0.38 on); set max_length instead, e.g. {batches: 1000}")


# --- custom keywords, with the semantics of master/pkg/schemas/extensions/*.go ------------------------

def _required(validator, names, instance, schema):
    # Reported at the missing key itself ("searcher.metric"), not at its parent object.
    for name in names if isinstance(instance, dict) else ():
        if name not in instance:
            yield ValidationError("is required; add it", path=[name])


def _eventually_required(validator, names, instance, schema):
    # The master checks these on the config merged with defaults, where null counts as missing.
    filled = FILLED_BY_MASTER.get(schema.get("$id", "").removeprefix(SCHEMA_BASE), set())
    for name in names if isinstance(instance, dict) else ():
        if instance.get(name) is None and name not in filled:
            yield ValidationError("is required (null does not count); set it", path=[name])


def _additional_properties(validator, allowed, instance, schema):
    if allowed is not False or not isinstance(instance, dict):
        yield from Draft7Validator.VALIDATORS["additionalProperties"](validator, allowed, instance, schema)
        return
    known, patterns = list(schema.get("properties", {})), list(schema.get("patternProperties", {}))
    for key in instance:
        if key not in known and not any(re.search(p, str(key)) for p in patterns):
            hint = _did_you_mean(str(key), known) or f" (allowed: {', '.join(known) or 'none'})"
            yield ValidationError(f"unknown key; remove it or fix its spelling{hint}", path=[key])


def _optional_ref(validator, ref, instance, schema):
    # A $ref that lets null through: null means "use the default".
    if instance is not None:
        yield from validator.descend(instance, {"$ref": ref})


def _union(validator, union, instance, schema):
    # Valid when an item validates. Otherwise only the first failing item whose unionKey matches the
    # instance explains why ("never" items help to validate but never explain), else defaultMessage:
    # every item's errors together would bury the one the user meant.
    failures = []
    for item in union["items"]:
        errors = list(validator.descend(instance, item))
        if not errors:
            return
        failures.append((item["unionKey"], errors))
    for key, errors in failures:
        if _key_matches(key, instance):
            yield from errors
            return
    # No key matched. An unknown discriminator value ("type: s4") is clearer reported where it is.
    choices = {}
    for field, _, value in (key[len("const:"):].partition("=") for key, _ in failures if key.startswith("const:")):
        choices.setdefault(field, []).append(value)
    for field, values in choices.items():
        got = instance.get(field) if isinstance(instance, dict) else None
        if isinstance(got, str):
            yield ValidationError(f"unknown value {got!r}{_did_you_mean(got, values)}; use one of {', '.join(values)}",
                                  path=[field])
            return
    message = union.get("defaultMessage", "matches none of the allowed forms")
    yield ValidationError(f"{message}; rewrite it in one of the allowed forms")


def _key_matches(key, instance):
    if key in ("always", "never"):
        return key == "always"
    if key.startswith("not:"):
        return not _key_matches(key[len("not:"):], instance)
    kind, _, arg = key.partition(":")
    if kind == "type":
        return isinstance(instance, {"array": list, "object": dict}[arg])
    if kind == "const":
        field, _, value = arg.partition("=")
        return isinstance(instance, dict) and isinstance(instance.get(field), str) and instance[field] == value
    if kind == "singleproperty":
        return isinstance(instance, dict) and list(instance) == [arg]
    if kind == "hasattr":
        return isinstance(instance, dict) and arg in instance
    raise ValueError(f"unknown unionKey {key!r} in the expconf schemas")


def _checks(validator, checks, instance, schema):
    # Each key is the user-facing message for the subschema that must hold.
    for message, subschema in checks.items():
        if not _is_valid(validator, instance, subschema):
            yield ValidationError(f"{message}; change the value so that this holds")


def _compare_properties(validator, compare, instance, schema):
    # As in Go, missing or mistyped operands are skipped: `type` and `required` report those.
    a_name, b_name, kind = compare["a"], compare["b"], compare["type"]
    a, b = _lookup(instance, a_name), _lookup(instance, b_name)
    if kind in ("a<b", "a<=b") and _is_number(a) and _is_number(b) and (a > b or (kind == "a<b" and a == b)):
        relation = "less than" if kind == "a<b" else "at most"
        yield ValidationError(f"must be {relation} {b_name} (got {a} vs {b}); lower {a_name} or raise {b_name}",
                              path=a_name.split("."))
    elif kind == "a_is_subdir_of_b" and isinstance(a, str) and isinstance(b, str):
        a, b = posixpath.normpath(a), posixpath.normpath(b)
        inside = a.startswith(b) if a.startswith("/") else not a.startswith("..")  # a string prefix, as in Go
        if not inside:
            yield ValidationError(f"{a_name} must be a subdirectory of {b_name}; move it under {b_name}")


def _disallow_properties(validator, disallowed, instance, schema):
    for key, message in disallowed.items() if isinstance(instance, dict) else ():
        if key in instance:
            yield ValidationError(f"{message}; remove it", path=[key])


def _conditional(validator, conditional, instance, schema):
    # {"when": S, "enforce": E}: E must hold if S does; {"unless": S, "enforce": E}: E holds unless S does.
    test = conditional.get("when", conditional.get("unless"))
    if _is_valid(validator, instance, test) == ("when" in conditional):
        yield from validator.descend(instance, conditional["enforce"])


@lru_cache(maxsize=None)
def _validator():
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text())
        # With "$schema" present, jsonschema's descend() re-picks the validator class from it, so each
        # $ref would silently switch to the stock Draft7Validator, without the keywords below.
        schema.pop("$schema", None)
        resources.append((schema["$id"], DRAFT7.create_resource(schema)))
    registry = Registry().with_resources(resources)
    # "eventually" is deliberately left out: the master applies it only to a fully defaulted config.
    cls = validators.extend(Draft7Validator, {
        "required": _required, "eventuallyRequired": _eventually_required,
        "additionalProperties": _additional_properties, "optionalRef": _optional_ref, "union": _union,
        "checks": _checks, "compareProperties": _compare_properties,
        "disallowProperties": _disallow_properties, "conditional": _conditional,
    })
    return cls(registry.contents(SCHEMA_BASE + "experiment.json"), registry=registry)


# --- helpers -------------------------------------------------------------------------------------------

def _explain(error: ValidationError) -> str:
    """'<what is wrong>; <how to fix>' for one error, without dumping the schema."""
    keyword, want, got = error.validator, error.validator_value, error.instance
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    if keyword in FINAL:
        return error.message
    if keyword == "type":
        types = " or ".join([want] if isinstance(want, str) else want)
        return f"expected {types}, got {_json_type(got)}; change it to {types}"
    if keyword in bounds:
        return f"must be {bounds[keyword]} {want}, got {_show(got)}; use a value {bounds[keyword]} {want}"
    if keyword in ("enum", "const"):
        options = want if keyword == "enum" else [want]
        hint = _did_you_mean(got, [o for o in options if isinstance(o, str)]) if isinstance(got, str) else ""
        return f"{_show(got)} is not allowed{hint}; use {' or '.join(map(_show, options))}"
    if keyword is None:  # a `false` subschema: the key may not appear here at all
        return "is not allowed here; remove it"
    return f"{error.message[:120]}; fix this value"


def _dotted(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or TOP_LEVEL


def _lookup(instance, dotted_name):
    for key in dotted_name.split("."):
        instance = instance.get(key) if isinstance(instance, dict) else None
    return instance


def _is_valid(validator, instance, subschema) -> bool:
    return next(validator.descend(instance, subschema), None) is None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else f"{names.get(type(value), type(value).__name__)} {_show(value)}"


def _show(value) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)  # one line, whatever the value holds
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
