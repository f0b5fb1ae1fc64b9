"""Read a Determined experiment YAML for a local run: entrypoint flags, hyperparameters, storage.

On a cluster the master does this: it samples the hyperparameters and runs the entrypoint. Locally we
take the same file and do the parts a single trial needs, so one YAML serves both modes.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from swallow_ft.errors import UserError

SEARCHED_TYPES = ("int", "double", "log", "categorical")
TRAINING_ARGUMENTS = "training_arguments."  # hyperparameters under this key become run_clm.py flags
SCRIPT_NAME = "run_clm.py"
ONE_COMMAND = f"python3 -m determined.launch.… python3 {SCRIPT_NAME} …"
# One piece of a string entrypoint, as sh reads it outside quotes (DOTALL: an escaped character may be a newline).
SH_TOKEN = re.compile(r"""
    (?P<continuation>\\\n)
  | (?P<newline>\n)
  | (?P<blank>[ \t]+)
  | (?P<single>'[^']*')
  | (?P<double>"(?:[^"\\]|\\.)*")
  | (?P<escaped>\\.)
  | (?P<substitution>\$\(|`)
  | (?P<operator>[;&|<>()]+)
  | (?P<unclosed>['"])
  | (?P<text>(?:[^ \t\n'"\\;&|<>()`$]|\$(?!\())+|\\)
