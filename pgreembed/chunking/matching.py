"""Old chunks + new split -> the smallest change to the chunk table.

The peers delete every chunk of an edited row and embed them all again. A chunk whose
text is unchanged keeps its row (same embedding_uuid, same vector; only chunk_seq may
move), so after a one-sentence edit only the chunks around it are new. Matching is by
text: a text that occurs k times keeps min(k_old, k_new) rows, and among those the
rows with a vector are kept first (a pending duplicate is the one dropped).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from pgreembed.values import Diff, Existing

__all__ = ["Diff", "Existing", "match"]


def match(existing: Sequence[Existing], new: Sequence[str]) -> Diff:
    """The change that turns `existing` into exactly `new` (in order, seq 0..n-1)."""
    by_text: dict[str, list[Existing]] = defaultdict(list)
    # Rows with a vector first, then by position: they are the ones worth keeping.
    for row in sorted(existing, key=lambda r: (not r.has_vector, r.seq)):
        by_text[row.text].append(row)
    diff = Diff()
    for seq, text in enumerate(new):
        candidates = by_text.get(text)
        if candidates:
            row = candidates.pop(0)
            diff.kept += 1
            if row.seq != seq:
                diff.move.append((row.uuid, seq))
        else:
            diff.insert.append((seq, text))
    diff.delete = [row.uuid for rows in by_text.values() for row in rows]
    return diff
