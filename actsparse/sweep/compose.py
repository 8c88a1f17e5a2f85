"""Compose the grid with Hydra exactly as a multirun does: the primary config without sweep overrides,
then `hydra.sweeper.params` (from a preset) and the command line expanded by Hydra's BasicSweeper,
and one config per grid point composed by Hydra's config loader.

The console script collects the whole grid itself (no Hydra job runs, no output directories), so
every cell can be validated before anything is loaded or started, and the launcher sees the grid
as one DAG.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..errors import ActsparseError
from .config import conf_dir, register_configs, sweeps_dir


@dataclass
class Grid:
    """The composed sweep: its name, the grid overrides, and one resolved config per grid point."""
    name: str
    overrides: list[str]                   # as given on the command line
    sweep_params: dict                      # hydra.sweeper.params of the preset, if any
    points: list[tuple[list[str], dict]]    # (overrides of the point, resolved plain config)


def compose_grid(overrides: list[str]) -> Grid:
    """Return every grid point's resolved config for Hydra overrides (sweeps like a=1,2 expand); raise ActsparseError."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="actsparse"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        with _hydra_errors(loader, overrides):
            overrides = _model_overrides(parser.parse_overrides(list(overrides)), loader)
            primary = loader.load_configuration("config", overrides, run_mode=RunMode.MULTIRUN)
            params = dict(primary.hydra.sweeper.params or {})
            lines = [f"{k}={v}" for k, v in params.items()] + overrides
            batches = BasicSweeper.split_arguments(parser.parse_overrides(_model_overrides(parser.parse_overrides(lines), loader)), None)
            points = []
            for point in batches[0]:
                cfg = loader.load_sweep_config(primary, list(point))
                with open_dict(cfg):
                    del cfg["hydra"]
                points.append((list(point), OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))
    return Grid(points[0][1]["name"] if points else "adhoc", list(overrides), params, points)


def _model_overrides(parsed, loader) -> list[str]:
    """`model=X` where X is not a preset in conf/model means `model.name=X` (any asp.load_model spec);
    `+method.params.k=v` means `++method.params.k=v`.

    Every method's parameters are in the config with their defaults, so Hydra would refuse `+` (append) for
    them; `++` sets a known parameter and adds an unknown one, which validation then rejects by name."""
    options = set(loader.get_group_options("model"))
    out = []
    for o in parsed:
        line = o.input_line
        if line.startswith("+method.params."):
            line = "+" + line
        if o.key_or_group == "model" and o.package is None and line.startswith("model="):
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            if any(v not in options for v in values):
                line = "model.name=" + o.get_value_string()
        out.append(line)
    return out


class _hydra_errors:
    """Turn Hydra/OmegaConf composition errors into one-paragraph ActsparseErrors."""

    def __init__(self, loader, overrides: list[str]):
        self.loader = loader
        self.overrides = overrides

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if e is None or isinstance(e, ActsparseError):
            return False
        from hydra.errors import HydraException, MissingConfigException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
            group, _, value = e.missing_cfg_file.rpartition("/")
            raise _missing_option(group, value, self.loader) from None
        if isinstance(e, (HydraException, OmegaConfBaseException)):
            bad = re.search(r"Could not override 'method\.params\.([^'.]+)'", str(e))
            if bad:
                raise _unknown_param(bad.group(1), self.overrides) from None
            raise ActsparseError(f"bad configuration: {_first_lines(e)}") from None
        return False


def _unknown_param(name: str, overrides: list[str]) -> ActsparseError:
    """The error for `method.params.<name>=...` that the chosen method(s) do not have: their valid parameters."""
    from .config import method_defaults

    defaults = method_defaults()
    chosen = [v.strip() for o in overrides if o.startswith("method=") for v in o[len("method="):].split(",")]
    lines = []
    for method in dict.fromkeys(chosen or ["teal"]):
        params = defaults.get(method)
        if params is None or name in params:
            continue
        close = difflib.get_close_matches(name, params, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        listed = ", ".join(f"{k}={v}" for k, v in params.items()) or "none"
        lines.append(f"method {method!r} has no parameter {name!r}{hint}; its parameters (defaults): {listed}")
    return ActsparseError("; ".join(lines) or f"no method of this grid has a parameter {name!r}; "
                          "list them with `actsparse ls methods`")


def _missing_option(group: str, value: str, loader) -> ActsparseError:
    if group == "method":
        from ..sparsifiers.registry import get_method

        try:
            get_method(value)
        except ActsparseError as err:
            return err
    options = loader.get_group_options(group)
    if group == "sweep":
        return ActsparseError(f"unknown sweep preset {value!r}; presets in {sweeps_dir()}: {', '.join(options)}")
    return ActsparseError(f"unknown {group} option {value!r}; available: {', '.join(options)} (in {conf_dir() / group})")


def _first_lines(e: Exception) -> str:
    """The informative part of a Hydra/OmegaConf message (without the search-path dump and object type)."""
    parts = [str(e)]
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) not in parts[0]:
        parts.append(str(cause))
    keep = []
    for p in parts:
        for line in p.splitlines():
            line = line.strip()
            if not line or line.startswith(("Config search path", "Search path", "provider=", "object_type=",
                                             "full_key:", "reference_type")):
                if line.startswith(("Config search path", "Search path")):
                    break
                continue
            keep.append(line)
    return " ".join(keep)