""", re.VERBOSE | re.DOTALL)
# Inside double quotes a backslash escapes only these, and $ still expands.
SH_DOUBLE_QUOTED = re.compile(r"""
    (?P<continuation>\\\n)
  | (?P<escaped>\\[$`"\\])
  | (?P<substitution>\$\(|`)
  | (?P<text>(?:[^\\$`]|\$(?!\())+|\\)
""", re.VERBOSE | re.DOTALL)
# PyYAML's problems whose cause is known, matched on its problem text: (pattern, the cause in plain words, the fix).
# {start} is where the construct the problem is in begins (its context mark): where to look for a missing quote.
YAML_PROBLEMS = [(re.compile(pattern), what, fix) for pattern, what, fix in (
    (r"found character '\\t'", "a tab character, which YAML does not allow here", "indent with spaces, not tabs"),
    (r"found character '(?P<char>.+)' that cannot start any token", "YAML reserves {char} at the start of a value",
     "quote the value"),
    (r"mapping values are not allowed here", "a `key:` where no key can start (a wrong indent, or ': ' inside a value)",
     "indent it like the keys beside it, or quote the value"),
    (r"expected <block end>", "a line that does not fit the block above it (an indent that lines up with no key, "
     "or a key among - items)", "line it up with the keys or - items it belongs with"),
    (r"found unexpected end of stream", "the quote opened at {start} never closes", "close it"),
    (r"expected ',' or '\]'", "the [ list opened at {start} lacks a ',' between items or its closing ]", "add it"),
    (r"expected ',' or '}'", "the {{ mapping opened at {start} lacks a ',' between items or its closing }}", "add it"),
    (r"found undefined alias '(?P<name>.*)'", "*{name} names no &{name} anchor above it",
     "define the anchor first, or quote the value"),
)]


def shell_words(text: str, where: str, expand: bool = True) -> List[str]:
    """Split a string entrypoint into words as the cluster's `sh -c` does (Determined runs a string that way).

    Quotes and backslashes follow sh; backslash-newline joins two lines (the ends of a YAML `|` block's lines);
    `#` at the start of a word begins a comment; $VAR, ${VAR} and a leading ~ expand outside single quotes.
    They expand from this process's environment: locally the local one, where the cluster would use the
    container's. As with os.path.expandvars, an unset variable stays as written, and a value is not split into
    several words. Whatever would make sh run more than one command or redirect one (operators, command
    substitution, a second line) is refused: there is no shell here to run it, and dropping it would train
    something else than the cluster does.
    """
    words: List[str] = []
    parts: List[tuple] = []  # the current word: (text, expands)
    started = ended_line = False  # a word is open; a line with words is behind us

    def refuse(what: str) -> None:
        raise UserError(f"{where}: {what}, and locally the entrypoint must be one command "
                        f"({ONE_COMMAND}): move the rest into startup-hook.sh or a script of its own")

    def add(piece: str, expands: bool) -> None:
        nonlocal started
        if ended_line:
            refuse("a second line is a second command to sh (end a line with \\ to continue it)")
        started = True
        parts.append((piece, expands))

    def end_word() -> None:
        nonlocal started
        if started:
            words.append(_expand(parts) if expand else "".join(piece for piece, _ in parts))
        parts.clear()
        started = False

    pos = 0
    while pos < len(text):
        m = SH_TOKEN.match(text, pos)
        kind, piece = m.lastgroup, m.group()
        pos = m.end()
        if kind == "text" and piece.startswith("#") and not started:
            end = text.find("\n", pos)  # a comment, to the end of the line
            pos = len(text) if end < 0 else end
        elif kind in ("blank", "newline"):
            end_word()
            ended_line = ended_line or (kind == "newline" and bool(words))
        elif kind in ("operator", "substitution"):
            refuse(f"'{piece}' is shell syntax" + (" (command substitution)" if kind == "substitution" else ""))
        elif kind == "unclosed":
            raise UserError(f"{where}: unmatched {piece}: close the quote")
        elif kind == "single":
            add(piece[1:-1], False)
        elif kind == "escaped":
            add(piece[1], False)
        elif kind == "double":
            add("", False)  # "" is an (empty) word of its own
            for inner in SH_DOUBLE_QUOTED.finditer(piece[1:-1]):
                if inner.lastgroup == "substitution":
                    refuse(f"'{inner.group()}' is shell syntax (command substitution)")
                if inner.lastgroup != "continuation":
                    add(inner.group()[-1] if inner.lastgroup == "escaped" else inner.group(),
                        inner.lastgroup == "text")
        elif kind == "text":
            add(piece, True)
        # kind == "continuation": sh removes the backslash and the newline, joining the lines
    end_word()
    return words


def _expand(parts: List[tuple]) -> str:
    """One word's text, with variables expanded in its unquoted and double-quoted pieces and a leading ~."""
    word = "".join(os.path.expandvars(piece) if expands else piece for piece, expands in parts)
    tilde = parts[0][1] and parts[0][0].startswith("~")  # sh expands only an unquoted ~
    return os.path.expanduser(word) if tilde else word


def yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """PyYAML's error as one line: the file, line and column, the problem in plain words, and the fix if known."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:  # a ReaderError (a control character in the file) has no line and column
        return f"{path}: not valid YAML: {' '.join(str(exc).split())}"
    problem, begun = exc.problem or "", exc.context_mark
    start = f"line {(begun or mark).line + 1}, column {(begun or mark).column + 1}"
    where = f"{path} line {mark.line + 1}, column {mark.column + 1}: not valid YAML"
    for pattern, what, fix in YAML_PROBLEMS:
        found = pattern.match(problem)
        if found:
            return f"{where}: {what.format(start=start, **found.groupdict())}: {fix}"
    return f"{where}: {problem}" + (f" ({exc.context} from {start})" if exc.context and begun else "")


@dataclass
class Experiment:
    path: Path
    config: Dict[str, Any]

    @classmethod
    def load(cls, path) -> "Experiment":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: experiment file not found")
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise UserError(yaml_problem(path, exc)) from exc
        if not isinstance(config, dict):
            raise UserError(f"{path}: expected a mapping of experiment settings at the top level")
        return cls(path, config)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.stem)

    @property
    def slots_per_trial(self) -> int:
        """Processes for a local trial. The master takes 0 (a trial on CPUs, one process) and null (the default,
        1); both run one process here."""
        slots = (self.config.get("resources") or {}).get("slots_per_trial")
        if slots is None:
            return 1
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise UserError(f"{self.path}: resources.slots_per_trial must be an integer >= 0 (0: one process "
                            f"without a GPU), got {slots!r}")
        return max(slots, 1)

    @property
    def searcher(self) -> Dict[str, Any]:
        return self.config.get("searcher") or {}

    def entrypoint_tokens(self, expand: bool = True) -> List[str]:
        """expand=False keeps $VAR and ~ as written, for rewriting the file (python -m swallow_ft.plan --write)."""
        entrypoint = self.config.get("entrypoint")
        if isinstance(entrypoint, str):  # the cluster runs it with `sh -c`
            return shell_words(entrypoint, f"{self.path}: entrypoint", expand)
        if isinstance(entrypoint, list) and all(isinstance(t, str) for t in entrypoint):
            return list(entrypoint)  # the cluster runs a list as it is, without a shell: nothing expands
        raise UserError(f"{self.path}: entrypoint must be a string or a list of strings, e.g. "
                        f"'python3 -m determined.launch.deepspeed python3 {SCRIPT_NAME} --model_name_or_path ...'")

    def script_args(self, expand: bool = True) -> List[str]:
        """The flags after run_clm.py in the entrypoint."""
        tokens = self.entrypoint_tokens(expand)
        for i, token in enumerate(tokens):
            if Path(token).name == SCRIPT_NAME:
                return tokens[i + 1:]
        raise UserError(f"{self.path}: entrypoint does not run {SCRIPT_NAME}: {' '.join(tokens)}")

    def flags(self, overrides: Sequence[str] = (), sampled: bool = False) -> List[str]:
        """What a local trial passes to run_clm.py: entrypoint flags, then training_arguments. sampled: searched
        hyperparameters take one trial's values (sample_hparams), for tools that train nothing."""
        from swallow_ft.arguments import dict2args, split_equals

        hparams = self.sample_hparams() if sampled else self.hparams_for_local_run(overrides)
        return split_equals(self.script_args()) + dict2args(hparams.get("training_arguments") or {})

    def uses_deepspeed_launcher(self) -> bool:
        return "determined.launch.deepspeed" in self.entrypoint_tokens()

    def hparams_for_local_run(self, overrides: Sequence[str]) -> Dict[str, Any]:
        """The hyperparameters a single local trial gets, as the master would hand them to a trial.

        Constants are unwrapped. A searched hyperparameter has no single value, so unless the user
        pins it with a flag on the command line it is an error that names that flag.
        """
        from swallow_ft.arguments import field_of, given_fields

        pinned = given_fields(overrides)

        def pick(dotted: str, spec: Dict[str, Any]) -> Any:
            flag = f"--{dotted[len(TRAINING_ARGUMENTS):]}" if dotted.startswith(TRAINING_ARGUMENTS) else None
            if flag and field_of(flag) in pinned:
                return None  # the command-line override is appended after it and wins
            hint = (f"pass {flag} VALUE after --config to fix it for this run" if flag and field_of(flag)
                    else "give it a constant value for local runs")
            raise UserError(f"{self.path}: hyperparameters.{dotted} is searched (type: {spec['type']}) and a local "
                            f"run trains one trial: {hint}")

        return self.sample_hparams(pick)

    def sample_hparams(self, pick: Optional[Callable[[str, Dict[str, Any]], Any]] = None) -> Dict[str, Any]:
        """Hyperparameters as one trial of the search could get them. pick(dotted name, its spec) gives a searched
        one's value, None to leave it out; by default the lowest value (a range's lower end, the first category)."""
        def lowest(dotted: str, spec: Dict[str, Any]) -> Any:
            return (self._bounds(dotted, spec) or [None])[0]

        return {key: self._resolve(key, value, pick or lowest)
                for key, value in (self.config.get("hyperparameters") or {}).items()}

    def search_space(self) -> List[Tuple[str, Any]]:
        """(dotted name, value) for each value of a searched hyperparameter that bounds what a trial can draw, as the
        master hands it over: every category, and both ends of an int range, or of a double or log one as floats."""
        space: List[Tuple[str, Any]] = []

        def note(dotted: str, spec: Dict[str, Any]) -> None:
            space.extend((dotted, value) for value in self._bounds(dotted, spec))

        self.sample_hparams(note)
        return space

    def refused_search_values(self, args: Sequence[str]) -> List[str]:
        """A problem for each value a trial could draw (search_space) that run_clm.py would refuse in that trial,
        with these flags from the entrypoint and the constant hyperparameters."""
        from swallow_ft.arguments import parse_input_arguments

        problems = []
        for dotted, value in self.search_space():
            try:
                parse_input_arguments(self.sample_hparams(lambda name, spec: value if name == dotted else None), args)
            except UserError as exc:
                why = str(exc).removeprefix("run_clm.py: ")
                problems.append(f"{self.path}: hyperparameters.{dotted}: a trial can draw {value!r}, which "
                                f"run_clm.py refuses ({why}): change the search to values it takes")
        return problems

    def _bounds(self, dotted: str, spec: Dict[str, Any]) -> List[Any]:
        """The values of a searched hyperparameter that bound the rest, in the types the master draws them in."""
        if spec["type"] == "categorical":
            return list(spec.get("vals") or [])
        ends = [spec.get("minval", 0), spec.get("maxval", 0)]
        base = spec.get("base", 10) if spec["type"] == "log" else 1
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in ends + [base]):
            raise UserError(f"{self.path}: hyperparameters.{dotted}: minval, maxval and base must be numbers, got "
                            f"{ends[0]!r}, {ends[1]!r} and {base!r}")
        if spec["type"] == "log":
            return [float(base) ** end for end in ends]
        return ends if spec["type"] == "int" else [float(end) for end in ends]

    def _resolve(self, key: str, value: Any, pick: Callable[[str, Dict[str, Any]], Any], prefix: str = "") -> Any:
        dotted = f"{prefix}{key}"
        if not isinstance(value, dict):
            return value
        kind = value.get("type")
        if kind == "const":
            return value.get("val")
        if kind in SEARCHED_TYPES:
            return pick(dotted, value)
        if kind is None:  # a nested mapping of hyperparameters
            resolved = {k: self._resolve(k, v, pick, prefix=f"{dotted}.") for k, v in value.items()}
            return {k: v for k, v in resolved.items() if v is not None}
        raise UserError(f"{self.path}: hyperparameters.{dotted} has unknown type {kind!r} "
                        f"(use const, int, double, log or categorical)")

    def local_checkpoint_dir(self, runs_dir: Path) -> Path:
        """Where a local run stores checkpoints: the YAML's storage when it is a local path."""
        storage = self.config.get("checkpoint_storage") or {}
        kind = storage.get("type")
        if kind == "shared_fs" and storage.get("host_path"):
            base = Path(storage["host_path"])
            return base / storage["storage_path"] if storage.get("storage_path") else base
        if kind == "directory" and storage.get("container_path"):
            return Path(storage["container_path"])
        return runs_dir / self.name / "checkpoints"

    def cluster_only_storage(self) -> Optional[str]:
        kind = (self.config.get("checkpoint_storage") or {}).get("type")
        return kind if kind in ("s3", "gcs", "azure") else None
