"""Plain data types of the SDK."""

import datetime
import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union


class MLFramework(enum.IntEnum):
    """Deep learning frameworks, with ModelBox's wire values."""

    UNKNOWN = 0
    PYTORCH = 1
    KERAS = 2


@dataclass
class EventSource:
    name: str


@dataclass
class Event:
    """An event. ``wallclock_time`` is milliseconds since the Unix epoch (an int or
    float), or a ``datetime``; ``None`` means the time of the ``log_event`` call."""

    name: str
    source: EventSource = field(default_factory=lambda: EventSource(name=""))
    wallclock_time: Optional[Union[int, float, datetime.datetime]] = None
    metadata: Dict[str, Any] = field(default_factory=dict)


@dataclass
class UpdateMetadataResult:
    updated_at: datetime.datetime
    num_keys_written: int


@dataclass
class MetricSeries:
    """One metric's points, ordered by step: parallel lists.

    Exact series (the default) hold every point, and ``min`` and ``max`` are None.
    A series read with ``max_points`` that has more points comes back bucketed: each
    entry is the last point (largest step) of a step bucket, and ``min[i]`` /
    ``max[i]`` are the smallest and largest value in bucket i. ``total_points``
    counts the series' points in the requested step range before bucketing.
    """

    steps: List[int] = field(default_factory=list)
    wallclocks: List[int] = field(default_factory=list)
    values: List[Union[float, str, bytes, None]] = field(default_factory=list)
    min: Optional[List[float]] = None
    max: Optional[List[float]] = None
    total_points: int = 0

    @property
    def bucketed(self) -> bool:
        return self.min is not None


@dataclass
class MetricSummary:
    """A numeric series of an experiment, summarised by mboxd as points arrive:
    ``last`` is the value at the largest step."""

    last: float
    last_step: int
    min: float
    max: float
    count: int
