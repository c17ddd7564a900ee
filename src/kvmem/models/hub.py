"""Models by Hugging Face Hub id: `org/name` (safetensors) or `org/name:Q4_K_M` (one GGUF file).

Files go through `huggingface_hub` into its standard cache (`HF_HOME` / `HF_HUB_CACHE`, or
`download_dir`), with its own progress bars; a second load reads the cache, also offline
(`HF_HUB_OFFLINE=1`). `HF_TOKEN` reaches gated and private repos, `HF_ENDPOINT` a mirror.

Only what kvmem reads is downloaded: config.json, generation_config.json, the tokenizer files and
the safetensors weights (+ index); never `.bin`/`.pt`/`.onnx` weights or `original/`. In a GGUF repo,
one `.gguf` file: the one named by `gguf_file`, the one whose name carries the `:QUANT` label, or
the only one there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kvmem.progress import say

__all__ = ["HubRef", "cache_dir", "download", "parse_hub_id", "quant_label"]

# org/name[:QUANT], as the Hub spells repo ids (letters, digits, '-', '_', '.'; no '..').
_HUB_ID_RE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?::(?P<quant>[A-Za-z0-9][\w.-]*))?")
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")

# What a Hugging Face directory needs (see hf_loader / hf_tokenizer); weights are picked separately.
_HF_METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


class HubRef:
    """A parsed `org/name[:QUANT]`."""

    def __init__(self, repo_id: str, quant: str | None = None) -> None:
        self.repo_id = repo_id
        self.quant = quant

    def __repr__(self) -> str:
        return f"HubRef({self.repo_id!r}, {self.quant!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HubRef) and (self.repo_id, self.quant) == (other.repo_id, other.quant)


def parse_hub_id(model: str) -> HubRef | None:
    """`org/name` or `org/name:QUANT` -> HubRef; anything else (a path, a file name) -> None.

    The caller checks first that `model` is not an existing local path."""
    m = _HUB_ID_RE.fullmatch(model)
    if m is None:
        return None
    repo = m.group("repo")
    if ".." in repo or repo.endswith((".", "-")) or repo.lower().endswith((".gguf", ".safetensors", ".json")):
        return None
    return HubRef(repo, m.group("quant"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment now counts too.
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def cache_dir(download_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where Hub files go: `download_dir`, else `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    huggingface_hub's default (~/.cache/huggingface/hub). The environment is read now, not at import."""
    if download_dir is not None:
        return Path(download_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def quant_label(filename: str) -> str:
    """The quantization label in a GGUF file name: 'Llama-3.2-1B-Instruct-Q4_K_M.gguf' -> 'Q4_K_M'."""
    stem = _SHARD_RE.sub("", Path(filename).name.removesuffix(".gguf").removesuffix(".GGUF"))
    return re.split(r"[-.]", stem)[-1]


def _label_matches(label: str, filename: str) -> bool:
    # Case-insensitive, bounded: Q4_K does not match Q4_K_M, Q4_XS not IQ4_XS, F16 not BF16.
    name = Path(filename).name
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(label)}(?![A-Za-z0-9_])", name, re.IGNORECASE) is not None


def _gguf_set(filename: str) -> str:
    """A split GGUF's files ('x-00001-of-00003.gguf', ...) share one set name."""
    return _SHARD_RE.sub("", filename[: -len(".gguf")]) if filename.lower().endswith(".gguf") else filename


