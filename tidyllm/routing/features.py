"""Turn a routing context (a dict of caller metadata) into a sparse, fixed-width feature vector.

The bandit keeps one ridge-regression model per route over the same context features, so
context×route interactions come from the per-route models themselves: route ``chat-a`` can learn
that ``department=risk`` matters while ``chat-b`` learns it does not.

Features, all hashed with scikit-learn's :class:`~sklearn.feature_extraction.FeatureHasher` into
``n_features - 1`` signed buckets (index 0 is reserved for the intercept, so nothing collides with it):

- the known keys ``department``, ``use_case``, ``data_sensitivity``, ``model_group`` as one-hot
  ``key=value`` indicators;
- ``prompt_tokens`` as a length bucket (``prompt_len=1k-4k``), because the effect of prompt size on
  quality, cost and latency is not linear and a bucket needs no scaling;
- crossed indicators for each pair in ``interactions`` (by default ``department&use_case``), so a
  route's model can fit one value per department × use case when the main effects do not add up;
- any other key: strings and booleans as indicators, numbers as ``sign(v)·log1p(|v|)`` so a raw
  token count or dollar amount cannot dominate the ridge penalty. ``None`` values are skipped.

Hashing a dict costs ~0.1 ms in scikit-learn, more than the whole decision budget, so results are
memoised per distinct context (contexts repeat: a few departments × use cases × buckets).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np

from tidyllm.errors import ConfigurationError, RoutingError

__all__ = ["ContextFeaturizer", "KNOWN_KEYS", "prompt_length_bucket"]

#: context keys with a documented meaning; every other key is an "extra" feature
KNOWN_KEYS = ("department", "use_case", "data_sensitivity", "model_group")

#: upper edges (exclusive) of the prompt-length buckets, in tokens
DEFAULT_LENGTH_EDGES = (256, 1024, 4096, 16384)

_CACHE_LIMIT = 4096


def _format_tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def prompt_length_bucket(prompt_tokens: float, edges: Sequence[int] = DEFAULT_LENGTH_EDGES) -> str:
    """Name the bucket a prompt of ``prompt_tokens`` tokens falls in, e.g. ``"256-1k"``.

    >>> prompt_length_bucket(812)
    '256-1k'
    """
    lower = 0
    for edge in edges:
        if prompt_tokens < edge:
            return f"{_format_tokens(lower)}-{_format_tokens(edge)}"
        lower = edge
    return f">={_format_tokens(lower)}"


class ContextFeaturizer:
    """Map a context dict to ``(indices, values)`` of a sparse vector of width ``n_features``.

    Parameters
    ----------
    n_features:
        Width of the hashed feature space, including the intercept at index 0.
    interactions:
        Pairs of context keys to cross (``("department", "use_case")`` adds
        ``department=risk&use_case=qa``).
    length_edges:
        Increasing token counts that bound the prompt-length buckets.
    """

    def __init__(self, n_features: int = 64, interactions: Sequence[Sequence[str]] = (("department", "use_case"),),
                 length_edges: Sequence[int] = DEFAULT_LENGTH_EDGES) -> None:
        from sklearn.feature_extraction import FeatureHasher

        if int(n_features) < 8:
            raise ConfigurationError(f"n_features={n_features!r} is too small; use at least 8 (64 is the default)")
        edges = [int(e) for e in length_edges]
        if any(b <= a for a, b in zip(edges, edges[1:])) or any(e <= 0 for e in edges):
            raise ConfigurationError(f"length_edges={list(length_edges)!r} must be positive and strictly increasing")
        pairs = []
        for pair in interactions:
            if len(pair) != 2 or not all(isinstance(k, str) for k in pair):
                raise ConfigurationError(f"interaction {pair!r} must be a pair of context key names")
            pairs.append((pair[0], pair[1]))
        self.n_features = int(n_features)
        self.interactions = tuple(pairs)
        self.length_edges = tuple(edges)
        # alternate_sign: colliding features partly cancel instead of always adding up (Weinberger et al. 2009)
        self._hasher = FeatureHasher(n_features=self.n_features - 1, input_type="dict", alternate_sign=True)
        self._cache: dict[tuple[tuple[str, Any], ...], tuple[np.ndarray, np.ndarray]] = {}

    def feature_dict(self, context: Mapping[str, Any]) -> dict[str, float]:
        """The named features of ``context`` before hashing (useful to see what the model sees)."""
        if not isinstance(context, Mapping):
            raise RoutingError(f"a routing context must be a dict of metadata, got {type(context).__name__}")
        named: dict[str, float] = {}
        tokens = context.get("prompt_tokens")
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, Real) or not math.isfinite(tokens) or tokens < 0:
                raise RoutingError(f"context['prompt_tokens'] must be a non-negative number, got {tokens!r}")
            named[f"prompt_len={prompt_length_bucket(tokens, self.length_edges)}"] = 1.0
        for key, value in context.items():
            if key == "prompt_tokens" or value is None:
                continue
            if not isinstance(key, str):
                raise RoutingError(f"context keys must be strings, got {key!r}")
            if isinstance(value, str | bool):
                named[f"{key}={value}"] = 1.0
            elif isinstance(value, Real):
                number = float(value)
                if not math.isfinite(number):
                    raise RoutingError(f"context[{key!r}] is {value!r}; numbers must be finite")
                named[key] = math.copysign(math.log1p(abs(number)), number)
            else:
                raise RoutingError(f"context[{key!r}] has type {type(value).__name__}; "
                                   "use a string, a number, a boolean or None")
        for left, right in self.interactions:
            a, b = context.get(left), context.get(right)
            if a is not None and b is not None:
                named[f"{left}={a}&{right}={b}"] = 1.0
        return named

    def transform_one(self, context: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Sparse features of one context: integer ``indices`` and float ``values`` (intercept first)."""
        try:
            key = tuple(sorted(context.items()))
            cached = self._cache.get(key)
        except TypeError:  # unhashable or unorderable values: feature_dict raises the helpful error
            key, cached = None, None
        if cached is not None:
            return cached
        named = self.feature_dict(context)
        row = self._hasher.transform([named]).tocsr()
        row.sum_duplicates()
        keep = row.data != 0.0  # two signed collisions can cancel exactly
        indices = np.concatenate(([0], row.indices[keep] + 1)).astype(np.intp)
        values = np.concatenate(([1.0], row.data[keep])).astype(np.float64)
        result = (indices, values)
        if key is not None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = result
        return result
