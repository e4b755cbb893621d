# Type stubs of the lookback package (docs/python.md). Arrays are NumPy
# ndarrays or CPU torch.Tensors; results follow q's kind (NumPy in, NumPy out;
# torch in, torch out).
from typing import Any, Callable, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np

__version__: str

Causal = Union[Literal["bottom-right", "top-left", "none"], bool]
Storage = Literal["f32", "bf16", "f16", "int8", "fp8e4m3", "fp8e5m2", "float32", "bfloat16",
                  "float16"]
Array = Any  # numpy.ndarray or torch.Tensor

def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: Causal = ...,
    window: Optional[int] = ...,
    softcap: float = ...,
    alibi_slopes: Optional[Array] = ...,
    scale: Optional[float] = ...,
    dtype: Storage = ...,
    sink_tokens: int = ...,
    sink_logits: Optional[Array] = ...,
    return_lse: bool = ...,
    threads: Optional[int] = ...,
    out: Optional[Array] = ...,
) -> Union[Array, Tuple[Array, Array]]: ...
def attention_varlen(
    q: Array,
    k: Array,
    v: Array,
    cu_seqlens_q: Union[Array, Sequence[int]],
    cu_seqlens_k: Union[Array, Sequence[int]],
    *,
    causal: Causal = ...,
    window: Optional[int] = ...,
    softcap: float = ...,
    alibi_slopes: Optional[Array] = ...,
    scale: Optional[float] = ...,
    dtype: Storage = ...,
    sink_tokens: int = ...,
    sink_logits: Optional[Array] = ...,
    return_lse: bool = ...,
    threads: Optional[int] = ...,
) -> Union[Array, Tuple[Array, Array]]: ...
def reference_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: Causal = ...,
    window: Optional[int] = ...,
    softcap: float = ...,
    alibi_slopes: Optional[Array] = ...,
    scale: Optional[float] = ...,
    sink_tokens: int = ...,
    sink_logits: Optional[Array] = ...,
    return_lse: bool = ...,
) -> Union[Array, Tuple[Array, Array]]: ...
def flash_attn_func(
    q: Array,
    k: Array,
    v: Array,
    dropout_p: float = ...,
    softmax_scale: Optional[float] = ...,
    causal: bool = ...,
    window_size: Tuple[int, int] = ...,
    softcap: float = ...,
    alibi_slopes: Optional[Array] = ...,
    deterministic: bool = ...,
    return_attn_probs: bool = ...,
) -> Union[Array, Tuple[Array, Array, None]]: ...
def flash_attn_varlen_func(
    q: Array,
    k: Array,
    v: Array,
    cu_seqlens_q: Array,
    cu_seqlens_k: Array,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = ...,
    softmax_scale: Optional[float] = ...,
    causal: bool = ...,
    window_size: Tuple[int, int] = ...,
    softcap: float = ...,
    alibi_slopes: Optional[Array] = ...,
    deterministic: bool = ...,
    return_attn_probs: bool = ...,
) -> Union[Array, Tuple[Array, Array, None]]: ...

class KVCache:
    def __init__(
        self, capacity: int, kv_heads: int, head_dim: int, dtype: Storage = ...,
        rope_theta: Optional[float] = ..., ring: bool = ..., ring_sink_tokens: int = ...,
    ) -> None: ...
    @classmethod
    def load(cls, path: str) -> KVCache: ...
    def append(self, k: Array, v: Array) -> None: ...
    def attend(
        self, q: Array, *, scale: Optional[float] = ..., softcap: float = ...,
        window: Optional[int] = ..., alibi_slopes: Optional[Array] = ...,
        sink_tokens: int = ..., sink_logits: Optional[Array] = ...,
        return_lse: bool = ..., threads: Optional[int] = ...,
    ) -> Union[Array, Tuple[Array, Array]]: ...
    def __len__(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def ring_sink_tokens(self) -> Optional[int]: ...
    @property
    def first_kept(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    def clear(self) -> None: ...
    def save(self, path: str) -> None: ...

class PagedKVPool:
    def __init__(
        self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
        dtype: Storage = ..., rope_theta: Optional[float] = ...,
    ) -> None: ...
    @classmethod
    def load(cls, path: str) -> PagedKVPool: ...
    def create(self) -> int: ...
    def fork(self, parent: int) -> int: ...
    def release(self, sequence: int) -> None: ...
    def append(self, sequence: int, k: Array, v: Array) -> None: ...
    def attend(
        self, sequence: int, q: Array, *, scale: Optional[float] = ..., softcap: float = ...,
        window: Optional[int] = ..., alibi_slopes: Optional[Array] = ...,
        sink_tokens: int = ..., sink_logits: Optional[Array] = ...,
        return_lse: bool = ..., threads: Optional[int] = ...,
    ) -> Union[Array, Tuple[Array, Array]]: ...
    def length(self, sequence: int) -> int: ...
    def block_table(self, sequence: int) -> List[int]: ...
    def sequences(self) -> List[int]: ...
    @property
    def free_blocks(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    def save(self, path: str) -> None: ...

class LeakReport:
    verdict: Literal["causal", "leak"]
    leaks: List[Tuple[int, int]]
    missing: List[Tuple[int, int]]
    dependency: np.ndarray
    per_batch_head: np.ndarray
    runs: int

def leakcheck(
    fn: Callable[[Array, Array, Array], Array],
    length: int,
    heads: int,
    kv_heads: int,
    dim: int,
    *,
    batch: int = ...,
    causal: Causal = ...,
    window: Optional[int] = ...,
    sink_tokens: int = ...,
    seed: int = ...,
    framework: Literal["numpy", "torch"] = ...,
) -> LeakReport: ...
def visible_mask(
    seqlen_q: int, seqlen_k: Optional[int] = ..., causal: Causal = ...,
    window: Optional[int] = ..., sink_tokens: int = ...,
) -> np.ndarray: ...
def merge_states(out_a: Array, lse_a: Array, out_b: Array, lse_b: Array) -> Tuple[Array, Array]: ...
def kernel_info() -> dict: ...