def _pick_gguf(repo_id: str, files: list[str], quant: str | None, gguf_file: str | None) -> str:
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if gguf_file is not None:
        if gguf_file in ggufs:
            return gguf_file
        by_name = [f for f in ggufs if Path(f).name == gguf_file]
        if len(by_name) == 1:
            return by_name[0]
        raise FileNotFoundError(f"{repo_id} has no file {gguf_file!r}; its .gguf files: "
                                f"{', '.join(ggufs) or 'none'}")
    # Projector files of vision models are GGUFs too, never the language model.
    candidates = [f for f in ggufs if not Path(f).name.lower().startswith("mmproj")]
    labels = sorted(dict.fromkeys(quant_label(f) for f in candidates), key=str.lower)
    if quant is not None:
        chosen = [f for f in candidates if _label_matches(quant, f)]
        if not chosen:
            raise ValueError(f"{repo_id} has no .gguf file labelled {quant!r}; available: "
                             f"{', '.join(labels) or 'none'} (pick one as {repo_id}:LABEL)")
    else:
        chosen = candidates
        if not chosen:
            raise ValueError(f"{repo_id}: no safetensors weights and no .gguf file in this repo; kvmem reads "
                             "safetensors (with config.json and tokenizer.json) or GGUF")
    sets = dict.fromkeys(_gguf_set(f) for f in chosen)
    if len(sets) > 1:
        what = f"{len(chosen)} .gguf files match {quant!r}" if quant else "the repo holds several .gguf files"
        raise ValueError(f"{repo_id}: {what}: {', '.join(chosen)}; name one with {repo_id}:LABEL "
                         f"(available: {', '.join(labels)}) or gguf_file=NAME")
    if len(chosen) > 1 or _SHARD_RE.search(chosen[0][: -len(".gguf")]):
        raise ValueError(f"{repo_id}: {chosen[0]} is a split GGUF ({len(chosen)} files here); kvmem reads a single "
                         "GGUF file: merge it with llama.cpp's `llama-gguf-split --merge`, or pick another quant")
    return chosen[0]


def _pick_hf_files(files: list[str]) -> list[str]:
    """config, tokenizer and safetensors weights at the repo's root (not original/, no .bin/.pt/.onnx)."""
    root = [f for f in files if "/" not in f]
    wanted = [f for f in _HF_METADATA_FILES if f in root]
    if "model.safetensors" in root:
        return [*wanted, "model.safetensors"]
    if "model.safetensors.index.json" in root:
        # The index names the shards; a repo may also hold a consolidated.safetensors nobody needs.
        shards = [f for f in root if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f)]
        return [*wanted, "model.safetensors.index.json", *(shards or [f for f in root if f.endswith(".safetensors")])]
    return [*wanted, *(f for f in root if f.endswith(".safetensors"))]


def _is_hf_repo(files: list[str]) -> bool:
    return any("/" not in f and f.endswith(".safetensors") for f in files)


def _how_to_get(repo_id: str, revision: str = "main") -> str:
    cmd = f"download {repo_id}" + (f" --revision {revision}" if revision != "main" else "")
    return (f"run once with network access, or `hf {cmd}` (huggingface-cli {cmd}), "
            "or pass a local model directory or .gguf file")


def _cached_snapshot(storage: Path, revision: str) -> Path | None:
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        sha = revision
    else:
        ref = storage / "refs" / revision
        if not ref.is_file():
            return None
        sha = ref.read_text(encoding="utf-8").strip()
    snapshot = storage / "snapshots" / sha
    return snapshot if snapshot.is_dir() else None


