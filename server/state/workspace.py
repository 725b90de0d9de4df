"""A session's workspace: Caffe2-style named torch tensors on one device, charged before they are
allocated, changed only by transactions that commit whole."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType

import torch

from cosserve.limits import readable_bytes
from cosserve.server.errors import CosserveError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, quoted
from cosserve.server.state.accounts import Account
from cosserve.server.state.corpora import CORPUS_PREFIX, READ_ONLY, Corpora, is_corpus
from cosserve.server.state.norm_cache import NormCache

__all__ = [
    "BLOB_OVERHEAD_BYTES",
    "MAX_NAME_BYTES",
    "ChangeRecorder",
    "Reservation",
    "Transaction",
    "Workspace",
    "blob_charge",
    "check_name",
    "resolve_device",
]

# What a stored blob costs besides its data and its name: the dict entry, the tensor and its
# storage objects (a 4-byte blob named by 8 characters measured ~660 bytes of RSS, torch 2, CPython 3.11).
BLOB_OVERHEAD_BYTES = 640
# The longest blob name, in UTF-8 bytes; Caffe2 and our tests use names of a few dozen.
MAX_NAME_BYTES = 1024


# Told of each change about to be made to a workspace, for --durability (server/state/durability.py):
# called with the workspace, the kind of change and its blobs, under the workspace's lock, once
# every check has passed and before anything is changed, so before the change is acknowledged.
# If it raises, nothing is changed. Kinds: "set" (the blobs being stored), "remove" (the blob
# being removed), "reset" and "close" (no blobs).
ChangeRecorder = Callable[["Workspace", str, Mapping[str, torch.Tensor]], None]


def resolve_device(spec: str, default: str = "auto") -> torch.device:
    """Turn "auto" / "cpu" / "cuda" / "cuda:N" into a device this host has."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = default if default not in ("", "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
        if spec == "auto":
            spec = "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise InvalidArgument(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N") from err
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise InvalidArgument(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise FailedPrecondition(f"device {spec!r} was asked for, but this server has no CUDA device")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise FailedPrecondition(f"device {spec!r}: this server has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _name_bytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogatepass"))


def check_name(name: str) -> str:
    """`name`, if a session's blob may have it: not empty, not a shared corpus's `@NAME`, and at
    most MAX_NAME_BYTES of UTF-8."""
    if not name:
        raise InvalidArgument("blob name must not be empty")
    if is_corpus(name):
        raise InvalidArgument(
            f"blob name {quoted(name)} names a shared corpus ('{CORPUS_PREFIX}' names are theirs); {READ_ONLY}"
        )
    size = _name_bytes(name)
    if size > MAX_NAME_BYTES:
        raise InvalidArgument(f"blob name {name[:40]!r}... is {size} bytes of UTF-8, above the {MAX_NAME_BYTES} a name may have")
    return name


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def blob_charge(name: str, nbytes: int) -> int:
    """What a blob of nbytes of data named `name` counts against its session's and its identity's
    limits: the data, the name's UTF-8 bytes and BLOB_OVERHEAD_BYTES."""
    return nbytes + _name_bytes(name) + BLOB_OVERHEAD_BYTES


