"""What trains for each task of a sequence: all weights, one shared LoRA, one LoRA expert per task, or the
orthogonal complement of what earlier tasks use (OSF), all through peft.

All LoRA work is peft's: `get_peft_model` wraps the model the first time an adapter is needed, `add_adapter`
adds the next expert, `set_adapter` makes it the (only) trainable and active one.

``osf`` (orthogonal subspace fine-tuning, peft's `OSFConfig` (peft >= 0.21), Nayak et al. 2025 "Sculpting
Subspaces"): every target matrix W = U_high S_high V_high + U_low S_low V_low (SVD); the top `effective_rank`
directions are frozen, the rest trains with its gradients projected orthogonal to them (and, with
`project_updates`, its factors after every optimizer step: Adam's per-entry step would leak otherwise). At the start
of every later task the update of the finished task is merged into W and W is decomposed again with a larger
frozen rank (`OSFStrategyConfig`), so what the finished task uses becomes part of the frozen subspace (peft's
recipe: merge, wrap again, grow the rank; done in place). The model is an `OSFSequenceModel` (a
`PeftModelForCausalLM`) whose `save_pretrained` also writes the merged weights and the sequence's decompositions
(`osf_sequence/`: safetensors + JSON) and whose `load_adapter` reads them back, checked, before peft loads the
trainable factors: the trainer's checkpoints and end-of-task snapshots resume the sequence exactly, through
transformers' own save and load of a peft model. peft's own files alone (`adapter_model.safetensors`) are not
enough to rebuild the model after the first task: its base weights have changed (use `osf_sequence/`, or
`merge_and_unload()` the trained model).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .utils.options import OptionSource, build_config
from .utils.validation import OptionError, check_bool, check_number, fail

SHARED_ADAPTER = "default"


def expert_name(task_name: str) -> str:
    """Adapter name of a task's expert under `lora_per_task` (peft adapter names are plain identifiers)."""
    return "expert_" + "".join(c if c.isalnum() or c == "_" else "_" for c in task_name)


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(model, PeftModel)


#: the LoRA defaults (`ContinualConfig.lora_*` and `ExpertLibrary` share them)
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ("q_proj", "v_proj")}


def lora_config(
    r: int = LORA_DEFAULTS["r"],
    alpha: float = LORA_DEFAULTS["alpha"],
    dropout: float = LORA_DEFAULTS["dropout"],
    target_modules: Iterable[str] | str = LORA_DEFAULTS["target_modules"],
    **kwargs: Any,
):
    """The one LoRA-config factory of the package: a causal-LM `peft.LoraConfig`; `kwargs` go to `LoraConfig`
    (e.g. `init_lora_weights`). A lone string for `target_modules` is one module name (not a peft regex)."""
    if hasattr(r, "lora_r"):  # the former `lora_config(args)`, kept while call sites move to `lora_config_from_args`
        return lora_config_from_args(r, **kwargs)
    from peft import LoraConfig, TaskType

    modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    kwargs.setdefault("task_type", TaskType.CAUSAL_LM)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, **kwargs)


def lora_config_from_args(args: Any, **kwargs: Any):
    """`lora_config` from an object with the `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules` options."""
    return lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules, **kwargs)


def adapter_for_task(strategy: str, task_name: str) -> str | None:
    """The adapter that holds what was learned for `task_name` (None: the model's own weights)."""
    if strategy == "full":
        return None
    if strategy in ("shared_lora", "osf"):
        return SHARED_ADAPTER
    return expert_name(task_name)


