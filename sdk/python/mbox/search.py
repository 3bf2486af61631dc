"""Run search: experiments matching a filter, a page at a time, and as a DataFrame."""

from typing import Iterable, List, Optional

from ._types import MLFramework

# The experiment's own columns, first in a search DataFrame.
COLUMNS = ["id", "name", "namespace", "owner", "framework", "task", "external_id", "created_at", "updated_at"]
SUMMARY_FIELDS = ["last", "last_step", "min", "max", "count"]


class SearchResults:
    """An iterator of the Experiments a search matched, carrying ``metadata`` (a
    mapping) and ``summaries`` (key -> MetricSummary). Pages are requested as the
    iteration reaches them; iterate once."""

    def __init__(self, client, request, limit: Optional[int]):
        self._client = client
        self._request = request
        self._limit = limit
        self._results = self._generate()

    def _generate(self):
        from .experiment import Experiment

        if self._limit == 0:
            return
        n = 0
        for e in self._client._list_experiments(self._request):
            yield Experiment.from_proto(self._client, e, detailed=True)
            n += 1
            if self._limit is not None and n >= self._limit:
                return

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._results)

    def to_pandas(self):
        """The (remaining) results as a pandas DataFrame: one row per experiment, with
        columns id, name, namespace, owner, framework, task, external_id, created_at,
        updated_at, then ``params.<key>`` per metadata key and
        ``metrics.<key>.{last,last_step,min,max,count}`` per metric summary."""
        return to_pandas(self)


def to_pandas(experiments: Iterable):
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError("search_df / to_pandas need pandas: pip install 'mbox[pandas]'") from e
    rows: List[dict] = []
    params, metrics = set(), set()
    for e in experiments:
        row = {c: getattr(e, c) for c in COLUMNS}
        row["framework"] = MLFramework(e.framework).name
        for k, v in dict(e.metadata).items():
            row[f"params.{k}"] = v
            params.add(k)
        for k, s in (e.summaries or {}).items():
            for f in SUMMARY_FIELDS:
                row[f"metrics.{k}.{f}"] = getattr(s, f)
            metrics.add(k)
        rows.append(row)
    columns = (COLUMNS + [f"params.{k}" for k in sorted(params)]
               + [f"metrics.{k}.{f}" for k in sorted(metrics) for f in SUMMARY_FIELDS])
    return pd.DataFrame(rows, columns=columns)
