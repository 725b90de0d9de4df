"""Blobs through POSIX shared memory: the server copies a same-host client's region into a blob,
or a blob into the region, once. Opt-in (Settings.allow_shm) and loopback peers only. No gRPC here.

The region belongs to the client, and so does everything the client may do to it while the
server copies: shrink it, replace it with a FIFO, a directory or a link. So the server never maps
it (a mapping of a file that shrinks faults with SIGBUS, which kills the server and every
session). It reads with pread into the blob's own memory and writes with pwrite, in chunks of
_CHUNK_BYTES; a file that shrank gives a short read or a failed size check, answered
InvalidArgument. It opens only regular files on the shared-memory filesystem, non-blocking and
without following links, so no open or read can wait on the client.

The server opens a region by name without `multiprocessing.shared_memory.SharedMemory`, whose
Python 3.11 attach registers the name with the resource tracker (which would unlink the client's
region when the server exits) and unlinks it on a failed attach.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import stat
from collections.abc import Iterator, Sequence

import torch

from cosserve.limits import SHM_PREFIX, readable_bytes
from cosserve.server import memory, tracing
from cosserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from cosserve.server.protocols import codec
from cosserve.server.state.workspace import Workspace

try:  # POSIX only; without it every shared-memory call is refused.
    import _posixshmem
except ImportError:  # pragma: no cover  (Windows)
    _posixshmem = None

__all__ = ["check_access", "feed", "fetch", "is_local_peer"]

# Longest region name we pass to shm_open (NAME_MAX is 255 with the leading slash).
_MAX_NAME = 250
# Bytes per pread or pwrite: Linux moves at most 2 GiB per call, and on CUDA this is the size of
# the host buffer a chunk passes through.
_CHUNK_BYTES = 16 * 1024 * 1024
# Where shm_open keeps regions on Linux. A region must be a file of that filesystem: a user may
# mount a FUSE filesystem on a file they own, and a read there could wait forever.
_SHM_DIR = "/dev/shm"


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
    """A client's region, opened by name as a regular file of the shared-memory filesystem; `size`
    from fstat after the open. Only pread and pwrite touch its bytes."""

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
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, and a file under a lease
        # for its holder. O_NOFOLLOW: a link could point anywhere (glibc adds it too; we do not
        # count on that).
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.fd = _posixshmem.shm_open("/" + self.name, flags, mode=0o600)
        except FileNotFoundError:
            raise NotFound(f"shared memory region {self.name!r} does not exist on the server's host") from None
        except PermissionError:
            raise PermissionDenied(f"the server may not open shared memory region {self.name!r}") from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise InvalidArgument(
                    f"shared memory region {self.name!r} is a symbolic link; the server follows none"
                ) from None
            # glibc's shm_open turns EISDIR into EINVAL: say what the name is, when it can be seen.
            mode = self._mode_by_name()
            if mode is not None and not stat.S_ISREG(mode):
                raise self._not_regular(mode) from None
            raise InvalidArgument(f"shared memory region {self.name!r} cannot be opened: {err.strerror}") from None
        try:
            self.size = self._checked_size()
        except BaseException:
            os.close(self.fd)
            raise

    def _checked_size(self) -> int:
        """The size of the open file; InvalidArgument unless it is a regular shared-memory file."""
        opened = os.fstat(self.fd)
        if not stat.S_ISREG(opened.st_mode):
            raise self._not_regular(opened.st_mode)
        if os.path.isdir(_SHM_DIR) and opened.st_dev != os.stat(_SHM_DIR).st_dev:
            raise InvalidArgument(f"shared memory region {self.name!r} is not on the shared-memory filesystem")
        return opened.st_size

    def _mode_by_name(self) -> int | None:
        """The file mode of the name in the shared-memory directory, without following a link."""
        try:
            return os.lstat(os.path.join(_SHM_DIR, self.name)).st_mode
        except OSError:
            return None

    def _not_regular(self, mode: int) -> InvalidArgument:
        return InvalidArgument(
            f"shared memory region {self.name!r} is a {_kind(mode)}, not a regular file; "
            "create it with shm_open or multiprocessing.shared_memory"
        )

    def __enter__(self) -> _Region:
        return self

    def __exit__(self, *exc: object) -> None:
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

    def _changed(self, what: str, verb: str, done: int, nbytes: int) -> InvalidArgument:
        return InvalidArgument(
            f"{what}: shared memory region {self.name!r} changed while it was {verb} "
            f"({done} of {nbytes} bytes done); a client must not resize its region during the call"
        )

    def _failed(
        self, what: str, verb: str, err: OSError, done: int, nbytes: int
    ) -> InvalidArgument | ResourceExhausted:
        if err.errno == errno.ENOSPC:
            # The filesystem, not the request, is out of room: a region made with ftruncate gets
            # its pages only as they are written.
            return ResourceExhausted(
                f"{what}: the shared-memory filesystem has no room for the pages of region {self.name!r} "
                f"({done} of {nbytes} bytes {verb})"
            )
        return InvalidArgument(
            f"{what}: shared memory region {self.name!r} could not be {verb}: {err.strerror} "
            f"({done} of {nbytes} bytes done)"
        )

    def read_into(self, tensor: torch.Tensor, offset: int, what: str) -> None:
        """Fill `tensor` (fresh, contiguous) from the region's bytes at `offset`, already checked to fit."""
        target = memory.byte_view(tensor)
        nbytes = target.numel()
        # On CUDA each chunk passes through one host buffer; on the CPU pread writes into the blob.
        staging = None if target.device.type == "cpu" else torch.empty(min(nbytes, _CHUNK_BYTES), dtype=torch.uint8)
        for start in range(0, nbytes, _CHUNK_BYTES):
            size = min(_CHUNK_BYTES, nbytes - start)
            into = target[start : start + size] if staging is None else staging[:size]
            try:
                got = os.preadv(self.fd, [into.numpy().data], offset + start)
            except OSError as err:
                raise self._failed(what, "read", err, start, nbytes) from None
            # A read of a regular file comes up short only at its end: the client shrank it.
            if got != size:
                raise self._changed(what, "read", start + got, nbytes)
            if staging is not None:
                target[start : start + size].copy_(into)

    def write_from(self, tensor: torch.Tensor, offset: int, what: str) -> None:
        """Write `tensor`'s bytes into the region at `offset`, already checked to fit."""
        nbytes = tensor.numel() * tensor.element_size()
        for start, chunk in _host_chunks(tensor):
            # A write past the end would grow the file again rather than fail, so the size is
            # checked before each chunk: a region that shrank is refused, not silently regrown.
            if os.fstat(self.fd).st_size < offset + nbytes:
                raise self._changed(what, "written", start, nbytes)
            try:
                written = os.pwrite(self.fd, chunk, offset + start)
            except OSError as err:
                raise self._failed(what, "written", err, start, nbytes) from None
            if written != len(chunk):
                raise self._changed(what, "written", start + written, nbytes)


