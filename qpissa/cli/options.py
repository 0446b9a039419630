"""Typer options derived from config dataclasses: every option is declared once, as a dataclass field.

A field's name gives the flag (``batch_size`` → ``--batch-size``), its default the CLI default,
``metadata["help"]`` the help text and its type the option type. ``Literal[...]`` fields become
plain ``str`` options whose choices the dataclass validates (one :class:`~qpissa.errors.UserError`
line, exit 2) and the help lists. The Python API takes the same dataclasses, so the CLI, the API and
the planner cannot drift apart (the pattern of PEFT's ``LoraConfig``).

``with_options(config_file=True, ...)`` adds ``--config FILE`` (YAML or JSON): its keys are the same names (a
field, or an own option's long flag; a positional's parameter name), read into click's ``default_map``, so a
flag typed on the command line wins (``ctx.get_parameter_source`` says ``COMMANDLINE`` vs ``DEFAULT_MAP``) and a
required option or positional may come from the file instead. The command can ask for ``resolved`` (every
option's final value under its key) and write it with :func:`write_config`, which ``--config`` reads back.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import typer

from qpissa.choices import unoptional
from qpissa.errors import UserError

CONFIG_PARAM = "config_file"  # the parameter behind --config (not "config": plan's positional once had that name)
RESOLVED = "resolved"  # a command parameter of this name receives {key: final value} (see with_options)
NOT_RECORDED = ("resume", "overwrite")  # how a run was started, not what it computes: never written back


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("help", "")


@dataclass(frozen=True)
class Options:
    """Which fields of ``cls`` a command exposes, and how.

    ``defaults``: CLI defaults that differ from the Python API's (e.g. ``device="auto"``);
    ``toggles``: booleans as ``--x/--no-x`` (else an on-switch ``--x``); ``shorts``: field → short flag;
    ``list_choices``: append "(one of: …)" to the help of ``Literal`` fields; ``flags``: field → flag name when
    it is not ``--field-name`` (e.g. ``init_adapter`` → ``--init``); ``types``: field → CLI type when it is not
    the field's (e.g. ``Path`` for a ``str`` path: typer shows ``<path>``; the command converts it back).
    """

    cls: type
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    toggles: bool = True
    shorts: Mapping[str, str] = field(default_factory=dict)
    list_choices: bool = True
    flags: Mapping[str, str] = field(default_factory=dict)
    types: Mapping[str, type] = field(default_factory=dict)

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.cls)
        out = []
        for f in dataclasses.fields(self.cls):
            if f.name in self.exclude or (self.include is not None and f.name not in self.include):
                continue
            out.append(self._parameter(f, hints[f.name]))
        return out

    def _parameter(self, f: dataclasses.Field, hint: Any) -> inspect.Parameter:
        base, optional = unoptional(hint)
        base = self.types.get(f.name, base)
        help_text = f.metadata.get("help", "")
        if typing.get_origin(base) is Literal:
            allowed = [str(a) for a in typing.get_args(base)]
            if self.list_choices:
                help_text = f"{help_text} (one of: {', '.join(allowed)})"
            base = str
        flag = self.flags.get(f.name, "--" + f.name.replace("_", "-"))
        if base is bool and (self.toggles or optional):
            flag = f"{flag}/--no-{flag[2:]}"
        decls = [flag, *([self.shorts[f.name]] if f.name in self.shorts else [])]
        if f.name in self.defaults:
            default = self.defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = ...  # required
        annotation = Optional[base] if optional else base
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, *decls, help=help_text))


def with_options(config_file: bool = False, **groups: Options) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a typer command: for each ``name=Options(Cfg)``, add Cfg's fields as options and pass
    the command ``name={field: value}`` (the command builds the config, so nested configs stay explicit).

    ``config_file=True`` adds ``--config FILE`` (see the module docstring; :class:`ConfigSchema` has the keys) and,
    when the command has a ``resolved`` parameter, passes it ``{key: final value}`` for :func:`write_config`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn)
        fn_params = inspect.signature(fn).parameters
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in fn_params.values() if p.name not in groups and p.name != RESOLVED]
        added = {name: opts.parameters() for name, opts in groups.items()}
        grouped = [p for ps in added.values() for p in ps]
        schema = ConfigSchema.of(own, grouped) if config_file else None
        params = own + grouped
        if schema is not None:
            params = [schema.mark_optional(p) for p in params] + [schema.parameter()]
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{fn.__name__}: an option is declared twice: {sorted(n for n in names if names.count(n) > 1)}")

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            kwargs.pop(CONFIG_PARAM, None)  # already read into click's default_map by its callback
            if schema is not None and RESOLVED in fn_params:
                kwargs[RESOLVED] = schema.resolve(kwargs)
            for name, ps in added.items():
                kwargs[name] = {p.name: kwargs.pop(p.name) for p in ps}
            return fn(**kwargs)

        del command.__wrapped__  # typer must see the signature below, not fn's
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.config_schema = schema  # type: ignore[attr-defined]  (tests and other tools read files with it)
        return command

    return wrap


# ----------------------------------------------------------------------------- --config FILE

@dataclass(frozen=True)
class ConfigKey:
    """One key ``--config`` accepts: the command parameter it sets, its type, whether null is allowed."""

    param: str
    annotation: Any
    nullable: bool
    required: bool


@dataclass(frozen=True)
class ConfigSchema:
    """The keys of one command's ``--config`` file: a dataclass field's name, an own option's long flag
    (``out`` behind ``--output`` → ``output``), a positional's parameter name; dashes read as underscores."""

    keys: Mapping[str, ConfigKey]
    aliases: Mapping[str, str]  # other accepted spellings (the flag of a field whose flag differs) → key

    @classmethod
    def of(cls, own: list[inspect.Parameter], grouped: list[inspect.Parameter]) -> "ConfigSchema":
        keys, aliases = {}, {}
        own_names = {p.name for p in own}
        for p in own + grouped:
            info = p.default
            flag = _long_flag(info)
            key = flag if (p.name in own_names and flag) else p.name
            default = getattr(info, "default", info)
            keys[key] = ConfigKey(p.name, p.annotation, nullable=default is None, required=default is ...)
            if flag and flag != key:
                aliases[flag] = key
        return cls(keys, aliases)

    def parameter(self) -> inspect.Parameter:
        """The ``--config`` option: eager, so the file is read before any other option is processed."""

        def load(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
            if value is not None:
                ctx.default_map = {**(ctx.default_map or {}), **self.read(value, section=ctx.command.name)}
            return value

        help_text = ("YAML (.yaml/.yml) or JSON file of options: keys are the option names (underscores or dashes; "
                     "the positionals by their names), flags given on the command line override it; a file of "
                     "sections (one mapping per command name) gives each command its own")
        return inspect.Parameter(CONFIG_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                 default=typer.Option(None, "--config", is_eager=True, callback=load, help=help_text))

    def mark_optional(self, p: inspect.Parameter) -> inspect.Parameter:
        """A required option or positional says it may come from --config (click's default_map satisfies it)."""
        key = next(k for k, v in self.keys.items() if v.param == p.name)
        if not self.keys[key].required or not hasattr(p.default, "help"):
            return p
        info = copy.copy(p.default)
        info.help = f"{info.help or ''} (or `{key}:` in --config)".strip()
        return p.replace(default=info)

    def read(self, path: str | Path, section: str | None = None) -> dict[str, Any]:
        """Parameter name → value from file ``path`` (its ``section`` when the file has one mapping per command);
        an unknown key (with the closest valid one) or a value of the wrong type is one UserError line."""
        data = load_config_file(path)
        if isinstance(data.get("data_cfg"), dict):  # a RUN/config.json (the API's record of a run): flatten it
            data = run_record_options(data)
        if data and all(isinstance(v, dict) for v in data.values()):
            if section not in data:
                raise UserError(f"{path}: no `{section}:` section (it has {', '.join(map(str, data))})")
            data = data[section]
        out = {}
        for raw, value in data.items():
            name = str(raw).replace("-", "_")
            key = self.aliases.get(name, name)
            if key not in self.keys:
                best = difflib.get_close_matches(name, list(self.keys), n=1, cutoff=0.0)
                raise UserError(f"{path}: unknown key {raw!r}" + (f"; did you mean {best[0]!r}?" if best else ""))
            spec = self.keys[key]
            out[spec.param] = _coerce(f"{path}: {key}", value, spec.annotation, spec.nullable)
        return out

    def resolve(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Key → final value of every option but :data:`NOT_RECORDED` (paths as given, as strings)."""
        out = {}
        for key, spec in self.keys.items():
            if key in NOT_RECORDED or spec.param not in values:
                continue
            value = values[spec.param]
            if isinstance(value, (tuple, list)):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[key] = str(value) if isinstance(value, Path) else value
        return out


RUN_RECORD_ONLY = ("id2label", "labels_from_strings", "progress")  # what RUN/config.json holds besides options


def run_record_options(data: Mapping[str, Any]) -> dict[str, Any]:
    """RUN/config.json (``dataclasses.asdict(TrainConfig)`` + the label map) → the options it records: the nested
    ``data_cfg`` flattened, ``progress`` as ``no_progress``, what a run computed (``id2label``) left out."""
    out = {k: v for k, v in data.items() if k not in RUN_RECORD_ONLY and k != "data_cfg"}
    out.update(data["data_cfg"])
    if data.get("progress") is False:
        out["no_progress"] = True
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a .yaml/.yml/.json file (an empty file: {}), or one UserError line saying what is wrong."""
    import yaml

    path = Path(path)
    kind = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"--config {path}: unknown suffix {path.suffix!r}; use .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text) if kind == "YAML" else json.loads(text or "{}")
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise UserError(f"--config {path}: not valid {kind} ({' '.join(str(err).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values, got a {type(data).__name__}")
    return data


def write_config(path: str | Path, resolved: Mapping[str, Any], command: str) -> Path:
    """Write ``resolved`` (from ``with_options(config_file=True)``) as YAML, atomically; ``qpissa COMMAND --config
    PATH`` reads it back (paths relative to where the run was started, as they were given)."""
    import yaml

    from qpissa.atomic import write_text

    header = (f"# qpissa {command}: every option of this run (keys as --config reads them; --resume and --overwrite "
              f"are left out).\n# Repeat it: qpissa {command} --config {path} -o NEW_DIR  (flags override the file)\n")
    write_text(path, header + yaml.safe_dump(dict(resolved), sort_keys=False, allow_unicode=True))
    return Path(path)


def _long_flag(info: Any) -> str | None:
    """``--output`` of an option declared ``("--output", "-o")`` as a key (``output``); None for a positional."""
    if isinstance(info, typer.models.ArgumentInfo):
        return None
    for decl in getattr(info, "param_decls", None) or ():
        for part in decl.split("/"):
            if part.startswith("--"):
                return part[2:].replace("-", "_")
    return None


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (string)"}


def _coerce(where: str, value: Any, annotation: Any, nullable: bool) -> Any:
    """``value`` from a config file as ``annotation`` wants it, strictly (``rank: "16"`` is an error, not 16);
    one exception: a float may be a string such as ``2e-5``, which YAML 1.1 reads as text."""
    base, optional = unoptional(annotation)
    if value is None:
        if optional or nullable:
            return None
        raise UserError(f"{where}: expected {_TYPE_NAMES.get(base, base)}, got null")
    if typing.get_origin(base) in (list, tuple):
        item = (typing.get_args(base) or (str,))[0]
        return [_coerce(where, v, item, False) for v in (value if isinstance(value, list) else [value])]
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str),
          Path: isinstance(value, str)}.get(base, True)
    if not ok and base is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not ok:
        raise UserError(f"{where}: expected {_TYPE_NAMES.get(base, base)}, got {type(value).__name__} {value!r}")
    return float(value) if base is float else value
