"""Topics: the downlink subscription of a `downlinkTopicPattern`, and valid topic names."""

from __future__ import annotations

import re

from iotflow.formats import Template


def _expressions(level: str) -> list[tuple[int, int]]:
    """(start, end) of each `{...}` in one topic level; quotes may hold braces."""
    spans = []
    i = 0
    while i < len(level):
        if level[i] != "{":
            i += 1
            continue
        j = i + 1
        while j < len(level) and level[j] != "}":
            if level[j] in "'\"":
                close = level.find(level[j], j + 1)
                j = close if close >= 0 else len(level)
            j += 1
        spans.append((i, j + 1))
        i = j + 1
    return spans


class DownlinkTopic:
    """A `downlinkTopicPattern` as an MQTT subscription, and the DevEUI of a matched topic.

    Each level holding a `{...}` becomes `+` (a wildcard takes a whole level); the level
    whose expression names `DevEUI` (first choice or fallback) gives the device back,
    with the level's literal text around it removed (`dev-{DevEUI}` → `dev-(.+)`).
    """

    def __init__(self, pattern: str) -> None:
        Template(pattern)  # validated by the connector model; fail the same way here
        self.pattern = pattern
        levels = pattern.split("/")
        self.filter = "/".join("+" if "{" in level else level for level in levels)
        self._dev_level: int | None = None
        self._dev_regex: re.Pattern[str] | None = None
        for index, level in enumerate(levels):
            regex, names_dev_eui = self._level_regex(level)
            if names_dev_eui:
                self._dev_level, self._dev_regex = index, regex
                break

    @staticmethod
    def _level_regex(level: str) -> tuple[re.Pattern[str], bool]:
        parts: list[str] = []
        found = False
        last = 0
        for start, end in _expressions(level):
            parts.append(re.escape(level[last:start]))
            choices = [c.strip() for c in level[start + 1 : end - 1].split("|")]
            names = any(c in ("DevEUI", "DevEUI_uplink.DevEUI") for c in choices)
            parts.append("(?P<dev>.+?)" if names and not found else "(?:.+?)")
            found = found or names
            last = end
        parts.append(re.escape(level[last:]))
        return re.compile("".join(parts)), found

    def dev_eui(self, topic: str) -> str | None:
        """The DevEUI text of the topic's DevEUI level (not validated), or None."""
        if self._dev_level is None or self._dev_regex is None:
            return None
        levels = topic.split("/")
        if self._dev_level >= len(levels):
            return None
        match = self._dev_regex.fullmatch(levels[self._dev_level])
        return match.group("dev") if match else None


def valid_topic(topic: str) -> bool:
    """A topic name one may publish to (MQTT 3.1.1 section 4.7)."""
    return (
        0 < len(topic.encode()) <= 65535
        and "+" not in topic
        and "#" not in topic
        and "\x00" not in topic
    )
