"""The one record type every dataset loader returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Example:
    id: str
    dataset: str
    question: str
    gold: str
    choices: dict[str, str] | None = None  # letter -> option text (multiple choice only)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}
