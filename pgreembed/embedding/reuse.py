"""Pay once per text: a batch sends each distinct text once, and copies the vector to the
rows that share it (a text some other row already holds is copied before, see
`pgreembed.store.known`). Off per target with `dedupe = false`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pgreembed.embedding.embed import Outcome
from pgreembed.store.texts import is_no_text
from pgreembed.values import Embedded, Failed, Row


@dataclass
class Distinct:
    """One row per distinct text to send, and the rows that wait for each one's vector."""

    sent: list[Row] = field(default_factory=list)
    twins: dict[object, list[Row]] = field(default_factory=dict)  # sent row's pk -> rows

    @property
    def twin_count(self) -> int:
        return sum(len(rows) for rows in self.twins.values())


def distinct_texts(rows: Sequence[Row]) -> Distinct:
    """Rows without text stay apart: each is recorded failed with its own reason."""
    first: dict[str, Row] = {}
    out = Distinct()
    for row in rows:
        if row.text is None or is_no_text(row.text):
            out.sent.append(row)
        elif row.text in first:
            out.twins.setdefault(first[row.text].pk, []).append(row)
        else:
            first[row.text] = row
            out.sent.append(row)
    return out


def share_with_twins(outcome: Outcome, distinct: Distinct) -> int:
    """Give each twin its sent row's vector (or failure); returns the vectors shared."""
    shared = 0
    for item in list(outcome.embedded):
        for twin in distinct.twins.get(item.row.pk, ()):
            outcome.embedded.append(Embedded(twin, item.vector, item.truncated))
            shared += 1
    for failure in list(outcome.failed):
        for twin in distinct.twins.get(failure.row.pk, ()):
            outcome.failed.append(Failed(twin, failure.reason))
    return shared
