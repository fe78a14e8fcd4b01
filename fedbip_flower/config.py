"""Typed configuration: ``[tool.flwr.app.config]`` (flat, kebab-case, dotted) -> dataclasses.

The dataclass defaults are the single source of truth; a test checks that pyproject.toml's
table equals them. Every key is validated before any work starts: an unknown key or a bad
value raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, as Flower itself uses it
    import tomli as tomllib

SHAPES_DATASET = "fedbip-shapes"
# Experiment presets: TOML run-config files (flwr run --run-config FILE reads them as they are).
EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid."""


def _f(default: Any, help: str, choices: tuple | None = None, lo=None, hi=None):
    return field(default=default, metadata={"help": help, "choices": choices, "lo": lo, "hi": hi})


class _Checked:
    """Every field checked on construction (``__post_init__``), however the config is built:
    parsed from a run config, constructed, or ``dataclasses.replace``d. A bad value raises
    :class:`ConfigError` naming its run-config key."""

    _prefix: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if not dataclasses.is_dataclass(hints[f.name]):
                _check(_key(self._prefix, f.name), getattr(self, f.name), hints[f.name], dict(f.metadata))


@dataclass(frozen=True)
class ModelConfig(_Checked):
    _prefix: typing.ClassVar[str] = "model."

    id: str = _f("bundled", "LDM: 'bundled' (the shipped small LDM), an HF hub id, or a local folder")
    device: str = _f(
        "auto",
        "server devices: auto = every visible GPU (else cpu), or one or more of cpu / cuda / cuda:N / mps, "
        "comma-separated; sites' synthesis is spread over them",
    )
    dtype: str = _f("auto", "LDM weights dtype: auto = fp16 on CUDA, fp32 on CPU", ("auto", "float32", "float16"))

    def __post_init__(self) -> None:
        super().__post_init__()
        device_list(self.device)


@dataclass(frozen=True)
class DataConfig(_Checked):
    _prefix: typing.ClassVar[str] = "data."

    dataset: str = _f(
        SHAPES_DATASET, "'fedbip-shapes' (bundled), 'imagefolder' (data-dir / node's data-dir) or an HF id"
    )
    data_dir: str = _f("", "imagefolder root (holding train/metadata.csv) used in simulation")
    domains: str = _f("medical,satellite,thermal,chalkboard", "fedbip-shapes: comma-separated client styles")
    per_class: int = _f(48, "fedbip-shapes: images per class and domain", lo=2)
    resolution: int = _f(32, "image side in pixels (fedbip-shapes renders at 32 or 64)", (32, 64, 128, 256, 512))
    framing: str = _f(
        "close-up",
        "fedbip-shapes: object size of the sites' images; close-up is larger than any pretraining image",
        ("standard", "close-up"),
    )
    partition_by: str = _f("domain", "feature shift ('domain') or label shift ('dirichlet')", ("domain", "dirichlet"))
    alpha: float = _f(0.5, "Dirichlet concentration for partition-by='dirichlet'", lo=1e-4)
    shots: int = _f(16, "few-shot training images per class per client", lo=1)
    max_test_per_class: int = _f(64, "cap on each class's held-out test images per client", lo=1)
    preset: str = _f("natural", "prompt preset: natural / medical / satellite", ("natural", "medical", "satellite"))


