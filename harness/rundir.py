"""A run's results folder: reserved at the start, written out of sight, published whole at the end.

``results/<name>/`` only ever appears complete. While a run works, its files live in
``results/.<name>.partial/<name>/`` (the inner folder has the final name, so what is written
there reads the same once moved); the last step renames it to ``results/<name>/``. A run
killed outright (``kill -9``) leaves only the hidden ``.partial`` folder, which the next run
in the same output folder removes once the process that owned it (``owner.json``: host, pid)
no longer exists; one owned by another host is reported, not touched.

A run stopped by a full disk keeps its ``.partial`` folder instead (:meth:`StagedRunDir.keep`):
the methods it finished are in there, with ``KEPT.txt`` saying so; later runs report such a
folder and leave it alone.

Creating ``.<name>.partial`` is the reservation: ``mkdir`` is atomic, so two runs started at
the same moment never pick the same name, and a name stays taken while its run works.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from harness.tracking import HOST_TAG, PID_START_TAG, PID_TAG, owner_tags, process_alive

PARTIAL_SUFFIX = ".partial"
OWNER_FILE = "owner.json"
KEPT_FILE = "KEPT.txt"  # in a reservation kept on purpose (a full disk): never removed by clean_partials


@dataclass
class StagedRunDir:
    """A reserved run name: ``path`` is where the run writes, ``final`` where :meth:`publish` puts it."""

    final: Path
    reservation: Path

    @property
    def path(self) -> Path:
        return self.reservation / self.final.name

    def publish(self) -> Path:
        """Move the finished folder to its final name (one rename), then drop the reservation."""
        os.rename(self.path, self.final)
        shutil.rmtree(self.reservation, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        """Remove everything the run wrote (an interrupted or failed run)."""
        shutil.rmtree(self.reservation, ignore_errors=True)

    def finished_parts(self) -> list[str]:
        """The method runs whose per-item samples were written completely (``samples/*.jsonl``)."""
        return sorted(p.stem for p in (self.path / "samples").glob("*.jsonl")) if self.path.is_dir() else []

    def keep(self, reason: str) -> Path:
        """Leave the reservation in place, unpublished, with ``KEPT.txt`` saying why and what is in it.

        On a full disk even the note may not fit: the empty marker file (an inode, no data block) is
        created first, so later runs leave the folder alone either way.
        """
        marker = self.reservation / KEPT_FILE
        try:
            marker.touch()
            parts = self.finished_parts()
            marker.write_text(f"{reason}\n\nThis run was not finished and is not published as {self.final}.\n"
                              f"Finished method runs kept in {self.path.name}/ (samples/, adapters/): "
                              f"{', '.join(parts) or 'none'}.\n"
                              "Nothing here is removed by later runs; move what you need, then delete this folder.\n")
        except OSError:
            pass  # the marker (or the folder itself) could not be written; the error line still says where
        return self.reservation


def _partial(root: Path, name: str) -> Path:
    return root / f".{name}{PARTIAL_SUFFIX}"


def reserve(output_dir: str | os.PathLike, run_name: str, taken: Collection[str] = ()) -> StagedRunDir:
    """Reserve ``run_name`` (or ``run_name-2``, ``-3``, ...) in ``output_dir``.

    A name is free if no folder of that name exists, no other run has reserved it, and it is not in
    ``taken`` (the names of earlier MLflow runs, so that an interrupted run, which leaves no folder,
    does not give its name to the next one).
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        name = run_name if i == 1 else f"{run_name}-{i}"
        if name in taken or (root / name).exists():
            continue
        reservation = _partial(root, name)
        try:
            reservation.mkdir()
        except FileExistsError:
            continue  # another run works under this name
        if (root / name).exists():  # published between the check and the mkdir
            reservation.rmdir()
            continue
        staged = StagedRunDir(final=root / name, reservation=reservation)
        try:
            (reservation / OWNER_FILE).write_text(json.dumps(owner_tags()))
            staged.path.mkdir()
        except OSError:  # a full disk, say: no ownerless reservation is left for ever
            staged.discard()
            raise
        return staged
    raise RuntimeError(f"no free run folder name for {run_name!r} in {root}")


def clean_partials(output_dir: str | os.PathLike, log=print) -> list[Path]:
    """Remove the ``.partial`` folders of runs of this host whose process is gone; report other hosts' ones.

    Returns the folders removed.
    """
    root = Path(output_dir)
    removed = []
    for folder in sorted(root.glob(f".*{PARTIAL_SUFFIX}")) if root.is_dir() else []:
        if (folder / KEPT_FILE).exists():
            log(f"note: {folder} holds what a run stopped by a full disk finished (see {KEPT_FILE} there); "
                "it is left alone")
            continue
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # being created right now, or not ours
        if owner.get(HOST_TAG) != socket.gethostname():
            log(f"note: {folder} belongs to a run on host {owner.get(HOST_TAG)} (pid {owner.get(PID_TAG)}); "
                "remove it once that run has ended")
        elif not process_alive(owner.get(PID_TAG), owner.get(PID_START_TAG)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            log(f"removed {folder}: the unfinished results of a run killed earlier (pid {owner.get(PID_TAG)})")
    return removed
