"""Synthetic inputs built from the models' own input specs, identical for both models of a pair.

Axis 0, when symbolic, is the batch axis. Other symbolic axes take the size the
job gives (evaluate.input_shapes) or its datasets' samples hold (app.formats.input_shapes);
only what nothing fills gets a size guessed from its name (sequence-like: 128,
spatial: 224, else 1), and every guess is reported. A model that does not run at
a guessed size fails with input_shape_required, naming the dims to give. Values follow the input's role as its
name suggests: token ids stay
inside the vocabulary of the embedding they index, masks are ones, token types
zeros, floats standard normal.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InputShapeRequired, JobFailed, MeasurementFailed
from app.formats.input_shapes import BATCH, DECLARED, GUESSED, InputShapes, ShapeError, how_to_give, resolve, shape_text

ROLES = ("baseline", "result")
ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32, "tensor(uint16)": np.uint16, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
SEQUENCE_DIM = re.compile(r"seq|len|token|time|step|frame|word|position", re.IGNORECASE)
SPATIAL_DIM = re.compile(r"height|width|^h$|^w$|^img|image|pixel|spatial", re.IGNORECASE)
SEQUENCE_SIZE, SPATIAL_SIZE, OTHER_SIZE = 128, 224, 1
TOKEN_ID_HIGH = 100
ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


@dataclass
class PlannedInput:
    name: str
    dtypes: dict[str, np.dtype]          # role -> dtype that model declares
    declared: dict[str, list[Any]]      # role -> declared shape (ints, dim names, or None)
    dims: list[int | None]              # resolved sizes; None marks the batch axis
    kind: str                           # normal | ids | binary | bytes | ones | zeros | positions
    high: int = 2                       # exclusive upper bound for integer kinds
    sources: list[str] = field(default_factory=list)  # per axis, where its size came from (app.formats.input_shapes)
    value: Any = None                   # kind "value": what evaluate.input_values gives, fed as is

    def shape(self, batch: int) -> list[int]:
        return [batch if d is None else d for d in self.dims]

    def values(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        shape = self.shape(batch)
        if self.kind == "value":
            given = np.asarray(self.value)
            if given.shape == tuple(shape) or (not self.declared["baseline"] and given.ndim):
                return given.copy()
            try:  # a value given for one sample ([[1]] for [N, 1]) serves every batch size
                return np.broadcast_to(given, shape).copy()
            except ValueError:
                raise JobFailed(f"input '{self.name}' is given a value of shape {list(given.shape)} "
                                f"(evaluate.input_values), which does not fit its shape {shape} at batch {batch}",
                                code="invalid_input_shape", input=self.name) from None
        if self.kind == "normal":
            return rng.standard_normal(shape)
        if self.kind in ("ids", "binary", "bytes"):
            return rng.integers(0, self.high, size=shape)
        if self.kind == "ones":
            return np.ones(shape, dtype=np.int64)
        if self.kind == "zeros":
            return np.zeros(shape, dtype=np.int64)
        if self.kind == "positions":
            return np.broadcast_to(np.arange(shape[-1] if shape else 1), shape).copy()
        raise AssertionError(self.kind)

    def describe(self) -> dict[str, Any]:
        text = {
            "normal": "standard normal",
            "ids": f"integers in [0, {self.high}) (token ids)",
            "binary": f"integers in [0, {self.high})",
            "bytes": "integers in [0, 256)",
            "ones": "ones (mask)",
            "zeros": "zeros (token types)",
            "positions": "0, 1, 2, ... along the last axis (positions)",
            "value": f"{self.value!r:.80} (evaluate.input_values)",
        }[self.kind]
        entry = {"name": self.name, "dtype": self.dtypes["baseline"].name, "declared_shape": self.declared["baseline"],
                 "shape": self.dims, "shape_sources": self.sources, "values": text}
        if self.dtypes["result"] != self.dtypes["baseline"]:
            entry["result_dtype"] = self.dtypes["result"].name
        if self.declared["result"] != self.declared["baseline"]:
            entry["result_declared_shape"] = self.declared["result"]
        return entry


@dataclass
class InputPlan:
    inputs: list[PlannedInput]
    fixed_batch: int | None = None      # the only batch size the models accept, if any
    fixed_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    guessed: list[dict[str, Any]] = field(default_factory=list)  # {input, axis, dim, size} of each guessed axis

    def shapes(self, batch: int) -> dict[str, list[int]]:
        return {i.name: i.shape(batch) for i in self.inputs}

    def sources(self) -> dict[str, list[str]]:
        """Per input, per axis: given by the user / from dataset X / declared by the model / batch size / guessed."""
        return {i.name: list(i.sources) for i in self.inputs}

    @property
    def chosen(self) -> bool:
        """Whether any size was given, taken from a dataset or guessed (not all fixed by the model)."""
        return any(source not in (DECLARED, BATCH) for i in self.inputs for source in i.sources)

    def shape_failure(self, exc: BaseException, batch: int, *, model: str = "the original model") -> JobFailed | None:
        """The error for `model` failing to run on this plan's inputs at `batch`, where the sizes this plan chose
        may be to blame: input_shape_required when some were guessed (naming them and how to give them),
        invalid_input_shape when all came from the user or a dataset. None when the model fixes every size."""
        said = _short_reason(exc)
        if self.guessed:
            dims = "; ".join(f"input '{g['input']}' axis {g['axis']}" + (f" ('{g['dim']}')" if g["dim"] else "")
                             + f" = {g['size']}" for g in self.guessed)
            inputs = {g["input"] for g in self.guessed}
            open_axes: dict[str, list[tuple[int, str | None]]] = {}
            for g in self.guessed:
                open_axes.setdefault(g["input"], []).append((g["axis"], g["dim"]))
            hint = how_to_give(self.shapes(batch), open_axes) + self._value_hint()
            return InputShapeRequired(
                f"{model} does not run at the sizes guessed for its dynamic dims ({dims}); {hint}. "
                f"Shapes tried: {self._shapes_text(batch, inputs)}. ONNX Runtime said: {said}",
                guessed=self.guessed)
        if not self.chosen and self._value_hint():
            return JobFailed(f"{model} does not run on the values generated for its inputs{self._value_hint()}. "
                             f"ONNX Runtime said: {said}", code="input_value_required")
        if self.chosen:
            return JobFailed(f"{model} does not run at the input shapes given for it "
                             f"({self._shapes_text(batch, {i.name for i in self.inputs})}){self._value_hint()}: {said}",
                             code="invalid_input_shape", shapes=self.shapes(batch), sources=self.sources())
        return None

    def check_runs(self, session: Any, *, model: str) -> None:
        """Where this plan chose sizes or generated values for small integer inputs, run `session` (the
        baseline's) once at the smallest batch; raise shape_failure's error if it does not run."""
        if not self.chosen and not self._value_hint():
            return
        batch = self.fixed_batch or 1
        try:
            session.run(None, self.feeds(batch, np.random.default_rng(0))["baseline"])
        except Exception as exc:
            failure = self.shape_failure(exc, batch, model=model)
            if failure is not None:
                raise failure from None

    def _value_hint(self) -> str:
        """Where small integer or boolean inputs got generated values, they may be what the model refused (a
        sample rate that must be 16000): say how to give their values."""
        valued = [i for i in self.inputs if i.kind not in ("normal", "value") and len(i.dims) <= 1]
        if not valued:
            return ""
        example = ", ".join(f'"{i.name}": <value>' for i in valued)
        cli = " ".join(f"--input-value {i.name}=<value>" for i in valued)
        return (f"; if {', '.join(repr(i.name) for i in valued)} must hold particular values (generated here: "
                + "; ".join(i.describe()["values"] for i in valued)
                + f"), give them in evaluate.input_values, e.g. {{{example}}} ({cli})")

    def _shapes_text(self, batch: int, names: set[str]) -> str:
        return ", ".join(f"'{i.name}' {shape_text(i.shape(batch))} (" + ", ".join(
            f"axis {axis}: {source}" for axis, source in enumerate(i.sources) if source not in (DECLARED, BATCH))
            + ")" for i in self.inputs if i.name in names)

    def feeds(self, batch: int, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
        """One draw of values, cast to each model's declared dtype: both models see the same numbers."""
        drawn = {i.name: i.values(batch, rng) for i in self.inputs}
        return {role: {i.name: np.ascontiguousarray(drawn[i.name].astype(i.dtypes[role])) for i in self.inputs}
                for role in ROLES}


def gather_vocabularies(model) -> dict[str, int]:
    """Graph input name -> row count of the smallest initializer table a Gather looks it up in."""
    from workers.onnx_tools.graph import graphs

    found: dict[str, int] = {}
    for graph in graphs(model.graph):
        tables = {t.name: list(t.dims) for t in graph.initializer}
        for node in graph.node:
            if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in tables:
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = tables[node.input[0]]
            if dims and -len(dims) <= axis < len(dims):
                rows = dims[axis]
                found[node.input[1]] = min(found.get(node.input[1], rows), rows)
    return found


def _dtype(name: str, ort_type: str, role_name: str) -> np.dtype:
    if ort_type not in ORT_DTYPES:
        raise MeasurementFailed(f"input '{name}' of {role_name} has type {ort_type}, "
                                "for which the measurement cannot generate values")
    return np.dtype(ORT_DTYPES[ort_type])


def _kind(name: str, dtype: np.dtype, vocabulary: int | None) -> tuple[str, int]:
    lowered = name.lower()
    if dtype.kind == "f":
        return "normal", 0
    if dtype.kind == "b" or "mask" in lowered:
        return "ones", 1
    if "type" in lowered:
        return "zeros", 1
    if "position" in lowered:
        return "positions", 0
    if "ids" in lowered or "token" in lowered or (vocabulary is not None and vocabulary > 2):
        high = TOKEN_ID_HIGH if vocabulary is None else max(1, min(TOKEN_ID_HIGH, vocabulary))
        return "ids", high
    if dtype == np.uint8:
        return "bytes", 256
    return "binary", 2 if vocabulary is None else max(1, min(2, vocabulary))


def _merge_dims(name: str, shapes: dict[str, list[Any]]) -> list[int | str | None]:
    base, res = shapes["baseline"], shapes["result"]
    if len(base) != len(res):
        raise MeasurementFailed(f"input '{name}' has rank {len(base)} in the original model but rank {len(res)} "
                                "in the compressed model")
    merged: list[int | str | None] = []
    for a, b in zip(base, res):
        if isinstance(a, int) and isinstance(b, int) and a != b:
            raise MeasurementFailed(f"input '{name}' has shape {base} in the original model but {res} "
                                    "in the compressed model")
        merged.append(a if isinstance(a, int) else b if isinstance(b, int) else (a if a is not None else b))
    return merged


def _guess(dim_name: str | None, *, axis: int, rank: int, kind: str) -> int:
    if dim_name and SEQUENCE_DIM.search(dim_name):
        return SEQUENCE_SIZE
    if dim_name and SPATIAL_DIM.search(dim_name):
        return SPATIAL_SIZE
    if kind in ("ids", "ones", "zeros", "positions") and axis >= 1:
        return SEQUENCE_SIZE  # token-like inputs: [batch, sequence]
    if kind == "normal" and rank == 4 and axis in (2, 3):
        return SPATIAL_SIZE  # NCHW image
    if kind == "normal" and rank == 4 and axis == 1:
        return 3
    return OTHER_SIZE


def plan_inputs(sessions: dict[str, Any], structures: dict[str, Any], *,
                shapes: InputShapes | dict[str, Any] | None = None, probe: bool = True) -> InputPlan:
    """Inputs for both models of a pair (the same session twice for one model).

    shapes: the job's input shapes (StepContext.input_shapes; see app.formats.input_shapes): what the user gave and
    the shapes of the job's datasets' samples fill the model's dynamic dims before anything is guessed.
    probe: where a dim is not fixed by the model, run the baseline session once on the plan's inputs (when
    it has `run`), so a model that cannot run at the guessed or given sizes fails here with
    input_shape_required / invalid_input_shape rather than with ONNX Runtime's text later.
    """
    shapes = InputShapes.coerce(shapes)
    specs = {role: {i.name: i for i in sessions[role].get_inputs()} for role in ROLES}
    base_names, result_names = list(specs["baseline"]), list(specs["result"])
    if set(base_names) != set(result_names):
        raise MeasurementFailed(
            "the two models must take the same inputs to be compared: the original takes "
            f"{base_names} and the compressed model takes {result_names}")
    vocabularies: dict[str, int] = {}
    for role in ROLES:
        for name, rows in gather_vocabularies(structures[role]).items():
            vocabularies[name] = min(vocabularies.get(name, rows), rows)

    role_names = {"baseline": "the original model", "result": "the compressed model"}
    planned: list[tuple[PlannedInput, list[int | str | None]]] = []
    notes: list[str] = []
    for name in base_names:
        dtypes = {role: _dtype(name, specs[role][name].type, role_names[role]) for role in ROLES}
        declared = {role: list(specs[role][name].shape) for role in ROLES}
        if dtypes["baseline"].kind != dtypes["result"].kind:
            notes.append(f"input '{name}' is {dtypes['baseline'].name} in the original model and "
                         f"{dtypes['result'].name} in the compressed one; the same values were cast to each")
        kind, high = _kind(name, dtypes["baseline"], vocabularies.get(name))
        item = PlannedInput(name=name, dtypes=dtypes, declared=declared, dims=[], kind=kind, high=high)
        if name in shapes.values:
            item.kind, item.value = "value", shapes.values[name]
        planned.append((item, _merge_dims(name, declared)))

    plan = InputPlan(inputs=[p for p, _ in planned], notes=notes)
    try:
        resolved = resolve({item.name: merged for item, merged in planned}, shapes, strict=False)
    except ShapeError as exc:
        raise JobFailed(f"the input shapes do not fit the model: {exc.message}", code="invalid_input_shape",
                        **exc.where) from None
    batched = any(merged and not isinstance(merged[0], int) for _, merged in planned)
    if not batched:
        _fix_batch(plan, planned)
    guessed: dict[tuple[str, str | None, int], int] = {}
    for item, merged in planned:
        for axis, found in enumerate(resolved[item.name]):
            if found.source != GUESSED:
                item.dims.append(found.size)
                item.sources.append(found.source)
                continue
            size = _guess(found.dim, axis=axis, rank=len(merged), kind=item.kind)
            item.dims.append(size)
            item.sources.append(GUESSED)
            plan.guessed.append({"input": item.name, "axis": axis, "dim": found.dim, "size": size})
            key = (item.name, found.dim, axis)
            if key not in guessed:
                guessed[key] = size
                label = f"'{found.dim}'" if found.dim else "unnamed"
                plan.notes.append(f"input '{item.name}' axis {axis} ({label}) has no fixed size; "
                                  f"measured with {size} (a guess: give it in evaluate.input_shapes)")
    if probe and hasattr(sessions["baseline"], "run"):
        plan.check_runs(sessions["baseline"], model="the model")
    return plan


def _fix_batch(plan: InputPlan, planned: list[tuple[PlannedInput, list[int | str | None]]]) -> None:
    """No input has a free first axis: the models run at one batch size only."""
    ranked = [(item, merged) for item, merged in planned if merged]
    if not ranked:
        plan.fixed_batch = 1
        plan.fixed_reason = "the model has no batch dimension (all its inputs are scalars)"
        return
    item, merged = next(((i, m) for i, m in ranked if len(m) >= 2), ranked[0])
    size = merged[0]
    if not isinstance(size, int):
        raise TypeError(f"_fix_batch called with a free first axis on input {item.name!r}")
    base, res = item.declared["baseline"], item.declared["result"]
    if isinstance(base[0], int) and isinstance(res[0], int):
        where = ""
    elif isinstance(base[0], int):
        where = " in the original model"
    else:
        where = " in the compressed model (the original accepts any)"
    shape = base if isinstance(base[0], int) else res
    plan.fixed_batch = size
    plan.fixed_reason = (f"input '{item.name}' has a fixed batch dimension of {size}{where} "
                         f"(shape {shape_text(shape)})")


def _short_reason(exc: BaseException, limit: int = 300) -> str:
    """ONNX Runtime's reason, on one line and shortened: its text goes after ours, as a detail."""
    text = ORT_PREFIX.sub("", " ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def job_input_shapes(given: dict[str, Any] | None, datasets: list[Any],
                     values: dict[str, Any] | None = None) -> InputShapes:
    """A job's input shapes: evaluate.input_shapes (and the values of evaluate.input_values), then the sample
    shapes of the datasets it names (workers.datasets.Dataset, in order: the eval dataset first, then the
    steps'), for what the user left out."""
    try:
        shapes = InputShapes.parse(given, values)
    except ShapeError as exc:  # checked at submit; a job row written otherwise still fails with the code
        raise JobFailed(f"evaluate.input_shapes: {exc.message}", code="invalid_input_shape", **exc.where) from None
    for dataset in datasets:
        shapes = shapes.with_dataset(dataset.name, {name: array.shape for name, array in dataset.inputs.items()})
    return shapes


PREFLIGHT_MAX_BYTES = 2 * 1024**3
FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def check_original_runs(model_path: Path, shapes: InputShapes) -> InputPlan | None:
    """Before any step: where the model leaves a non-batch dim open, run it once on the inputs the job will
    use, so a model that needs its shapes given fails at once (input_shape_required, invalid_input_shape), not
    after its steps. Returns the plan, or None where nothing was checked: every size is fixed, the model is too
    large to load twice, or it does not load or take generated inputs (the steps and the measurement say why)."""
    import onnx
    import onnxruntime as ort

    from workers.onnx_tools.graph import model_size

    structure = onnx.load(str(model_path), load_external_data=False)
    open_dims = any(not dim.HasField("dim_value")
                    for value in structure.graph.input for dim in value.type.tensor_type.shape.dim[1:])
    # Small integer or boolean inputs (a sample rate, a flag) get generated values the model may refuse.
    small_ints = any(value.type.tensor_type.elem_type not in FLOAT_TYPES and len(value.type.tensor_type.shape.dim) <= 1
                     for value in structure.graph.input)
    if not (open_dims or small_ints) or model_size(model_path, structure)["file_bytes"] > PREFLIGHT_MAX_BYTES:
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        plan = plan_inputs({"baseline": session, "result": session}, {"baseline": structure, "result": structure},
                           shapes=shapes, probe=False)
    except MeasurementFailed:
        return None
    except JobFailed:
        raise
    except Exception:
        return None
    plan.check_runs(session, model="the uploaded model")
    return plan
