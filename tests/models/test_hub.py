"""Models by Hub id (kvmem.models.hub), without the network: a Hub cache laid out as
`snapshot_download` writes it, and a local HTTP server answering the Hub's endpoints."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from gguf import GGMLQuantizationType as Q

from kvmem import LLM, SamplingParams
from kvmem.config import EngineConfig
from kvmem.models import hub
from kvmem.models.loader import load_model
from tests.conftest import write_gguf
from tests.models.test_gguf_loader import _arch_metadata, _gguf_tensors, _hf_tensors, _vocab
from tests.oracle import make_tiny_model

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("hub-src") / "tiny", "llama-mha")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    hf = _hf_tensors(_vocab(), bias=False, tie=False)
    path = tmp_path_factory.mktemp("hub-gguf") / "tiny.gguf"
    return write_gguf(path, metadata=_arch_metadata("llama"), tensors=_gguf_tensors(hf, True, Q.F32))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """HF_HOME / HF_HUB_CACHE under tmp_path (env and huggingface_hub's import-time constants)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    cache = home / "hub"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return cache


def _offline(monkeypatch, on: bool) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if on else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", on)


def lay_out(cache: Path, repo_id: str, files: dict[str, Path], sha: str = SHA, ref: str = "main") -> Path:
    """What snapshot_download leaves: blobs/<etag>, snapshots/<sha>/<name> -> ../../blobs/<etag>, refs/<ref>."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / sha
    for name, src in files.items():
        data = src.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(sha)
    return snapshot


def _model_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file()}


# ------------------------------------------------------------------ parsing and picking


def test_parse_hub_id():
    assert hub.parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct") == hub.HubRef("Qwen/Qwen2.5-0.5B-Instruct")
    assert hub.parse_hub_id("org/name-GGUF:Q4_K_M") == hub.HubRef("org/name-GGUF", "Q4_K_M")
    for not_an_id in ("./org/name", "/abs/path", "~/x/y", "a/b/c", "name", "models/tiny.gguf", "a/../b", ""):
        assert hub.parse_hub_id(not_an_id) is None, not_an_id


def test_pick_gguf_by_label():
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m.IQ4_XS.gguf", "m-f16.gguf", "m-bf16.gguf",
             "mmproj-m-f16.gguf"]
    assert hub._pick_gguf("o/m", files, "q4_k_m", None) == "m-Q4_K_M.gguf"
    assert hub._pick_gguf("o/m", files, "F16", None) == "m-f16.gguf"  # not bf16, not the projector
    assert hub._pick_gguf("o/m", files, "iq4_xs", None) == "m.IQ4_XS.gguf"
    assert hub._pick_gguf("o/m", files, None, "m-Q4_K_S.gguf") == "m-Q4_K_S.gguf"
    with pytest.raises(ValueError, match=r"no \.gguf file labelled 'Q5_K_M'; available: bf16, f16, IQ4_XS, "
                                         r"Q4_K_M, Q4_K_S"):
        hub._pick_gguf("o/m", files, "Q5_K_M", None)
    with pytest.raises(ValueError, match=r"several \.gguf files.*o/m:LABEL"):
        hub._pick_gguf("o/m", files, None, None)
    with pytest.raises(ValueError, match="2 .gguf files match 'Q4'"):
        hub._pick_gguf("o/m", ["a-Q4.gguf", "b-Q4.gguf"], "Q4", None)
    with pytest.raises(ValueError, match="split GGUF"):
        hub._pick_gguf("o/m", ["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"], "Q8_0", None)
    with pytest.raises(FileNotFoundError, match="no file 'x.gguf'"):
        hub._pick_gguf("o/m", files, None, "x.gguf")


def test_pick_hf_files_skips_other_formats():
    files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
             "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "consolidated.safetensors", "pytorch_model.bin", "model.onnx", "original/params.json",
             "original/consolidated.00.pth", "onnx/model.onnx"]
    assert hub._pick_hf_files(files) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_engine_config_hub_fields():
    c = EngineConfig(model="org/name", revision="v1", download_dir=Path("/tmp/x"), gguf_file="m-Q4_K_M.gguf")
    assert (c.revision, c.download_dir, c.gguf_file) == ("v1", "/tmp/x", "m-Q4_K_M.gguf")
    for bad in (dict(revision=""), dict(revision="a b"), dict(download_dir=3), dict(gguf_file="model.bin")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(model="org/name", **bad)
    with pytest.raises(ValueError, match="gguf_file need a model"):
        EngineConfig(gguf_file="m.gguf")


# ------------------------------------------------------------------ (1) a laid-out cache, offline


def test_llm_by_hub_id_from_the_cache_offline(hf_cache, tiny_dir, monkeypatch, caplog):
    _offline(monkeypatch, True)
    lay_out(hf_cache, "org/tiny", _model_files(tiny_dir))
    with caplog.at_level(logging.INFO, logger="kvmem.progress"):
        llm = LLM("org/tiny", dtype="float32", kv_cache_memory="8MiB", max_model_len=64)
    assert "using cached org/tiny (main, offline)" in caplog.text
    assert llm.engine.model_config.name == "org/tiny"
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, temperature=0),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    # The same model as the directory it came from.
    ref = LLM(str(tiny_dir), dtype="float32", kv_cache_memory="8MiB", max_model_len=64)
    again = ref.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, temperature=0),
                         use_tqdm=False)
    assert again[0].outputs[0].token_ids == out[0].outputs[0].token_ids


def test_revision_and_download_dir(tmp_path, hf_cache, tiny_dir, monkeypatch):
    _offline(monkeypatch, True)
    other = tmp_path / "elsewhere"
    sha = "f" * 40
    snapshot = lay_out(other, "org/tiny", _model_files(tiny_dir), sha=sha, ref="v2")
    source = load_model("org/tiny", revision="v2", download_dir=str(other))
    assert source.path == snapshot and source.config.name == "org/tiny"
    assert load_model("org/tiny", revision=sha, download_dir=other).path == snapshot
    with pytest.raises(FileNotFoundError, match=r"org/tiny \(revision main\) is not in the Hugging Face cache"):
        load_model("org/tiny", download_dir=str(other))


def test_local_path_wins_over_hub_id(tmp_path, tiny_dir, hf_cache, monkeypatch):
    _offline(monkeypatch, True)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "org" / "tiny")
    source = load_model("org/tiny")  # a relative path that exists: read as a path, no cache involved
    assert source.path == Path("org/tiny") and source.config.name == "tiny"


# ------------------------------------------------------------------ (3) org/name:QUANT among several GGUFs


def test_gguf_by_quant_label_from_the_cache(hf_cache, tiny_gguf, monkeypatch):
    _offline(monkeypatch, True)
    labels = ["Q4_K_M", "Q4_K_S", "Q8_0", "f16"]
    # Blobs are content-addressed: files with different content, as real quants are.
    variants = {}
    for i, label in enumerate(labels):
        p = tiny_gguf.parent / f"v{i}.gguf"
        if not p.exists():
            p.write_bytes(tiny_gguf.read_bytes() + b"\0" * (32 * i))  # padding after the tensor data
        variants[f"Tiny-{label}.gguf"] = p
    snapshot = lay_out(hf_cache, "org/tiny-GGUF", {**variants, "README.md": tiny_gguf.parent / "v0.gguf"})
    source = load_model("org/tiny-GGUF:q8_0")
    assert source.path == snapshot / "Tiny-Q8_0.gguf"
    assert source.config.name == "org/tiny-GGUF:q8_0" and source.config.vocab_size == _vocab()
    assert load_model("org/tiny-GGUF", gguf_file="Tiny-f16.gguf").path == snapshot / "Tiny-f16.gguf"
    with pytest.raises(ValueError, match=r"no \.gguf file labelled 'Q5_K_M'; available: f16, Q4_K_M, Q4_K_S, Q8_0"):
        load_model("org/tiny-GGUF:Q5_K_M")
    with pytest.raises(ValueError, match=r"several \.gguf files"):
        load_model("org/tiny-GGUF")


# ------------------------------------------------------------------ (4) offline and not cached


def test_offline_not_cached_is_a_clear_error(hf_cache, monkeypatch):
    _offline(monkeypatch, True)
    with pytest.raises(FileNotFoundError) as e:
        load_model("org/absent")
    message = str(e.value)
    assert "org/absent (revision main) is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download org/absent" in message and "local" in message
    with pytest.raises(FileNotFoundError, match="org/absent"):
        LLM("org/absent")


def test_missing_local_path_that_is_no_hub_id():
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_model("./no/such/dir")


# ------------------------------------------------------------------ (2) the real download path, a local Hub


class _Hub:
    """A minimal Hub at http://127.0.0.1:PORT: model info, tree listing, resolve (HEAD + GET)."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: tuple[str, ...] = ()) -> None:
        self.repos = repos
        self.gated = gated
        self.requests: list[tuple[str, str]] = []
        hub_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub_self.handle(self, head=True)

            def do_GET(self):
                hub_self.handle(self, head=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _send(h, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h, obj, head=False, status=200):
        self._send(h, status, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

    def handle(self, h, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
            if repo not in self.repos:
                return self._send(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
            if repo in self.gated:
                return self._send(h, 401, b'{"error":"gated"}', {"X-Error-Code": "GatedRepo"}, head)
            if rev not in ("main", SHA):
                return self._send(h, 404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, head)
            files = self.repos[repo]
            if kind == "revision":
                return self._json(h, {"id": repo, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}, head)
            if kind == "tree":
                return self._json(h, [{"type": "file", "path": f, "size": len(d),
                                       "oid": hashlib.sha1(d).hexdigest()} for f, d in files.items()], head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            data = self.repos.get(repo, {}).get(filename)
            if data is None or rev not in ("main", SHA):
                return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": SHA}, head)
            return self._send(h, 200, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": SHA,
                                             "Content-Type": "application/octet-stream"}, head)
        self._send(h, 404, b"", {}, head)


@pytest.fixture
def local_hub(monkeypatch, hf_cache):
    """Starts a _Hub given its repos; HF_ENDPOINT (env and the constants read at import) points to it."""
    from huggingface_hub import constants, file_download

    started = []

    def start(repos, **kwargs) -> _Hub:
        server = _Hub(repos, **kwargs).__enter__()
        started.append(server)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        if hasattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):
            monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        return server

    _offline(monkeypatch, False)
    yield start
    for server in started:
        server.__exit__()


def test_download_then_offline(local_hub, hf_cache, tiny_dir, monkeypatch, caplog):
    files = {name: p.read_bytes() for name, p in _model_files(tiny_dir).items()}
    files.update({"pytorch_model.bin": b"never fetched", "model.onnx": b"nor this", "original/params.json": b"{}"})
    server = local_hub({"org/tiny": files})
    with caplog.at_level(logging.INFO, logger="kvmem.progress"):
        source = load_model("org/tiny")
    assert f"downloading org/tiny (main) into {hf_cache}" in caplog.text
    snapshot = hf_cache / "models--org--tiny" / "snapshots" / SHA
    assert source.path == snapshot and source.config.name == "org/tiny"
    assert (hf_cache / "models--org--tiny" / "refs" / "main").read_text() == SHA
    fetched = {p.split("/resolve/")[1].split("/", 1)[1] for m, p in server.requests if "/resolve/" in p and m == "GET"}
    assert fetched == set(_model_files(tiny_dir))  # no .bin, .onnx, original/
    assert (snapshot / "model.safetensors").is_symlink()

    # Online again: nothing downloaded twice.
    caplog.clear()
    server.requests.clear()
    with caplog.at_level(logging.INFO, logger="kvmem.progress"):
        assert load_model("org/tiny").path == snapshot
    assert "using cached org/tiny (main)" in caplog.text
    assert not [r for r in server.requests if r[0] == "GET" and "/resolve/" in r[1]]

    # Offline, and the server gone: the cache alone.
    server.__exit__()
    _offline(monkeypatch, True)
    llm = LLM("org/tiny", dtype="float32", kv_cache_memory="8MiB", max_model_len=64)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_download_gguf_by_quant(local_hub, hf_cache, tiny_gguf):
    data = tiny_gguf.read_bytes()
    server = local_hub({"org/tiny-GGUF": {"tiny-Q4_K_M.gguf": data, "tiny-Q8_0.gguf": data + b"\0" * 32,
                                          "README.md": b"# tiny"}})
    source = load_model("org/tiny-GGUF:Q4_K_M")
    assert source.path == hf_cache / "models--org--tiny-GGUF" / "snapshots" / SHA / "tiny-Q4_K_M.gguf"
    gets = [p for m, p in server.requests if m == "GET" and "/resolve/" in p]
    assert [p.rsplit("/", 1)[1] for p in gets] == ["tiny-Q4_K_M.gguf"]


def test_no_network_and_not_cached(hf_cache, monkeypatch):
    from huggingface_hub import constants

    _offline(monkeypatch, False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(FileNotFoundError, match=r"org/tiny \(revision main\) is not in the Hugging Face cache .* "
                                                r"cannot be reached.*hf download org/tiny"):
        load_model("org/tiny")


def test_missing_and_gated_repos(local_hub):
    local_hub({"org/tiny": {"config.json": b"{}"}, "org/gated": {"config.json": b"{}"}}, gated=("org/gated",))
    with pytest.raises(ValueError, match="org/nothing: no such model on the Hugging Face Hub"):
        load_model("org/nothing")
    with pytest.raises(ValueError, match="org/gated is a gated model: accept its terms"):
        load_model("org/gated")
    with pytest.raises(ValueError, match="org/tiny: no revision 'v9'"):
        load_model("org/tiny", revision="v9")
    with pytest.raises(ValueError, match=r"org/tiny: no safetensors weights and no \.gguf file"):
        load_model("org/tiny")
