"""Sessions that outlive the process (--durability): snapshots of every session, and the sync log.

Layout under `<state-dir>/sessions/`:
  `<id>.safetensors` + `<id>.json`  one session, written by `snapshots.write` (meta: SESSION_META)
  `journal.log`                     with `sync`: every change since the last compaction
  `journal.old.log`                 with `sync`: the log a compaction set aside until its
                                    snapshots are all written (replayed first if it is there)

`snapshot`: every changed session is written every --snapshot-interval-s and at SIGTERM (after
in-flight calls drained); at start every session file comes back under its id and owner. `sync`
also appends each change to the log and fsyncs it before the change is made, so before it is
acknowledged (Workspace.journal). Records only ever say what a blob *is* (set, remove, reset,
close), so replaying a log over snapshots taken while it was written gives the same sessions
again: a compaction can set the log aside, write the snapshots and only then delete it, and a
crash at any point in between loses nothing. No gRPC here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from cosserve.server import memory, tracing
from cosserve.server.errors import CosserveError, NotFound, SnapshotError
from cosserve.server.settings import Settings
from cosserve.server.state import journal, snapshots
from cosserve.server.state.sessions import SessionStore
from cosserve.server.state.workspace import Workspace

__all__ = ["JOURNAL", "SESSION_META", "Durability", "mode_of"]

log = logging.getLogger("cosserve.server")

SESSION_META = "cosserve-session"
SESSION_META_VERSION = 1
JOURNAL = "journal.log"
OLD_JOURNAL = "journal.old.log"
_SESSION_ID = re.compile(r"[0-9a-f]{32}")
# A session restored after a crash gets at least this much of its idle timeout, so that its
# client has time to come back to it: a periodic snapshot only records the idle clock of
# sessions whose blobs changed.
RESTORE_GRACE_S = 60.0
# Reads of a changing session's blobs before one that no change overlapped is given up on.
_READ_TRIES = 5
# The least time between two compactions the log's size asked for.
_MIN_COMPACTION_GAP_S = 1.0
_DTYPES = {memory.dtype_name(dtype): dtype for dtype in memory.STORED_DTYPES}


def mode_of(settings: Settings) -> str:
    """none, snapshot or sync: what --durability means with this --state-dir (auto: snapshot with one)."""
    if settings.durability == "auto":
        return "snapshot" if settings.state_dir else "none"
    return settings.durability


@dataclasses.dataclass
class _Written:
    """What the session file of one session holds: its generation then, and its idle clock then."""

    generation: int
    last_used: float


class Durability:
    """Writes and restores the sessions of a SessionStore under --state-dir (see the module doc)."""

    def __init__(self, settings: Settings, store: SessionStore) -> None:
        self.settings = settings
        self.store = store
        self.mode = mode_of(settings)
        self.directory = Path(settings.state_dir) / "sessions"
        # Bumped under each session's lock before each of its changes: a session is written again
        # only when its generation moved since it was last written.
        self._generations: dict[str, int] = {}
        self._written: dict[str, _Written] = {}
        self._journal: journal.Journal | None = None
        self._pass_lock = threading.Lock()  # one pass (snapshot or compaction) at a time
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._compaction_asked = False

    # ---- start ---------------------------------------------------------------------------

    def restore(self) -> None:
        """Bring back every session of the state directory (before the server serves), then
        watch every session from now on."""
        if self.mode == "none":
            return
        started = time.monotonic()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stems = sorted({p.name.split(".", 1)[0] for p in self.directory.iterdir() if not p.name.startswith(".")})
        restored = failed = 0
        for session_id in stems:
            if _SESSION_ID.fullmatch(session_id):
                if self._restore_file(session_id):
                    restored += 1
                else:
                    failed += 1
        replayed = 0
        for name in (OLD_JOURNAL, JOURNAL):
            if (self.directory / name).exists():
                replayed += self._replay(self.directory / name, cut_tail=name == JOURNAL)
        for workspace, owner in self.store.owned():
            workspace.journal = self._changed
        self.store.on_open = self._opened
        if self.mode == "sync":
            self._journal = journal.Journal(self.directory / JOURNAL)
        # What the logs brought back is written now, and the logs start again from nothing.
        self._pass(final=False)
        if self.mode == "snapshot":
            for name in (OLD_JOURNAL, JOURNAL):
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / name).unlink()
        log.info(
            "durability %s: %d session(s) restored from %s, %d could not be, %d logged change(s) replayed, in %.2f s",
            self.mode, restored, self.directory, failed, replayed, time.monotonic() - started,
        )

    def _unrestorable(self, session_id: str, owner: str | None, reason: str) -> None:
        self.store.discard(session_id)
        self.store.mark_unrestorable(session_id, owner, reason)
        log.warning("session %s could not be restored: %s", session_id, reason)

    def _restore_file(self, session_id: str) -> bool:
        stem = self.directory / session_id
        try:
            meta = _session_meta(self.directory / f"{session_id}{snapshots.MANIFEST_SUFFIX}", session_id)
        except SnapshotError as err:
            self._unrestorable(session_id, None, str(err))
            return False
        owner = meta["owner"]
        try:
            workspace = self.store.restore(session_id, owner, meta["device"], _remaining(meta))
            with workspace.transaction() as staged:
                blobs, _ = snapshots.read(
                    stem, workspace.device, lambda nbytes: staged.expect([], nbytes, f"restoring session {session_id}")
                )
                staged.stage_outputs(blobs, f"session {session_id}'s blobs")
                staged.commit()
        except CosserveError as err:
            self._unrestorable(session_id, owner, str(err))
            return False
        self._written[session_id] = _Written(0, workspace.last_used)
        return True

    # ---- watching ------------------------------------------------------------------------

    def _opened(self, workspace: Workspace, owner: str) -> None:
        workspace.journal = self._changed
        if self._journal is not None:
            self._append({"op": "open", "session": workspace.id, "owner": owner, "device": str(workspace.device)}, [])

    def _changed(self, workspace: Workspace, kind: str, blobs: Mapping[str, torch.Tensor]) -> None:
        """Workspace.journal of every session: under its lock, before the change is made."""
        self._generations[workspace.id] = self._generations.get(workspace.id, 0) + 1
        if self._journal is None:
            return
        header: dict[str, Any] = {"op": kind, "session": workspace.id}
        data: list[memoryview] = []
        if kind in ("set", "replace"):  # replace: the session's blobs are these, and only these
            header["blobs"] = [
                {"name": name, "dtype": memory.dtype_name(t.dtype), "shape": list(t.shape)} for name, t in blobs.items()
            ]
            data = [memory.tensor_bytes(t) for t in blobs.values()]
        elif kind == "remove":
            header["name"] = next(iter(blobs))
        try:
            self._append(header, data)
        except CosserveError:
            if kind != "close":
                raise
            # A close cannot be refused (expiry closes too): the session goes, and if the server
            # dies before its next snapshot it comes back, which loses nothing.
            log.warning("session %s: its close could not be logged", workspace.id)

    def _append(self, header: Mapping[str, Any], data: list[memoryview]) -> None:
        assert self._journal is not None
        size = self._journal.append(header, data)
        if size > self.settings.sync_log_max_bytes and not self._compaction_asked and self._loop is not None:
            self._compaction_asked = True
            assert self._wake is not None
            self._loop.call_soon_threadsafe(self._wake.set)

    # ---- writing -------------------------------------------------------------------------

    async def run(self) -> None:
        """On the server's loop: a pass every --snapshot-interval-s (0: none), and in sync mode a
        compaction whenever the log passes --sync-log-max-bytes; the writing is done on a thread."""
        if self.mode == "none":
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        interval = self.settings.snapshot_interval_s or None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await asyncio.to_thread(self._pass, final=False)
            except Exception:
                log.exception("a snapshot of the sessions failed")
            self._compaction_asked = False
            # A log that fills faster than it is compacted is compacted at most this often.
            await asyncio.sleep(min(_MIN_COMPACTION_GAP_S, interval or _MIN_COMPACTION_GAP_S))

    def close(self) -> None:
        """After the last call has drained (SIGTERM): write every session that changed, and stop."""
        if self.mode == "none":
            return
        self._pass(final=True)
        if self._journal is not None:
            self._journal.close()

    def _pass(self, *, final: bool) -> None:
        """Write each session that changed since its last write, and delete the files of sessions
        that are gone. In sync mode the log is set aside first and deleted once every session is
        written: it starts again from nothing."""
        # A root span (no call asked for it), its snapshot writes inside it.
        with self._pass_lock, tracing.span("cosserve.durability.pass", {"cosserve.final": final}):
            if self._journal is not None:
                self._journal.set_aside(self.directory / OLD_JOURNAL)
            failures = 0
            live: set[str] = set()
            for workspace, owner in self.store.owned():
                live.add(workspace.id)
                try:
                    self._write(workspace, owner, final=final)
                except (CosserveError, OSError) as err:
                    if isinstance(err, NotFound) and workspace.closed:
                        continue  # closed while it was being read: its files go at the next pass
                    failures += 1
                    log.warning("session %s could not be written: %s", workspace.id, err)
            self._delete_others(live | self.store.unrestorable())
            if self._journal is not None and not failures:
                # Every change the old log holds is in a snapshot now.
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / OLD_JOURNAL).unlink()
                    snapshots.fsync_directory(self.directory)

    def _write(self, workspace: Workspace, owner: str, *, final: bool) -> None:
        written = self._written.get(workspace.id)
        if written is not None and written.generation == self._generations.get(workspace.id, 0):
            # A periodic pass does not rewrite a session only read since; the last one brings its
            # idle clock up to date.
            if not final or written.last_used == workspace.last_used:
                return
        blobs, generation = self._blobs_of(workspace)
        last_used = workspace.last_used
        timeout = self.settings.session_idle_timeout_s
        meta = {
            "kind": SESSION_META,
            "version": SESSION_META_VERSION,
            "id": workspace.id,
            "owner": owner,
            "device": str(workspace.device),
            "idle_remaining_s": None if timeout <= 0 else max(0.0, timeout - (time.monotonic() - last_used)),
            "written_at": time.time(),
        }
        snapshots.write(self.directory / workspace.id, blobs, meta)
        self._written[workspace.id] = _Written(generation, last_used)

    def _blobs_of(self, workspace: Workspace) -> tuple[dict[str, torch.Tensor], int]:
        """Every blob of the session as it was between two changes, and its generation then.
        Blobs are replaced, never changed in place: holding them is holding that state."""
        blobs: dict[str, torch.Tensor] = {}
        generation = 0
        for _ in range(_READ_TRIES):
            generation = self._generations.get(workspace.id, 0)
            try:
                blobs = {name: workspace.get(name) for name in workspace.names()}
            except NotFound:  # removed meanwhile; a closed session is skipped by the caller
                if workspace.closed:
                    raise
                continue
            if self._generations.get(workspace.id, 0) == generation:
                break
        # Still changing after the tries: each blob is one it held, and the next pass writes it again
        # (in sync mode the log, replayed over it, makes it whole).
        return blobs, generation

    def _delete_others(self, keep: set[str]) -> None:
        """Delete the files of sessions neither open nor waiting for their owner to close them."""
        deleted = False
        for path in self.directory.iterdir():
            stem, _, suffix = path.name.partition(".")
            if _SESSION_ID.fullmatch(stem) and f".{suffix}" in (snapshots.DATA_SUFFIX, snapshots.MANIFEST_SUFFIX):
                if stem not in keep:
                    self._written.pop(stem, None)
                    self._generations.pop(stem, None)
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        deleted = True
        if deleted:
            snapshots.fsync_directory(self.directory)

    # ---- replay --------------------------------------------------------------------------

    def _replay(self, path: Path, *, cut_tail: bool) -> int:
        """Apply the log's whole records in order; at the first that is not whole, stop and (for
        the current log) cut it off. Returns how many records were applied."""
        applied = 0
        with open(path, "r+b") as source:
            size = os.fstat(source.fileno()).st_size
            start = 0
            while start < size:
                try:
                    end = self._apply_record(source, start, size)
                except journal.TornRecord as torn:
                    log.warning(
                        "sync log %s: the record at byte %d is incomplete or corrupt (%s); %s",
                        path.name, start, torn, "cut off there" if cut_tail else "what follows is skipped",
                    )
                    if cut_tail:
                        source.truncate(start)
                        source.flush()
                        os.fsync(source.fileno())
                    break
                start = end
                applied += 1
        return applied

    def _apply_record(self, source: BinaryIO, start: int, size: int) -> int:
        """Read the record at `start`, apply it if it is whole; return where the next begins."""
        text, data_bytes, end, crc = journal.read_head(source, start, size)
        try:
            header = json.loads(text)
            session_id = header["session"]
            if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
                raise ValueError("not a session id")
        except (ValueError, KeyError, TypeError):
            raise journal.TornRecord("its header is not a record's") from None
        workspace = next((ws for ws, _ in self.store.owned() if ws.id == session_id), None)
        op = header.get("op")
        if op in ("set", "replace") and workspace is not None:
            return self._replay_set(source, header, workspace, crc, data_bytes, end)
        journal.skip_data(source, data_bytes, crc)  # raises journal.TornRecord on a crc mismatch: nothing applied
        try:
            if op == "open" and workspace is None and session_id not in self.store.unrestorable():
                self.store.restore(session_id, str(header["owner"]), str(header["device"]), None)
            elif workspace is not None and op == "remove":
                with contextlib.suppress(NotFound):
                    workspace.remove(str(header["name"]))
            elif workspace is not None and op == "reset":
                workspace.reset()
            elif op == "close":
                self.store.discard(session_id)
        except CosserveError as err:
            self._unrestorable(session_id, str(header.get("owner", "")) if op == "open" else None, str(err))
        self._generations[session_id] = self._generations.get(session_id, 0) + 1
        return end

    def _replay_set(
        self, source: BinaryIO, header: dict[str, Any], workspace: Workspace, crc: int, data_bytes: int, end: int
    ) -> int:
        try:
            entries = [(str(b["name"]), _DTYPES[b["dtype"]], tuple(int(d) for d in b["shape"])) for b in header["blobs"]]
        except (KeyError, TypeError, ValueError):
            raise journal.TornRecord("its header is not a record's") from None
        if any(d < 0 for _, _, shape in entries for d in shape) or data_bytes != sum(
            math.prod(shape) * dtype.itemsize for _, dtype, shape in entries
        ):
            raise journal.TornRecord("its blobs' sizes do not add up to its data")
        try:
            with workspace.transaction() as staged:
                staged.expect([name for name, _, _ in entries], data_bytes, f"replaying session {workspace.id}")
                blobs = {}
                for name, dtype, shape in entries:
                    host = memory.empty(dtype, shape, torch.device("cpu"), f"blob {name!r}")
                    crc = journal.read_into(source, memory.tensor_bytes(host), crc)
                    blobs[name] = host if workspace.device.type == "cpu" else host.to(workspace.device)
                journal.check_crc(source, crc)
                staged.stage_outputs(blobs, f"replaying session {workspace.id}")
                staged.commit(replace=header["op"] == "replace")
        except CosserveError as err:
            owner = next((o for ws, o in self.store.owned() if ws is workspace), None)
            self._unrestorable(workspace.id, owner, str(err))
            source.seek(end)
        self._generations[workspace.id] = self._generations.get(workspace.id, 0) + 1
        return end


def _session_meta(path: Path, session_id: str) -> dict[str, Any]:
    """The meta of a session file's manifest (read before anything else of it: it says whose the
    session is and where its blobs go); SnapshotError for one that is missing or damaged."""
    try:
        with open(path, "rb") as source:
            text = source.read(snapshots.MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise SnapshotError(f"its manifest {path.name} is missing") from None
    except OSError as err:
        raise SnapshotError(f"its manifest {path.name} cannot be read: {err.strerror or err}") from None
    try:
        if len(text) > snapshots.MAX_MANIFEST_BYTES:
            raise ValueError("too large")
        meta = json.loads(text)["meta"]
        if meta.get("kind") != SESSION_META or meta.get("id") != session_id:
            raise ValueError("not this session's")
        if meta.get("version") != SESSION_META_VERSION:
            raise SnapshotError(
                f"{path.name} has session format version {meta.get('version')!r}; this server reads {SESSION_META_VERSION}"
            )
        if not isinstance(meta.get("owner"), str) or not isinstance(meta.get("device"), str):
            raise ValueError("no owner or device")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise SnapshotError(f"its manifest {path.name} is damaged (not this session's JSON manifest)") from None
    return dict(meta)


def _remaining(meta: Mapping[str, Any]) -> float | None:
    remaining = meta.get("idle_remaining_s")
    if not isinstance(remaining, (int, float)) or isinstance(remaining, bool) or not math.isfinite(remaining):
        return None
    return max(float(remaining), RESTORE_GRACE_S)