_FILE_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, for an error message."""
    return next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "special file")


def _host_chunks(tensor: torch.Tensor) -> Iterator[tuple[int, memoryview]]:
    """(offset, bytes) of a tensor's bytes in host memory, _CHUNK_BYTES at a time: views of a
    CPU tensor, one host copy per chunk of a CUDA tensor."""
    source = memory.byte_view(tensor)
    for start in range(0, source.numel(), _CHUNK_BYTES):
        chunk = source[start : start + _CHUNK_BYTES]
        yield start, chunk.cpu().numpy().data


def feed(workspace: Workspace, name: str, dtype_code: int, shape: Sequence[int], shm_name: str, offset: int) -> None:
    """Create or overwrite blob `name` from a region; the session is charged and every check made
    before the allocation, and on any failure the old blob stays as it was."""
    what = f"blob {name!r}"
    shape = tuple(shape)
    nbytes = codec.check_header(what, dtype_code, shape, workspace.max_bytes)
    # Charged before the region is opened or the blob allocated, and held until it is stored:
    # concurrent feeds cannot pass the limits together.
    with workspace.claim(name, nbytes) as claim:
        with _Region(shm_name, writable=False, session_id=workspace.id) as region:
            region.check_span(offset, nbytes, what)
            # ResourceExhausted when the host or device cannot allocate what the limits allowed.
            tensor = memory.empty(codec.TORCH_DTYPES[dtype_code], shape, workspace.device, f"{what} of {readable_bytes(nbytes)}")
            if nbytes:
                with tracing.span("cosserve.shm.read", {"cosserve.bytes": nbytes}):
                    region.read_into(tensor, offset, what)
        claim.store(tensor)


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
            with tracing.span("cosserve.shm.write", {"cosserve.bytes": nbytes}):
                region.write_from(tensor, offset, f"blob {name!r}")
    return tensor