def prepare_task_parameters(model: torch.nn.Module, strategy: str, task_name: str, args: Any) -> torch.nn.Module:
    """Make the parameters of `task_name` trainable and return the (possibly newly wrapped) model.

    * ``full``: the model as it is (every parameter that requires grad trains);
    * ``shared_lora``: wrap once in a peft LoRA model (adapter ``default``) and keep training it;
    * ``lora_per_task``: one adapter per task (``expert_<task>``), created on first use and activated;
    * ``osf``: wrap once in peft's OSF (`OSFSequenceModel`), then at every new task merge the finished task's
      update and decompose again with the next preserved rank (`prepare_osf`).
    """
    if strategy == "osf":
        return prepare_osf(model, task_name, args)
    adapter = adapter_for_task(strategy, task_name)
    if adapter is None:
        return model
    from peft import get_peft_model

    if not is_peft_model(model):
        return get_peft_model(model, lora_config_from_args(args), adapter_name=adapter)
    if adapter not in model.peft_config:
        model.add_adapter(adapter, lora_config_from_args(args))
    model.set_adapter(adapter)
    return model


def activate_adapter(model: torch.nn.Module, adapter: str | None) -> None:
    """Activate `adapter` for inference (no-op for models without adapters or unknown names)."""
    if adapter is None or not is_peft_model(model) or adapter not in model.peft_config:
        return
    model.set_adapter(adapter)


# --------------------------------------------------------------------------------------------------------- OSF
#: the peft release whose OSF layer this strategy is written against (its buffers, `update_layer`, gradient hooks)
OSF_MIN_PEFT = "0.21"
#: the one adapter of an `osf` sequence
OSF_ADAPTER = SHARED_ADAPTER
#: folder (in a saved model, a checkpoint or an end-of-task snapshot) with the sequence's merged weights
OSF_STATE_DIR = "osf_sequence"
OSF_STATE_FORMAT = 1


@dataclass
class OSFStrategyConfig:
    """Options of ``adapter_strategy='osf'``: how much of every target matrix (`lora_target_modules`) is frozen.

    Task i of the sequence (0-based) freezes the top ``min(effective_rank + i * rank_step, max_effective_rank)``
    of the singular directions of each target matrix (a fraction of its smaller dimension, rounded down as peft
    does) and trains the rest, orthogonal to them. The first task's directions are those of the pre-trained
    weights; each later task's are those of the weights after the tasks before it (decomposed again), so the
    growing frozen part takes in what the finished tasks use (peft's advice: grow the preserved rank per task).
    """

    effective_rank: float = field(
        default=0.5,
        metadata={
            "help": "OSF: fraction of each target matrix's singular directions (of its smaller dimension) frozen "
            "while the first task trains, in (0, 1); the rest trains orthogonal to them (peft's effective_rank)."
        },
    )
    rank_step: float = field(
        default=0.1,
        metadata={
            "help": "OSF: added to the frozen fraction at every later task (its weights are decomposed again "
            "first, so what the finished tasks use is frozen), in [0, 1); capped by osf_max_effective_rank."
        },
    )
    max_effective_rank: float = field(
        default=0.9,
        metadata={"help": "OSF: the largest frozen fraction, in (0, 1) and >= osf_effective_rank."},
    )
    project_updates: bool = field(
        default=True,
        metadata={
            "help": "OSF: keep the trainable factors orthogonal to the frozen directions after every optimizer "
            "step (projected before the next forward). peft projects only the gradients, which an adaptive "
            "optimizer (Adam) rescales per entry, so its steps leak into the frozen directions; True makes the "
            "protection exact whatever the optimizer. False: exactly peft's OSF."
        },
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "effective_rank", self.effective_rank, 0, 1, low_open=True, high_open=True)
        check_number(owner, "rank_step", self.rank_step, 0, 1, high_open=True)
        check_number(owner, "max_effective_rank", self.max_effective_rank, 0, 1, low_open=True, high_open=True)
        if self.effective_rank > self.max_effective_rank:
            raise OptionError(
                owner,
                "effective_rank",
                self.effective_rank,
                "must be <= {0}",
                (("max_effective_rank", self.max_effective_rank),),
            )
        check_bool(owner, "project_updates", self.project_updates)
        self.effective_rank = float(self.effective_rank)
        self.rank_step = float(self.rank_step)
        self.max_effective_rank = float(self.max_effective_rank)

    def fraction(self, index: int) -> float:
        """The frozen fraction of task `index` (0-based) of the sequence."""
        return min(self.effective_rank + index * self.rank_step, self.max_effective_rank)