@dataclass(frozen=True)
class ClientConfig(_Checked):
    _prefix: typing.ClassVar[str] = "client."

    template: str = _f("", "prompt template with [S] and [V]; empty = the data preset's template")
    n_s: int = _f(4, "tokens in the domain concept S", lo=1, hi=8)
    n_v: int = _f(1, "tokens per class concept V", lo=1, hi=8)
    injection: str = _f(
        "input", "where S/V enter: text-encoder input (paper) or output (authors' code)", ("input", "output")
    )
    init: str = _f("word", "concept initialisation: natural-word embeddings or random", ("word", "random"))
    steps: int = _f(120, "optimisation steps of S and V", lo=0)
    batch_size: int = _f(32, "images per optimisation step", lo=1)
    lr: float = _f(0.05, "Adam step size of S and V, relative to the RMS of their initial vectors", lo=0.0)
    timestep: int = _f(
        0, "noise timestep T of the uploaded latents; 0 = the server's first inference timestep", lo=0, hi=999
    )
    interpolate: bool = _f(True, "mix each latent with a same-class partner (instance level)")
    gamma_mean: float = _f(0.5, "mean of the interpolation weight gamma", lo=0.0, hi=1.0)
    gamma_std: float = _f(0.1, "std of gamma (clipped to [0, 1])", lo=0.0)
    upload_latents: bool = _f(True, "upload the noised latents (off = concept level only)")
    device: str = _f("auto", "client torch device", ("auto", "cpu", "cuda", "mps"))


@dataclass(frozen=True)
class ServerConfig(_Checked):
    _prefix: typing.ClassVar[str] = "server."

    inference_steps: int = _f(5, "DDIM steps of the full schedule (its first timestep is the default T)", lo=1, hi=1000)
    guidance_scale: float = _f(3.0, "classifier-free guidance scale", lo=0.0)
    ddim_eta: float = _f(0.0, "DDIM eta (0 = deterministic)", lo=0.0, hi=1.0)
    concept_noise: float = _f(
        0.5, "std of the per-image noise added to S, relative to the RMS of the uploaded S and V", lo=0.0
    )
    multiplier: int = _f(1, "synthetic images per uploaded latent (FedBiP-S/M/L = 1/5/10)", lo=1, hi=100)
    batch_size: int = _f(64, "images per synthesis batch", lo=1)
    round_timeout: float = _f(1800.0, "seconds to wait for the clients' replies", lo=1.0)
    wait_timeout: float = _f(300.0, "seconds to wait for min-clients nodes to connect", lo=0.0)
    max_upload_mb: float = _f(512.0, "reject a client upload larger than this", lo=0.001)
    max_images: int = _f(100000, "reject a client upload with more latents than this", lo=1)
    site_quota: int = _f(
        0, "latents per class a site's upload may bring to synthesis (0 = data.shots); the rest is left unused", lo=0
    )
    max_site_share: float = _f(
        0.5,
        "largest share of the synthetic training set one site may hold (its images are subsampled)",
        lo=0.01,
        hi=1.0,
    )
    defence: str = _f(
        "replace",
        "screening of valid uploads (concepts vs. the words, norms, latent statistics, copies): what a flag does",
        ("off", "report", "down-weight", "exclude", "replace"),
    )
    down_weight: float = _f(
        0.25, "defence=down-weight: share of a flagged site's (or class's) latents kept", lo=0.0, hi=1.0
    )


@dataclass(frozen=True)
class ClassifierConfig(_Checked):
    _prefix: typing.ClassVar[str] = "classifier."

    arch: str = _f("resnet18", "torchvision classifier", ("resnet18",))
    stem: str = _f("imagenet", "ResNet stem: ImageNet 7x7/2 + maxpool, or CIFAR 3x3/1", ("imagenet", "cifar"))
    pretrained: str = _f("", "path to ImageNet weights (.pth / .safetensors); empty = random init")
    epochs: int = _f(40, "training epochs (used when steps = 0)", lo=1)
    steps: int = _f(
        0, "SGD steps whatever the set size (0 = epochs x batches); equal steps compare methods fairly", lo=0
    )
    batch_size: int = _f(64, "batch size", lo=1)
    lr: float = _f(0.02, "SGD peak learning rate (one-cycle schedule)", lo=0.0)
    momentum: float = _f(0.9, "SGD momentum", lo=0.0, hi=1.0)
    weight_decay: float = _f(5e-4, "SGD weight decay", lo=0.0)
    augment: bool = _f(True, "random crop + flip augmentation")
    resolution: int = _f(
        0, "image side the classifier trains and scores at (images resized); 0 = the synthetic images' side", lo=0
    )
    workers: int = _f(0, "DataLoader processes reading the synthetic set from disk (0 = the training process)", lo=0)


