"""Verified downloads into a cache folder: URL + sha256 + atomic rename.

- A file is streamed to a temporary name beside its final path, hashed on the way,
  and renamed only when its sha256 matches:
  an interrupted or corrupt download never leaves a file that looks complete.
- A cached file whose hash is wrong is fetched again.
- Some publishers state no hash. Then the sha256 is computed at the first download and kept
  beside the file (`<file>.sha256`): later loads check the cached file against it,
  and runs record it, so a changed file upstream or on disk is noticed rather than silently used.
"""
import hashlib
import os
import sys
import time
import urllib.error
import urllib.request

from ..atomic import atomic_write

CACHE_ENV = "MRS_ADAPTER_CACHE"


class DownloadError(RuntimeError):
    """A download that failed or did not verify; nothing was written to the cache."""


def cache_dir(download_root: str = None) -> str:
    """`download_root` or None -> it, else $MRS_ADAPTER_CACHE, else ~/.cache/clip (OpenAI's)."""
    return os.path.expanduser(download_root or os.environ.get(CACHE_ENV) or "~/.cache/clip")


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    """Path -> the file's sha256, in hex, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _progress(done: int, total: int, start: float, name: str, last: list):
    """One status line on stderr: a redrawn line on a terminal, every 10% otherwise."""
    now = time.time()
    pct = 100.0 * done / total if total else 0.0
    tty = sys.stderr.isatty()
    if tty and now - last[0] < 0.2 and done != total:
        return
    if not tty and int(pct // 10) == last[1] and done != total:
        return
    last[0], last[1] = now, int(pct // 10)
    speed = done / max(now - start, 1e-6) / 2 ** 20
    mib = f"{done / 2 ** 20:.1f}"
    size = f"{mib}/{total / 2 ** 20:.1f} MiB ({pct:.0f}%)" if total else f"{mib} MiB"
    start_of_line = "\r" if tty else ""
    end_of_line = "" if tty and done != total else "\n"
    sys.stderr.write(f"{start_of_line}downloading {name}: {size} {speed:.1f} MiB/s{end_of_line}")
    sys.stderr.flush()


def recorded_sha256(path: str):
    """Path -> the sha256 kept beside a downloaded file (`download` writes it), or None."""
    try:
        with open(path + ".sha256") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


def _record_sha256(path: str, sha256: str):
    atomic_write(path + ".sha256", lambda f: f.write(f"{sha256}  {os.path.basename(path)}\n"))


def download(url: str, sha256: str = None, root: str = None, filename: str = None,
             timeout: float = 60.0) -> str:
    """URL -> path of its file in the cache, fetched and verified against `sha256` if needed.

    sha256=None: no pinned value; the file's hash is computed and kept beside it (see above).
    """
    root = cache_dir(root)
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, filename or os.path.basename(url))
    if os.path.isfile(target):
        expected = sha256 or recorded_sha256(target)
        actual = sha256_of(target)
        if expected is None or actual == expected:
            if expected is None:  # neither pinned nor recorded yet
                print(f"{target}: no published sha256; its sha256 is {actual} "
                      f"(kept in {target}.sha256)", file=sys.stderr)
                _record_sha256(target, actual)
            return target
        print(f"{target} exists but its sha256 does not match {expected}; downloading it again",
              file=sys.stderr)
    got = []

    def fetch(out):  # streamed into atomic_write's temporary file, renamed only if we return
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as src:
            total, done = int(src.headers.get("Content-Length") or 0), 0
            start, last = time.time(), [0.0, -1]
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
                h.update(block)
                done += len(block)
                _progress(done, total, start, os.path.basename(target), last)
        if total and done != total:
            raise DownloadError(f"download of {url} ended after {done} of {total} bytes")
        got.append(h.hexdigest())
        if sha256 is not None and h.hexdigest() != sha256:
            raise DownloadError(f"sha256 of the file downloaded from {url} is {h.hexdigest()}, "
                               f"expected {sha256}; nothing was written to {target}")

    try:
        atomic_write(target, fetch, mode="wb")
    except (urllib.error.URLError, OSError) as e:  # offline, DNS, refused, timed out, short read
        raise DownloadError(f"could not download {url}: {getattr(e, 'reason', e)}. Nothing was "
                           f"written to the cache; put the verified file at {target} yourself, "
                           f"or pass a local file.") from e
    if sha256 is None:
        _record_sha256(target, got[0])
        print(f"{target}: no published sha256; computed {got[0]} at download "
              f"(kept in {target}.sha256)", file=sys.stderr)
    return target
