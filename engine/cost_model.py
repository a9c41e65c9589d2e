"""Step-latency model for the SLO-aware scheduler: predicts one step's seconds from its chunk shapes.

A step is a list of chunks (p, c): p tokens computed this step for one request that already has c
tokens in the KV cache. The model is linear in five features and a constant, each tied to a part of
the step:

    t = per_token * P + per_attended * sum p*(p+c) + per_context * sum (p+c) + per_seq * S
        + per_prefill_step * [some p > 1] + per_step

  P = sum p           every projection and MLP matrix product, embedding, norms, rotary: linear in tokens
  sum p*(p+c)         attention scores and weighted sums: each new token against its whole context
  sum (p+c)           gathering each sequence's cached keys and values, and the Python that builds
                      its slot map and block table
  S = len(chunks)     the LM head and sampling, which run once per sequence, plus per-sequence
                      batching overhead. Every chunk is counted, including a prefill chunk that does not
                      yet reach its prompt's end and so samples nothing: an overestimate of one LM-head
                      row, the safe side for a latency bound.
  [some p > 1]        a step that is not decodes only: on CUDA decode-only steps replay CUDA graphs
                      (engine/decode_graphs.py) and any other step launches every kernel itself. On an
                      H200 a graphed decode step of 64 took 9.9 ms and the same step eager 27 ms, and a
                      model without this term fitted graphed and eager steps to 37-41% mean error. On
                      the CPU, where every step runs eagerly, the fit gives it no weight (82 profiled
                      steps of SmolLM2: held-out error 26% with or without it).
  per_step            per-step Python and per-layer kernel launches, whatever the batch

Decodes (p == 1) count as long as the longest decode in the step, because the runner pads the decode
batch to it and attends over the padding too. Measured on 2 cores (SmolLM2-135M, bf16), 40 decodes of
contexts up to 1,800 took 180 ms; without the padding the model predicted 92 ms. The true cost lies
between the two (padding gathers one block over and over, which stays in cache), so counting it
whole errs on the safe side.

Prefill attention is counted as the full p x (p+c) rectangle. The runner's first long chunks (c == 0)
use a causal kernel that skips the masked half, so those are overestimated (a 2,048-token prompt by
~25%); they run when no online work is in flight, where the latency bound does not apply.

Samples are fitted by relative error (rows weighted by 1/t): steps span milliseconds to seconds and
the scheduler needs a TPOT-sized step predicted as well, relatively, as a long offline prefill."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np

Chunks = Sequence[tuple[int, int]]
Sample = tuple[Chunks, float]  # (chunks of one step, measured seconds)


def features(chunks: Chunks) -> tuple[int, int, int, int, int]:
    """(P, sum p*(p+c), sum (p+c), S, 1 if any p > 1 else 0) of a step, decodes counted at the longest
    decode's context."""
    tokens = attended = context = 0
    decodes = longest_decode = 0
    for p, c in chunks:
        if p == 1:
            decodes += 1
            longest_decode = max(longest_decode, c + 1)
        else:
            n = p + c
            attended += p * n
            context += n
        tokens += p
    padded = decodes * longest_decode  # one new token against the padded context, for each decode
    return tokens, attended + padded, context + padded, len(chunks), int(decodes < len(chunks))


@dataclass(frozen=True)
class CostModel:
    per_token: float = 0.0
    per_attended: float = 0.0
    per_context: float = 0.0
    per_seq: float = 0.0
    per_prefill_step: float = 0.0
    per_step: float = 0.0

    def predict(self, chunks: Chunks) -> float:
        """Predicted seconds of a step that computes these (p, c) chunks."""
        tokens, attended, context, seqs, prefill = features(chunks)
        return (self.per_token * tokens + self.per_attended * attended + self.per_context * context
                + self.per_seq * seqs + self.per_prefill_step * prefill + self.per_step)

    @classmethod
    def fit(cls, samples: Sequence[Sample], exclude: Sequence[str] = ()) -> "CostModel":
        """Least squares in relative error, with every coefficient non-negative: a negative cost would
        let the scheduler buy time by adding work. Coefficients named in exclude stay zero (to measure
        what a term is worth: bench/cost_model_fit.py)."""
        if not samples:
            raise ValueError("fitting a cost model needs at least one sample")
        names = [f.name for f in fields(cls)]
        if unknown := set(exclude) - set(names):
            raise ValueError(f"unknown cost model coefficients {sorted(unknown)}")
        x = np.array([(*features(chunks), 1) for chunks, _ in samples], dtype=np.float64)
        x[:, [names.index(name) for name in exclude]] = 0.0  # a zero column gets a zero coefficient
        t = np.array([seconds for _, seconds in samples], dtype=np.float64)
        if not (t > 0).all():
            raise ValueError("step times must be positive")
        x /= t[:, None]  # row i scaled by 1/t_i, so the target becomes all ones
        # Columns scaled to unit norm: their raw magnitudes differ by ten orders.
        scale = np.linalg.norm(x, axis=0)
        scale[scale == 0] = 1.0
        return cls(*(_nnls(x / scale, np.ones_like(t)) / scale).tolist())

    def relative_errors(self, samples: Sequence[Sample]) -> list[float]:
        """|predicted - measured| / measured for each sample."""
        return [abs(self.predict(chunks) - seconds) / seconds for chunks, seconds in samples]

    def mean_relative_error(self, samples: Sequence[Sample]) -> float:
        errors = self.relative_errors(samples)
        return sum(errors) / len(errors)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CostModel":
        """Raises ValueError unless values hold exactly this model's coefficients, as finite non-negative numbers."""
        names = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            raise ValueError(f"a cost model has exactly the coefficients {sorted(names)}")
        coef = {}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"cost model coefficient {name} must be a finite non-negative number, got {value!r}")
            coef[name] = float(value)
        return cls(**coef)


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin |a x - b| subject to x >= 0, by Lawson and Hanson's active-set method (no scipy here)."""
    n = a.shape[1]
    tol = 10 * np.finfo(float).eps * np.abs(a).sum(axis=0).max() * max(a.shape)
    x = np.zeros(n)
    free = np.zeros(n, dtype=bool)  # coefficients not pinned at zero
    for _ in range(3 * n):
        gradient = a.T @ (b - a @ x)
        if free.all() or gradient[~free].max() <= tol:
            break
        free[np.argmax(np.where(free, -np.inf, gradient))] = True
        while True:
            z = np.zeros(n)
            z[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
            if (z[free] > tol).all():
                x = z
                break
            # Step from x toward z until the first coefficient reaches zero, pin it there, retry.
            blocking = free & (z <= tol)
            # (The column just freed has x == 0 and may have z <= 0 from rounding: then the step is 0.)
            x += np.min(x[blocking] / np.maximum(x[blocking] - z[blocking], np.finfo(float).tiny)) * (z - x)
            free &= x > tol
    return x