class Workspace:
    """Named tensors of one session. Its lock is held only for bookkeeping, never while computing:
    readers take a snapshot, writers commit staged tensors (see Transaction).

    What it holds is charged, before it is allocated, against `max_bytes` and against `account`
    (the identity's limit, shared by its sessions): each stored blob's `blob_charge`, and the
    reservations of blobs being built (a stream being received, a net's staged outputs). A blob
    that replaces another is charged beside it until it is stored, as both are alive until then.
    """

    def __init__(
        self,
        session_id: str,
        device: torch.device,
        max_bytes: int,
        account: Account | None = None,
        corpora: Corpora | None = None,
    ) -> None:
        self.id = session_id
        self.device = device
        self.max_bytes = max_bytes
        self.account = account
        # The server's shared corpora, read as `@NAME` (never stored here, never charged here).
        self.corpora = corpora
        self._lock = threading.Lock()
        self._blobs: dict[str, torch.Tensor] = {}
        self._stored = 0  # the charges of _blobs, kept with it so no call sums every blob
        self._reserved = 0  # the charges of open reservations
        self.last_used = time.monotonic()
        self.closed = False
        self.journal: ChangeRecorder | None = None  # set by durability before the session is used
        # Corpus row norms for ScoreTopK, keyed weakly by tensor: an entry goes with its blob's tensor
        # when the blob is overwritten or removed (blobs are replaced, never changed in place).
        self.norms = NormCache()

    @staticmethod
    def bytes_of(blobs: Mapping[str, torch.Tensor]) -> int:
        """Data bytes of `blobs`."""
        return sum(_nbytes(t) for t in blobs.values())

    def held_bytes(self) -> int:
        """Everything charged to this session: stored blobs and open reservations."""
        return self._stored + self._reserved

    def size_of(self, names: Iterable[str]) -> int:
        """Data bytes of the named blobs that exist, shared corpora (`@NAME`) included."""
        names = set(names)
        corpus_bytes = sum(self.corpora.nbytes(n) for n in names if is_corpus(n)) if self.corpora is not None else 0
        with self._lock:
            return corpus_bytes + sum(_nbytes(self._blobs[n]) for n in names if n in self._blobs)

    def missing(self, name: str) -> CosserveError:
        """The error for a blob this workspace does not hold. A `@NAME` is never a session's: asked
        for by a read it is resolved before this, so here it is a write (RemoveBlob)."""
        if is_corpus(name):
            return InvalidArgument(f"blob {quoted(name)} is a shared corpus; {READ_ONLY}")
        return NotFound(f"blob {name!r} is not in session {self.id}")

    def corpus(self, name: str) -> torch.Tensor:
        """The shared corpus `@NAME` on this session's device (NOT_FOUND if the server has none)."""
        if self.corpora is None:
            raise NotFound(f"shared corpus {quoted(name)} does not exist: this server has no shared corpora")
        return self.corpora.get(name, self.device)

    def _ensure_open(self) -> None:
        if self.closed:
            raise NotFound(f"session {self.id!r} was closed")

    def _charge(self, delta: int, what: str, tail: str) -> None:
        """Count delta more bytes against this session's limit, then its identity's (lock held);
        raise ResourceExhausted and count nothing if either would be passed. The caller updates
        _stored or _reserved."""
        after = self._stored + self._reserved + delta
        if delta > 0 and after > self.max_bytes:
            raise ResourceExhausted(
                f"{what} would take session {self.id} to {readable_bytes(after)}, above its limit of "
                f"{readable_bytes(self.max_bytes)} (--max-session-bytes); {tail}"
            )
        if self.account is not None:
            if delta >= 0:
                self.account.charge(delta, what)
            else:
                self.account.release(-delta)

    def _charge_of(self, name: str) -> int:
        old = self._blobs.get(name)
        return 0 if old is None else blob_charge(name, _nbytes(old))

    def reserve(self, name: str, nbytes: int) -> None:
        """Refuse now, before anything is received or allocated, a blob `name` of nbytes that could
        not be stored (closed session, bad name, byte limits). A check only: `claim` also holds the room."""
        self.claim(name, nbytes).release()

    def claim(self, name: str, nbytes: int) -> Reservation:
        """Charge now the blob `name` of nbytes that the caller is about to allocate and fill, or
        raise (closed session, bad name, ResourceExhausted). Use it as a context manager: it is
        released on leaving unless `store` turned it into the blob."""
        check_name(name)
        charge = blob_charge(name, nbytes)
        with self._lock:
            self._ensure_open()
            self._charge(charge, f"blob {name!r} of {readable_bytes(nbytes)}", "remove blobs or raise the limit")
            self._reserved += charge
        return Reservation(self, name, charge)

    def hold(self, nbytes: int, what: str) -> Reservation:
        """Charge nbytes of working memory that is no blob (a ScoreTopK batch in flight: its
        queries and results), or raise as a blob would be refused. Released on leaving a with
        block or by `release`; never stored."""
        self._reserve(nbytes, f"{what} ({nbytes} bytes)", "send smaller batches or raise the limit")
        return Reservation(self, "", nbytes)

    def _reserve(self, delta: int, what: str, tail: str) -> None:
        """Grow (or shrink, delta < 0) the unnamed reservation of a transaction."""
        with self._lock:
            if delta > 0:
                self._ensure_open()
            self._charge(delta, what, tail)
            self._reserved += delta

    def _store(self, blobs: Mapping[str, torch.Tensor], reserved: int, *, replace: bool = False) -> None:
        """Set `blobs`, paid for by a reservation of `reserved` bytes, which this consumes. With
        `replace`, every other blob goes in the same step (one journal record: a crash keeps the
        old blobs or the new ones, never none)."""
        with self._lock:
            self._ensure_open()
            new = sum(blob_charge(name, _nbytes(t)) for name, t in blobs.items())
            old = self._stored if replace else sum(self._charge_of(name) for name in blobs)
            what = f"blob {next(iter(blobs))!r}" if len(blobs) == 1 else "the outputs"
            kind = "replace" if replace else "set"
            self._charge_logged(new - old - reserved, what, "nothing was changed", kind, blobs)
            self._reserved -= reserved
            self._stored += new - old
            if replace:
                self._blobs = dict(blobs)
            else:
                self._blobs.update(blobs)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Store a tensor that is already allocated (it frees the blob it replaces at once)."""
        check_name(name)
        self.apply({name: tensor})

    def apply(self, changes: Mapping[str, torch.Tensor]) -> None:
        """Set every blob of `changes` at once or, if they do not fit, none of them."""
        self._store(changes, 0)

    def get(self, name: str) -> torch.Tensor:
        if is_corpus(name):
            with self._lock:
                self._ensure_open()
            return self.corpus(name)
        with self._lock:
            self._ensure_open()
            tensor = self._blobs.get(name)
        if tensor is None:
            raise self.missing(name)
        return tensor

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._blobs

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._blobs)

    def remove(self, name: str) -> None:
        with self._lock:
            self._ensure_open()
            charge = self._charge_of(name)
            if not charge:
                raise self.missing(name)
            self._charge_logged(-charge, "", "", "remove", {name: self._blobs[name]})
            del self._blobs[name]
            self._stored -= charge

    def _charge_logged(self, delta: int, what: str, tail: str, kind: str, blobs: Mapping[str, torch.Tensor]) -> None:
        """`_charge`, and the change told to the journal: both or neither (lock held). A charge,
        which may be refused, comes before the journal; a release, which cannot be, after it."""
        if self.journal is None:
            self._charge(delta, what, tail)
            return
        if delta <= 0:
            self.journal(self, kind, blobs)
            self._charge(delta, what, tail)
            return
        self._charge(delta, what, tail)
        try:
            self.journal(self, kind, blobs)
        except BaseException:
            self._charge(-delta, "", "")
            raise

    def _drop_blobs(self, kind: str) -> None:
        """Forget every stored blob (lock held); open reservations stay until their owners end them."""
        self._charge_logged(-self._stored, "", "", kind, {})
        self._blobs = {}
        self._stored = 0

    def reset(self) -> None:
        with self._lock:
            self._drop_blobs("reset")

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._drop_blobs("close")

    def transaction(self) -> Transaction:
        """A snapshot to read from and a place to stage outputs; `commit` applies them all or none.
        Use it as a context manager: what it holds charged is given back on leaving."""
        with self._lock:
            self._ensure_open()
            return Transaction(dict(self._blobs), self.max_bytes, self.missing, self)


class Reservation:
    """Bytes charged to a workspace (and its identity) for one blob being built. `store` turns them
    into the blob; `release`, or leaving the with block without storing, gives them back."""

    def __init__(self, workspace: Workspace, name: str, charge: int) -> None:
        self.workspace = workspace
        self.name = name
        self._charge = charge  # 0 once stored or released

    def store(self, tensor: torch.Tensor) -> None:
        self.workspace._store({self.name: tensor}, self._charge)
        self._charge = 0

    def release(self) -> None:
        if self._charge:
            self.workspace._reserve(-self._charge, "", "")
            self._charge = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class Transaction:
    """Reads see a workspace as it was when the transaction began plus what was staged since;
    `commit` applies the staged blobs together.

    Room is taken before each op runs (`expect`: the op's declared output size) and settled to the
    actual outputs when they are staged, all charged to the workspace at once, so concurrent calls
    cannot together pass its limit and a net is refused at the op that would. A staged output
    replacing a stored blob does not free it: both are alive until commit.

    Commits are applied on top of the workspace as it is then: a concurrent call's changes to
    other blobs are kept, as if that call had run after this one. Without a workspace (one-shot
    Compute) a transaction only stages, within `max_bytes`.
    """

    def __init__(
        self,
        blobs: dict[str, torch.Tensor],
        max_bytes: int,
        missing: Callable[[str], Exception],
        workspace: Workspace | None = None,
    ) -> None:
        self.workspace = workspace
        self.max_bytes = max_bytes
        self._missing = missing
        self._view = blobs
        self.staged: dict[str, torch.Tensor] = {}
        self._staged_charge = 0  # blob_charge of everything in `staged`
        self._reserved = 0  # charged for this transaction: staged outputs, and the op now running

    def get(self, name: str) -> torch.Tensor:
        tensor = self._view.get(name)
        if tensor is None:
            if is_corpus(name) and self.workspace is not None:
                # Read where it is, never copied into the view: no stage can write an '@' name.
                return self.workspace.corpus(name)
            raise self._missing(name)
        return tensor

    def _settle(self, target: int, what: str) -> None:
        """Hold `target` bytes charged in all, or raise ResourceExhausted holding what was held."""
        delta = target - self._reserved
        if self.workspace is not None:
            self.workspace._reserve(delta, what, "nothing was changed")
        elif delta > 0 and target > self.max_bytes:
            raise ResourceExhausted(
                f"{what} would take the reply to {readable_bytes(target)}, above the {readable_bytes(self.max_bytes)} of one message; "
                "run it in a session and fetch the outputs (streamed)"
            )
        self._reserved = target

    def expect(self, names: Iterable[str], nbytes: int, what: str) -> None:
        """Take room for outputs `names` of nbytes in all before an op allocates them."""
        names = list(names)
        charge = nbytes + sum(blob_charge(name, 0) for name in names)
        self._settle(self._staged_charge + charge, f"{what}: its outputs of {readable_bytes(nbytes)}")

    def stage(self, name: str, tensor: torch.Tensor) -> None:
        self.stage_outputs({name: tensor}, f"output {name!r}")

    def stage_outputs(self, outputs: Mapping[str, torch.Tensor], what: str) -> None:
        """Stage an op's outputs; the room held becomes what is staged (more if the op wrote more
        than `expect` was told, refused like it)."""
        replaced = sum(blob_charge(name, _nbytes(self.staged[name])) for name in outputs if name in self.staged)
        added = sum(blob_charge(name, _nbytes(tensor)) for name, tensor in outputs.items())
        target = self._staged_charge - replaced + added
        self._settle(target, f"{what}: its outputs of {readable_bytes(Workspace.bytes_of(outputs))}")
        self._staged_charge = target
        self._view.update(outputs)
        self.staged.update(outputs)

    def commit(self, *, replace: bool = False) -> None:
        """Store the staged blobs, paid for by the room held; with `replace`, instead of every
        blob the workspace holds, in one step."""
        if self.workspace is not None and (self.staged or replace):
            self.workspace._store(self.staged, self._reserved, replace=replace)
            self._reserved = 0

    def release(self) -> None:
        """Give back the room still held (after a failure, or nothing staged)."""
        if self.workspace is not None and self._reserved:
            self.workspace._reserve(-self._reserved, "", "")
        self._reserved = 0

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
        # A failed call's traceback may keep this transaction alive: let its tensors go now.
        self._view, self.staged = {}, {}