@dataclass(frozen=True)
class FedBiPConfig(_Checked):
    seed: int = _f(0, "fixes partitions, few-shot selection, noise and synthesis")
    min_clients: int = _f(2, "clients to wait for; fewer good replies stop the run", lo=1)
    output_dir: str = _f(
        "outputs", "folder for run outputs (one sub-folder per run); use an absolute path in deployment"
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_cross(self)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FedBiPConfig:
        """Parse Flower's flat run config; unknown keys and bad values raise ConfigError."""
        return _build(cls, dict(run_config), prefix="")

    def to_run_config(self) -> dict[str, Any]:
        """Flat kebab-case dict, the inverse of :meth:`from_run_config`."""
        out: dict[str, Any] = {}
        _flatten(self, "", out)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _key(prefix: str, name: str) -> str:
    return prefix + name.replace("_", "-")


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _flatten(v, _key(prefix, f.name) + ".", out)
        else:
            out[_key(prefix, f.name)] = v


def _coerce(key: str, value: Any, typ: type, meta: dict) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "false"):
            out = value.lower() == "true"
        else:
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        out = int(value)
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        out = float(value)
        if out != out or out in (float("inf"), float("-inf")):
            raise ConfigError(f"config key '{key}': must be finite, got {value!r}")
    else:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        out = value
    return out


def _check(key: str, value: Any, typ: type, meta: dict) -> None:
    """A field's type, choices and bounds (no coercion: :func:`_coerce` does that for run configs)."""
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
        str: isinstance(value, str),
    }.get(typ, True)
    if not ok:
        raise ConfigError(f"config key '{key}': expected {typ.__name__}, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(meta['choices'])}")
    if meta.get("lo") is not None and value < meta["lo"]:
        raise ConfigError(f"config key '{key}': {value!r} is below the minimum {meta['lo']}")
    if meta.get("hi") is not None and value > meta["hi"]:
        raise ConfigError(f"config key '{key}': {value!r} is above the maximum {meta['hi']}")


def _build(cls: type, flat: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        key = _key(prefix, f.name)
        if isinstance(typ, type) and dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, flat, key + ".")
        elif key in flat:
            kwargs[f.name] = _coerce(key, flat.pop(key), typ, dict(f.metadata))
    if prefix == "" and flat:
        known = sorted(FedBiPConfig().to_run_config())
        raise ConfigError(f"unknown config key(s): {', '.join(sorted(flat))}; known keys: {', '.join(known)}")
    return cls(**kwargs)  # __post_init__ checks bounds, choices and (at the top) cross-key rules


_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def device_list(spec: str) -> list[str]:
    """The items of a ``model.device`` value: ``["auto"]`` or a list of torch device names."""
    items = [d.strip() for d in spec.split(",")]
    if items == ["auto"]:
        return items
    bad = [d for d in items if not _DEVICE.match(d)]
    if bad or not items:
        raise ConfigError(
            f"config key 'model.device': {spec!r} is not 'auto' or a comma-separated list of "
            f"cpu / cuda / cuda:N / mps (bad: {bad})"
        )
    return items


def _check_cross(cfg: FedBiPConfig) -> None:
    t = cfg.client.template
    if t and ("[S]" not in t or "[V]" not in t):
        raise ConfigError(f"config key 'client.template': needs both [S] and [V], got {t!r}")
    if cfg.data.dataset == SHAPES_DATASET:
        from fedbip_flower.data.shapes import STYLES, SUPPORTED_RESOLUTIONS

        doms = [d.strip() for d in cfg.data.domains.split(",") if d.strip()]
        if not doms:
            raise ConfigError("config key 'data.domains': empty")
        bad = [d for d in doms if d not in STYLES]
        if bad:
            raise ConfigError(f"config key 'data.domains': unknown style(s) {bad}; known: {list(STYLES)}")
        if cfg.data.resolution not in SUPPORTED_RESOLUTIONS:
            raise ConfigError(f"config key 'data.resolution': fedbip-shapes renders at {SUPPORTED_RESOLUTIONS}")


