"""The image folder of a search index: its image files, their size and mtime (a file whose pair
is unchanged is not read again), and what could not be read: folders that cannot be listed and
symbolic links that lead nowhere are listed with their reason, never skipped without a word.
A linked folder is followed (data is often linked in), once: a link back to a folder already
listed is a loop, listed and not followed.
"""
import errno
import os
from typing import Dict, List, Optional

EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png")


def list_images(root: str, problems: Optional[Dict[str, str]] = None) -> List[str]:
    """Image files under `root`, recursively (linked folders followed once), as sorted
    '/'-separated paths relative to it; each folder that cannot be listed, or a link back to one
    already listed, goes into `problems` as 'folder/': its reason."""
    def unlisted(e: OSError):
        if problems is not None:
            rel = os.path.relpath(e.filename, root).replace(os.sep, "/")
            problems[rel + "/"] = f"folder not readable ({e.strerror})"

    top = os.path.realpath(root)
    found, seen = [], {top}
    for folder, dirs, files in os.walk(root, onerror=unlisted, followlinks=True):
        for name in sorted(dirs):  # a linked folder is followed once: a link back is a loop
            real = os.path.realpath(os.path.join(folder, name))
            if real in seen or top.startswith(real + os.sep):  # seen, or above the image folder
                dirs.remove(name)
                if problems is not None:
                    rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                    problems[rel + "/"] = "symbolic link loop (a folder already listed)"
            seen.add(real)
        dirs.sort()
        for name in files:
            if name.lower().endswith(EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def _stat_error(path: str, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symbolic link loop"
    if os.path.islink(path) and isinstance(e, FileNotFoundError):
        return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    return e.strerror or str(e)


def file_stats(images: str, problems: Optional[Dict[str, str]] = None) -> Dict[str, List[int]]:
    """[size, mtime_ns] of every image under `images`: a file whose pair is unchanged since it
    was embedded is not read again. Files that cannot be stat'ed (a broken or looping symbolic
    link) and folders that cannot be listed go into `problems`."""
    stats, problems = {}, {} if problems is None else problems
    for rel in list_images(images, problems):
        path = os.path.join(images, rel)
        try:
            st = os.stat(path)
        except OSError as e:
            problems[rel] = _stat_error(path, e)
            continue
        stats[rel] = [st.st_size, st.st_mtime_ns]
    return stats


def unseen(manifest: Dict, problems: Dict[str, str]) -> Dict[str, List[int]]:
    """[size, mtime_ns] as recorded of the indexed (or known unreadable) files under folders that
    could not be listed this run: kept as they are, since nothing says they changed."""
    folders = [rel for rel in problems if rel.endswith("/")]
    recorded = dict(manifest["skipped"], **manifest["files"])
    return {rel: [e["size"], e["mtime_ns"]] for rel, e in recorded.items()
            if any(rel.startswith(folder) for folder in folders)}
