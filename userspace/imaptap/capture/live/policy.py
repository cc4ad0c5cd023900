"""The per-flow payload policy, mirrored into the kernel's flow_modes map."""

from __future__ import annotations

import ctypes
import socket

from imaptap.capture.live.abi import ADDR_BYTES, KernelFlowKey
from imaptap.segment import DEFAULT_HANDSHAKE_SNAPLEN, FlowKey, PayloadMode, PayloadPolicy


def kernel_flow_key(key: FlowKey) -> KernelFlowKey:
    """Translate Python's `flow_key` (ordered by address text) into the kernel's canonical order
    (smaller port first; on equal ports the smaller address bytes)."""
    a, ap, b, bp = key
    family = socket.AF_INET6 if ":" in a else socket.AF_INET
    ab = socket.inet_pton(family, a).ljust(ADDR_BYTES, b"\0")
    bb = socket.inet_pton(family, b).ljust(ADDR_BYTES, b"\0")
    if (bp, bb) < (ap, ab):
        a, ap, ab, b, bp, bb = b, bp, bb, a, ap, ab
    k = KernelFlowKey()
    k.addr_a[:] = ab
    k.addr_b[:] = bb
    k.port_a = ap
    k.port_b = bp
    k.ip_version = 6 if family == socket.AF_INET6 else 4
    return k


class KernelPayloadPolicy(PayloadPolicy):
    """`PayloadPolicy` whose changes are written to the kernel's per-flow mode map.

    The kernel applies a mode from the next packet on; records already in the ring buffer were
    cut under the previous one.  Before the capture starts and after it ends only the Python
    side changes (flows are forgotten after detach when the CLI closes them).
    """

    def __init__(self, snaplen: int, taillen: int, handshake_snaplen: int = DEFAULT_HANDSHAKE_SNAPLEN) -> None:
        super().__init__(snaplen, taillen, handshake_snaplen)
        self._table = None
        self.kernel_errors = 0
        """Map updates the kernel refused (never expected; counted rather than raised)."""

    def bind(self, table) -> None:
        """Write every mode set so far to ``table`` (BCC's flow_modes), and each change from now on."""
        self._table = table
        for key, mode in self.modes.items():
            self._write(key, mode)

    def unbind(self) -> None:
        """Stop writing to the kernel: the map is about to be freed."""
        self._table = None

    def _write(self, key: FlowKey, mode: PayloadMode) -> None:
        if self._table is None:
            return
        try:
            k = kernel_flow_key(key)
            if mode is self.default:  # the kernel applies it to every flow its map does not name
                try:
                    del self._table[k]
                except KeyError:
                    pass
            else:
                self._table[k] = ctypes.c_uint8(int(mode))
        except Exception:  # bcc raises bare Exception
            self.kernel_errors += 1

    def set(self, key: FlowKey, mode: PayloadMode) -> None:
        super().set(key, mode)
        self._write(key, mode)

    def forget(self, key: FlowKey) -> None:
        super().forget(key)
        self._write(key, self.default)
