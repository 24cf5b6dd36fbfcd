"""The input shapes a job measures and calibrates at: what the user gave, what its datasets hold, what the model
declares. Pure: imports nothing of the service, so the API checks a submission with the same rules the worker
resolves shapes by.

`evaluate.input_shapes` is an object: input name -> list of sizes (one per axis), plus the reserved key "dims":
symbolic dim name -> size. Axis 0, where the model leaves it symbolic, is the batch axis: its size comes from
`evaluate.batch_sizes`, so any value (or null) there is ignored. Per axis, the size measured is, first that
applies: the model's fixed size; the batch size; the size the user gave for that input and axis; the size the
user gave for the dim's name (directly in "dims" or through another input of the same dim name); the samples of
a dataset the job names (sample shape = array shape without axis 0); else a guess (see workers.onnx_tools.inputs).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypedDict

DIMS_KEY = "dims"
MAX_SIZE = 1 << 24
GIVEN, DECLARED, BATCH, GUESSED = "given by the user", "declared by the model", "batch size", "guessed"


class ShapeWhere(TypedDict, total=False):
    """Where a ShapeError points: only the keys it knows."""

    input: str
    axis: int
    dim: str


class ShapeError(ValueError):
    """Given shapes that break a rule or contradict the model; names the input (or dim) and the axis."""

    def __init__(self, message: str, *, input: str | None = None, axis: int | None = None,
                 dim: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = ShapeWhere()
        if input is not None:
            self.where["input"] = input
        if axis is not None:
            self.where["axis"] = axis
        if dim is not None:
            self.where["dim"] = dim


def how_to_give(shapes: dict[str, list[Any]], open_axes: dict[str, list[tuple[int, str | None]]]) -> str:
    """How to give the sizes of `open_axes` (input -> [(axis, dim name)]), for the inputs' `shapes` (sizes
    as measured): by dim name where the dims have names, else by input; in the API and the CLI."""
    named = list(dict.fromkeys(dim for axes in open_axes.values() for _, dim in axes if dim))
    by_input = {name: ", ".join("<size>" if any(axis == a for a, _ in open_axes[name]) else str(size)
                                for axis, size in enumerate(shapes[name])) for name in open_axes}
    api = [f'{{"{DIMS_KEY}": {{' + ", ".join(f'"{dim}": <size>' for dim in named) + "}}"] if named else []
    api += ["{" + ", ".join(f'"{name}": [{sizes}]' for name, sizes in by_input.items()) + "}"]
    cli = " ".join(f"--dim {dim}=<size>" for dim in named) if named else " ".join(
        f"--input-shape {name}={sizes.replace(', ', ',')}" for name, sizes in by_input.items())
    return f"give them in the job's evaluate.input_shapes, e.g. {' or '.join(api)}; with the CLI: {cli}"


def from_dataset(name: str | None) -> str:
    return f"from dataset {name!r}" if name else "from the dataset"


@dataclass(frozen=True)
class InputShapes:
    """Sizes to measure at. `given`: input -> sizes per axis (None: not given); `dims`: dim name -> size;
    `samples`: input -> shape of one dataset sample, with the dataset's name in `sample_sources`."""

    given: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    samples: dict[str, tuple[int, ...]] = field(default_factory=dict)
    sample_sources: dict[str, str] = field(default_factory=dict)
    # evaluate.input_values: input -> the value fed as is (a number or nested lists), for inputs that are not
    # data (a sample rate, a flag); its shape counts as given.
    values: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: dict[str, Any] | None, values: dict[str, Any] | None = None) -> InputShapes:
        """The evaluate.input_shapes object, checked for its own rules (types, positive sizes); raises ShapeError."""
        fixed = parse_values(values)
        if not value:
            return cls(given={name: shape for name, (shape, _) in fixed.items()},
                       values={name: data for name, (_, data) in fixed.items()})
        if not isinstance(value, dict):
            raise ShapeError("evaluate.input_shapes must be an object: input name -> list of sizes, and "
                             "optionally \"dims\": dim name -> size")
        given: dict[str, tuple[int | None, ...]] = {}
        dims: dict[str, int] = {}
        for key, sizes in value.items():
            if key == DIMS_KEY:
                if not isinstance(sizes, dict):
                    raise ShapeError('"dims" must be an object: symbolic dim name -> size, e.g. {"H": 48}')
                for dim, size in sizes.items():
                    dims[str(dim)] = _size(size, f"dim {dim!r}", dim=str(dim))
                continue
            if not isinstance(sizes, list | tuple):
                raise ShapeError(f"input {key!r}: give a list of sizes, one per axis, e.g. [1, 3, 48, 320]", input=key)
            given[key] = tuple(None if size is None else _size(size, f"input {key!r} axis {axis}", input=key,
                                                               axis=axis)
                               for axis, size in enumerate(sizes))
        for name, (shape, _) in fixed.items():
            if name in given and given[name] != shape:
                raise ShapeError(f"input {name!r} is given the shape {list(given[name])} and a value of shape "
                                 f"{list(shape)} (evaluate.input_values)", input=name)
            given[name] = shape
        return cls(given=given, dims=dims, values={name: data for name, (_, data) in fixed.items()})

    @classmethod
    def coerce(cls, value: InputShapes | dict[str, Any] | None) -> InputShapes:
        """An InputShapes from itself, its to_json() form, or None."""
        if value is None:
            return cls()
        if isinstance(value, InputShapes):
            return value
        return cls(given={k: tuple(v) for k, v in value.get("given", {}).items()}, dims=dict(value.get("dims", {})),
                   samples={k: tuple(v) for k, v in value.get("samples", {}).items()},
                   sample_sources=dict(value.get("sample_sources", {})), values=dict(value.get("values", {})))

    def to_json(self) -> dict[str, Any]:
        return {"given": {k: list(v) for k, v in self.given.items()}, "dims": dict(self.dims),
                "samples": {k: list(v) for k, v in self.samples.items()}, "sample_sources": dict(self.sample_sources),
                "values": dict(self.values)}

    def with_dataset(self, name: str | None, shapes: dict[str, Any]) -> InputShapes:
        """These shapes plus a dataset's: array name -> its full shape (axis 0 = samples). Inputs a dataset
        already described keep the earlier one's samples."""
        samples, sources = dict(self.samples), dict(self.sample_sources)
        for array, shape in shapes.items():
            if array != "labels" and array not in samples and len(shape) >= 1:
                samples[array] = tuple(int(d) for d in shape[1:])
                sources[array] = from_dataset(name)
        return InputShapes(given=self.given, dims=self.dims, samples=samples, sample_sources=sources,
                           values=self.values)

    def __bool__(self) -> bool:
        return bool(self.given or self.dims or self.samples or self.values)


