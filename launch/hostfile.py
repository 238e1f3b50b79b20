"""DeepSpeed hostfiles: one `HOSTNAME slots=N` per line, `#` starts a comment.

Every hostname must be an RFC 1123 name (dot-separated labels of letters, digits and inner hyphens, each
1-63 characters, 253 in all; IPv4 addresses qualify). Nothing else can reach a command line: DeepSpeed's
ssh runner pastes host names into a remote shell, so a name is validated rather than quoted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SLOTS = re.compile(r"slots=(\d+)")
MAX_HOSTNAME_LEN = 253


class HostfileError(ValueError):
    """A hostfile line that is not `HOSTNAME slots=N`; the message names the file, line and value."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def hostname_problem(name: str) -> str | None:
    """Why `name` is not an RFC 1123 hostname, or None if it is one."""
    if not name:
        return "is empty"
    if len(name) > MAX_HOSTNAME_LEN:
        return f"is {len(name)} characters long (at most {MAX_HOSTNAME_LEN})"
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            return (
                f"has the label {label!r}: labels are 1-63 letters, digits or hyphens and neither start "
                "nor end with a hyphen (RFC 1123)"
            )
    return None


def validate_hostname(name: str, *, where: str = "hostname") -> str:
    """Returns `name` if it is an RFC 1123 hostname; raises HostfileError naming `where` otherwise."""
    problem = hostname_problem(name)
    if problem:
        raise HostfileError(f"{where}: {name!r} {problem}")
    return name


def parse_hostfile(text: str, *, source: str = "<hostfile>") -> list[Host]:
    """Parses hostfile text; `source` names the file in error messages (`FILE:LINE: ...`)."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        fields = line.split()
        if len(fields) != 2:
            raise HostfileError(f"{where}: {raw.strip()!r} is not 'HOSTNAME slots=N'")
        name, slots_field = fields
        validate_hostname(name, where=where)
        m = _SLOTS.fullmatch(slots_field)
        if not m or int(m.group(1)) < 1:
            raise HostfileError(f"{where}: {slots_field!r} is not 'slots=N' with N a positive integer")
        if name in seen:
            raise HostfileError(f"{where}: host {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = lineno
        hosts.append(Host(name, int(m.group(1))))
    if not hosts:
        raise HostfileError(f"{source}: lists no hosts")
    return hosts


def read_hostfile(path: str | Path) -> list[Host]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HostfileError(f"{path}: hostfile not found") from None
    except UnicodeDecodeError as exc:
        raise HostfileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_hostfile(text, source=str(path))


def format_hostfile(hosts: list[Host]) -> str:
    """The hostfile text for `hosts` (each name validated)."""
    for h in hosts:
        validate_hostname(h.name)
        if h.slots < 1:
            raise HostfileError(f"host {h.name!r}: slots={h.slots} must be positive")
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)
