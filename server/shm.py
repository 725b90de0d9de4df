"""Blobs through POSIX shared memory: the server maps a same-host client's region, copies once,
unmaps. Opt-in (Settings.allow_shm) and loopback peers only. No gRPC here.

The region belongs to the client: the server opens it by name without
`multiprocessing.shared_memory.SharedMemory`, whose Python 3.11 attach registers the name with
the resource tracker (which would unlink the client's region when the server exits) and unlinks
it on a failed attach. A feed maps the region copy-on-write, so the server cannot change it.
"""

from __future__ import annotations

import ipaddress
import mmap
import os
from collections.abc import Sequence

import torch

from cosserve.limits import SHM_PREFIX
from cosserve.server import codec
from cosserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from cosserve.server.workspace import Workspace

try:  # POSIX only; without it every shared-memory call is refused.
    import _posixshmem
except ImportError:  # pragma: no cover  (Windows)
    _posixshmem = None

__all__ = ["check_access", "feed", "fetch", "is_local_peer"]

# Longest region name we pass to shm_open (NAME_MAX is 255 with the leading slash).
_MAX_NAME = 250


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is this host."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    if peer.startswith("ipv4:"):
        host = peer[len("ipv4:") :].rsplit(":", 1)[0]
    elif peer.startswith("ipv6:[") and "]" in peer:
        host = peer[len("ipv6:[") : peer.index("]")]
    else:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_access(allowed: bool, peer: str) -> None:
    """FailedPrecondition unless the server allows shared memory; PermissionDenied for a remote peer."""
    if not allowed or _posixshmem is None:
        raise FailedPrecondition(
            "shared memory is not enabled on this server; start it with --allow-shm "
            "(same-host clients only), or send the blob over the socket"
        )
    if not is_local_peer(peer):
        raise PermissionDenied(f"shared memory is only for clients on the server's host; peer {peer!r} is not local")


class _Region:
    """A client's region, opened by name; `size` from fstat, mapped only when there are bytes to move."""

    def __init__(self, shm_name: str, writable: bool, session_id: str) -> None:
        prefix = f"{SHM_PREFIX}{session_id}_"
        if not shm_name.lstrip("/").startswith(prefix):
            raise PermissionDenied(
                f"shared memory region {shm_name!r}: this session may only use regions named {prefix}*"
            )
        if "/" in shm_name.lstrip("/") or "\0" in shm_name or len(shm_name) > _MAX_NAME:
            raise InvalidArgument(
                f"shared memory name {shm_name!r} is not a region name "
                "(as multiprocessing.shared_memory gives it: no '/', at most 250 characters)"
            )
        self.name = shm_name.lstrip("/")
        self.writable = writable
        try:
            self.fd = _posixshmem.shm_open("/" + self.name, os.O_RDWR if writable else os.O_RDONLY, mode=0o600)
        except FileNotFoundError:
            raise NotFound(f"shared memory region {self.name!r} does not exist on the server's host") from None
        except PermissionError:
            raise PermissionDenied(f"the server may not open shared memory region {self.name!r}") from None
        except OSError as err:
            raise InvalidArgument(f"shared memory region {self.name!r} cannot be opened: {err.strerror}") from None
        self.size = os.fstat(self.fd).st_size
        self.map: mmap.mmap | None = None

    def __enter__(self) -> _Region:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.map is not None:
            self.map.close()
        os.close(self.fd)

    def check_span(self, offset: int, nbytes: int, what: str) -> None:
        """InvalidArgument unless [offset, offset + nbytes) lies inside the region."""
        if offset < 0:
            raise InvalidArgument(f"{what}: offset {offset} into shared memory region {self.name!r} is negative")
        if offset + nbytes > self.size:
            raise InvalidArgument(
                f"{what}: {nbytes} bytes at offset {offset} do not fit shared memory region {self.name!r} "
                f"of {self.size} bytes"
            )

    def bytes_at(self, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 view of [offset, offset + nbytes) of the mapped region (nbytes > 0)."""
        if self.writable:
            self.map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            # Copy-on-write: the view is writable as torch wants, and nothing reaches the client.
            self.map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=offset)


def feed(workspace: Workspace, name: str, dtype_code: int, shape: Sequence[int], shm_name: str, offset: int) -> None:
    """Create or overwrite blob `name` from a region; every check comes before the allocation, and
    on any failure the old blob stays as it was."""
    what = f"blob {name!r}"
    shape = tuple(shape)
    nbytes = codec.check_header(what, dtype_code, shape, workspace.max_bytes)
    workspace.reserve(name, nbytes)
    with _Region(shm_name, writable=False, session_id=workspace.id) as region:
        region.check_span(offset, nbytes, what)
        tensor = codec.empty(codec.TORCH_DTYPES[dtype_code], shape, workspace.device)
        if nbytes:
            source = region.bytes_at(offset, nbytes)
            codec.byte_view(tensor).copy_(source)
            del source  # the mapping cannot close while a view exports it
    workspace.put(name, tensor)


def fetch(workspace: Workspace, name: str, shm_name: str, offset: int) -> torch.Tensor:
    """Copy blob `name` into a region and return it (for its dtype and shape); with an empty
    `shm_name` only return it, so a client can size its region first."""
    tensor = workspace.get(name)
    if not shm_name:
        return tensor
    nbytes = tensor.numel() * tensor.element_size()
    with _Region(shm_name, writable=True, session_id=workspace.id) as region:
        region.check_span(offset, nbytes, f"blob {name!r}")
        if nbytes:
            target = region.bytes_at(offset, nbytes)
            target.copy_(codec.byte_view(tensor))
            del target
    return tensor
