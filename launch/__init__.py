"""Command building for the `deepspeed` launcher and `torchrun`, and hostfile validation. Imports no model code."""

from launch.commands import (
    NCCL_DEFAULTS,
    LaunchCommand,
    LaunchError,
    LaunchSpec,
    build_command,
    default_env,
    detect_device,
    parse_env_assignments,
    validate_env,
)
from launch.hostfile import (
    Host,
    HostfileError,
    format_hostfile,
    parse_hostfile,
    read_hostfile,
    validate_hostname,
)

__all__ = [
    "NCCL_DEFAULTS",
    "Host",
    "HostfileError",
    "LaunchCommand",
    "LaunchError",
    "LaunchSpec",
    "build_command",
    "default_env",
    "detect_device",
    "format_hostfile",
    "parse_env_assignments",
    "parse_hostfile",
    "read_hostfile",
    "validate_env",
    "validate_hostname",
]
