"""The latest ids of something that ended (an interrupted turn, a stopped one), bounded in count.

Fencing needs to recognise a late message of an ended turn for a little while, never for ever: a
conversation of 10,000 turns must hold the ids of a few, not of 10,000."""
from __future__ import annotations

from collections import OrderedDict


class RecentIds:
    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, id_: str) -> None:
        self._ids[id_] = None
        self._ids.move_to_end(id_)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._ids

    def __len__(self) -> int:
        return len(self._ids)
