"""How far the compressed model's outputs move from the original's on the same inputs."""
from __future__ import annotations

from typing import Any

import numpy as np

from app.errors import MeasurementFailed
from workers.measure.rounding import significant
from workers.onnx_tools.similarity import cosine


def padding_mask(feed: dict[str, np.ndarray], batch: int) -> np.ndarray | None:
    """[batch, sequence] booleans, False at padding, from an `attention_mask` input that has zeros; else None.

    A transformer's outputs at padded positions are never read (the next layer or the pooling masks them out), and
    they move freely under quantization: comparing them would call a faithful model unfaithful."""
    for name, value in feed.items():
        if "attention_mask" in name.lower() and value.ndim == 2 and value.shape[0] == batch:
            keep = np.asarray(value) != 0
            return None if keep.all() else keep
    return None


class OutputComparison:
    """Accumulates one output's differences over many runs.

    A float output is compared sample by sample (a cosine per row of the sample axis), except an output with one
    value per sample (a probability [batch, 1], a score): the cosine of two one-element vectors only compares their
    signs (1.0, 0.0 or -1.0), so such an output is compared as one vector over all the samples seen."""

    def __init__(self, name: str, result_name: str, dtype: str) -> None:
        self.name, self.result_name, self.dtype = name, result_name, dtype
        self.shape: list[int] = []
        self.samples = 0
        self.is_float = False
        self.row_cosines: list[float] = []  # one per row of the sample axis
        self.row_sizes: set[int] = set()  # how many values a row held, over every run
        # While every row holds one value: those values (original, compressed) where both are finite, in order.
        self.values: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        self.max_abs = 0.0
        self.abs_sum, self.abs_count = 0.0, 0
        self.equal, self.elements = 0, 0
        self.top1_equal, self.top1_rows, self.top1_width, self.rows_per_sample = 0, 0, 0, 0
        self.nonfinite = {"baseline": 0, "result": 0}
        self.nonfinite_mismatch = 0
        self.padded_positions = 0

    def add(self, baseline: np.ndarray, result: np.ndarray, batch: int, keep: np.ndarray | None = None) -> None:
        """keep: padding_mask() of the inputs; an output whose first two axes are [batch, sequence] is compared at
        the kept positions only."""
        baseline, result = np.asarray(baseline), np.asarray(result)
        if baseline.shape != result.shape:
            raise MeasurementFailed(f"output '{self.name}' has shape {list(baseline.shape)} in the original model "
                                    f"but {list(result.shape)} in the compressed model on the same input")
        self.shape = list(baseline.shape)
        is_float = baseline.dtype.kind in "fc" or result.dtype.kind in "fc"
        b, r = baseline.astype(np.float64), result.astype(np.float64)
        finite_b, finite_r = np.isfinite(b), np.isfinite(r)
        self.nonfinite["baseline"] += int((~finite_b).sum())
        self.nonfinite["result"] += int((~finite_r).sum())
        self.nonfinite_mismatch += int((finite_b != finite_r).sum())
        both = finite_b & finite_r
        row_keep = None
        if keep is not None and baseline.ndim >= 2 and tuple(baseline.shape[:2]) == keep.shape:
            # Padded positions are zero in both (they add nothing to a cosine, a difference or a count).
            positions = keep.reshape(keep.shape + (1,) * (baseline.ndim - 2))
            both = both & positions
            self.padded_positions += int((~keep).sum())
            if baseline.ndim >= 3:
                row_keep = np.broadcast_to(positions[..., 0], baseline.shape[:-1]).reshape(-1)
        b, r = np.where(both, b, 0.0), np.where(both, r, 0.0)
        diff = np.abs(b - r)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
        self.abs_sum += float(diff.sum())
        self.abs_count += int(both.sum())
        self.equal += int((baseline == result).sum())
        self.elements += baseline.size

        # A leading axis as long as the batch is the sample axis; otherwise one run is one sample.
        per_sample = baseline.ndim >= 1 and baseline.shape[0] == batch
        rows = batch if per_sample else 1
        self.samples += rows
        if is_float:
            self.is_float = True
            bs, rs = b.reshape(rows, -1), r.reshape(rows, -1)
            for x, y in zip(bs, rs):
                self.row_cosines.append(cosine(x, y))
            self.row_sizes.add(bs.shape[1])
            if self.row_sizes == {1}:
                kept = both.reshape(rows, -1)[:, 0]
                self.values[0].append(bs[kept, 0])
                self.values[1].append(rs[kept, 0])
            elif self.values[0]:
                self.values = ([], [])
            if baseline.ndim >= 1 and baseline.shape[-1] > 1:
                width = baseline.shape[-1]
                top_b = np.argmax(b.reshape(-1, width), axis=1)
                top_r = np.argmax(r.reshape(-1, width), axis=1)
                if row_keep is not None:
                    top_b, top_r = top_b[row_keep], top_r[row_keep]
                self.top1_equal += int((top_b == top_r).sum())
                self.top1_rows += top_b.size
                self.top1_width = width
                self.rows_per_sample = max(1, top_b.size // rows)

    @property
    def one_value_per_sample(self) -> bool:
        """A float output every row of which (every sample's part of it) held exactly one value."""
        return self.is_float and self.row_sizes == {1}

    @property
    def cosines(self) -> list[float]:
        """The cosines that a mean and a worst case are taken over: one per sample; for an output with one value per
        sample, the one cosine over all samples; none for an integer output, or where fewer than 2 samples of a
        one-value output were seen (no cosine means anything there)."""
        if not self.one_value_per_sample:
            return self.row_cosines
        across = self.across_samples()["cosine"]
        return [] if across is None else [across]

    def cosine_figures(self) -> tuple[float, float] | None:
        """(mean cosine, worst sample's cosine), the figures a min_cosine budget reads; None where there are none
        (see `cosines`). For an output with one value per sample both are the cosine over samples."""
        cosines = self.cosines
        return (float(np.mean(cosines)), float(np.min(cosines))) if cosines else None

    def across_samples(self) -> dict[str, Any]:
        """An output with one value per sample, compared as one vector over the samples seen (their values in the
        original against the compressed model). `cosine`: the budget's figure, as for any other output.
        `correlation` (Pearson): the cosine is not centred, so values that all sit near one constant (probabilities
        of a model that is sure of nothing) keep it near 1 whatever their order: 0.5 +- 0.01 against the same values
        reversed has cosine 0.9996 and correlation -1. The correlation misses what the cosine sees (an offset or a
        scale: 0.2 + 0.5 x correlates 1.0 with x), so it is reported beside it, not instead. None where either
        model's values do not vary. `max_abs_diff_to_spread`: the largest difference over the original's range
        across samples (max - min), scale-free; None where that range is 0."""
        base = np.concatenate(self.values[0]) if self.values[0] else np.zeros(0)
        result = np.concatenate(self.values[1]) if self.values[1] else np.zeros(0)
        count = int(base.size)
        if count < 2:
            return {"compared": f"one value per sample, and {count} sample(s) with finite values in both models: "
                                "no figure (the cosine of one value against one compares only their signs)",
                    "cosine": None, "correlation": None, "max_abs_diff_to_spread": None}
        spread = float(base.max() - base.min())
        varies = spread > 0 and float(result.max() - result.min()) > 0
        return {
            "compared": f"one value per sample: compared as one vector over the {count} samples, not sample by sample",
            "cosine": cosine(base, result),
            "correlation": max(-1.0, min(1.0, float(np.corrcoef(base, result)[0, 1]))) if varies else None,
            "max_abs_diff_to_spread": float(np.abs(base - result).max()) / spread if spread > 0 else None,
        }

    def report(self) -> dict[str, Any]:
        figures = self.cosine_figures()
        entry: dict[str, Any] = {
            "name": self.name,
            "shape": self.shape,
            "dtype": self.dtype,
            "samples": self.samples,
            "max_abs_diff": significant(self.max_abs),
            "mean_abs_diff": significant(self.abs_sum / self.abs_count) if self.abs_count else None,
            "cosine_similarity": round(figures[0], 8) if figures else None,
            "min_sample_cosine": round(figures[1], 8) if figures else None,
            "top1_agreement": round(self.top1_equal / self.top1_rows, 6) if self.top1_rows else None,
            "top1_note": self._top1_note(),
        }
        if self.one_value_per_sample:
            across = self.across_samples()
            entry["compared"] = across["compared"]
            entry["correlation"] = None if across["correlation"] is None else round(across["correlation"], 8)
            entry["max_abs_diff_to_spread"] = significant(across["max_abs_diff_to_spread"])
        if self.result_name != self.name:
            entry["result_name"] = self.result_name
        if not self.is_float:
            entry["equal_fraction"] = round(self.equal / self.elements, 6) if self.elements else None
        if any(self.nonfinite.values()):
            entry["nonfinite_values"] = dict(self.nonfinite, mismatched_positions=self.nonfinite_mismatch)
        if self.padded_positions:
            entry["padding_left_out"] = (f"{self.padded_positions} padded position(s) (attention_mask 0) were left "
                                         "out of every figure of this output: nothing reads them")
        return entry

    def _top1_note(self) -> str:
        if not self.is_float:
            return "not a float output: compared element by element (equal_fraction), no cosine or top-1"
        if not self.top1_rows:
            return "not a score vector (last axis has one value or the output is a scalar)"
        if self.rows_per_sample == 1:
            return f"argmax over the last axis ({self.top1_width} values), one row per sample"
        return (f"argmax over the last axis ({self.top1_width} values) of each of {self.rows_per_sample} rows per "
                "sample; meaningful only if that axis holds class scores")


def pair_outputs(baseline_session: Any, result_session: Any) -> tuple[list[tuple[int, int, str, str, str]], list[str]]:
    """(baseline index, result index, name, result name, dtype) for each comparable output, and notes."""
    base, res = baseline_session.get_outputs(), result_session.get_outputs()
    if len(base) != len(res):
        raise MeasurementFailed(f"the original model has {len(base)} outputs ({[o.name for o in base]}) but the "
                                f"compressed model has {len(res)} ({[o.name for o in res]}); they cannot be compared")
    notes: list[str] = []
    result_index = {o.name: i for i, o in enumerate(res)}
    by_name = all(o.name in result_index for o in base)
    if not by_name:
        notes.append("the output names differ between the two models; outputs were paired by position")
    pairs = []
    for i, out in enumerate(base):
        j = result_index[out.name] if by_name else i
        if not out.type.startswith("tensor(") or out.type == "tensor(string)":
            notes.append(f"output '{out.name}' ({out.type}) is not a numeric tensor and was not compared")
            continue
        pairs.append((i, j, out.name, res[j].name, out.type[len("tensor("):-1]))
    if not pairs:
        raise MeasurementFailed("the models have no numeric tensor output to compare")
    return pairs, notes


def summarize_outputs(comparisons: list[OutputComparison], *, batch_size: int, runs: int) -> dict[str, Any]:
    outputs = [c.report() for c in comparisons]
    cosines = [o["cosine_similarity"] for o in outputs if o["cosine_similarity"] is not None]
    diffs = [o["max_abs_diff"] for o in outputs if o["max_abs_diff"] is not None]
    summary = {
        "batch_size": batch_size,
        "runs": runs,
        "samples": runs * batch_size,
        "inputs": "synthetic random inputs (see `inputs`), a fresh draw for every run; not a data set",
        "outputs": outputs,
        "cosine_similarity": min(cosines) if cosines else None,
        # The worst single sample of any output: a precision that breaks some inputs shows here, not in the mean.
        "worst_sample_cosine": min((o["min_sample_cosine"] for o in outputs if o["min_sample_cosine"] is not None),
                                   default=None),
        "max_abs_diff": max(diffs) if diffs else None,
    }
    # A float output without a cosine is left out of the figures above (the others still count), and named here:
    # a min_cosine budget cannot be shown to hold while one of the outputs was not compared (workers.verdict).
    missing = [f"output '{o['name']}': {o.get('compared') or 'no cosine'}"
               for c, o in zip(comparisons, outputs) if c.is_float and o["cosine_similarity"] is None]
    if missing:
        summary["not_compared"] = missing
    return summary
