"""Image path -> overlap.py's hashes, cached in one JSON file by path, size and modification time.

- An image whose size and modification time are unchanged is not decoded again.
- The cache only saves time; it never stops a run:
  a file that cannot be read, or entries of another form, are dropped with a warning,
  those images hashed again and the file rewritten.
"""
import json
import os
from typing import Optional, Tuple

from ..atomic import atomic_write

VERSION = 2  # bump when a hash of overlap.py changes, so cached hashes are recomputed


class HashCache:
    """{absolute path: [size, mtime_ns, exact, phash, thumb hex]}, read from and saved to `path`.

    With path None, nothing is read or saved.
    """

    def __init__(self, path: Optional[str]):
        self.path, self.entries, self.changed = path, {}, False
        if not (path and os.path.isfile(path)):
            return
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, OSError) as e:
            return self._rebuild(f"is unreadable ({e})")
        if not isinstance(data, dict) or not isinstance(data.get("images", {}), dict):
            return self._rebuild("is not a hash cache of this program")
        if data.get("version") == VERSION:  # another version: hashed again, as meant
            self.entries = {k: v for k, v in data.get("images", {}).items() if _well_formed(v)}
            if len(self.entries) < len(data.get("images", {})):
                self._rebuild(f"has {len(data['images']) - len(self.entries)} malformed entries")

    def _rebuild(self, why: str) -> None:
        print(f"warning: the hash cache {self.path} {why}; the images it cannot give are "
              f"hashed again and the cache rewritten")
        self.changed = True

    def get(self, path: str):
        stat, hit = os.stat(path), self.entries.get(os.path.abspath(path))
        if hit and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
            return hit[2], hit[3], bytes.fromhex(hit[4])
        return None

    def put(self, path: str, value: Tuple[str, int, bytes]):
        stat = os.stat(path)
        self.entries[os.path.abspath(path)] = [stat.st_size, stat.st_mtime_ns, value[0], value[1],
                                               value[2].hex()]
        self.changed = True

    def save(self):
        if not (self.path and self.changed):
            return
        try:
            data = {"version": VERSION, "images": self.entries}
            atomic_write(self.path, lambda f: json.dump(data, f))
        except OSError as e:  # a read-only data folder: the hashes are right, a rerun is slower
            print(f"warning: cannot write the hash cache {self.path}: {e}")


def _well_formed(entry) -> bool:
    """Cache entry -> whether it has the form of one:

        [size, mtime_ns, exact hex, pHash < 2**64, 8x8 RGB thumbnail as 384 hex digits]
    """
    if not (isinstance(entry, list) and len(entry) == 5):
        return False
    size, mtime, exact, p, thumb = entry
    numbers = all(isinstance(x, int) and not isinstance(x, bool) for x in (size, mtime, p))
    if not (numbers and 0 <= p < 2 ** 64 and isinstance(exact, str) and isinstance(thumb, str)
            and len(thumb) == 384):
        return False
    try:
        bytes.fromhex(thumb)
    except ValueError:
        return False
    return True
