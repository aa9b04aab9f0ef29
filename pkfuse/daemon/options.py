"""``-o`` mount options: which pkfuse takes, which go to libfuse, and the set ``pyfuse3.init`` gets."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .preflight import EXIT_USAGE, MountError

#: -o options passed through to libfuse/the kernel as given
PASSTHROUGH = {"allow_other", "allow_root", "auto_unmount", "default_permissions", "dev", "nodev", "suid",
               "nosuid", "exec", "noexec", "atime", "noatime", "sync", "async", "dirsync"}
#: (libfuse rejects relatime; max_read breaks pyfuse3's init: neither is offered)
PASSTHROUGH_VALUE = {"fsname", "subtype"}
#: pkfuse's own -o options
OWN_FLAGS = {"ro", "rw", "no_default_permissions", "nodefault_permissions"}
OWN_VALUE = {"log", "regs", "control", "domains"}
DOMAIN_DESIGNS = ("persistent", "ephemeral")  #: -o domains=: where iommufd domains live


def parse_options(opts: Iterable[str]) -> dict[str, Any]:
    """Split ``-o a,b=c`` strings into ``{"fuse": set, "read_only": bool, "log": ..., "regs": ...}``."""
    out: dict[str, Any] = {"fuse": set(), "read_only": False, "default_permissions": True,
                           "log": None, "regs": None, "control": None, "domains": "persistent"}
    for group in opts:
        for opt in (o.strip() for o in group.split(",")):
            if not opt:
                continue
            key, eq, value = opt.partition("=")
            if eq and key in OWN_VALUE:
                if key == "domains" and value not in DOMAIN_DESIGNS:
                    raise MountError(f"-o domains={value}: want {' or '.join(DOMAIN_DESIGNS)}", EXIT_USAGE)
                out[key] = value
            elif not eq and key in OWN_FLAGS:
                if key in ("ro", "rw"):
                    out["read_only"] = key == "ro"
                else:
                    out["default_permissions"] = False
            elif (not eq and key in PASSTHROUGH) or (eq and key in PASSTHROUGH_VALUE):
                if not opt.isascii():
                    raise MountError(f"mount option {opt!r} is not ASCII (libfuse options must be)", EXIT_USAGE)
                out["fuse"].add(opt)
            else:
                raise MountError(f"unknown mount option {opt!r}", EXIT_USAGE)
    return out


def _escape(text: str) -> str:
    """``text`` as one libfuse option value: ASCII (pyfuse3 encodes options as ASCII), ``,`` and ``\\`` escaped."""
    return text.encode("ascii", "backslashreplace").decode().replace("\\", "\\\\").replace(",", "\\,")


def fuse_options(image: str, opts: dict[str, Any]) -> set[str]:
    """The option set for ``pyfuse3.init``: fsname/subtype, permissions, ro, the user's extras."""
    out = set(opts["fuse"])
    if not any(o.startswith("fsname=") for o in out):
        out.add(f"fsname={_escape(image)}")
    if not any(o.startswith("subtype=") for o in out):
        out.add("subtype=pkfuse")
    if opts["default_permissions"]:
        out.add("default_permissions")
    else:
        out.discard("default_permissions")
    if opts["read_only"]:
        out.add("ro")
    return out



def default_log(image: str) -> str:
    return image + ".log"