#: the options of the `osf` strategy (`osf_effective_rank`, `osf_rank_step`, `osf_max_effective_rank`,
#: `osf_project_updates`), composed into `ContinualConfig` like the optimizer's
OSF_OPTIONS = (OptionSource(OSFStrategyConfig, "osf_"),)


def _osf_version_problem(installed: str) -> str:
    return (
        f"adapter_strategy='osf' needs peft>={OSF_MIN_PEFT} (its OSFConfig tuner, orthogonal subspace fine-tuning); "
        f"the installed peft is {installed}: pip install -U 'peft>={OSF_MIN_PEFT}'"
    )


def require_osf() -> tuple[type, type]:
    """peft's `OSFConfig` and `OSFLayer`, imported on first use; an ImportError naming the peft release needed when
    the installed peft has no OSF or is older than the release this strategy is written against."""
    import peft
    from packaging.version import Version

    installed = str(getattr(peft, "__version__", "unknown"))
    try:
        from peft import OSFConfig
        from peft.tuners.osf.layer import OSFLayer
    except ImportError as err:
        raise ImportError(_osf_version_problem(installed)) from err
    try:
        too_old = Version(installed) < Version(OSF_MIN_PEFT)
    except ValueError:  # a version string packaging cannot read: trust the import
        too_old = False
    if too_old:
        raise ImportError(_osf_version_problem(installed))
    return OSFConfig, OSFLayer


@functools.cache
def osf_model_class() -> type:
    """`OSFSequenceModel`, built on first use (peft's OSF is imported only when the strategy is used)."""
    require_osf()
    from peft import PeftModelForCausalLM

    class OSFSequenceModel(PeftModelForCausalLM):
        """A `PeftModelForCausalLM` whose one OSF adapter learns a task sequence (`hf_adaptive.adapters`).

        `save_pretrained` also writes `osf_sequence/` (merged weights, decompositions, options) and
        `load_adapter` reads it back, checked, before peft loads the trainable factors; a snapshot of the task
        before the one set up (`osf_task`) then goes on to it (merge, decompose again): how the trainer's
        checkpoints and end-of-task snapshots resume an `osf` sequence.
        """

        #: the strategy's options (fixed for the sequence)
        osf_options: OSFStrategyConfig
        #: the tasks the weights were decomposed for, in order: the last one is the one training
        osf_tasks: list[str]
        #: the task `prepare_osf` set up last (None: none)
        osf_task: str | None

        def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
            super().save_pretrained(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                save_osf_state(self, Path(save_directory) / OSF_STATE_DIR)

        def load_adapter(self, model_id: str, adapter_name: str, *args: Any, **kwargs: Any):
            if adapter_name != OSF_ADAPTER:
                raise ValueError(
                    f"OSFSequenceModel.load_adapter: adapter_name={adapter_name!r} is not allowed: an osf sequence "
                    f"has one adapter, {OSF_ADAPTER!r}"
                )
            folder = Path(str(model_id)) / OSF_STATE_DIR
            if folder.is_dir():
                projected = load_osf_state(self, folder)
            elif Path(str(model_id)).is_dir():
                raise ValueError(
                    f"{model_id} holds no {OSF_STATE_DIR}/ folder: it was not saved by an adapter_strategy='osf' "
                    "model, whose trainable factors only make sense with the weights and decompositions saved there"
                )
            else:
                projected = {}
            result = super().load_adapter(model_id, adapter_name, *args, **kwargs)
            for name, layer in osf_layers(self):
                if projected.get(name):  # saved projected: not projected again (a resumed run is the same run)
                    _mark_projected(layer)
            if self.osf_task is not None and self.osf_tasks[-1] != self.osf_task:
                start_osf_task(self, self.osf_task)  # the snapshot of the task before: go on to the one set up
            return result

    # named as what it is to users: `hf_adaptive.adapters.OSFSequenceModel` (the module's `__getattr__` builds it)
    OSFSequenceModel.__module__ = __name__
    OSFSequenceModel.__qualname__ = "OSFSequenceModel"
    return OSFSequenceModel


def __getattr__(name: str) -> Any:
    """`OSFSequenceModel` is built on first access (it subclasses a peft class; peft's OSF is imported then)."""
    if name == "OSFSequenceModel":
        return osf_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_osf_model(model: Any) -> bool:
    """An `osf` sequence's model (False without peft's OSF: nothing can be one then)."""
    try:
        return isinstance(model, osf_model_class())
    except ImportError:
        return False


def osf_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """`(name, layer)` of every OSF layer of `model`, in module order."""
    _, osf_layer = require_osf()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, osf_layer)]