def _listing(snapshot: Path) -> list[str]:
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _hub_error(repo_id: str, revision: str, error: Exception) -> Exception | None:
    """A clear error for a repo the Hub refuses (gated, missing, private, bad revision); None otherwise."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, GatedRepoError):
        return ValueError(f"{repo_id} is a gated model: accept its terms on https://huggingface.co/{repo_id} and "
                          "set HF_TOKEN (or `hf auth login`) to a token of that account")
    if isinstance(error, RepositoryNotFoundError):
        token = " (HF_TOKEN is set: check it can read this repo)" if os.environ.get("HF_TOKEN") else \
            " (if it is private, set HF_TOKEN)"
        return ValueError(f"{repo_id}: no such model on the Hugging Face Hub{token}; check the id, or pass a "
                          "local model directory or .gguf file")
    if isinstance(error, RevisionNotFoundError):
        return ValueError(f"{repo_id}: no revision {revision!r} (a branch, tag or commit) on the Hugging Face Hub")
    if isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code in (401, 403):
        return ValueError(f"{repo_id}: the Hugging Face Hub refused access (HTTP {error.response.status_code}); "
                          "set HF_TOKEN to a token that can read this repo")
    return None


def download(ref: HubRef, *, revision: str | None = None, download_dir: str | os.PathLike[str] | None = None,
             gguf_file: str | None = None) -> Path:
    """The local path of a Hub model (a snapshot directory, or one .gguf file), downloaded if needed.

    Raises FileNotFoundError when it is neither cached nor downloadable (offline, no network),
    ValueError for a repo the Hub refuses or that holds nothing kvmem can read."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    repo_id, rev = ref.repo_id, revision or "main"
    cache = cache_dir(download_dir)
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    offline = _offline()
    want_gguf = ref.quant is not None or gguf_file is not None

    files: list[str] | None = None
    sha: str | None = None
    unreachable: Exception | None = None
    if not offline:
        try:
            # A timeout (huggingface_hub sets none here): a network that drops packets means "use the cache".
            info = HfApi().model_info(repo_id, revision=rev, timeout=constants.HF_HUB_ETAG_TIMEOUT)
            files = [s.rfilename for s in info.siblings or []]
            sha = info.sha
        except Exception as e:  # noqa: BLE001  refused repos raise below; anything else means "try the cache"
            clear = _hub_error(repo_id, rev, e)
            if clear is not None:
                raise clear from e
            unreachable = e

    if files is None:  # offline or no network: the cache alone
        snapshot = _cached_snapshot(storage, rev)
        files = _listing(snapshot) if snapshot is not None else []
        if not files:
            why = "downloads are off (HF_HUB_OFFLINE=1)" if offline else \
                f"the Hugging Face Hub cannot be reached ({type(unreachable).__name__}: {unreachable})"
            raise FileNotFoundError(f"{repo_id} (revision {rev}) is not in the Hugging Face cache {cache} and "
                                    f"{why}: {_how_to_get(repo_id, rev)}")
        assert snapshot is not None
        if want_gguf or not _is_hf_repo(files):
            path = snapshot / _pick_gguf(repo_id, files, ref.quant, gguf_file)
        else:
            missing = [f for f in ("config.json", "tokenizer.json") if f not in files]
            if missing:
                raise FileNotFoundError(f"the cached copy of {repo_id} ({snapshot}) lacks {', '.join(missing)} and "
                                        f"the Hub cannot be reached: {_how_to_get(repo_id, rev)}")
            path = snapshot
        say("using cached %s (%s, offline) from %s", repo_id, rev, cache)
        return path

    # Online: pick the files from the listing, fetch those not cached yet.
    if want_gguf or not _is_hf_repo(files):
        wanted = [_pick_gguf(repo_id, files, ref.quant, gguf_file)]
    else:
        wanted = _pick_hf_files(files)
        missing = [f for f in ("config.json", "tokenizer.json") if f not in wanted]
        if missing:
            raise ValueError(f"{repo_id}: no {' or '.join(missing)} in this repo; kvmem needs a Hugging Face model "
                             "with config.json, tokenizer.json and safetensors weights, or a GGUF file")
    snapshot_dir = storage / "snapshots" / (sha or "")
    if sha and all((snapshot_dir / f).is_file() for f in wanted):
        say("using cached %s (%s)", repo_id, rev)
    else:
        say("downloading %s (%s) into %s", repo_id, rev, cache)
    try:
        if len(wanted) == 1 and wanted[0].lower().endswith(".gguf"):
            return Path(hf_hub_download(repo_id, wanted[0], revision=rev, cache_dir=cache))
        return Path(snapshot_download(repo_id, revision=rev, cache_dir=cache, allow_patterns=wanted))
    except Exception as e:
        clear = _hub_error(repo_id, rev, e)
        if clear is not None:
            raise clear from e
        if isinstance(e, (FileNotFoundError, ValueError)):
            raise
        # FileNotFoundError, as for any model kvmem cannot get hold of (the commands report it plainly).
        raise FileNotFoundError(f"{repo_id}: download failed ({type(e).__name__}: {e}); "
                                f"{_how_to_get(repo_id, rev)}") from e
