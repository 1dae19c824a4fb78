"""pdagent's KV connector for vLLM (0.32): a prefill engine hands each layer's KV to its local
pdagent, which ships it to the decode host over QUIC with mutual TLS; the decode engine takes
the shipment from its own agent and copies it into the blocks vLLM allocated.

Loaded by vLLM through ``--kv-transfer-config`` (the ``vllm`` driver writes it)::

    {"kv_connector": "PdagentConnector", "kv_connector_module_path": "pdagent_vllm.connector",
     "kv_role": "kv_producer" | "kv_consumer", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"socket": "<data_dir>/kv.sock", "engine": "<id>",
                                   "fingerprint": "<model fingerprint, hex>"}}

The request flow (the agents drive it):

- prefill: the request comes with ``kv_transfer_params = {"do_remote_decode": true,
  "pdagent": {"shipment": "<16 hex>"}}`` and ``max_tokens`` 1. The scheduler part tells the
  worker part, step by step, which of the request's tokens were computed (chunked prefill:
  several steps; a local prefix-cache hit: handed out from the cache in the first step). The
  worker part, right after each attention layer wrote its KV (``save_kv_layer``), copies those
  tokens' K and V rows out of the paged cache and writes them to the agent's socket with their
  CRC-32; after the request's last step (``wait_for_save``) it says ``end``. The blocks are not
  held past the request: the bytes are the agent's once written. The answer's
  ``kv_transfer_params`` name the shipment, the prompt length and the prompt tokens' CRC-32.
- decode: the request comes with those ``kv_transfer_params``. The scheduler part checks the
  prompt (same length, same token ids by CRC: otherwise the engine computes it itself) and
  asks vLLM to load the prompt's KV asynchronously; the worker part asks its agent for the
  shipment on a thread of its own (the engine goes on with other requests meanwhile), checks
  every piece's CRC-32 and copies the rows into the request's blocks with vLLM's own cache
  writer. A failed shipment is reported as a load failure: vLLM recomputes the prompt
  (``kv_load_failure_policy: recompute``), so wrong KV never produces output.

The wire format of the agent's socket is in ``agent/src/kv/bridge.rs``. Rows travel as
pdagent's KV format: per layer, K then V, each ``[tokens, kv_heads, head_dim]``, in the
engine's KV dtype.

This version reads and writes vLLM's CPU attention cache (the ``vec``, ``vec16`` and ``amx``
layouts); on other devices it refuses to start, naming the alternative (NIXL).
"""

from __future__ import annotations

import json
import queue
import re
import socket
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.logger import init_logger
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.request import RequestStatus

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = init_logger("pdagent_vllm")

HEAD_BYTES_MAX = 64 << 10


def prompt_crc(token_ids) -> int:
    """CRC-32 of a prompt's token ids as little-endian u32."""
    ids = list(token_ids or [])
    return zlib.crc32(struct.pack(f"<{len(ids)}I", *ids)) & 0xFFFFFFFF


# ---------------------------------------------------------------- the agent's socket


# Bound on any one read or write on the agent's socket: an agent that stopped answering fails
# the shipment (the decode engine then computes the prompt) instead of holding the engine.
SOCKET_TIMEOUT_S = 60.0


class AgentLink:
    """One connection to the agent's KV socket (frames: u32 head length, JSON head, u64 body
    length, body)."""

    def __init__(self, path: str, hello: dict):
        self.path = path
        self.hello = hello
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(SOCKET_TIMEOUT_S)
            s.connect(self.path)
            self.sock = s
            self._send(self.hello, b"")
            head, _ = self._recv()
            if not head.get("ok"):
                self.close()
                raise RuntimeError(f"the agent refused this engine: {head.get('error')}")
        return self.sock

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _send(self, head: dict, body) -> None:
        h = json.dumps(head).encode()
        self.sock.sendall(struct.pack("<I", len(h)) + h + struct.pack("<Q", len(body)))
        if len(body):
            self.sock.sendall(body)

    def _exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError("the agent closed the KV socket")
            got += k
        return buf

    def _recv(self) -> tuple[dict, bytearray]:
        (hl,) = struct.unpack("<I", self._exact(4))
        if hl > HEAD_BYTES_MAX:
            raise ConnectionError(f"a frame head of {hl} bytes from the agent")
        head = json.loads(bytes(self._exact(hl)))
        (bl,) = struct.unpack("<Q", self._exact(8))
        return head, self._exact(bl)

    def send(self, head: dict, body=b"") -> None:
        """Sends a frame; on a broken connection, reconnects once."""
        try:
            self._connect()
            self._send(head, body)
        except OSError:
            self.close()
            self._connect()
            self._send(head, body)

    def request(self, head: dict) -> dict:
        """Sends a frame and reads the answer's head; on a broken connection (the agent
        restarted), reconnects once."""
        try:
            self._connect()
            self._send(head, b"")
        except OSError:
            self.close()
            self._connect()
            self._send(head, b"")
        return self._recv()[0]

    def recv(self) -> tuple[dict, bytearray]:
        return self._recv()