def preserved_rank(layer: Any, fraction: float) -> int:
    """Frozen directions of `layer` for a frozen `fraction`: peft's rule, int(smaller dimension x fraction)."""
    return int(min(layer.get_base_layer().weight.shape) * fraction)


def _factors(layer: Any) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    params = layer.osf_svd_params[OSF_ADAPTER]
    return params["U_low"], params["V_low"]


def _mark_projected(layer: Any) -> None:
    """Record that the trainable factors of `layer` are in the trainable subspace as they are now."""
    u, v = _factors(layer)
    layer._hf_adaptive_projected = (id(u), u._version, id(v), v._version)


@torch.no_grad()
def project_osf_updates(layer: Any) -> None:
    """Put the trainable factors U_low, V_low of `layer` back into the orthogonal complement of its frozen
    directions (U_high, V_high): the formulas of peft's gradient hooks, applied to the factors. Skipped when they
    have not changed since the last projection (no optimizer step, load, or decomposition since)."""
    u, v = _factors(layer)
    if getattr(layer, "_hf_adaptive_projected", None) == (id(u), u._version, id(v), v._version):
        return
    if OSF_ADAPTER in layer._osf_U_high:  # U_high is not square-recoverable: stored
        high = layer._osf_U_high[OSF_ADAPTER]
        u.sub_(high @ (high.transpose(0, 1) @ u))
    else:  # I - U_high U_high^T = U_low_init U_low_init^T
        low = layer._osf_U_low_init[OSF_ADAPTER]
        u.copy_(low @ (low.transpose(0, 1) @ u))
    if OSF_ADAPTER in layer._osf_V_high:
        high = layer._osf_V_high[OSF_ADAPTER]
        v.sub_((v @ high.transpose(0, 1)) @ high)
    else:
        low = layer._osf_V_low_init[OSF_ADAPTER]
        v.copy_((v @ low.transpose(0, 1)) @ low)
    _mark_projected(layer)


def _projection_hook(module: torch.nn.Module, args: Any) -> None:
    """Forward pre-hook of an OSF layer (`project_updates`): project the factors the last step moved."""
    project_osf_updates(module)


@torch.no_grad()
def _decompose(layer: Any, rank: int, config: Any) -> None:
    """Decompose the layer's current base weight again, freezing its top `rank` directions (peft's
    `update_layer`: new trainable factors, frozen factors and gradient hooks)."""
    layer._detach_hooks()
    layer.update_layer(OSF_ADAPTER, effective_rank=rank, config=config)
    _mark_projected(layer)  # fresh from the SVD: in the trainable subspace


