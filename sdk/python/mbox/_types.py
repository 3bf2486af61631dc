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
    """One metric's points, ordered by step: parallel lists."""

    steps: List[int] = field(default_factory=list)
    wallclocks: List[int] = field(default_factory=list)
    values: List[Union[float, str, bytes]] = field(default_factory=list)
