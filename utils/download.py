"""Fetch the MVTec AD archive (resumable, sha256-checked) and extract one category safely."""

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm.auto import tqdm

from .constants import (
    MVTEC_ARCHIVE_NAME,
    MVTEC_CATEGORIES,
    MVTEC_LICENSE,
    MVTEC_PAGE_URL,
    MVTEC_SHA256,
    MVTEC_URL,
    MVTEC_URL_ENV,
    SYNTHETIC_SUBSET,
)

# The real archive sometimes wraps everything in one folder of this name.
_ARCHIVE_TOP_FOLDER = "mvtec_anomaly_detection"
_CHUNK = 1 << 20

_license_shown = False


class DownloadError(RuntimeError):
    """The archive could not be fetched (offline, host moved, transfer cut)."""


def resolve_url(url: str | None = None) -> str:
    """Archive URL: the explicit argument, else the MVTEC_URL environment variable, else the constant."""
    if url:
        return url
    return os.environ.get(MVTEC_URL_ENV) or MVTEC_URL


def sha256_of(path: str | Path, chunk_size: int = _CHUNK) -> str:
    """Hex sha256 of a file, read in chunks so a 5 GB archive does not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_hint(archive: Path, data_dir: Path | None = None, category: str | None = None) -> str:
    """How to get the data without this code downloading it."""
    folder = f"the '{category}' folder" if category else "the category folder (e.g. 'bottle/')"
    target = str(data_dir) if data_dir is not None else "your data_dir"
    return (
        f"To get the data by hand: download {MVTEC_ARCHIVE_NAME} from {MVTEC_PAGE_URL} and put it at "
        f"{archive} (it is extracted on the next run), or extract {folder} from it into {target}. "
        f"If the host moved, set the Training.ipynb parameter mvtec_url or the {MVTEC_URL_ENV} environment variable."
    )


def _total_size(response: http.client.HTTPResponse, start: int) -> int | None:
    """Full file size from Content-Range ('bytes a-b/total') or start + Content-Length; None if unknown."""
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return start + int(length) if length is not None else None


def _fetch_to(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Download url into part, resuming from part's current size with a Range request."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:
            return  # part already holds the whole file; the hash check decides whether it is good
        raise
    with response:
        if start and response.status != 206:
            start = 0  # the server ignored Range and sends the whole file: restart from zero
        total = _total_size(response, start)
        written = start
        with open(part, "ab" if start else "wb") as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"Downloading {part.name.removesuffix('.part')}", disable=not progress,
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written < total:
        # http.client returns b"" on a cut connection instead of raising, so check the count.
        raise ConnectionError(f"connection closed after {written} of {total} bytes")


def download_file(
    url: str,
    dest: Path,
    expected_sha256: str | None,
    progress: bool = True,
    timeout: float = 60,
    *,
    data_dir: Path | None = None,
) -> Path:
    """Download url to dest via dest.part (resumable), check its sha256, then rename it to dest.

    A cut or failed transfer keeps dest.part, so the next call resumes it. data_dir only serves
    the error message (where an extracted category folder would go).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch_to(url, part, progress, timeout)
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts and resets are OSErrors
        kept = f" The partial file {part} is kept; the next call resumes it." if part.exists() else ""
        raise DownloadError(
            f"Could not download {url}: {err}. The machine may be offline, or the host may have moved."
            f"{kept} {_manual_hint(dest, data_dir)}"
        ) from err
    if expected_sha256 is not None:
        actual = sha256_of(part)
        if actual != expected_sha256.lower():
            part.unlink()
            raise ValueError(
                f"Downloaded file {part} has sha256 {actual}, expected {expected_sha256}: it is corrupt "
                f"or {url} serves another file. It was deleted; call again to download it afresh. "
                f"{_manual_hint(dest, data_dir)}"
            )
    os.replace(part, dest)
    return dest


def _relative_name(name: str) -> str:
    """Member name without leading './' and without one top-level 'mvtec_anomaly_detection/' folder."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if name == _ARCHIVE_TOP_FOLDER or name.startswith(_ARCHIVE_TOP_FOLDER + "/"):
        name = name[len(_ARCHIVE_TOP_FOLDER) + 1:]
    return "" if name == "." else name


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse anything but plain files and folders with relative names inside the archive."""
    name = member.name
    problem = None
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        problem = "an absolute path"
    elif ".." in PurePosixPath(name.replace("\\", "/")).parts:
        problem = "a '..' component that points outside the destination"
    elif member.issym() or member.islnk():
        problem = f"a link (to '{member.linkname}')"
    elif not (member.isfile() or member.isdir()):
        problem = "a device, fifo or other special file"
    if problem:
        raise ValueError(
            f"Archive {archive} is unsafe: member '{member.name}' has {problem}. Nothing was extracted; "
            f"download the genuine archive from {MVTEC_PAGE_URL}."
        )