def config_table() -> str:
    """The README's config table (``python -m fedbip_flower.config``)."""
    rows = ["| Key | Default | Meaning |", "|---|---|---|"]
    defaults = FedBiPConfig().to_run_config()

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = _key(prefix, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
                continue
            val = defaults[key]
            shown = (
                ("true" if val else "false") if isinstance(val, bool) else repr(val) if isinstance(val, str) else val
            )
            meaning = f.metadata["help"] + (
                f" ({' / '.join(map(str, f.metadata['choices']))})" if f.metadata.get("choices") else ""
            )
            rows.append(f"| `{key}` | `{shown}` | {meaning} |")

    walk(FedBiPConfig, "")
    return "\n".join(rows)


def experiment_names() -> list[str]:
    """The experiment presets shipped in ``fedbip_flower/experiments/``."""
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def load_experiment(name_or_path: str | Path) -> dict[str, Any]:
    """The flat run-config overrides of an experiment preset: a shipped name (see
    :func:`experiment_names`) or a path to a TOML run-config file. Every key and value is
    checked as a run config is; a missing file or a bad key raises :class:`ConfigError`."""
    text = str(name_or_path)
    path = Path(text) if text.endswith(".toml") or "/" in text else EXPERIMENTS_DIR / f"{text}.toml"
    if not path.is_file():
        raise ConfigError(f"no experiment {text!r} (no file {path}); shipped: {', '.join(experiment_names())}")
    try:
        tree = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"experiment {path}: not valid TOML: {err}") from err
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(tree, "")
    try:
        FedBiPConfig.from_run_config(flat)
    except ConfigError as err:
        raise ConfigError(f"experiment {path}: {err}") from err
    return flat


def run_config_string(overrides: dict[str, Any]) -> str:
    """``overrides`` as one ``--run-config "k=v ..."`` string for ``flwr run`` (strings quoted)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            if '"' in v:
                raise ConfigError(f"run-config value {v!r}: double quotes cannot pass through --run-config")
            return json.dumps(v, ensure_ascii=False)
        return repr(v)

    return " ".join(f"{k}={value(v)}" for k, v in overrides.items())


def config_page() -> str:
    """docs/configuration.md, generated: ``python -m fedbip_flower.config > docs/configuration.md``."""
    return "\n".join(
        [
            "# Configuration",
            "",
            "Every key of `[tool.flwr.app.config]` in pyproject.toml, with its default. Override any of",
            'them with `flwr run ... --run-config "key=value ..."` or `bash scripts/main.sh --run-config',
            '"..."`. Unknown keys and bad values stop the run before any work, with a message naming',
            "the key. This page is generated by `python -m fedbip_flower.config > docs/configuration.md`",
            "(a test checks that it is current).",
            "",
            config_table(),
            "",
            "## Experiment presets",
            "",
            "Named sets of overrides, as TOML run-config files in `fedbip_flower/experiments/`:",
            "`bash scripts/main.sh --experiment NAME` (the launcher also sizes the simulated federation",
            "from the preset's `min-clients`; `--run-config` still overrides single keys),",
            "`flwr run . --run-config fedbip_flower/experiments/NAME.toml`, or the benchmark's",
            "`--settings NAME`. A path to your own TOML file works wherever a name does.",
            "",
            "| preset | what it is |",
            "|---|---|",
            *[f"| `{name}` | {_experiment_summary(name)} |" for name in experiment_names()],
            "",
        ]
    )


def _experiment_summary(name: str) -> str:
    """The first comment paragraph of an experiment preset, as one line."""
    lines = []
    for line in (EXPERIMENTS_DIR / f"{name}.toml").read_text().splitlines():
        text = line.removeprefix("#").strip()
        if not line.startswith("#") or not text or line.startswith("#  "):
            break
        lines.append(text)
    return " ".join(lines).replace("|", "\\|")


if __name__ == "__main__":
    print(config_page(), end="")
