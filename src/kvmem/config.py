"""Engine configuration: what a user sets on `LLM(...)` or the command line, validated once."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvmem.memory.registry import STRATEGY_NAMES as KV_CACHE_STRATEGIES  # noqa: E402  the one list
ATTENTION_BACKENDS = ("torch", "reference", "triton")
QUANTIZATIONS = ("none", "gguf", "auto", "int8")  # --quantization (vLLM's flag); see EngineConfig.quantization  # kvmem.attention.torch_attention.BACKENDS
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

# Default KV budget: this fraction of the memory available after the weights are loaded
# (vLLM's gpu_memory_utilization plays this role on GPUs). On a CPU the rest of RAM stays the OS's.
DEFAULT_KV_CACHE_FRACTION_CPU = 0.2
DEFAULT_KV_CACHE_FRACTION_CUDA = 0.9
# Prefix-cache tiers (kvmem.memory.tiers): the strategies they work with, and the disk tier's default size.
KV_OFFLOAD_STRATEGIES = ("paged", "virtual")
DEFAULT_KV_OFFLOAD_DISK_BYTES = 4 * 2**30

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


@dataclass
class EngineConfig:
    model: str | None = None  # Hub id (org/name[:QUANT]), HF directory or .gguf file; None = embedded SmolLM2
    dtype: str = "auto"
    kv_cache: str = "paged"
    kv_cache_memory: int | float | str | None = None  # bytes, "2GiB", or a fraction in (0, 1]
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    attention_backend: str = "torch"
    device: str | None = None  # "cpu" | "cuda"; None = cuda if available
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads (process-wide); None = torch's default
    # glibc keeps freed memory in the process instead of giving it back to the kernel at each step
    # (process-wide mallopt; see kvmem.engine.host_allocator). Off: the process's malloc is untouched.
    tune_host_allocator: bool = True
    # Greedy output independent of the rest of the batch (CPU linears: a lone row computed as a
    # GEMM row). Off: batch-1 decode a few % faster, and an answer may change with the load.
    batch_invariant: bool = True
    # Rows sharing a cached prefix read its KV once per group (kvmem.attention.cascade; the results
    # are the same bit for bit). vLLM's name; True: every row alone (for measuring).
    disable_cascade_attn: bool = False
    # kv_cache="virtual" only: vAttention's optimizations (see kvmem.memory.virtual.VirtualOptions)
    background_mapping: bool = True
    deferred_reclamation: bool = True
    eager_mapping: bool = True
    mapping_lookahead: int = 8  # tokens mapped ahead of what a step needs
    # kv_cache="hybrid" only (HybridServe; see kvmem.memory.hybrid)
    device_memory: int | float | str | None = None  # device tier + staging; None = kv_cache_memory's budget
    host_memory: int | float | str | None = None  # host tier (KV + activation blocks); None = 0.2 of free RAM
    act_ratio: float | None = None  # share of host-tier blocks kept as activations; None = the cost model's
    offload_weights: bool = False  # layer weights in host memory, streamed to the device layer by layer
    hybrid_profile: str | None = None  # hardware profile JSON for the cost model; None = measured when needed
    # vLLM's names for what a vLLM user sets (see ENGINE_FLAGS for what each means here)
    gpu_memory_utilization: float | None = None  # share of total memory for weights + KV; excludes kv_cache_memory
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 | fp8_e4m3 | fp8_e5m2 | int8 (kvmem.attention.kv_quant)
    tensor_parallel_size: int = 1  # ranks the model's heads and KV are split over (kvmem.distributed)
    chat_template: str | None = None  # a file path or an inline Jinja template; None = the model's own
    # Hugging Face Hub models (`model` = org/name or org/name:QUANT; see kvmem.models.hub)
    revision: str | None = None  # branch, tag or commit of a Hub model; None = main
    download_dir: str | None = None  # Hub cache directory; None = HF_HUB_CACHE / HF_HOME's
    gguf_file: str | None = None  # the .gguf file to read in a Hub repo or a directory
    # vLLM's --kv-events-config: JSON (or a dict) of kvmem.engine.kv_events.KVEventsConfig; None = no events
    kv_events_config: str | dict | None = None
    # Tensor parallelism over several machines (kvmem.distributed): where the ranks meet, how many
    # machines share the tensor_parallel_size ranks, and which one this is (0 runs the engine).
    distributed_init_method: str | None = None  # tcp://HOST:PORT; None = MASTER_ADDR/PORT, or a local port
    nnodes: int = 1
    node_rank: int = 0
    # vLLM's --quantization, for GGUF files: gguf keeps Q8_0/Q4/Q5/K-quant weights in their blocks (native
    # CPU kernels; other types dequantized at load), auto does so where it can (a GGUF on the CPU),
    # none dequantizes every weight at load (float32 greedy output identical to transformers').
    # int8 (a Hugging Face checkpoint): weight-only 8-bit quantization at load (kvmem.models.int8_weights).
    quantization: str = "none"
    # Prefix-cache tiers below the KV budget (kvmem.memory.tiers): evicted prefix blocks kept in host
    # memory and/or on disk and loaded back on a hit; the disk tier survives restarts.
    kv_offload_memory: int | float | str | None = None  # host tier: bytes, "2GiB" or a fraction of free RAM
    kv_offload_dir: str | None = None  # disk tier's directory (one subdirectory per model fingerprint)
    kv_offload_disk_bytes: int | str | None = None  # disk tier's size; None = DEFAULT_KV_OFFLOAD_DISK_BYTES

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHE_STRATEGIES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_STRATEGIES)}, got {self.kv_cache!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("background_mapping", "deferred_reclamation", "eager_mapping", "enable_prefix_caching",
                     "tune_host_allocator", "batch_invariant", "disable_cascade_attn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.mapping_lookahead, int) or isinstance(self.mapping_lookahead, bool) \
                or self.mapping_lookahead < 0:
            raise ValueError(f"mapping_lookahead must be an integer >= 0, got {self.mapping_lookahead!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.kv_cache_memory is not None:
            parse_memory_size(self.kv_cache_memory)  # validate early
        self._check_hybrid()
        self._check_model_source()
        self._check_vllm_options()
        self._check_quantization()
        if self.kv_events_config is not None:
            from kvmem.engine.kv_events import KVEventsConfig

            KVEventsConfig.parse(self.kv_events_config)  # validate early
        self._check_kv_offload()

    @property
    def offloads_kv(self) -> bool:
        """Whether prefix-cache tiers are on (kv_offload_memory or kv_offload_dir)."""
        return self.kv_offload_memory is not None or self.kv_offload_dir is not None

    def _check_kv_offload(self) -> None:
        if self.kv_offload_memory is not None:
            parse_memory_size(self.kv_offload_memory, "kv_offload_memory")
        if isinstance(self.kv_offload_dir, os.PathLike):
            self.kv_offload_dir = os.fspath(self.kv_offload_dir)
        if self.kv_offload_dir is not None:
            if not isinstance(self.kv_offload_dir, str) or not self.kv_offload_dir.strip():
                raise ValueError(f"kv_offload_dir must be a directory path, got {self.kv_offload_dir!r}")
            if os.path.exists(self.kv_offload_dir) and not os.path.isdir(self.kv_offload_dir):
                raise ValueError(f"kv_offload_dir {self.kv_offload_dir!r} exists and is not a directory")
        if self.kv_offload_disk_bytes is not None:
            if self.kv_offload_dir is None:
                raise ValueError("kv_offload_disk_bytes sizes the disk tier: give kv_offload_dir too")
            if isinstance(parse_memory_size(self.kv_offload_disk_bytes, "kv_offload_disk_bytes"), float):
                raise ValueError(f"kv_offload_disk_bytes must be bytes or a size like '20GiB', "
                                 f"got {self.kv_offload_disk_bytes!r}")
        if not self.offloads_kv:
            return
        flag = "kv_offload_memory" if self.kv_offload_memory is not None else "kv_offload_dir"
        if self.kv_cache not in KV_OFFLOAD_STRATEGIES:
            raise ValueError(f"{flag} (prefix-cache tiers) works with kv_cache {' or '.join(KV_OFFLOAD_STRATEGIES)}, "
                             f"not {self.kv_cache!r}")
        if not self.enable_prefix_caching:
            raise ValueError(f"{flag} keeps prefix-cache blocks: it needs enable_prefix_caching")
        if self.tensor_parallel_size > 1:
            raise ValueError(f"{flag} does not combine with tensor_parallel_size > 1 yet (each rank holds a "
                             "share of the heads); use tensor_parallel_size 1")

    def kv_offload_bytes(self) -> tuple[int, int]:
        """(host tier bytes, disk tier bytes); 0 = that tier off."""
        host = 0 if self.kv_offload_memory is None else resolve_memory_bytes(
            self.kv_offload_memory, torch.device("cpu"), 0, "kv_offload_memory")
        disk = 0 if self.kv_offload_dir is None else parse_memory_size(
            self.kv_offload_disk_bytes if self.kv_offload_disk_bytes is not None else DEFAULT_KV_OFFLOAD_DISK_BYTES,
            "kv_offload_disk_bytes")
        return host, disk

    def _check_vllm_options(self) -> None:
        u = self.gpu_memory_utilization
        if u is not None:
            if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
                raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {u!r}")
            self.gpu_memory_utilization = float(u)
            given = [n for n in ("kv_cache_memory", "device_memory") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"gpu_memory_utilization and {given[0]} both size the KV cache: set one")
        from kvmem.attention.kv_quant import check_kv_cache_dtype

        check_kv_cache_dtype(self.kv_cache_dtype)
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        self._check_tensor_parallel()
        if self.chat_template is not None:
            import jinja2

            from kvmem.chat_template import compile_chat_template

            try:  # a bad template fails now, not at the first chat
                compile_chat_template(self.chat_template_text())
            except jinja2.TemplateError as e:
                raise ValueError(f"chat_template is not a valid Jinja template: {e}") from e

    def _check_tensor_parallel(self) -> None:
        tp = self.tensor_parallel_size
        for name in ("nnodes", "node_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "nnodes" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'nnodes' else 0}, got {value!r}")
        if tp % self.nnodes:
            raise ValueError(f"tensor_parallel_size {tp} must be a multiple of nnodes ({self.nnodes}): "
                             "every node hosts as many ranks")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes), got {self.node_rank} with nnodes {self.nnodes}")
        if self.distributed_init_method is not None:
            from kvmem.distributed.group import parse_init_method

            parse_init_method(self.distributed_init_method)
        if tp > 1 and self.kv_cache == "hybrid":
            raise ValueError(f"tensor_parallel_size {tp} does not work with kv_cache='hybrid' (its host tier and "
                             "recompute run on one device); use paged, static or virtual, or tensor_parallel_size 1")

    def _check_quantization(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quantization in ("gguf", "int8"):
            q = self.quantization
            if self.device != "cpu":
                raise ValueError(f"quantization {q!r} runs on the CPU only (device is {self.device!r}); use "
                                 "quantization 'auto' or 'none' to dequantize the weights at load")
            if self.kv_cache == "hybrid":
                raise ValueError(f"quantization {q!r} does not combine with kv_cache='hybrid' yet (its K,V "
                                 "recomputation reads full-width weights); use quantization 'none'")
            if self.tensor_parallel_size > 1:
                raise ValueError(f"quantization {q!r} does not combine with tensor_parallel_size > 1 yet (the "
                                 "ranks slice full-width weights); use quantization 'none' or 'auto'")

    def keeps_quantized_weights(self) -> bool:
        """Whether GGUF blocks stay quantized in memory: gguf, or auto where the kernels run (CPU,
        not the hybrid cache)."""
        return self.quantization in ("gguf", "int8") or (self.quantization == "auto" and self.device == "cpu"
                                                and self.kv_cache != "hybrid" and self.tensor_parallel_size == 1)

    def chat_template_text(self) -> str | None:
        """`chat_template` as Jinja source: the file's content when it names a file, else the string
        itself when it looks like a template (vLLM's rule); None when not set."""
        value = self.chat_template
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"chat_template must be a file path or a Jinja template, got {value!r}")
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                return f.read()
        if any(c in value for c in "{}\n"):
            return value
        raise ValueError(f"chat_template {value!r} is neither a file nor a Jinja template")

    def resolve_kv_budget(self, device: torch.device, weight_bytes: int | Callable[[], int]) -> int:
        """The KV budget in bytes, once the weights (`weight_bytes`, or a function that counts them)
        are loaded: gpu_memory_utilization x total memory (device memory on CUDA, RAM on CPU) less
        the weights on the device, as vLLM means it; else `kv_budget_setting` (bytes, or a fraction
        of the memory free now)."""
        if self.gpu_memory_utilization is not None:
            from kvmem.progress import human_bytes

            total = total_memory_bytes(device)
            on_device = 0 if self.offload_weights else weight_bytes if isinstance(weight_bytes, int) else weight_bytes()
            budget = int(self.gpu_memory_utilization * total) - on_device
            if budget <= 0:
                raise ValueError(f"gpu_memory_utilization {self.gpu_memory_utilization:g} of {human_bytes(total)} "
                                 f"is {human_bytes(self.gpu_memory_utilization * total)}, and the weights take "
                                 f"{human_bytes(on_device)} of it: nothing is left for the KV cache (raise "
                                 "gpu_memory_utilization, or give kv_cache_memory instead)")
            return budget
        default = DEFAULT_KV_CACHE_FRACTION_CPU if device.type == "cpu" else DEFAULT_KV_CACHE_FRACTION_CUDA
        return resolve_memory_bytes(self.kv_budget_setting, device, default,
                                    "device_memory" if self.device_memory is not None else "kv_cache_memory")

    def _check_model_source(self) -> None:
        for name in ("revision", "download_dir", "gguf_file"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(self, name, value)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.revision is not None and any(c.isspace() for c in self.revision):
            raise ValueError(f"revision must be a branch, tag or commit name, got {self.revision!r}")
        if self.gguf_file is not None and not self.gguf_file.lower().endswith(".gguf"):
            raise ValueError(f"gguf_file must name a .gguf file, got {self.gguf_file!r}")
        if self.model is None:
            given = [n for n in ("revision", "gguf_file") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} need a model (a Hub id or a directory), "
                                 "not the embedded default")

    def _check_hybrid(self) -> None:
        for name in ("device_memory", "host_memory"):
            if getattr(self, name) is not None:
                parse_memory_size(getattr(self, name), name)
        if self.act_ratio is not None:
            r = self.act_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:  # NaN fails too
                raise ValueError(f"act_ratio must be a number in [0, 1] (or None: the cost model decides), got {r!r}")
            self.act_ratio = float(r)
        if not isinstance(self.offload_weights, bool):
            raise ValueError(f"offload_weights must be a bool, got {self.offload_weights!r}")
        if self.hybrid_profile is not None and not isinstance(self.hybrid_profile, str):
            raise ValueError(f"hybrid_profile must be a path to a profile JSON, got {self.hybrid_profile!r}")
        if self.kv_cache != "hybrid":
            given = [n for n in ("device_memory", "host_memory", "act_ratio", "hybrid_profile")
                     if getattr(self, n) is not None] + (["offload_weights"] if self.offload_weights else [])
            if given:
                raise ValueError(f"{', '.join(given)} apply to kv_cache='hybrid' only (kv_cache is {self.kv_cache!r})")
        elif self.device_memory is not None and self.kv_cache_memory is not None:
            raise ValueError("kv_cache='hybrid' takes device_memory (its device budget) or kv_cache_memory, not both")

    @property
    def kv_budget_setting(self) -> int | float | str | None:
        """The setting that sizes the KV budget on the device: `device_memory` for hybrid (its device
        tier and staging), `kv_cache_memory` otherwise (the two are never both set)."""
        return self.device_memory if self.device_memory is not None else self.kv_cache_memory

    def torch_dtype(self, checkpoint_dtype: str) -> torch.dtype:
        """`auto`: the checkpoint's dtype on CUDA; on CPU bfloat16 where the CPU computes it natively
        (AVX512-BF16 or AMX), else float32 (emulated bf16 GEMMs are slower than float32 ones)."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device != "cpu":
            return DTYPES.get(checkpoint_dtype, torch.bfloat16)
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass(frozen=True)
class EngineFlag:
    """How an `EngineConfig` field shows on the command line (kvmem.cli generates one flag per field):
    its help line, extra spellings (`aliases`, e.g. vLLM's or older kvmem ones; a boolean's
    `--no-x` aliases turn it off), the help group, and a metavar."""

    help: str
    aliases: tuple[str, ...] = ()
    group: str | None = None
    metavar: str | None = None


VIRTUAL_GROUP = "virtual KV cache (vAttention) optimizations, for measuring each"
HYBRID_GROUP = "hybrid KV cache (HybridServe): --kv-cache hybrid"
TP_GROUP = "tensor parallelism across machines: --tensor-parallel-size N over --nnodes M"
OFFLOAD_GROUP = "prefix-cache tiers below the KV budget (host memory, disk): --kv-offload-memory / --kv-offload-dir"

# One entry per EngineConfig field (tests/test_cli.py checks): a field without one has no help line.
ENGINE_FLAGS: dict[str, EngineFlag] = {
    "model": EngineFlag("Hub id (org/name, org/name:QUANT), HF directory or .gguf file "
                        "(default: embedded SmolLM2-135M-Instruct)"),
    "dtype": EngineFlag("auto | float32 | bfloat16 | float16 (auto: the checkpoint's on CUDA; on CPU bfloat16 "
                        "where the CPU computes it natively, else float32)"),
    "kv_cache": EngineFlag("KV-cache strategy"),
    "kv_cache_memory": EngineFlag("KV budget: bytes, a size like 2GiB, or a fraction of the memory free after the "
                                  "weights load (default: 0.2 on CPU, 0.9 on CUDA); --kv-cache-memory-bytes: vLLM's "
                                  "spelling", aliases=("--kv-cache-memory-bytes",), metavar="SIZE"),
    "block_size": EngineFlag("tokens per KV block (paged, prefix caching)"),
    "enable_prefix_caching": EngineFlag("reuse the KV of prompt prefixes already computed", aliases=(
        "--no-prefix-caching",)),
    "max_num_seqs": EngineFlag("most sequences in one step"),
    "max_num_batched_tokens": EngineFlag("most tokens in one step (prompt chunks + decodes)"),
    "max_model_len": EngineFlag("context length (prompt + output) of a request (default: the model's, capped by "
                                "the KV budget)"),
    "attention_backend": EngineFlag("torch: native CPU kernel / batched torch ops; reference: plain per-sequence "
                                    "math; triton: the Triton kernel for every row (CUDA)"),
    "device": EngineFlag("cpu | cuda | cuda:N (default: cuda when available)"),
    "seed": EngineFlag("seed of the engine's random generator (requests that set no seed of their own)"),
    "num_threads": EngineFlag("torch intra-op threads (process-wide; default: torch's)", aliases=("--threads",)),
    "tune_host_allocator": EngineFlag("keep freed memory in the process (glibc mallopt) instead of giving it back "
                                      "to the kernel at each step"),
    "batch_invariant": EngineFlag("greedy output independent of the rest of the batch; --no-batch-invariant: a few "
                                  "% more speed at batch 1"),
    "disable_cascade_attn": EngineFlag("read a shared prefix's KV once per row instead of once per group of rows "
                                       "that share it (cascade attention; same results, for measuring)"),
    "background_mapping": EngineFlag("map pages off the step's path (--no-background-mapping: on it)",
                                     group=VIRTUAL_GROUP),
    "deferred_reclamation": EngineFlag("keep a finished slot's pages for the next request "
                                       "(--no-deferred-reclamation: unmap them when it ends)", group=VIRTUAL_GROUP),
    "eager_mapping": EngineFlag("map a prompt whole (--no-eager-mapping: chunk by chunk)", group=VIRTUAL_GROUP),
    "mapping_lookahead": EngineFlag("tokens mapped ahead of need", group=VIRTUAL_GROUP),
    "device_memory": EngineFlag("device tier + staging buffers: bytes, a size like 64MiB, or a fraction of free "
                                "device memory (default: --kv-cache-memory's budget)", group=HYBRID_GROUP,
                                metavar="SIZE"),
    "host_memory": EngineFlag("host tier (KV + activation blocks): bytes, a size like 1GiB, or a fraction of free "
                              "host memory (default: 0.2)", group=HYBRID_GROUP, metavar="SIZE"),
    "act_ratio": EngineFlag("force this fraction (0-1) of host-tier blocks to hold activations (default: the cost "
                            "model decides; KV only for grouped-query models)", group=HYBRID_GROUP),
    "offload_weights": EngineFlag("keep layer weights in host memory and stream them to the device layer by layer",
                                  group=HYBRID_GROUP),
    "hybrid_profile": EngineFlag("hardware profile JSON for the cost model (kvmem bench hybrid --measure "
                                 "--save-profile FILE); default: measured at start-up when needed", group=HYBRID_GROUP),
    "revision": EngineFlag("branch, tag or commit of a Hub model (default: main)"),
    "download_dir": EngineFlag("where Hub models are downloaded (default: HF_HUB_CACHE / HF_HOME's cache)"),
    "gguf_file": EngineFlag("the .gguf file to read in a Hub repo or a directory"),
    "gpu_memory_utilization": EngineFlag("vLLM's: share (0-1] of all device memory (of RAM on CPU) for the weights "
                                         "+ the KV cache; KV budget = this x total - weights (instead of "
                                         "--kv-cache-memory)", metavar="F"),
    "kv_cache_dtype": EngineFlag("KV cache element type: auto (the model's dtype), fp8 (= fp8_e4m3), fp8_e5m2 "
                                 "(1 byte, per-tensor scale 1.0) or int8 (1 byte + a scale per token and head): "
                                 "about twice the tokens of bf16 in the same memory"),
    "tensor_parallel_size": EngineFlag("ranks (CPU core groups or GPUs) to split the model's heads, MLP and KV "
                                       "cache over (gloo on CPU, NCCL on CUDA)", aliases=("-tp",)),
    "chat_template": EngineFlag("chat template to use instead of the model's: a file path or an inline Jinja "
                                "string", metavar="FILE_OR_JINJA"),
    "kv_events_config": EngineFlag("vLLM's KV-cache events, as JSON: e.g. '{\"enable_kv_cache_events\": true, "
                                   "\"endpoint\": \"tcp://*:5557\"}' publishes BlockStored / BlockRemoved / "
                                   "AllBlocksCleared over ZMQ (fields: publisher zmq|null, endpoint, replay_endpoint, "
                                   "buffer_steps, hwm, max_queue_size, topic)", metavar="JSON"),
    "distributed_init_method": EngineFlag("tcp://HOST:PORT where the tensor-parallel ranks meet (node 0's "
                                          "address; default: MASTER_ADDR/MASTER_PORT, else a free local port)",
                                          group=TP_GROUP, metavar="URL"),
    "nnodes": EngineFlag("machines sharing the --tensor-parallel-size ranks", group=TP_GROUP),
    "node_rank": EngineFlag("this machine's index; 0 runs the engine and the server, the others only their "
                            "ranks (start them with the same flags)", group=TP_GROUP),
    "quantization": EngineFlag("none | gguf | auto (vLLM's flag). gguf: keep a GGUF's Q8_0/Q4/Q5/K-quant weights in "
                               "their blocks (native CPU kernels; memory about the file's size; other types "
                               "dequantized at load); auto: gguf where possible (a GGUF on the CPU), else none; "
                               "none (default): dequantize every weight at load; int8: quantize a Hugging Face "
                               "checkpoint's weights to 8 bits at load (Q8_0 blocks, about half of bfloat16)",
                               aliases=("-q",)),
    "kv_offload_memory": EngineFlag("host-memory tier for prefix blocks the KV budget evicts (LRU; pinned on CUDA): "
                                    "bytes, a size like 2GiB, or a fraction of free RAM; they are loaded back on a "
                                    "prefix hit instead of recomputed", group=OFFLOAD_GROUP, metavar="SIZE"),
    "kv_offload_dir": EngineFlag("disk tier for prefix blocks (what the host tier evicts, or the budget without a "
                                 "host tier): crash-safe files, kept across restarts for the same model, dtype "
                                 "and layout", group=OFFLOAD_GROUP, metavar="DIR"),
    "kv_offload_disk_bytes": EngineFlag("most bytes the disk tier keeps (LRU; default 4GiB)", group=OFFLOAD_GROUP,
                                        metavar="SIZE"),
}


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def parse_memory_size(value: int | float | str, name: str = "kv_cache_memory") -> int | float:
    """Bytes (int or "2GiB"/"512MB") -> int; a fraction in (0, 1] -> float. Errors name `name`."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be bytes, a size like '2GiB' or a fraction, got {value!r}")
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"{name} as a fraction must be in (0, 1], got {value}")
        return value
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            number = float(m.group(1))
            if not m.group(2) and number <= 1 and "." in m.group(1):
                return parse_memory_size(number, name)
            size = int(number * _SIZE_UNITS[m.group(2).lower()])
            if size > 0:
                return size
    raise ValueError(f"{name} must be bytes, a size like '2GiB' or a fraction in (0, 1], got {value!r}")


def resolve_memory_bytes(value: int | float | str | None, device: torch.device, default: int | float,
                         name: str = "kv_cache_memory") -> int:
    """A memory setting in bytes: bytes or a size string as given, a fraction of the memory
    `device` has available now; `default` (either kind) where `value` is None."""
    size = parse_memory_size(value, name) if value is not None else default
    return int(size * available_memory_bytes(device)) if isinstance(size, float) else size


def total_memory_bytes(device: torch.device) -> int:
    """All the memory of `device`: the device's on CUDA, MemTotal (RAM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return _meminfo_bytes("MemTotal", "SC_PHYS_PAGES")


def available_memory_bytes(device: torch.device) -> int:
    """Memory the KV cache could take now: free device memory on CUDA, MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _meminfo_bytes("MemAvailable", "SC_AVPHYS_PAGES")


def _meminfo_bytes(field: str, sysconf_pages: str) -> int:
    """A /proc/meminfo field in bytes, or sysconf's page count where there is no /proc."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf(sysconf_pages)
