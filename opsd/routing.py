"""Multi-teacher routing (MOPD, Ma et al. 2026, arXiv:2606.30406): which named teacher scores a row.

MOPD distils several domain teachers into one student on the student's own rollouts; every
rollout is scored by the teacher of its domain, never by a mixture. As in verl's and NeMo-RL's
multi-teacher setups (routed by the row's ``data_source``/task field), the domain is a field of
the row, and the rule is a plain table:

    teacher(row) = route.map[ field(row) ]   when that value is in the table
                 = route.default             otherwise (None: the first teacher listed)

``field`` is a registry entry (``ROUTE_FIELDS``), named by ``teacher.route.by``. The rule is
applied per dataset row, so every sample of a prompt goes to the same teacher.
"""

from __future__ import annotations

from typing import Callable

from opsd.data.rows import Row

# teacher.route.by -> the row's routing value (None when the row has none: the default teacher)
ROUTE_FIELDS: dict[str, Callable[[Row], str | None]] = {
    "task": lambda row: row.task,
    # verl's and NeMo-RL's name for a row's source dataset, kept in the row's metadata
    "data_source": lambda row: (None if row.metadata.get("data_source") is None
                                else str(row.metadata["data_source"])),
}
FIELDS = tuple(ROUTE_FIELDS)


def route(row: Row, by: str, table: dict[str, str], default: str) -> str:
    """The name of the teacher that scores ``row`` (``default`` for values not in ``table``)."""
    value = ROUTE_FIELDS[by](row)
    return table.get(value, default) if value is not None else default

