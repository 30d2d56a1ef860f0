"""SlotTable: the host's record of a batch's busy slots, one per batch (DecodeLoop, SpeculativeSlots).

Per busy slot: its prompt length, the tokens it has emitted (an upper bound between device reads: every round
counts as emitting until the slot's budget), its budget, the tokens stop-checked so far, the top alternatives it
asked for, and whether it brought its own seed. The device state lives in :class:`~ivl_fast.decode.buffers.
DecodeBuffers`; this mirror never reads the device, so a loop can size the KV columns of its next rounds and skip
free slots above every busy one without a sync.
"""

from __future__ import annotations


class SlotTable:
    """``size`` slots; a slot is busy from :meth:`add` to :meth:`remove`."""

    def __init__(self, size: int):
        self.size = size
        self.length: dict[int, int] = {}  # slot -> prompt tokens
        self.emitted: dict[int, int] = {}  # slot -> tokens emitted (at most; exact after a device read)
        self.budget: dict[int, int] = {}  # slot -> max_new_tokens
        self.checked: dict[int, int] = {}  # slot -> tokens stop-string-checked
        self.top_logprobs: dict[int, int] = {}  # slot -> top alternatives asked for (0 left out)
        self.seeded: set[int] = set()  # slots whose request brought its own seed
        self.components: dict[int, int] = {}  # slot -> components asked for (0 left out)

    def __contains__(self, slot: int) -> bool:
        return slot in self.length

    def __len__(self) -> int:
        return len(self.length)

    def busy(self) -> list[int]:
        return sorted(self.length)

    def free(self, usable: int | None = None) -> list[int]:
        """The free slots among the first ``usable`` (default: all), lowest first."""
        return [s for s in range(self.size if usable is None else usable) if s not in self.length]

    def require(self, slot: int) -> None:
        """ValueError unless ``slot`` holds a request."""
        if slot not in self.length:
            raise ValueError(f"slot {slot} holds no request")

    def add(
        self, slot: int, length: int, budget: int, *, top_logprobs: int = 0, seeded: bool = False, components: int = 0
    ) -> None:
        """A request of ``length`` prompt tokens and ``budget`` new ones in ``slot``, its first token emitted."""
        self.length[slot], self.emitted[slot], self.budget[slot], self.checked[slot] = length, 1, budget, 0
        if top_logprobs:
            self.top_logprobs[slot] = top_logprobs
        if components:
            self.components[slot] = components
        if seeded:
            self.seeded.add(slot)

    def remove(self, slot: int) -> None:
        """Forget ``slot`` (retired, or its admission undone); a free slot is ignored."""
        for d in (self.length, self.emitted, self.budget, self.checked, self.top_logprobs, self.components):
            d.pop(slot, None)
        self.seeded.discard(slot)

    def note_rounds(self, rounds: int, tokens_per_round: int = 1) -> None:
        """``rounds`` rounds ran: each busy slot emitted at most ``tokens_per_round`` per round, within its budget."""
        for s in self.length:
            self.emitted[s] = min(self.emitted[s] + rounds * tokens_per_round, self.budget[s])

    def kv_need(self, ahead: int = 0) -> int:
        """KV columns the round ``ahead`` rounds from now attends to: every busy slot's position + 1 (a finished
        slot stays at its last position, so its budget bounds it)."""
        return max(self.length[s] + min(self.emitted[s] + ahead, self.budget[s]) for s in self.length)

    def rows_in_use(self) -> int:
        """Rows a round must run over: up to the highest busy slot (free slots above it are skipped); 0 if none."""
        return max(self.length) + 1 if self.length else 0

    def longest_prompt(self) -> int:
        return max(self.length.values(), default=0)

    def rounds_left(self) -> int:
        """Rounds until every busy slot has spent its budget (what may remain at most)."""
        return max(self.budget[s] - self.emitted[s] for s in self.length)