@dataclass
class ResolvedAxis:
    size: int | None        # None: the batch axis (batch_sizes), or no source (to be guessed)
    source: str             # GIVEN, DECLARED, BATCH, from_dataset(name), or GUESSED when size is None
    dim: str | None = None  # the symbolic name the model gives the axis


def resolve(declared: dict[str, list[Any] | None], shapes: InputShapes, *,
            strict: bool = True) -> dict[str, list[ResolvedAxis]]:
    """Per input, per axis: the size to use and where it comes from. `declared`: input -> the model's shape
    (ints, dim names, None for unnamed dims; None for an unknown rank). Raises ShapeError where the given
    shapes do not fit the model: an unknown input or dim name (unless not strict: a step's model may name its
    dims otherwise than the uploaded one, which the submission was checked against), a wrong rank, a size
    against a fixed dim, two sizes for one dim name. Axes nothing fills have size None and source GUESSED."""
    declared = {name: _meaningful(shape) for name, shape in declared.items()}
    if not strict:
        known = {d for shape in declared.values() for d in shape or [] if isinstance(d, str)}
        shapes = InputShapes(given={k: v for k, v in shapes.given.items() if k in declared},
                             dims={k: v for k, v in shapes.dims.items() if k in known},
                             samples=shapes.samples, sample_sources=shapes.sample_sources,
                             values={k: v for k, v in shapes.values.items() if k in declared})
    for name, sizes in shapes.given.items():
        if name not in declared:
            raise ShapeError(f"the model has no input {name!r}; its inputs are {', '.join(map(repr, declared))}",
                             input=name)
        shape = declared[name]
        if shape is not None and len(sizes) != len(shape):
            raise ShapeError(f"input {name!r} has rank {len(shape)} (shape {shape_text(shape)}); "
                             f"{len(sizes)} size(s) were given", input=name)
    known_dims = {d for shape in declared.values() for d in shape or [] if isinstance(d, str)}
    for dim in shapes.dims:
        if dim not in known_dims:
            have = ", ".join(map(repr, sorted(known_dims))) or "none (every dim is fixed or unnamed)"
            raise ShapeError(f"the model has no dim named {dim!r}; its symbolic dims are {have}", dim=dim)
    batched = any(shape and not isinstance(shape[0], int) for shape in declared.values())

    # Dim name -> (size, source, where it was set): the user's first, then the datasets'.
    named: dict[str, tuple[int, str, str]] = {d: (s, GIVEN, f'"dims": {{"{d}": {s}}}') for d, s in shapes.dims.items()}
    for name, sizes in shapes.given.items():
        for axis, (dim, size) in enumerate(zip(declared[name] or [], sizes)):
            if isinstance(dim, int):
                if size is not None and size != dim:
                    raise ShapeError(f"input {name!r} axis {axis} is fixed at {dim} by the model "
                                     f"(shape {shape_text(declared[name])}); {size} was given", input=name, axis=axis)
                continue
            if size is None or (axis == 0 and batched) or not isinstance(dim, str):
                continue
            where = f"input {name!r} axis {axis}"
            if dim in named and named[dim][0] != size:
                raise ShapeError(f"dim {dim!r} is given as {named[dim][0]} ({named[dim][2]}) and as {size} ({where})",
                                 input=name, axis=axis, dim=dim)
            named.setdefault(dim, (size, GIVEN, where))
    for name, sampled in shapes.samples.items():
        shape = declared.get(name)
        if shape is None or len(sampled) != len(shape) - 1:
            continue
        for dim, size in zip(shape[1:], sampled):
            if isinstance(dim, str) and dim not in named:
                named[dim] = (size, shapes.sample_sources.get(name, from_dataset(None)), "")

    resolved: dict[str, list[ResolvedAxis]] = {}
    for name, shape in declared.items():
        given = shapes.given.get(name, ())
        sample = shapes.samples.get(name)
        if sample is not None and shape is not None and len(sample) != len(shape) - 1:
            sample = None
        axes = []
        for axis, dim in enumerate(shape or []):
            label = dim if isinstance(dim, str) else None
            if isinstance(dim, int):
                axes.append(ResolvedAxis(dim, DECLARED))
            elif axis == 0 and batched:
                axes.append(ResolvedAxis(None, BATCH, label))
            elif axis < len(given) and given[axis] is not None:
                axes.append(ResolvedAxis(given[axis], GIVEN, label))
            elif label in named:
                axes.append(ResolvedAxis(named[label][0], named[label][1], label))
            elif sample is not None:
                axes.append(ResolvedAxis(sample[axis - 1], shapes.sample_sources.get(name, from_dataset(None)),
                                         label))
            else:
                axes.append(ResolvedAxis(None, GUESSED, label))
        resolved[name] = axes
    return resolved