# ---------------------------------------------------------------- the paged cache, on CPU


def cpu_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


class CpuCache:
    """One layer's paged KV cache as vLLM's CPU attention backend keeps it: a [blocks, heads,
    block_size, 2 * head_size] view whose K and V halves are packed per ISA."""

    def __init__(self, kv: torch.Tensor, isa: str):
        if isa not in ("vec", "vec16", "amx"):
            raise RuntimeError(f"pdagent's KV connector does not know the CPU cache layout {isa!r}")
        self.kv = kv
        self.isa = isa
        b, h, n, c = kv.shape
        self.blocks, self.heads, self.block_size, self.head_size = b, h, n, c // 2
        self.kc, self.vc = kv.view(b, h, 2 * n, c // 2).chunk(2, dim=2)

    def _unpacked(self):
        b, h, n, hs = self.blocks, self.heads, self.block_size, self.head_size
        if self.isa == "amx":
            k = self.kc.reshape(b, h, n // 16, hs // 2, 16, 2).permute(0, 1, 2, 4, 3, 5)
            k = k.reshape(b, h, n, hs)
            v = self.vc.reshape(b, h, hs // 16, n // 2, 16, 2).permute(0, 1, 3, 5, 2, 4)
            v = v.reshape(b, h, n, hs)
        else:
            k = self.kc.reshape(b, h, hs, n).transpose(2, 3)
            v = self.vc.reshape(b, h, n, hs)
        return k, v

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the tokens at `slots`, each [tokens, heads, head_size], contiguous."""
        k, v = self._unpacked()
        blk, off = slots // self.block_size, slots % self.block_size
        return k[blk, :, off].contiguous(), v[blk, :, off].contiguous()

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        from vllm import _custom_ops as ops

        ops.cpu_attn_reshape_and_cache(k, v, self.kc, self.vc, slots, self.isa)


def slots_of(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    t = torch.arange(start, end, dtype=torch.int64)
    blocks = torch.tensor(block_ids, dtype=torch.int64)
    return blocks[t // block_size] * block_size + t % block_size


def as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def layer_index(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name) or re.search(r"(\d+)", name)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------- metadata


@dataclass
class Save:
    """Tokens [start, end) of a prefill's prompt to hand out in this step."""

    req_id: str
    shipment: str
    block_ids: list[int]
    start: int
    end: int
    prompt_tokens: int
    last: bool


@dataclass
class Load:
    """Tokens [start, prompt_tokens) of a decode's prompt to take from the agent."""

    req_id: str
    shipment: str
    block_ids: list[int]
    start: int
    prompt_tokens: int


@dataclass
class PdagentMetadata(KVConnectorMetadata):
    saves: list[Save] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)


# ---------------------------------------------------------------- the connector


class PdagentConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.socket_path = extra.get("socket") or ""
        self.engine = extra.get("engine", "vllm")
        self.fingerprint = extra.get("fingerprint", "0")
        self.producer = self._kv_transfer_config.is_kv_producer
        self.block_size = vllm_config.cache_config.block_size
        # Scheduler side.
        self._prefills: dict[str, "Request"] = {}
        self._blocks: dict[str, list[int]] = {}
        self._pending_loads: list[Load] = []
        # Worker side.
        self._layers: dict[str, tuple[int, CpuCache]] = {}
        self._sent: dict[str, int] = {}
        self._broken: set[str] = set()
        self._put: AgentLink | None = None
        self._loads: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._loader: threading.Thread | None = None
        self._rank, self._tp = 0, 1
        if role == KVConnectorRole.WORKER:
            from vllm.distributed import (
                get_tensor_model_parallel_rank,
                get_tensor_model_parallel_world_size,
            )

            self._rank = get_tensor_model_parallel_rank()
            self._tp = get_tensor_model_parallel_world_size()
            if not self.socket_path:
                raise RuntimeError("pdagent's KV connector needs kv_connector_extra_config.socket")

    # ------------------------------------------------------------ scheduler side

    @staticmethod
    def _ours(request: "Request") -> dict | None:
        p = request.kv_transfer_params
        if isinstance(p, dict) and isinstance(p.get("pdagent"), dict):
            return p
        return None

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int):
        p = self._ours(request)
        if self.producer or p is None or not p.get("do_remote_prefill"):
            return 0, False
        mine = p["pdagent"]
        prompt = request.prompt_token_ids or []
        if mine.get("tokens") != len(prompt) or mine.get("prompt_crc") != prompt_crc(prompt):
            # The shipment is of another prompt (another tokenization): compute it here.
            log.warning(
                "pdagent: shipment %s holds %s prompt tokens (crc %s), this request has %d (crc %d): computing the prompt here",
                mine.get("shipment"), mine.get("tokens"), mine.get("prompt_crc"), len(prompt), prompt_crc(prompt),
            )
            p["do_remote_prefill"] = False
            return 0, False
        n = len(prompt) - num_computed_tokens
        return (n, True) if n > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        p = self._ours(request)
        if p is None:
            return
        if self.producer:
            if p.get("do_remote_decode"):
                self._prefills[request.request_id] = request
            return
        if not p.get("do_remote_prefill"):
            return
        p["do_remote_prefill"] = False  # one shot: not again after a preemption
        if num_external_tokens <= 0:
            return
        ids = list(blocks.get_block_ids()[0])
        prompt = len(request.prompt_token_ids or [])
        start = prompt - num_external_tokens
        self._pending_loads.append(Load(request.request_id, p["pdagent"]["shipment"], ids, start, prompt))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = PdagentMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if not self.producer:
            return meta
        for r in scheduler_output.scheduled_new_reqs:
            req = self._prefills.get(r.req_id)
            if req is None:
                continue
            self._blocks[r.req_id] = list(r.block_ids[0])
            self._save(meta, req, r.num_computed_tokens, scheduler_output, first=True)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            req = self._prefills.get(rid)
            if req is None:
                continue
            new = cached.new_block_ids[i]
            resumed = rid in cached.resumed_req_ids
            if resumed:
                self._blocks[rid] = list(new[0])
            elif new:
                self._blocks[rid] += list(new[0])
            self._save(meta, req, cached.num_computed_tokens[i], scheduler_output, first=resumed)
        return meta

    def _save(self, meta: PdagentMetadata, req: "Request", computed: int, so, first: bool):
        prompt = req.num_prompt_tokens
        end = min(computed + so.num_scheduled_tokens.get(req.request_id, 0), prompt)
        # The first step also hands out what came from the local prefix cache.
        start = 0 if first else computed
        if start >= end:
            return
        meta.saves.append(
            Save(req.request_id, req.kv_transfer_params["pdagent"]["shipment"],
                 self._blocks[req.request_id], start, end, prompt, end >= prompt)
        )

    def request_finished(self, request: "Request", block_ids: list[int]):
        self._prefills.pop(request.request_id, None)
        self._blocks.pop(request.request_id, None)
        p = self._ours(request)
        if not self.producer or p is None or not p.get("do_remote_decode"):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None
        prompt = request.prompt_token_ids or []
        # The KV is the agent's once handed out: the blocks are freed now.
        return False, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "pdagent": {
                "shipment": p["pdagent"]["shipment"],
                "tokens": len(prompt),
                "prompt_crc": prompt_crc(prompt),
            },
        }

    # ------------------------------------------------------------ worker side

    def _hello(self) -> dict:
        name, (_, cache) = next(iter(self._layers.items()))
        return {
            "op": "hello",
            "engine": self.engine,
            "role": "prefill" if self.producer else "decode",
            "rank": self._rank,
            "tp": self._tp,
            "dtype": str(cache.kv.dtype),
            "layers": len(self._layers),
            "kv_heads": cache.heads,
            "head_dim": cache.head_size,
            "block_size": cache.block_size,
            "fingerprint": self.fingerprint,
        }

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        seen = set()
        ordered = sorted(kv_caches.items(), key=lambda kv: layer_index(kv[0]))
        index = 0
        for name, kv in ordered:
            if kv.device.type != "cpu":
                raise RuntimeError(
                    "pdagent's KV connector reads vLLM's CPU attention cache in this version; on "
                    f"{kv.device.type} hosts deploy with --kv-transport nixl"
                )
            if kv.data_ptr() in seen:  # a layer sharing another's cache
                continue
            seen.add(kv.data_ptr())
            b, h, n, c = kv.shape
            self._layers[name] = (index, CpuCache(kv, cpu_isa(kv.dtype, n, c // 2)))
            index += 1
        log.info("pdagent: %d KV layers, %s, rank %d of %d, agent socket %s",
                 len(self._layers), self._hello(), self._rank, self._tp, self.socket_path)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs):
        if not self.producer or layer_name not in self._layers:
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, PdagentMetadata) or not meta.saves:
            return
        index, cache = self._layers[layer_name]
        for s in meta.saves:
            if s.shipment in self._broken:
                continue
            try:
                slots = slots_of(s.block_ids, cache.block_size, s.start, s.end)
                k, v = cache.read(slots)
                kb, vb = as_bytes(k), as_bytes(v)
                crc = zlib.crc32(vb, zlib.crc32(kb)) & 0xFFFFFFFF
                head = {"op": "put", "shipment": s.shipment, "layer": index, "start": s.start,
                        "count": s.end - s.start, "tokens": s.prompt_tokens, "crc": crc}
                self._link().send(head, bytes(kb) + bytes(vb))
                self._sent[s.shipment] = self._sent.get(s.shipment, 0) + 1
            except Exception as e:  # never fail the engine's forward pass
                log.error("pdagent: handing KV of shipment %s to the agent failed: %s", s.shipment, e)
                self._broken.add(s.shipment)

    def wait_for_save(self):
        if not self.producer or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, PdagentMetadata):
            return
        for s in meta.saves:
            if not s.last:
                continue
            pieces = self._sent.pop(s.shipment, 0)
            try:
                if s.shipment in self._broken:
                    self._broken.discard(s.shipment)
                    self._link().send({"op": "abort", "shipment": s.shipment, "why": "the engine could not hand out its KV"})
                else:
                    self._link().send({"op": "end", "shipment": s.shipment, "pieces": pieces, "tokens": s.prompt_tokens})
            except Exception as e:
                log.error("pdagent: ending shipment %s failed: %s", s.shipment, e)

    def _link(self) -> AgentLink:
        if self._put is None:
            self._put = AgentLink(self.socket_path, self._hello())
        return self._put

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs):
        if self.producer or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, PdagentMetadata) or not meta.loads:
            return
        if self._loader is None:
            self._loader = threading.Thread(target=self._load_loop, name="pdagent-kv-load", daemon=True)
            self._loader.start()
        for load in meta.loads:
            self._loads.put(load)

    def _load_loop(self):
        link = AgentLink(self.socket_path, self._hello())
        while True:
            load: Load = self._loads.get()
            try:
                self._load(link, load)
                self._done.put((load.req_id, True))
            except Exception as e:
                log.warning("pdagent: KV of shipment %s not loaded (%s): the engine computes the prompt",
                            load.shipment, e)
                link.close()
                self._done.put((load.req_id, False))

    def _load(self, link: AgentLink, load: Load):
        head = link.request({"op": "get", "shipment": load.shipment, "tokens": load.prompt_tokens})
        if not head.get("ok"):
            raise RuntimeError(head.get("error", "refused"))
        by_index = {i: c for (i, c) in self._layers.values()}
        pieces = []
        for _ in range(int(head["pieces"])):
            ph, body = link.recv()
            if zlib.crc32(body) & 0xFFFFFFFF != ph["crc"]:
                raise RuntimeError(f"piece of layer {ph['layer']} failed its checksum")
            pieces.append((ph, body))
        # Checked whole before a byte is written into the engine's cache.
        for ph, body in pieces:
            cache = by_index.get(ph["layer"])
            if cache is None:
                raise RuntimeError(f"a piece for layer {ph['layer']} of {len(by_index)}")
            start, count = int(ph["start"]), int(ph["count"])
            lo, hi = max(start, load.start), min(start + count, load.prompt_tokens)
            if lo >= hi:
                continue
            rows = torch.frombuffer(body, dtype=cache.kv.dtype).view(2, count, cache.heads, cache.head_size)
            k = rows[0, lo - start:hi - start].contiguous()
            v = rows[1, lo - start:hi - start].contiguous()
            cache.write(slots_of(load.block_ids, cache.block_size, lo, hi), k, v)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        # A failed load is finished too, and named failed: vLLM then computes the whole prompt
        # (kv_load_failure_policy "recompute"), never decoding from KV it did not get.
        done, failed = set(), set()
        while True:
            try:
                rid, ok = self._done.get_nowait()
            except queue.Empty:
                break
            done.add(rid)
            if not ok:
                failed.add(rid)
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]):
        r = self.get_transfer_results(finished_req_ids)
        return None, r.finished_recving or None

    def shutdown(self):
        if self._put is not None:
            self._put.close()
