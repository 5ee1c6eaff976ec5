"""Where benchmark files live, and how a missing one is fetched.

One data directory holds the LLM-Adapters files under their upstream relative paths
(``dataset/gsm8k/test.json``, ``ft-training_set/math_10k.json`` ...). It is, in order:
the ``--data-dir`` argument, ``$HARNESS_DATA_DIR``, or ``~/.cache/lora-harness/data``
(under ``$XDG_CACHE_HOME`` when set). A file missing there is downloaded from the
upstream repository's raw URL, written atomically and checked against the SHA256 the
benchmark's SHA256SUMS lists; without network the error says what to do. A file already there
is checked against the same list before use (once per process), so an edited or damaged copy
is refused instead of scored; ``$HARNESS_ALLOW_MODIFIED_DATA=1`` accepts it on purpose.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from harness.errors import UserError
from harness.fsutil import publish_mode

DATA_DIR_ENV = "HARNESS_DATA_DIR"
ALLOW_MODIFIED_ENV = "HARNESS_ALLOW_MODIFIED_DATA"
_verified: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) of a copy whose digest matched
UPSTREAM_RAW_URL = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/"

# SHA256SUMS of the LLM-Adapters snapshot (commit 8166572). The large training sets and HellaSwag
# were not in the checked snapshot: they download unverified, and the log says so.
SHA256 = {
    "dataset/AQuA/test.json": "de677f5f0139340009eb01f17c0db781b4161912cd1f4efa77292f2fcf3478ee",
    "dataset/ARC-Challenge/test.json": "4a89ce368ae01a71d268d9851686738b2a0a1d84271116bab49a1dd2b48ecad7",
    "dataset/ARC-Challenge/train.json": "a9debff28aafed86a08211dc3584a3b6cb38edca8c56bb34cd5002ed54aeebfb",
    "dataset/ARC-Easy/test.json": "3f32a84716ca6d57d38728bf80cc8117aecd17445c2cf29a68b571b810eb82dc",
    "dataset/ARC-Easy/train.json": "6a06cece3dec32f4fb1c1b0fc29dab14be7cf3053b417290dbc6cd845359f5ff",
    "dataset/AddSub/test.json": "62a8662b1ad40879953c4df0e61883a749d03aa3fc5e71f1cdb842b816e139ff",
    "dataset/MultiArith/test.json": "a40f426807c8a563802c2a5b66bda3bcd1eba9c099038fd1199f0dd57de5fd28",
    "dataset/SVAMP/test.json": "ffed015784f738f317c5603177861d044c4fc94e09211d78b25e96d46c656e2c",
    "dataset/SingleEq/test.json": "712b15edb851c97aab42a5de106d94008f94d917366c92537ed5400a8aacb207",
    "dataset/boolq/test.json": "89df2397cbca81dc31adcc6f7f5b635821aa0565aafde46725b2b4bd39b4dfa9",
    "dataset/boolq/train.json": "5ccbaceebaddc69765e1c4a363632196b81851d303696672165ab59ec4e48c83",
    "dataset/gsm8k/test.json": "2cc616a1e0b23ea1df29370476365cde71c4e0aa823fb06cc194c5a8a9381abe",
    "dataset/mawps/test.json": "c1a708979cbf2b3df9ac4020baacf3e8e73fcf089e1de7dd1b305b810bfaa15f",
    "dataset/mawps/trainset.json": "42e631004e46e71f5e050bfd6f0af2e27c9d76315cee66cc6412d66a19b47c1a",
    "dataset/mawps/validset.json": "ab20f1b6bd99e2307303a65898715628249896122d44c82971b4ea6e3e44622a",
    "dataset/openbookqa/test.json": "8479930f7b8a26052c78250280b5465a4016ca7fc806af440d0f37e243f3099e",
    "dataset/openbookqa/train.json": "a1e094eeea01f70c0baa880f37497b26700ae99b243927b9c529984de9b1fe90",
    "dataset/piqa/test.json": "3860d11b9b42e590b6b4bbc1643214d373ed0b0d4ac62fcc7bdceb8e044ad141",
    "dataset/social_i_qa/test.json": "71543f41127451945379d106ffedaef502f1c8770dff6d2f543aca85e3080b1d",
    "dataset/winogrande/test.json": "6946f5209e7114c65c6d04f8f644c5a061af20d730b1cfe158fff3dc44076fb9",
    "ft-training_set/math_data.json": "1d06633b4db748b7cfa38f2891f8d7b17b3636717b3188dd382045b94cf999a7",
}


def resolve_data_dir(cli_value: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else ``$HARNESS_DATA_DIR``, else the user cache folder."""
    if cli_value:
        return Path(cli_value).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora-harness" / "data"


def data_file(relative: str, data_dir: Path | None = None, download: bool = True) -> Path:
    """The local path of an upstream file (``dataset/gsm8k/test.json``), downloading it when missing."""
    root = resolve_data_dir(data_dir)
    path = root / relative
    if path.is_file():
        verify_local_file(relative, path)
        return path
    how = (f"put the LLM-Adapters file there, point --data-dir or ${DATA_DIR_ENV} at a folder that has it, "
           f"or allow network access to {UPSTREAM_RAW_URL}")
    if not download:
        raise UserError(f"data file {relative} not found in {root}: {how}")
    try:
        download_file(UPSTREAM_RAW_URL + relative, path, SHA256.get(relative))
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise UserError(f"data file {relative} not found in {root} and the download failed ({_reason(err)}): {how}") from err
    return path


def verify_local_file(relative: str, path: Path) -> None:
    """Refuse a local copy of a known upstream file whose SHA256 differs from the snapshot's.

    A benchmark file edited by hand or damaged on disk would otherwise be scored as if it were the
    benchmark. Files without a listed digest pass; a matching copy is not hashed again in this process
    unless its size or modification time changes.
    """
    expected = SHA256.get(relative)
    if not expected or os.environ.get(ALLOW_MODIFIED_ENV) == "1":
        return
    stat = path.stat()
    if _verified.get(path) == (stat.st_size, stat.st_mtime_ns):
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise UserError(f"data file {path} has SHA256 {digest.hexdigest()}, expected {expected} "
                        f"(the LLM-Adapters snapshot): restore the original file (delete it to download it again), "
                        f"or set {ALLOW_MODIFIED_ENV}=1 to evaluate the modified copy on purpose")
    _verified[path] = (stat.st_size, stat.st_mtime_ns)


def download_file(url: str, target: Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``target`` atomically (temporary file, then rename), verifying ``sha256`` when given."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HARNESS_OFFLINE") == "1":
        raise urllib.error.URLError("offline mode is set (HF_DATASETS_OFFLINE=1 or HARNESS_OFFLINE=1)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if sha256 and digest.hexdigest() != sha256:
            raise UserError(f"download of {url} has SHA256 {digest.hexdigest()}, expected {sha256}: "
                            "the upstream file changed; supply the expected file yourself")
        publish_mode(staging)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


def _reason(err: BaseException) -> str:
    return str(getattr(err, "reason", None) or err).splitlines()[0]
