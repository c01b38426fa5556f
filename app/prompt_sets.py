"""Sets of prompts as people give them: pasted one per line, or a .txt / .jsonl file; and the limits on them.

    parse_prompts("def f():\\n\\nHello there")                  -> ["def f():", "Hello there"]
    parse_prompts('{"text": "a\\\\nb", "label": 1}', "x.jsonl")  -> ["a\\nb"]
    read_labelled(Path("prompts.jsonl"))                       -> (["a\\nb", ...], [1, ...] or None)

A .jsonl line is a JSON string or an object with "text" (or "prompt"); its optional "label" (1/true: set A,
0/false: set B) is what `featurescope detect` measures an AUROC with. Anything else is one prompt per
non-blank line.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_UPLOAD_BYTES = 2_000_000  # per set (pasted or uploaded)


class PromptSetError(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param, self.message = param, message


def parse_prompts(text: str, filename: str | None = None, param: str = "a") -> list[str]:
    return [t for t, _ in _records(text, filename, param)]


def read_labelled(path: Path) -> tuple[list[str], list[int] | None]:
    """A file of prompts and, when every record of a .jsonl file has one, their labels (1: set A, 0: set B)."""
    records = _records(Path(path).read_text(encoding="utf-8"), str(path), str(path))
    labels = [label for _, label in records]
    return [t for t, _ in records], (labels if records and all(v is not None for v in labels) else None)


def _records(text: str, filename: str | None, param: str) -> list[tuple[str, int | None]]:
    if len(text.encode("utf-8")) > MAX_UPLOAD_BYTES:
        raise PromptSetError(param, f"The prompts of {param} are {len(text.encode('utf-8')):,} bytes; at most "
                                    f"{MAX_UPLOAD_BYTES:,} bytes are accepted per set.")
    if not (filename or "").lower().endswith(".jsonl"):
        return [(line.strip(), None) for line in text.splitlines() if line.strip()]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise PromptSetError(param, f"Line {number} of {filename} is not JSON ({exc}).") from None
        if isinstance(record, dict):
            prompt, label = record.get("text", record.get("prompt")), _label(record.get("label"), filename, number, param)
        else:
            prompt, label = record, None
        if not isinstance(prompt, str):
            raise PromptSetError(param, f"Line {number} of {filename} has no text: give a JSON string or an object "
                                        'with "text".')
        if prompt.strip():
            out.append((prompt, label))
    return out


def _label(value: object, filename: str | None, number: int, param: str) -> int | None:
    if value is None:
        return None
    if value in (1, True, "1", "a", "A", "true"):
        return 1
    if value in (0, False, "0", "b", "B", "false"):
        return 0
    raise PromptSetError(param, f"Line {number} of {filename}: label {value!r} is not 1/true (set A) or 0/false (set B).")


def check_sets(a: list[str], b: list[str], limit: int) -> None:
    """Both sets non-empty and within the limit, or a PromptSetError naming the set at fault."""
    for param, prompts, name in (("a", a, "A"), ("b", b, "B")):
        if not prompts:
            other = b if param == "a" else a
            hint = " (only one set was given: a contrast needs two)" if other else ""
            raise PromptSetError(param, f"Set {name} is empty{hint}: give at least one prompt per set, one per line.")
        if len(prompts) > limit:
            raise PromptSetError(param, f"Set {name} has {len(prompts):,} prompts; this server contrasts at most {limit:,} "
                                        "prompts per set (featurescope serve --max-contrast-prompts).")