# Dim names exporters write for "unknown": they do not name one dim shared across axes (PaddleOCR's exports call
# both H and W "?"), so they count as unnamed.
UNNAMED_DIMS = re.compile(r"^(\?|-?\d*|none|null|unk|unknown|dynamic|\s*)$", re.IGNORECASE)


def _meaningful(shape: list[Any] | None) -> list[Any] | None:
    """A declared shape with what is not a real size or name made unnamed: sizes <= 0 (Paddle writes
    dim_value -1 for a free batch) and placeholder names such as "?"."""
    if shape is None:
        return None
    return [None if (isinstance(d, int) and d <= 0) or (isinstance(d, str) and UNNAMED_DIMS.match(d)) else d
            for d in shape]


def check_against_model(value: dict[str, Any] | None, model_inputs: list[dict[str, Any]],
                        values: dict[str, Any] | None = None) -> InputShapes:
    """The submit-time check of evaluate.input_shapes (and input_values) against the model's inspection (inputs
    with name and shape); returns the parsed shapes or raises ShapeError."""
    shapes = InputShapes.parse(value, values)
    if shapes and model_inputs:
        resolve({i["name"]: i.get("shape") for i in model_inputs}, shapes)
    return shapes


MAX_VALUE_ELEMENTS = 4096


def parse_values(values: dict[str, Any] | None) -> dict[str, tuple[tuple[int, ...], Any]]:
    """evaluate.input_values: input -> (the value's shape, the value): a number, a boolean, or nested lists of
    them, rectangular, at most MAX_VALUE_ELEMENTS numbers."""
    if not values:
        return {}
    if not isinstance(values, dict):
        raise ShapeError("evaluate.input_values must be an object: input name -> value (a number or nested lists)")
    parsed = {}
    for name, value in values.items():
        shape = _value_shape(value, name, depth=0)
        count = 1
        for size in shape:
            count *= size
        if count > MAX_VALUE_ELEMENTS:
            raise ShapeError(f"input {name!r}: a value may hold at most {MAX_VALUE_ELEMENTS} numbers (send data "
                             "as a dataset)", input=name)
        parsed[str(name)] = (shape, value)
    return parsed


def _value_shape(value: Any, name: str, *, depth: int) -> tuple[int, ...]:
    if isinstance(value, bool | int | float):
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
            raise ShapeError(f"input {name!r}: {value} does not fit in 64 bits", input=name)
        return ()
    if depth >= 8:
        raise ShapeError(f"input {name!r}: a value may nest at most 8 lists deep", input=name)
    if isinstance(value, list) and value:
        shapes = {_value_shape(item, name, depth=depth + 1) for item in value}
        if len(shapes) == 1:
            return (len(value), *shapes.pop())
        raise ShapeError(f"input {name!r}: the value's nested lists must all have the same length", input=name)
    raise ShapeError(f"input {name!r}: a value is a number, a boolean, or non-empty nested lists of them, not "
                     f"{value!r:.40}", input=name)


def shape_text(shape: list[Any] | tuple[Any, ...] | None) -> str:
    if shape is None:
        return "[any shape]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _size(value: Any, what: str, **where: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(f"{what}: a size must be a whole number, not {value!r}", **where)
    if not 1 <= value <= MAX_SIZE:
        raise ShapeError(f"{what}: a size must be between 1 and {MAX_SIZE}, not {value}", **where)
    return value