def extract_category(archive: Path, category: str, dest_root: Path, progress: bool = True) -> Path:
    """Extract only archive's category folder to dest_root/category, all or nothing.

    Members go to a temporary folder inside dest_root that is moved into place only when every
    member is out; on any failure it is removed, so no half category is left behind.
    """
    archive, dest_root = Path(archive), Path(dest_root)
    target = dest_root / category
    if target.exists():
        raise FileExistsError(f"{target} already exists; delete it to extract '{category}' again.")
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_root, prefix=".extract-"))
    found: set[str] = set()
    try:
        # One forward pass over the (xz-compressed) stream: extracting while iterating never seeks back.
        with tarfile.open(archive, "r:*") as tar:
            for member in tqdm(tar, desc=f"Extracting {category}", unit=" files", disable=not progress):
                _check_member(member, archive)
                name = _relative_name(member.name)
                parts = name.split("/")
                if name and (len(parts) > 1 or member.isdir()):
                    found.add(parts[0])
                if parts[0] != category:
                    continue
                try:
                    tar.extract(member.replace(name=name, deep=False), tmp, filter="data")
                except tarfile.FilterError as err:
                    raise ValueError(
                        f"Archive {archive} is unsafe: member '{member.name}' was refused ({err})."
                    ) from err
        if category not in found:
            raise ValueError(
                f"Category '{category}' is not in {archive}; it holds: {', '.join(sorted(found)) or 'none'}."
            )
        os.replace(tmp / category, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _present_subsets(data_dir: Path) -> str:
    """Sorted visible folder names in data_dir, or a phrase saying there are none."""
    if not data_dir.is_dir():
        return f"the folder {data_dir} does not exist"
    names = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return ", ".join(names) if names else f"{data_dir} has no subset folders"


def _show_license_once() -> None:
    """Tell the user, once per process, under which license MVTec AD is downloaded."""
    global _license_shown
    if not _license_shown:
        tqdm.write(f"Downloading MVTec AD. {MVTEC_LICENSE}", file=sys.stderr)
        _license_shown = True


def ensure_subset(
    data_dir: str | Path,
    subset_name: str,
    download: bool,
    url: str | None = None,
    expected_sha256: str | None = MVTEC_SHA256,
    archive_path: Path | None = None,
) -> Path:
    """Return data_dir/subset_name, extracting it from the MVTec AD archive (downloaded if allowed).

    The archive defaults to data_dir.parent / 'mvtec_anomaly_detection.tar.xz'; an archive already
    there is used without any download. expected_sha256=None skips the hash check (hand-made archives).
    MVTec AD is released under CC BY-NC-SA 4.0 (non-commercial use, attribution, share-alike);
    Copyright 2019 MVTec Software GmbH.
    """
    data_dir = Path(data_dir)
    subset_dir = data_dir / subset_name
    if subset_dir.is_dir():
        return subset_dir
    if subset_name == SYNTHETIC_SUBSET:
        raise ValueError(
            f"Subset '{SYNTHETIC_SUBSET}' is generated, not downloaded: create it with the synthetic generator."
        )
    if subset_name not in MVTEC_CATEGORIES:
        raise ValueError(
            f"Unknown subset '{subset_name}' in {data_dir} (present: {_present_subsets(data_dir)}). "
            f"subset_name is a folder in data_dir (your own data in the MVTec layout, or a category already "
            f"there), an MVTec AD category to download ({', '.join(MVTEC_CATEGORIES)}), or '{SYNTHETIC_SUBSET}'."
        )
    archive = Path(archive_path) if archive_path is not None else data_dir.parent / MVTEC_ARCHIVE_NAME
    if archive.is_file():
        if expected_sha256 is not None and (actual := sha256_of(archive)) != expected_sha256.lower():
            raise ValueError(
                f"Archive {archive} has sha256 {actual}, expected {expected_sha256}: it is corrupt or another "
                f"file. Delete it and call again with download=True, or replace it by the archive from "
                f"{MVTEC_PAGE_URL}."
            )
    elif not download:
        raise FileNotFoundError(
            f"MVTec AD subset '{subset_name}' is not in {data_dir} (present: {_present_subsets(data_dir)}) "
            f"and download=False. MVTec AD categories: {', '.join(MVTEC_CATEGORIES)}. "
            f"{_manual_hint(archive, data_dir, subset_name)} Or pass download=True."
        )
    else:
        _show_license_once()
        download_file(resolve_url(url), archive, expected_sha256, data_dir=data_dir)
    return extract_category(archive, subset_name, data_dir)