def wrap_osf(
    model: torch.nn.Module,
    task_name: str,
    options: OSFStrategyConfig,
    target_modules: Iterable[str] | str,
    owner: str = "OSFStrategyConfig",
    option: str = "effective_rank",
) -> torch.nn.Module:
    """`model` wrapped in peft's OSF (an `OSFSequenceModel`) to learn `task_name`, the first task of a sequence:
    the top `options.fraction(0)` of every target matrix frozen. A fraction that would freeze nothing of some
    target matrix is refused, naming `owner.option`."""
    osf_config_class, _ = require_osf()
    from peft import TaskType

    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    fraction = options.fraction(0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            smallest = min(module.weight.shape)
            if int(smallest * fraction) < 1:
                fail(
                    owner,
                    option,
                    options.effective_rank,
                    f"freezes no direction of {name} (smaller dimension {smallest}): use at least "
                    f"{math.ceil(1e6 / smallest) / 1e6}",
                )
    config = osf_config_class(target_modules=targets, effective_rank=fraction, task_type=TaskType.CAUSAL_LM)
    wrapped = osf_model_class()(model, config, adapter_name=OSF_ADAPTER)
    wrapped.osf_options = options
    wrapped.osf_tasks = [task_name]
    wrapped.osf_task = task_name
    for _, layer in osf_layers(wrapped):
        _mark_projected(layer)
        if options.project_updates:
            layer.register_forward_pre_hook(_projection_hook)
    return wrapped


def start_osf_task(model: torch.nn.Module, task_name: str) -> None:
    """Set an `OSFSequenceModel` up to learn `task_name`: merge the finished task's update into the weights and
    decompose them again with the next frozen fraction, so that the directions the finished tasks use are frozen
    from now on. A no-op for the task the weights are already decomposed for."""
    tasks = model.osf_tasks
    if tasks and tasks[-1] == task_name:
        model.osf_task = task_name
        return
    if task_name in tasks:
        raise ValueError(
            f"task {task_name!r} was learned already in this osf sequence ({tasks}): task names are unique"
        )
    fraction = model.osf_options.fraction(len(tasks))
    config = model.peft_config[OSF_ADAPTER]
    with torch.no_grad():
        for _, layer in osf_layers(model):
            if model.osf_options.project_updates:
                project_osf_updates(layer)
            base = layer.get_base_layer()
            base.weight.data += layer.get_delta_weight(OSF_ADAPTER).to(base.weight.dtype)
            _decompose(layer, preserved_rank(layer, fraction), config)
    config.effective_rank = fraction
    tasks.append(task_name)
    model.osf_task = task_name


def prepare_osf(model: torch.nn.Module, task_name: str, args: Any) -> torch.nn.Module:
    """``adapter_strategy='osf'`` for `task_name`: the first time wrap `model` (target matrices:
    `args.lora_target_modules`; options: `args.osf_*`, defaults where `args` has none), later go on to the task
    (`start_osf_task`)."""
    owner = type(args).__name__
    options = build_config(OSF_OPTIONS[0], args, owner=owner)
    cls = osf_model_class()  # the ImportError naming the peft release, before anything else
    names = OSF_OPTIONS[0].names()
    if isinstance(model, cls):
        for name, value in asdict(options).items():
            if getattr(model.osf_options, name) != value:
                fail(
                    owner, names[name], value, f"the osf sequence was set up with {getattr(model.osf_options, name)!r}"
                )
        start_osf_task(model, task_name)
        return model
    if is_peft_model(model):
        fail(
            owner,
            "adapter_strategy",
            "osf",
            f"the model already has peft adapters {sorted(model.peft_config)}: pass the model without them",
        )
    targets = getattr(args, "lora_target_modules", LORA_DEFAULTS["target_modules"])
    return wrap_osf(model, task_name, options, targets, owner=owner, option=names["effective_rank"])


def osf_state(model: torch.nn.Module) -> dict[str, Any]:
    """What resumes an `osf` sequence besides peft's trainable factors (tensors + JSON): per OSF layer its base
    weight (the merged updates of the finished tasks), frozen rank and whether its factors are projected; the
    decompositions made (`tasks`), the options and the target modules, checked at load."""
    layers = {}
    for name, layer in osf_layers(model):
        u, v = _factors(layer)
        layers[name] = {
            "weight": layer.get_base_layer().weight.detach(),
            "rank": int(layer.effective_rank[OSF_ADAPTER]),
            "projected": getattr(layer, "_hf_adaptive_projected", None) == (id(u), u._version, id(v), v._version),
        }
    return {
        "format": OSF_STATE_FORMAT,
        "options": asdict(model.osf_options),
        "target_modules": sorted(model.peft_config[OSF_ADAPTER].target_modules),
        "tasks": list(model.osf_tasks),
        "layers": layers,
    }


def save_osf_state(model: torch.nn.Module, folder: str | Path) -> None:
    """`osf_state(model)` as `folder/tensors.safetensors` + `folder/state.json`, each written whole."""
    from .utils.io import save_state

    save_state(folder, osf_state(model))


def load_osf_state(model: torch.nn.Module, folder: str | Path) -> dict[str, bool]:
    """Restore what `save_osf_state` wrote into the `OSFSequenceModel` `model`: base weights, decompositions
    (shapes of the saved factors, which peft loads next) and the list of tasks. Everything is checked before
    anything changes: a `StateLoadError` names the file and what does not match (options, targets, layers,
    shapes, ranks, NaN). Returns, per layer, whether its saved factors were projected."""
    from .utils.io import META_FILE, StateLoadError, check_tensor, load_state

    folder = Path(folder)
    where = folder / META_FILE
    state = load_state(folder)
    names = OSF_OPTIONS[0].names()

    def bad(message: str) -> StateLoadError:
        return StateLoadError(f"osf sequence state {where}: {message}")

    try:
        if state["format"] != OSF_STATE_FORMAT:
            raise bad(f"format {state['format']!r} is not {OSF_STATE_FORMAT}")
        saved_options, tasks, layers = state["options"], state["tasks"], state["layers"]
        current = asdict(model.osf_options)
        if not isinstance(saved_options, dict) or set(saved_options) != set(current):
            raise bad(f"options {saved_options!r} are not those of OSFStrategyConfig {sorted(current)}")
        for key, value in current.items():
            if saved_options[key] != value:
                raise bad(
                    f"the sequence was started with {names[key]}={saved_options[key]!r} and this run has "
                    f"{value!r}: resume with the options it started with"
                )
        targets = sorted(model.peft_config[OSF_ADAPTER].target_modules)
        if state["target_modules"] != targets:
            raise bad(f"target modules {state['target_modules']} differ from this model's {targets}")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise bad(f"tasks={tasks!r} is not a non-empty list of task names")
        if model.osf_task is not None and model.osf_task in tasks[:-1]:
            raise bad(
                f"its weights were decomposed for tasks {tasks}, after {model.osf_task!r}, the task this model is "
                "set up for: it cannot be loaded to train that task again"
            )
        own = dict(osf_layers(model))
        if not isinstance(layers, dict) or set(layers) != set(own):
            missing, extra = sorted(set(own) - set(layers or {})), sorted(set(layers or {}) - set(own))
            raise bad(f"its OSF layers do not match this model's (missing {missing[:3]}, unexpected {extra[:3]})")
        fraction = model.osf_options.fraction(len(tasks) - 1)
        for name, layer in own.items():
            entry = layers[name]
            weight = layer.get_base_layer().weight
            check_tensor(f"layers.{name}.weight", entry["weight"], weight.shape, floating=True, file=where)
            rank = entry["rank"]
            if rank != preserved_rank(layer, fraction) or not isinstance(entry["projected"], bool):
                raise bad(
                    f"layers.{name}: rank={rank!r} is not the frozen rank {preserved_rank(layer, fraction)} of "
                    f"task {len(tasks) - 1} (fraction {fraction}), or projected={entry['projected']!r} is no bool"
                )
    except (KeyError, TypeError) as err:
        raise bad(f"missing or malformed entry ({type(err).__name__}: {err})") from err
    config = model.peft_config[OSF_ADAPTER]
    with torch.no_grad():
        for name, layer in own.items():
            weight = layer.get_base_layer().weight
            weight.data.copy_(layers[name]["weight"].to(device=weight.device, dtype=weight.dtype))
            _decompose(layer, layers[name]["rank"], config)
    config.effective_rank = fraction
    model.osf_tasks = list(tasks)
    return {name: layers[name]["projected"] for name in own}
