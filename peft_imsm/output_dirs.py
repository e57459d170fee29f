"""Checks of a folder that a command is about to write into, so that nothing the user saved is lost unasked.

Imports neither torch nor transformers (the commands call it before loading anything). Two checks:

* :func:`check_not_protected`: refuse an output folder that is (or contains, or lies inside) a folder the command
  reads from (the adapter, the base model), and the working folder, one of its parents, the home folder or a
  filesystem root. Paths are compared resolved (``~`` expanded, symbolic links followed).
* :func:`check_output_dir`: for a command that writes a whole new folder (and, with ``--overwrite``, replaces one):
  the checks above, then refuse a file, and a non-empty folder unless ``overwrite`` is set and the folder is an
  earlier output of the same command holding only files that the command writes. Returns the folder that the
  command will replace (None when there is nothing to replace).

Both raise :class:`OutputDirError` (a ``ValueError``) with a message that names the folder, the cause and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

_SHOWN = 8  # entries of a folder listed in a message


class OutputDirError(ValueError):
    """An output folder that the command refuses to write into (the message says why and what to do)."""


def resolved(path: str | os.PathLike) -> Path:
    """``path`` absolute, ``~`` expanded and symbolic links followed (for the parts that exist)."""
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def listing(folder: Path, names: list[str] | None = None) -> str:
    """The entries of ``folder`` (or ``names`` of it) for a message: ``notes.txt, results/, ...`` (folders end in
    ``/``), the first few and how many more."""
    names = sorted(os.listdir(folder)) if names is None else sorted(names)
    shown = [name + ("/" if (folder / name).is_dir() else "") for name in names[:_SHOWN]]
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(shown) + more


def check_not_protected(
    out_dir: str | os.PathLike,
    protected: Mapping[str, str | os.PathLike | None],
    *,
    name: str,
    nested: bool = True,
    working_dirs: bool = True,
) -> Path:
    """Refuse ``out_dir`` where writing (or replacing it) could destroy what the user has; return it resolved.

    Args:
        out_dir: the folder the command will write into.
        protected: ``{what: folder}`` of folders the command must never write into, e.g.
            ``{"adapter folder": adapter_dir}`` (None values are skipped).
        name: how the user gave ``out_dir`` (``"OUT_DIR"``, ``"--output_dir"``), for the messages.
        nested: also refuse ``out_dir`` containing a protected folder or inside one (for a command that replaces
            ``out_dir`` whole, or writes into it files that a protected folder holds).
        working_dirs: also refuse the working folder, any of its parents, the home folder and a filesystem root.

    Raises :class:`OutputDirError`.
    """
    out = resolved(out_dir)
    given = f"{name} {os.fspath(out_dir)!r}" + (f" ({out})" if str(out) != os.fspath(out_dir) else "")
    for what, folder in protected.items():
        if folder is None:
            continue
        folder = resolved(folder)
        if out == folder:
            raise OutputDirError(
                f"{given} is the {what}; writing there would overwrite its files. Pass a new folder outside it."
            )
        if nested and folder.is_relative_to(out):
            raise OutputDirError(
                f"{given} contains the {what} ({folder}); writing there could delete or overwrite it. Pass a new "
                f"folder that is neither the {what} nor one of its parents."
            )
        if nested and out.is_relative_to(folder):
            raise OutputDirError(
                f"{given} is inside the {what} ({folder}); keep the output out of it. Pass a new folder outside the "
                f"{what}."
            )
    if working_dirs:
        cwd = resolved(os.getcwd())
        if out.parent == out:
            raise OutputDirError(f"{given} is a filesystem root. Pass a new folder, e.g. {name} ./imsm-out.")
        if out == resolved(Path.home()):
            raise OutputDirError(f"{given} is the home folder. Pass a new folder inside it instead.")
        if cwd.is_relative_to(out):
            which = "the working folder" if out == cwd else f"a parent of the working folder {cwd}"
            raise OutputDirError(
                f"{given} is {which}, which holds other files. Pass a new folder inside it instead, e.g. "
                f"{name} ./imsm-out."
            )
    return out


def check_output_dir(
    out_dir: str | os.PathLike,
    *,
    command: str,
    protected: Mapping[str, str | os.PathLike | None],
    overwrite: bool,
    earlier_output: Callable[[Path], str | None],
    writes: Callable[[Path], bool],
    name: str = "OUT_DIR",
) -> Path | None:
    """Check the folder that ``command`` writes whole (to a temporary folder renamed into place) before anything
    loads; return the existing folder it will replace (resolved), or None when ``out_dir`` is missing or empty.

    Args:
        out_dir: the output folder.
        command: the command's name, for the messages (``"imsm-export"``).
        protected: the folders it reads from (see :func:`check_not_protected`, ``nested=True``).
        overwrite: whether the user asked to replace an earlier output (``--overwrite``).
        earlier_output: ``folder -> None`` when ``folder`` is an output of an earlier run of ``command``, else what
            tells it apart (for the message, e.g. ``"its config.json has no imsm section"``).
        writes: ``entry -> bool``: whether ``command`` writes that entry of the folder (a file of that name, say);
            anything else in the folder is the user's, and is never deleted.
        name: how the user gave ``out_dir``, for the messages.

    Raises :class:`OutputDirError`: ``out_dir`` refused by :func:`check_not_protected`, a symbolic link, a file, or
    a non-empty folder without ``overwrite``; with ``overwrite``, a non-empty folder that is not an earlier output of
    ``command`` or holds files that ``command`` does not write.
    """
    out = check_not_protected(out_dir, protected, name=name)
    path = Path(os.path.expanduser(os.fspath(out_dir)))
    given = f"{name} {os.fspath(out_dir)!r}"
    if path.is_symlink():
        raise OutputDirError(
            f"{given} is a symbolic link (to {out}); {command} replaces a folder whole. Pass the folder itself or a "
            "new folder."
        )
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{given} is a file, not a folder. Pass a new folder to write (it is created).")
    if not path.exists() or not any(path.iterdir()):
        return None
    only = f"--overwrite only replaces a folder that an earlier {command} wrote"
    if not overwrite:
        raise OutputDirError(
            f"{given} is not empty (it holds {listing(path)}); nothing was written. Pass a new or empty folder, or, "
            f"if it is an earlier {command} output, --overwrite to replace it ({only})."
        )
    why_not = earlier_output(path)
    if why_not is not None:
        raise OutputDirError(
            f"{given} is not a folder that {command} wrote ({why_not}; it holds {listing(path)}), and {only}; nothing "
            "was deleted. Pass a new or empty folder."
        )
    foreign = [entry for entry in os.listdir(path) if not writes(path / entry)]
    if foreign:
        raise OutputDirError(
            f"{given} is an earlier {command} output but also holds files that {command} does not write: "
            f"{listing(path, foreign)}. --overwrite would delete them, so nothing was deleted. Move them out of "
            f"{out}, or pass a new folder."
        )
    return out
